"""store.py against moto's standalone server over HTTP (the real DynamoDB wire protocol)."""

from __future__ import annotations

import boto3
import pytest

from gco_infra.endpoint import validate_all
from gco_infra.store import EndpointStore, StoreConfig, StoreError


def item(name, **extra):
    return {"endpoint_name": name, "desired_state": "running", "target_regions": ["us-east-1"],
            "spec": {"image": "org/server:1", "replicas": 2}, **extra}


def test_put_and_list_round_trip(store):
    store.put_desired(item("a"))
    store.put_desired(item("b", spec={"image": "x/y:1", "env": {"A": "1"}, "canary": {"image": "x/y:2", "weight": 10}}))
    items = store.list_endpoints()
    assert sorted(i["endpoint_name"] for i in items) == ["a", "b"]
    v = validate_all(items)
    assert set(v.endpoints) == {"a", "b"} and not v.invalid
    b = store.get("b")
    assert b["created_at"] and b["updated_at"] and b["created_by"] == "gco-infra"


def test_scan_over_one_megabyte_is_paginated_and_complete(store):
    blob = "x" * 9000  # ~9 KB per item: 200 items is ~1.8 MB, past one scan page
    with store._table.batch_writer() as w:
        for i in range(200):
            w.put_item(Item=item(f"ep-{i:03d}", spec={"image": "org/server:1", "env": {"PAD": blob}}))
    before = store.calls
    items = store.list_endpoints()
    assert len(items) == 200
    assert len({i["endpoint_name"] for i in items}) == 200
    assert store.calls - before >= 2, "expected more than one scan page"


def test_unreadable_table_raises_not_empty_list(moto_url):
    s = EndpointStore(StoreConfig(table="does-not-exist", region="us-east-1", endpoint_url=moto_url))
    with pytest.raises(StoreError, match="reading table does-not-exist failed"):
        s.list_endpoints()


def test_unreachable_endpoint_raises():
    s = EndpointStore(StoreConfig(table="t", region="us-east-1", endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StoreError):
        s.list_endpoints()


def test_region_status_write_is_conditional(store):
    store.put_desired(item("a"))
    first = {"state": "creating", "replicas_ready": 0, "replicas_desired": 2, "last_sync": "t1"}
    assert store.write_region_status("a", "us-east-1", first, expected=None)
    assert store.get("a")["region_status"]["us-east-1"]["state"] == "creating"
    # A second writer that read nothing loses: no lost update.
    assert not store.write_region_status("a", "us-east-1", {"state": "error"}, expected=None)
    second = dict(first, state="running", replicas_ready=2)
    assert store.write_region_status("a", "us-east-1", second, expected=first)
    assert not store.write_region_status("a", "us-east-1", {"state": "x"}, expected=first)  # stale
    assert store.write_region_status("a", "eu-west-1", {"state": "pending"}, expected=None)
    rs = store.get("a")["region_status"]
    assert rs["us-east-1"]["state"] == "running" and rs["eu-west-1"]["state"] == "pending"


def test_status_write_never_resurrects_a_purged_item(store):
    assert not store.write_region_status("gone", "us-east-1", {"state": "running"}, expected=None)
    assert not store.write_region_status("gone", "us-east-1", {"state": "running"}, expected=None, map_exists=False)
    assert store.get("gone") is None


def test_first_status_of_a_new_record_is_one_request_and_still_conditional(store):
    store.put_desired(item("a"))
    calls = store.calls
    assert store.write_region_status("a", "us-east-1", {"state": "creating"}, expected=None, map_exists=False)
    assert store.calls - calls == 1
    # Read as new, but another region's writer created the map meanwhile: its status stays.
    store.put_desired(item("b"))
    assert store.write_region_status("b", "eu-west-1", {"state": "pending"}, expected=None, map_exists=False)
    assert store.write_region_status("b", "us-east-1", {"state": "creating"}, expected=None, map_exists=False)
    assert store.get("b")["region_status"] == {"eu-west-1": {"state": "pending"}, "us-east-1": {"state": "creating"}}
    assert not store.write_region_status("b", "us-east-1", {"state": "error"}, expected=None, map_exists=False)


def test_desired_state_update_is_conditioned_on_current_value(store):
    store.put_desired(item("a", desired_state="deploying"))
    assert store.set_desired_state("a", "running", expected="deploying")
    assert not store.set_desired_state("a", "running", expected="deploying")
    assert store.get("a")["desired_state"] == "running"


def test_purge_is_conditional(store):
    store.put_desired(item("a", desired_state="deleted"))
    seen = store.get("a")
    store.put_desired(item("a", desired_state="deleted"))  # someone touched it: updated_at may differ
    current = store.get("a")
    if current["updated_at"] != seen["updated_at"]:
        assert not store.purge("a", expected_updated_at=seen["updated_at"])
    assert store.purge("a", expected_updated_at=current["updated_at"])
    assert store.get("a") is None
    store.put_desired(item("b"))
    assert not store.purge("b", expected_updated_at=store.get("b")["updated_at"])  # not deleted: kept


def test_put_desired_keeps_region_status(store):
    store.put_desired(item("a"))
    store.write_region_status("a", "us-east-1", {"state": "running"}, expected=None)
    store.put_desired(item("a", desired_state="stopped"))
    got = store.get("a")
    assert got["desired_state"] == "stopped" and got["region_status"]["us-east-1"]["state"] == "running"
