"""Every table call is bounded: a DynamoDB that stops answering fails a read within seconds, not minutes.

The servers here are real sockets on 127.0.0.1: one that accepts connections and never answers,
a closed port, and one that answers every scan with "more pages" so a scan never ends by itself.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import boto3
import pytest

from gco_infra.localenv import free_port
from gco_infra.store import EndpointStore, StoreConfig, StoreError

FAST = dict(connect_timeout=0.5, read_timeout=0.5, max_attempts=2, operation_timeout=1.5)


def session() -> boto3.session.Session:
    return boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")


class SilentServer:
    """Accepts every connection and never sends a byte; counts the connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)  # held open, never answered

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_config_bounds_every_request_and_reads_env(monkeypatch):
    monkeypatch.setenv("GCO_DYNAMODB_CONNECT_TIMEOUT", "1.5")
    monkeypatch.setenv("GCO_DYNAMODB_READ_TIMEOUT", "2")
    monkeypatch.setenv("GCO_DYNAMODB_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("GCO_DYNAMODB_OPERATION_TIMEOUT", "9")
    c = StoreConfig.from_env()
    assert (c.connect_timeout, c.read_timeout, c.max_attempts, c.operation_timeout) == (1.5, 2.0, 4, 9.0)
    # 4 attempts of (connect + read), plus at most 1 + 2 + 4 s of throttling backoff between them
    assert c.request_worst_case == pytest.approx(4 * 3.5 + 7)
    assert c.operation_worst_case == pytest.approx(9 + c.request_worst_case)
    store = EndpointStore(c, session=session())
    for client in (store._client, store._table.meta.client, store._streams):
        cfg = client.meta.config
        assert (cfg.connect_timeout, cfg.read_timeout) == (1.5, 2.0)
        assert cfg.retries == {"total_max_attempts": 4, "mode": "standard"}


def test_defaults_fail_within_seconds():
    c = StoreConfig()
    assert c.connect_timeout <= 5 and c.read_timeout <= 10 and c.max_attempts <= 3
    assert c.request_worst_case < 60


@pytest.mark.parametrize("name, value", [("GCO_DYNAMODB_READ_TIMEOUT", "soon"), ("GCO_DYNAMODB_MAX_ATTEMPTS", "0"),
                                         ("GCO_DYNAMODB_CONNECT_TIMEOUT", "-1")])
def test_bad_env_values_are_refused_by_name(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        StoreConfig.from_env()


def test_silent_endpoint_fails_closed_within_the_configured_bound(silent):
    url = f"http://127.0.0.1:{silent.port}"
    config = StoreConfig(table="t", region="us-east-1", endpoint_url=url, **FAST)
    store = EndpointStore(config, session=session())
    started = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.list_endpoints()
    elapsed = time.monotonic() - started
    assert elapsed < 3 * config.request_worst_case, elapsed
    assert elapsed >= config.read_timeout  # it waited for the answer, then gave up
    assert url in str(err.value) and "did not answer" in str(err.value)
    assert len(silent.accepted) == config.max_attempts  # the retry budget, no more


@pytest.mark.parametrize("call", ["list_endpoints", "get", "get_many", "stream_arn", "put_desired", "write_region_status"])
def test_every_table_call_is_bounded(silent, call):
    url = f"http://127.0.0.1:{silent.port}"
    config = StoreConfig(table="t", region="us-east-1", endpoint_url=url, **FAST)
    store = EndpointStore(config, session=session())
    args = {"list_endpoints": (), "get": ("a",), "get_many": (["a", "b"],), "stream_arn": (),
            "put_desired": ({"endpoint_name": "a", "desired_state": "running"},),
            "write_region_status": ("a", "r", {"state": "running"}, None)}[call]
    started = time.monotonic()
    with pytest.raises(StoreError, match="did not answer"):
        getattr(store, call)(*args)
    # write_region_status may make two conditional requests (item map, then region entry)
    assert time.monotonic() - started < 3 * 2 * config.request_worst_case


def test_silent_stream_endpoint_is_bounded_too(silent):
    url = f"http://127.0.0.1:{silent.port}"
    config = StoreConfig(table="t", region="us-east-1", endpoint_url=url, **FAST)
    store = EndpointStore(config, session=session())
    started = time.monotonic()
    with pytest.raises(StoreError, match="did not answer"):
        store.changed_keys("iterator", 10)
    with pytest.raises(StoreError, match="did not answer"):
        store.open_shard_positions("arn:aws:dynamodb:us-east-1:1:table/t/stream/x")
    assert time.monotonic() - started < 3 * 2 * config.request_worst_case


def test_closed_port_fails_closed_and_names_the_endpoint():
    port = free_port()  # nothing listens here
    url = f"http://127.0.0.1:{port}"
    config = StoreConfig(table="t", region="us-east-1", endpoint_url=url, **FAST)
    store = EndpointStore(config, session=session())
    started = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.list_endpoints()
    assert time.monotonic() - started < 3 * config.request_worst_case
    assert url in str(err.value) and "did not answer" in str(err.value)


class EndlessScan(BaseHTTPRequestHandler):
    """Every Scan answers with no items and one more page to read, a little slowly."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(0.05)
        body = json.dumps({"Items": [], "Count": 0, "ScannedCount": 0,
                           "LastEvaluatedKey": {"endpoint_name": {"S": "next"}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_scan_that_never_ends_stops_at_the_operation_deadline():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EndlessScan)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        config = StoreConfig(table="t", region="us-east-1", endpoint_url=url, **FAST)
        store = EndpointStore(config, session=session())
        started = time.monotonic()
        with pytest.raises(StoreError) as err:
            store.list_endpoints()
        elapsed = time.monotonic() - started
        assert config.operation_timeout <= elapsed < 3 * config.operation_worst_case, elapsed
        assert url in str(err.value) and "did not answer" in str(err.value)
        assert store.calls > 2  # many pages were read before the deadline
    finally:
        server.shutdown()
        server.server_close()


def test_bounded_config_still_reads_and_writes(store):
    bounded = EndpointStore(replace(store.config, **FAST))
    bounded.put_desired({"endpoint_name": "a", "desired_state": "running"})
    assert [i["endpoint_name"] for i in bounded.list_endpoints()] == ["a"]
    assert bounded.write_region_status("a", "r", {"state": "running"}, expected=None)
    assert bounded.get_many(["a", "missing"]).keys() == {"a"}
