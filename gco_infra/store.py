"""The only module that talks to DynamoDB.

Reads are complete or fail: a scan that cannot reach its last page raises StoreError instead of
returning a shorter list, because the program deletes what the table forgets. Writes are
conditional: no lost updates, no resurrected items.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterator, Mapping

import boto3
from boto3.dynamodb.conditions import Attr
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

DEFAULT_TABLE = "gco-inference-endpoints"
MAX_PAGES = 100_000


class StoreError(RuntimeError):
    """The table could not be read or written completely; nothing should change."""


def utcnow() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class StoreConfig:
    table: str = DEFAULT_TABLE
    region: str | None = None
    endpoint_url: str | None = None
    """A local DynamoDB (moto server) URL; None means AWS."""

    @classmethod
    def from_env(cls, **overrides: Any) -> "StoreConfig":
        values = {
            "table": os.environ.get("GCO_TABLE", DEFAULT_TABLE),
            "region": os.environ.get("GCO_TABLE_REGION") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            "endpoint_url": os.environ.get("GCO_DYNAMODB_ENDPOINT") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _plain(value: Any) -> Any:
    """DynamoDB's Decimals and sets as plain JSON-able values (ints stay ints)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    return value


def _dynamo(value: Any) -> Any:
    """Plain values as DynamoDB accepts them (floats become Decimals)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return Decimal(str(value))
    if isinstance(value, Mapping):
        return {k: _dynamo(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dynamo(v) for v in value]
    return value


class EndpointStore:
    def __init__(self, config: StoreConfig, *, session: boto3.session.Session | None = None) -> None:
        self.config = config
        session = session or boto3.session.Session()
        self._client = session.client(
            "dynamodb", region_name=config.region or "us-east-1", endpoint_url=config.endpoint_url,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        )
        self._table = session.resource(
            "dynamodb", region_name=config.region or "us-east-1", endpoint_url=config.endpoint_url,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        ).Table(config.table)
        self.calls = 0
        """DynamoDB requests made, for benchmarks and tests."""

    # ---- reads ---------------------------------------------------------------------------------

    def _pages(self) -> Iterator[list[dict[str, Any]]]:
        start: dict[str, Any] | None = None
        for _ in range(MAX_PAGES):
            kwargs: dict[str, Any] = {"ConsistentRead": True}
            if start:
                kwargs["ExclusiveStartKey"] = start
            try:
                self.calls += 1
                page = self._table.scan(**kwargs)
            except (ClientError, BotoCoreError) as exc:
                raise StoreError(f"reading table {self.config.table} failed: {exc}") from exc
            yield page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return
        raise StoreError(f"reading table {self.config.table} did not finish after {MAX_PAGES} pages")

    def list_endpoints(self) -> list[dict[str, Any]]:
        """Every item, all pages, consistent reads; raises StoreError rather than return part."""
        items: list[dict[str, Any]] = []
        for page in self._pages():
            items.extend(page)
        return items

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            self.calls += 1
            return self._table.get_item(Key={"endpoint_name": name}, ConsistentRead=True).get("Item")
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f'reading endpoint "{name}" failed: {exc}') from exc

    # ---- conditional writes ------------------------------------------------------------------------

    def _update(self, **kwargs: Any) -> bool:
        try:
            self.calls += 1
            self._table.update_item(**kwargs)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise StoreError(f"writing table {self.config.table} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"writing table {self.config.table} failed: {exc}") from exc

    def write_region_status(self, name: str, region: str, status: Mapping[str, Any],
                            expected: Mapping[str, Any] | None) -> bool:
        """Replace ``region_status.<region>`` if it still equals ``expected`` (None: absent).

        Never creates an item: a purged endpoint stays purged. Returns False when the condition
        failed (someone else wrote first); the caller re-reads on its next tick.
        """
        key = {"endpoint_name": name}
        value = _dynamo(dict(status))
        names = {"#rs": "region_status", "#r": region}
        exists = Attr("endpoint_name").exists()
        if expected is None:
            ok = self._update(
                Key=key, UpdateExpression="SET #rs.#r = :s", ExpressionAttributeNames=names,
                ExpressionAttributeValues={":s": value},
                ConditionExpression="attribute_exists(endpoint_name) AND attribute_exists(#rs) AND attribute_not_exists(#rs.#r)",
            )
            if ok:
                return True
            # region_status itself may be missing: create the map, still never the item.
            return self._update(
                Key=key, UpdateExpression="SET #rs = :m", ExpressionAttributeNames={"#rs": "region_status"},
                ExpressionAttributeValues={":m": {region: value}},
                ConditionExpression=exists & Attr("region_status").not_exists(),
            )
        return self._update(
            Key=key, UpdateExpression="SET #rs.#r = :s", ExpressionAttributeNames=names,
            ExpressionAttributeValues={":s": value, ":e": _dynamo(dict(expected))},
            ConditionExpression="attribute_exists(endpoint_name) AND #rs.#r = :e",
        )

    def set_desired_state(self, name: str, new: str, *, expected: str) -> bool:
        """Change desired_state only if it is still ``expected`` (a concurrent stop or delete wins)."""
        return self._update(
            Key={"endpoint_name": name},
            UpdateExpression="SET desired_state = :n, updated_at = :t",
            ExpressionAttributeValues={":n": new, ":e": expected, ":t": utcnow()},
            ConditionExpression="attribute_exists(endpoint_name) AND desired_state = :e",
        )

    def purge(self, name: str, *, expected_updated_at: str | None) -> bool:
        """Delete a ``deleted`` endpoint whose record has not changed since it was read."""
        cond = Attr("endpoint_name").exists() & Attr("desired_state").eq("deleted")
        cond = cond & (Attr("updated_at").eq(expected_updated_at) if expected_updated_at
                       else Attr("updated_at").not_exists())
        try:
            self.calls += 1
            self._table.delete_item(Key={"endpoint_name": name}, ConditionExpression=cond)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise StoreError(f'purging endpoint "{name}" failed: {exc}') from exc

    def put_desired(self, item: Mapping[str, Any], *, created_by: str = "gco-infra") -> None:
        """Write an endpoint's desired state (as the platform's CLI does), keeping region_status."""
        name = item["endpoint_name"]
        now = utcnow()
        fields = {k: v for k, v in item.items() if k not in ("endpoint_name", "region_status", "created_at")}
        fields["updated_at"] = now
        sets = [f"#f{i} = :v{i}" for i in range(len(fields))]
        names = {f"#f{i}": k for i, k in enumerate(fields)}
        values = {f":v{i}": _dynamo(v) for i, v in enumerate(fields.values())}
        sets += ["created_at = if_not_exists(created_at, :now)", "created_by = if_not_exists(created_by, :by)"]
        values.update({":now": now, ":by": created_by})
        try:
            self.calls += 1
            self._table.update_item(Key={"endpoint_name": name}, UpdateExpression="SET " + ", ".join(sets),
                                    ExpressionAttributeNames=names, ExpressionAttributeValues=values)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f'writing endpoint "{name}" failed: {exc}') from exc

    # ---- table management (local environment, tests) ----------------------------------------

    def create_table(self) -> None:
        """Create the table with the platform's key schema if it does not exist."""
        try:
            self._client.create_table(
                TableName=self.config.table, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": "endpoint_name", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "endpoint_name", "KeyType": "HASH"}],
            )
            self._client.get_waiter("table_exists").wait(TableName=self.config.table,
                                                         WaiterConfig={"Delay": 1, "MaxAttempts": 30})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise StoreError(f"creating table {self.config.table} failed: {exc}") from exc


plain = _plain
