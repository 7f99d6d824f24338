"""TableCache against moto's server: the stream decides what is re-read, the result is always the table."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gco_infra.store import EndpointStore, StoreConfig, StoreError, TableCache

from ..moto_store import own_moto_store


def item(name, image="org/server:1"):
    return {"endpoint_name": name, "desired_state": "running", "target_regions": ["us-east-1"],
            "spec": {"image": image}}


def snapshot(items):
    return sorted(items, key=lambda i: i["endpoint_name"])


@pytest.fixture
def streamed(moto_url, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s = EndpointStore(StoreConfig(table=f"streamed-{uuid.uuid4().hex[:8]}", region="us-east-1", endpoint_url=moto_url))
    s.create_table(stream=True)
    return s


def test_no_writes_means_no_scan(streamed):
    for n in ("a", "b", "c"):
        streamed.put_desired(item(n))
    cache = TableCache(streamed)
    assert [i["endpoint_name"] for i in cache.read()] == ["a", "b", "c"]
    assert cache.scans == 1 and cache.last_read == "scan (first read)"
    generation, calls = cache.generation, streamed.calls
    assert [i["endpoint_name"] for i in cache.read()] == ["a", "b", "c"]
    assert cache.scans == 1 and cache.last_read == "stream, no writes"
    assert cache.generation == generation
    assert streamed.calls - calls == 2  # DescribeTable + one GetRecords for the one shard


def test_written_items_are_re_read_and_removed_items_dropped(streamed):
    for n in ("a", "b", "c"):
        streamed.put_desired(item(n))
    cache = TableCache(streamed)
    cache.read()
    streamed.put_desired(item("b", image="org/server:2"))
    streamed.put_desired(item("d"))
    streamed.write_region_status("c", "us-east-1", {"state": "running"}, expected=None)
    streamed._table.delete_item(Key={"endpoint_name": "a"})
    got = cache.read()
    assert cache.scans == 1 and cache.last_read == "stream, 4 re-read"
    assert snapshot(got) == snapshot(streamed.list_endpoints())
    assert {i["endpoint_name"]: i["spec"]["image"] for i in got} == {"b": "org/server:2", "c": "org/server:1", "d": "org/server:1"}
    assert next(i for i in got if i["endpoint_name"] == "c")["region_status"]["us-east-1"]["state"] == "running"


def test_many_writes_fall_back_to_a_scan(streamed):
    cache = TableCache(streamed, max_changed=5)
    cache.read()
    with streamed._table.batch_writer() as w:
        for i in range(12):
            w.put_item(Item=item(f"e{i}"))
    assert len(cache.read()) == 12
    assert cache.scans == 2 and cache.last_read == "scan (more than 5 items written)"
    cache.read()
    assert cache.last_read == "stream, no writes"


def test_table_without_stream_is_scanned_every_time(streamed):
    store = EndpointStore(replace(streamed.config, table=streamed.config.table + "-plain"))
    store.create_table(stream=False)
    store.put_desired(item("a"))
    cache = TableCache(store)
    cache.read()
    store.put_desired(item("a", image="org/server:2"))
    assert cache.read()[0]["spec"]["image"] == "org/server:2"
    assert cache.scans == 2 and cache.last_read == "scan (table has no stream)"


def test_disabled_stream_and_periodic_rescan(streamed):
    now = [0.0]
    cache = TableCache(streamed, rescan_every=60, clock=lambda: now[0])
    cache.read()
    now[0] = 61
    cache.read()
    assert cache.last_read == "scan (periodic)"
    streamed.put_desired(item("late"))
    streamed._client.update_table(TableName=streamed.config.table, StreamSpecification={"StreamEnabled": False})
    # (moto answers writes to a table whose stream was disabled with a server error, so none follow)
    assert [i["endpoint_name"] for i in cache.read()] == ["late"]
    assert cache.last_read == "scan (table stream changed)"
    cache.read()
    assert cache.last_read == "scan (table has no stream)" and cache.scans == 4


def test_a_broken_stream_position_falls_back_to_a_scan(streamed):
    cache = TableCache(streamed)
    cache.read()
    cache._positions = {shard: "not-an-iterator" for shard in cache._positions}
    streamed.put_desired(item("a"))
    assert [i["endpoint_name"] for i in cache.read()] == ["a"]
    assert cache.last_read.startswith("scan (stream read failed")


def test_unreachable_table_after_a_good_read_raises_not_stale_items(tmp_path):
    with own_moto_store(tmp_path, "t") as (s, _):
        s.put_desired(item("a"))
        cache = TableCache(s)
        assert len(cache.read()) == 1
    with pytest.raises(StoreError):
        cache.read()


NAMES = st.sampled_from([f"e{i}" for i in range(8)])
WRITES = st.lists(st.tuples(st.sampled_from(["put", "status", "delete"]), NAMES, st.integers(0, 3)), max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(WRITES, min_size=1, max_size=4))
def test_cache_always_equals_a_fresh_scan(streamed, rounds):
    cache = TableCache(streamed, max_changed=4)
    for writes in rounds:
        for op, name, n in writes:
            if op == "put":
                streamed.put_desired(item(name, image=f"org/server:{n}"))
            elif op == "status":
                current = streamed.get(name)
                if current is not None:
                    stored = (current.get("region_status") or {}).get("r")
                    streamed.write_region_status(name, "r", {"state": "running", "replicas_ready": n}, expected=stored)
            else:
                streamed._table.delete_item(Key={"endpoint_name": name})
        assert snapshot(cache.read()) == snapshot(streamed.list_endpoints()), cache.last_read


def test_a_failed_re_read_keeps_nothing_half_applied(streamed):
    streamed.put_desired(item("a"))
    cache = TableCache(streamed)
    cache.read()
    streamed.put_desired(item("a", image="org/server:2"))
    real = streamed.get_many
    streamed.get_many = lambda names: (_ for _ in ()).throw(StoreError("throttled"))
    with pytest.raises(StoreError):
        cache.read()
    streamed.get_many = real
    assert cache.read()[0]["spec"]["image"] == "org/server:2"  # the written key was not lost
    assert cache.last_read == "scan (the previous read failed)"


def test_stream_without_open_shards_is_not_trusted(streamed):
    streamed.open_shard_positions = lambda arn: None  # e.g. a shard rollover in progress
    cache = TableCache(streamed)
    cache.read()
    streamed.put_desired(item("a"))
    assert [i["endpoint_name"] for i in cache.read()] == ["a"]
    assert cache.last_read == "scan (table stream shards are changing)"
