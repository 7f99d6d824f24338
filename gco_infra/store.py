"""The only module that talks to DynamoDB.

Reads are complete or fail: a scan that cannot reach its last page raises StoreError instead of
returning a shorter list, because the program deletes what the table forgets. Writes are
conditional: no lost updates, no resurrected items. Every call is bounded in time (see StoreConfig):
a table that stops answering fails the operation within seconds rather than holding a tick.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Iterator, Mapping

import boto3
from boto3.dynamodb.conditions import Attr
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

DEFAULT_TABLE = "gco-inference-endpoints"
MAX_PAGES = 100_000
BATCH_GET = 100
MAX_UNPROCESSED_RETRIES = 8
_THROTTLE_BACKOFF = (1.0, 20.0)
"""botocore's standard retry mode: the n-th retry of a throttled request waits up to min(1 s * 2**n, 20 s)
(25 ms * 2**n for other errors from DynamoDB and its stream)."""


class StoreError(RuntimeError):
    """The table could not be read or written completely; nothing should change."""


class StreamError(StoreError):
    """The table's stream could not be read; the table itself may be fine (TableCache scans instead)."""


def utcnow() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _env_number(name: str, default: float, kind: type = float) -> Any:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {'whole number' if kind is int else 'number of seconds'}, "
                         f"got {raw!r}") from None


@dataclass(frozen=True)
class StoreConfig:
    """Where the table is and how long any call to it may take.

    The time bounds default to their environment variables (GCO_DYNAMODB_CONNECT_TIMEOUT,
    GCO_DYNAMODB_READ_TIMEOUT, GCO_DYNAMODB_MAX_ATTEMPTS, GCO_DYNAMODB_OPERATION_TIMEOUT), else to
    built-in values, so every store of a process (the runner's, the local environment's) honours the
    same overrides. See ``request_worst_case`` and ``operation_worst_case`` for what they add up to.
    """

    table: str = DEFAULT_TABLE
    region: str | None = None
    endpoint_url: str | None = None
    """A local DynamoDB (moto server) URL; None means AWS."""
    connect_timeout: float = field(default_factory=lambda: _env_number("GCO_DYNAMODB_CONNECT_TIMEOUT", 3.0))
    """Seconds to open a connection (per attempt)."""
    read_timeout: float = field(default_factory=lambda: _env_number("GCO_DYNAMODB_READ_TIMEOUT", 5.0))
    """Seconds to wait for the server on an open connection (per attempt)."""
    max_attempts: int = field(default_factory=lambda: _env_number("GCO_DYNAMODB_MAX_ATTEMPTS", 3, int))
    """Attempts per request, the first included (botocore's standard retry mode)."""
    operation_timeout: float = field(default_factory=lambda: _env_number("GCO_DYNAMODB_OPERATION_TIMEOUT", 60.0))
    """Seconds one logical operation (every page of a scan, every batch of a re-read) may keep
    starting requests; a request is not started after it."""

    def __post_init__(self) -> None:
        for name, env in (("connect_timeout", "GCO_DYNAMODB_CONNECT_TIMEOUT"), ("read_timeout", "GCO_DYNAMODB_READ_TIMEOUT"),
                          ("operation_timeout", "GCO_DYNAMODB_OPERATION_TIMEOUT")):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} ({env}) must be more than 0 seconds, got {getattr(self, name)!r}")
        if not (isinstance(self.max_attempts, int) and self.max_attempts >= 1):
            raise ValueError(f"max_attempts (GCO_DYNAMODB_MAX_ATTEMPTS) must be at least 1, got {self.max_attempts!r}")

    @property
    def request_worst_case(self) -> float:
        """Seconds one request can take when the server does not answer: every attempt's connect
        and read timeouts, plus the longest backoff between attempts (throttling's).

        Not covered: DNS resolution (no timeout in the resolver), a hostname whose addresses are
        tried one after another (a connect timeout each), and a server that trickles bytes (the read
        timeout is per socket read). Against a silent server or a closed port, this is the bound.
        """
        base, cap = _THROTTLE_BACKOFF
        backoff = sum(min(base * 2 ** n, cap) for n in range(self.max_attempts - 1))
        return self.max_attempts * (self.connect_timeout + self.read_timeout) + backoff

    @property
    def operation_worst_case(self) -> float:
        """Seconds one logical operation (a whole paginated scan, a batched re-read, a stream read)
        can take: the deadline, then at most one more request that was started just before it."""
        return self.operation_timeout + self.request_worst_case

    def client_config(self) -> Config:
        return Config(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                      retries={"total_max_attempts": self.max_attempts, "mode": "standard"})

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


def _no_answer(exc: Exception) -> bool:
    """The server did not answer: refused, unreachable, timed out, or the connection dropped."""
    return isinstance(exc, (BotoConnectionError, HTTPClientError))


class EndpointStore:
    """The table, through clients whose every request is bounded (StoreConfig).

    A request that gets no answer (connect or read timeout, refused, dropped) within its retry
    budget raises StoreError naming the endpoint. A read that takes several requests (a paginated
    scan, batched re-reads, stream pages) starts none after ``operation_timeout``, so any read takes
    at most ``config.operation_worst_case`` seconds; a write at most two requests'
    ``config.request_worst_case`` (write_region_status may need two conditional updates).
    """

    def __init__(self, config: StoreConfig, *, session: boto3.session.Session | None = None) -> None:
        self.config = config
        session = session or boto3.session.Session()
        self._session = session
        self._streams_client: Any = None
        self._client = session.client(
            "dynamodb", region_name=config.region or "us-east-1", endpoint_url=config.endpoint_url,
            config=config.client_config(),
        )
        self._table = session.resource(
            "dynamodb", region_name=config.region or "us-east-1", endpoint_url=config.endpoint_url,
            config=config.client_config(),
        ).Table(config.table)
        self.calls = 0
        """DynamoDB requests made, for benchmarks and tests."""

    @property
    def endpoint(self) -> str:
        """The URL the table's requests go to (AWS's regional endpoint when none is configured)."""
        return self._client.meta.endpoint_url

    def _request(self, what: str, call: Callable[..., Any], /, *, since: float | None = None,
                 stream: bool = False, conditional: bool = False, **kwargs: Any) -> Any:
        """One request of the operation ``what`` that began at ``since`` (time.monotonic(); None: now).

        Failures become StoreError (StreamError for the stream) saying what failed and, when the
        server did not answer, where. ``conditional``: a failed condition returns None instead.
        """
        error = StreamError if stream else StoreError
        where = self._streams.meta.endpoint_url if stream else self.endpoint
        cfg = self.config
        if since is not None and time.monotonic() - since > cfg.operation_timeout:
            raise error(f"{what} failed: DynamoDB at {where} did not answer within the {cfg.operation_timeout:g} s "
                        f"allowed for one operation (GCO_DYNAMODB_OPERATION_TIMEOUT)")
        self.calls += 1
        try:
            return call(**kwargs)
        except ClientError as exc:
            if conditional and exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return None
            raise error(f"{what} failed: {exc}") from exc
        except BotoCoreError as exc:
            if _no_answer(exc):
                raise error(f"{what} failed: DynamoDB at {where} did not answer ({cfg.max_attempts} attempts, "
                            f"connect timeout {cfg.connect_timeout:g} s, read timeout {cfg.read_timeout:g} s): {exc}") from exc
            raise error(f"{what} failed: {exc}") from exc

    # ---- reads ---------------------------------------------------------------------------------

    def _pages(self) -> Iterator[list[dict[str, Any]]]:
        what = f"reading table {self.config.table}"
        since = time.monotonic()
        start: dict[str, Any] | None = None
        for _ in range(MAX_PAGES):
            kwargs: dict[str, Any] = {"ConsistentRead": True}
            if start:
                kwargs["ExclusiveStartKey"] = start
            page = self._request(what, self._table.scan, since=since, **kwargs)
            yield page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return
        raise StoreError(f"reading table {self.config.table} did not finish after {MAX_PAGES} pages")

    def list_endpoints(self) -> list[dict[str, Any]]:
        """Every item, all pages, consistent reads; raises StoreError rather than return part.

        Takes at most ``config.operation_worst_case`` seconds, however many pages the table has.
        """
        items: list[dict[str, Any]] = []
        for page in self._pages():
            items.extend(page)
        return items

    def get(self, name: str) -> dict[str, Any] | None:
        return self._request(f'reading endpoint "{name}"', self._table.get_item,
                             Key={"endpoint_name": name}, ConsistentRead=True).get("Item")

    def get_many(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The items of ``names`` that exist, consistent reads, all of them or StoreError."""
        what = f"reading table {self.config.table}"
        since = time.monotonic()
        found: dict[str, dict[str, Any]] = {}
        client = self._table.meta.client  # the resource's client: Python values, as scans return
        for start in range(0, len(names), BATCH_GET):
            keys: dict[str, Any] = {self.config.table: {
                "Keys": [{"endpoint_name": n} for n in names[start:start + BATCH_GET]], "ConsistentRead": True}}
            for attempt in range(MAX_UNPROCESSED_RETRIES):
                out = self._request(what, client.batch_get_item, since=since, RequestItems=keys)
                for got in out.get("Responses", {}).get(self.config.table, []):
                    found[got["endpoint_name"]] = got
                keys = out.get("UnprocessedKeys") or {}
                if not keys:
                    break
                time.sleep(min(0.05 * 2 ** attempt, 2.0))
            else:
                raise StoreError(f"reading table {self.config.table}: keys still unprocessed after "
                                 f"{MAX_UNPROCESSED_RETRIES} attempts")
        return found

    # ---- change feed (DynamoDB Streams) -----------------------------------------------------------

    @property
    def _streams(self) -> Any:
        if self._streams_client is None:
            self._streams_client = self._session.client(
                "dynamodbstreams", region_name=self.config.region or "us-east-1", endpoint_url=self.config.endpoint_url,
                config=self.config.client_config())
        return self._streams_client

    def stream_arn(self) -> str | None:
        """The table's current stream, or None when it has none enabled."""
        table = self._request(f"describing table {self.config.table}", self._client.describe_table,
                              TableName=self.config.table)["Table"]
        if not (table.get("StreamSpecification") or {}).get("StreamEnabled"):
            return None
        return table.get("LatestStreamArn")

    def open_shard_positions(self, arn: str) -> dict[str, str] | None:
        """Shard id -> an iterator just past its newest record, for every open shard of the stream.

        None when the shard list cannot be trusted to cover every write from now on: no open shard,
        or a closed shard whose successor is not listed yet (a shard rollover in progress).
        StreamError when the stream cannot be read.
        """
        what = f"reading the stream of table {self.config.table}"
        since = time.monotonic()
        shards: list[dict[str, Any]] = []
        start: str | None = None
        for _ in range(MAX_PAGES):
            kwargs: dict[str, Any] = {"StreamArn": arn}
            if start:
                kwargs["ExclusiveStartShardId"] = start
            desc = self._request(what, self._streams.describe_stream, since=since, stream=True,
                                 **kwargs)["StreamDescription"]
            shards += desc.get("Shards", [])
            start = desc.get("LastEvaluatedShardId")
            if not start:
                break
        parents = {shard.get("ParentShardId") for shard in shards}
        closed = {sh["ShardId"] for sh in shards if "EndingSequenceNumber" in sh.get("SequenceNumberRange", {})}
        if len(closed) == len(shards) or any(c not in parents for c in closed):
            return None
        positions = {}
        for shard in shards:
            if shard["ShardId"] in closed:
                continue  # its records are older than the scan that follows
            positions[shard["ShardId"]] = self._request(
                what, self._streams.get_shard_iterator, since=since, stream=True,
                StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="LATEST")["ShardIterator"]
        return positions

    def changed_keys(self, iterator: str, limit: int) -> tuple[set[str], str | None, bool]:
        """Keys written since ``iterator``: (keys, next iterator or None if the shard closed, more left).

        Reads at most ``limit`` keys' worth of records; ``more left`` says the caller stopped early.
        StreamError when the stream cannot be read.
        """
        what = f"reading the stream of table {self.config.table}"
        since = time.monotonic()
        keys: set[str] = set()
        for _ in range(MAX_PAGES):
            out = self._request(what, self._streams.get_records, since=since, stream=True,
                                ShardIterator=iterator, Limit=1000)
            records = out.get("Records", [])
            for record in records:
                key = (record.get("dynamodb") or {}).get("Keys", {}).get("endpoint_name", {}).get("S")
                if key is not None:
                    keys.add(key)
            iterator = out.get("NextShardIterator")
            if not records or iterator is None:
                return keys, iterator, False
            if len(keys) > limit:
                return keys, iterator, True
        return keys, iterator, True

    # ---- conditional writes ------------------------------------------------------------------------

    def _update(self, **kwargs: Any) -> bool:
        return self._request(f"writing table {self.config.table}", self._table.update_item, conditional=True,
                             **kwargs) is not None

    def write_region_status(self, name: str, region: str, status: Mapping[str, Any],
                            expected: Mapping[str, Any] | None, *, map_exists: bool = True) -> bool:
        """Replace ``region_status.<region>`` if it still equals ``expected`` (None: absent).

        Never creates an item: a purged endpoint stays purged. Returns False when the condition
        failed (someone else wrote first); the caller re-reads on its next tick. ``map_exists``: whether
        the record as read had a ``region_status`` map (a new record has none); that write is tried
        first, and the other one only when its condition fails.
        """
        key = {"endpoint_name": name}
        value = _dynamo(dict(status))
        names = {"#rs": "region_status", "#r": region}
        exists = Attr("endpoint_name").exists()
        if expected is None:
            def in_map() -> bool:
                return self._update(
                    Key=key, UpdateExpression="SET #rs.#r = :s", ExpressionAttributeNames=names,
                    ExpressionAttributeValues={":s": value},
                    ConditionExpression="attribute_exists(endpoint_name) AND attribute_exists(#rs) "
                                        "AND attribute_not_exists(#rs.#r)",
                )

            def new_map() -> bool:  # region_status itself is missing: create the map, still never the item
                return self._update(
                    Key=key, UpdateExpression="SET #rs = :m", ExpressionAttributeNames={"#rs": "region_status"},
                    ExpressionAttributeValues={":m": {region: value}},
                    ConditionExpression=exists & Attr("region_status").not_exists(),
                )
            first, second = (in_map, new_map) if map_exists else (new_map, in_map)
            return first() or second()
        return self._update(
            Key=key, UpdateExpression="SET #rs.#r = :s", ExpressionAttributeNames=names,
            ExpressionAttributeValues={":s": value, ":e": _dynamo(dict(expected))},
            ConditionExpression="attribute_exists(endpoint_name) AND #rs.#r = :e",
        )

    def write_rollout(self, name: str, value: Mapping[str, Any], *, expected_seq: int | None,
                      force: bool = False) -> bool:
        """Replace the record's ``rollout`` if its ``seq`` is still ``expected_seq`` (None: there is none).

        Never creates an item. Two health jobs (or a job and a person's ``gco-infra rollout``) that
        read the same state cannot both move it on: the second write's condition fails. ``force``:
        whatever it holds (``gco-infra rollout abort --reset``, for a value nobody can read).
        """
        if force:
            return self._update(Key={"endpoint_name": name}, UpdateExpression="SET #ro = :v",
                                ExpressionAttributeNames={"#ro": "rollout"},
                                ExpressionAttributeValues={":v": _dynamo(dict(value))},
                                ConditionExpression="attribute_exists(endpoint_name)")
        if expected_seq is None:
            cond = "attribute_exists(endpoint_name) AND attribute_not_exists(#ro)"
            values = {":v": _dynamo(dict(value))}
        else:
            cond = "attribute_exists(endpoint_name) AND #ro.#seq = :e"
            values = {":v": _dynamo(dict(value)), ":e": expected_seq}
        names = {"#ro": "rollout"}
        if expected_seq is not None:
            names["#seq"] = "seq"
        return self._update(Key={"endpoint_name": name}, UpdateExpression="SET #ro = :v",
                            ExpressionAttributeNames=names, ExpressionAttributeValues=values,
                            ConditionExpression=cond)

    def clear_rollout(self, name: str, *, expected_seq: int | None = None) -> bool:
        """Remove the record's ``rollout``: if its ``seq`` is still ``expected_seq`` (the health job, for a
        record under no policy), or whatever it holds when None. Never creates an item; False when the
        condition failed or the endpoint does not exist."""
        names = {"#ro": "rollout"}
        cond = "attribute_exists(endpoint_name)"
        values = None
        if expected_seq is not None:
            names["#seq"] = "seq"
            cond += " AND #ro.#seq = :e"
            values = {":e": expected_seq}
        return self._update(Key={"endpoint_name": name}, UpdateExpression="REMOVE #ro",
                            ExpressionAttributeNames=names, ConditionExpression=cond,
                            **({"ExpressionAttributeValues": values} if values else {}))

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
        return self._request(f'purging endpoint "{name}"', self._table.delete_item, conditional=True,
                             Key={"endpoint_name": name}, ConditionExpression=cond) is not None

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
        self._request(f'writing endpoint "{name}"', self._table.update_item, Key={"endpoint_name": name},
                      UpdateExpression="SET " + ", ".join(sets), ExpressionAttributeNames=names,
                      ExpressionAttributeValues=values)

    # ---- table management (local environment, tests) ----------------------------------------

    def create_table(self, *, stream: bool = True) -> None:
        """Create the table with the platform's key schema if it does not exist.

        ``stream``: with a keys-only stream, which lets runners skip reading the whole table when
        nothing was written (see TableCache).
        """
        extra: dict[str, Any] = {}
        if stream:
            extra["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": "KEYS_ONLY"}
        what = f"creating table {self.config.table}"
        try:
            self._request(
                what, self._client.create_table,
                TableName=self.config.table, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": "endpoint_name", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "endpoint_name", "KeyType": "HASH"}], **extra,
            )
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") == "ResourceInUseException":
                return
            raise
        try:
            self._client.get_waiter("table_exists").wait(TableName=self.config.table,
                                                         WaiterConfig={"Delay": 1, "MaxAttempts": 30})
        except BotoCoreError as exc:
            raise StoreError(f"{what} failed: {exc}") from exc


def _error_text(exc: Exception) -> str:
    """A short reason for logs: the service's error code and message, or the exception's text."""
    if isinstance(exc, StreamError) and isinstance(exc.__cause__, ClientError):
        exc = exc.__cause__
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}"[:200]
    return f"{exc.__class__.__name__}: {exc}"[:200]


class TableCache:
    """Every item of the table, re-read only where the table's stream says something was written.

    A complete scan (``EndpointStore.list_endpoints``) is the source of truth. Before it, the cache
    takes a position just past the newest record of every open shard of the table's stream; each
    later ``read`` collects the keys written since (any writer, this runner's own status writes
    included) and re-reads just those items, consistently. Everything else falls back to a fresh
    complete scan: no stream on the table (or a different one than before), a shard that closed,
    an expired or trimmed iterator, any stream error, more than ``max_changed`` keys written, or
    ``rescan_every`` seconds since the last scan. A failed scan or re-read raises StoreError, as
    ``list_endpoints`` does; the cache never returns part of the table.
    """

    def __init__(self, store: EndpointStore, *, rescan_every: float = 300.0, max_changed: int = 100,
                 clock: Any = time.monotonic) -> None:
        self.store = store
        self.rescan_every = rescan_every
        self.max_changed = max_changed
        self.clock = clock
        self._items: dict[str, dict[str, Any]] | None = None
        self._arn: str | None = None
        self._positions: dict[str, str] = {}
        self._scanned_at = 0.0
        self._no_stream = "table has no stream"
        self._invalid = "first read"
        self.scans = 0
        self.generation = 0
        """Changes whenever the returned items may differ from the previous read's."""
        self.last_read = ""
        """How the last read was served: 'scan (<why>)', 'stream, no writes' or 'stream, N re-read'."""

    def read(self) -> list[dict[str, Any]]:
        why = self._why_rescan()
        if why is None:
            try:
                why = self._follow_stream()
            except StreamError as exc:
                why = f"stream read failed: {_error_text(exc)}"
            except StoreError:
                self.invalidate()  # the keys read from the stream are not applied: scan next time
                raise
        if why is not None:
            self._rescan(why)
        assert self._items is not None
        return [self._items[k] for k in sorted(self._items)]

    def absorb(self, fresh: Mapping[str, Mapping[str, Any] | None]) -> list[dict[str, Any]]:
        """Items the caller read itself with consistent reads (None: the item is gone) replace what the
        cache holds, and every item is returned. They are at least as new as the cache's copies: the
        stream's record of those writes, when it comes, makes the cache read them again anyway."""
        if self._items is None:
            raise StoreError("the table cache holds nothing to absorb into: read it first")
        for key, item in fresh.items():
            if item is None:
                self._items.pop(key, None)
            else:
                self._items[key] = dict(item)
        self.generation += 1
        return [self._items[k] for k in sorted(self._items)]

    def invalidate(self, why: str = "the previous read failed") -> None:
        """The next read scans the whole table."""
        self._items = None
        self._invalid = why

    def _why_rescan(self) -> str | None:
        if self._items is None:
            return self._invalid
        if self.clock() - self._scanned_at >= self.rescan_every:
            return "periodic"
        if self._arn is None:
            return self._no_stream
        if self.store.stream_arn() != self._arn:  # disabled, or re-enabled as a new stream
            return "table stream changed"
        return None

    def _follow_stream(self) -> str | None:
        assert self._items is not None
        keys: set[str] = set()
        positions = dict(self._positions)
        for shard, iterator in self._positions.items():
            got, following, more = self.store.changed_keys(iterator, self.max_changed - len(keys))
            keys |= got
            if following is None:
                return "a stream shard closed"
            positions[shard] = following
            if more or len(keys) > self.max_changed:
                return f"more than {self.max_changed} items written"
        # the new positions hold only once the written items are re-read (a failure keeps the old)
        if keys:
            found = self.store.get_many(sorted(keys))
            self.generation += 1
            for key in keys:
                if key in found:
                    self._items[key] = found[key]
                else:
                    self._items.pop(key, None)
            self.last_read = f"stream, {len(keys)} re-read"
        else:
            self.last_read = "stream, no writes"
        self._positions = positions
        return None

    def _rescan(self, why: str) -> None:
        self._items = None
        arn = self.store.stream_arn()
        positions: dict[str, str] | None = None
        self._no_stream = "table has no stream"
        if arn is not None:
            try:
                positions = self.store.open_shard_positions(arn)
                self._no_stream = "table stream shards are changing"  # when positions is None
            except StreamError as exc:
                self._no_stream = f"table stream unreadable: {_error_text(exc)}"
        if positions is None:
            arn = None  # scan every tick until the stream can be followed again
        started = self.clock()
        items = self.store.list_endpoints()  # StoreError propagates: nothing cached, nothing returned
        self._items = {i["endpoint_name"]: i for i in items}  # the table's key: every item has one
        self._arn, self._positions, self._scanned_at = arn, positions or {}, started
        self._invalid = "first read"
        self.scans += 1
        self.generation += 1
        self.last_read = f"scan ({why})"


plain = _plain
