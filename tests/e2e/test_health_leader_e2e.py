"""Leader election and Kubernetes call timeouts: an apiserver that stops answering, a wall clock that
jumps. The partition is a real one: a TCP relay in front of the apiserver that stops relaying."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
from kubernetes import client

from gco_infra.health import HealthJob, LeaseElector

NS = ("gco-inference",)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Relay:
    """127.0.0.1:<port> relays to ``upstream`` (host, port); ``silent = True`` makes it a peer that
    accepts and never answers: bytes in either direction are dropped, new connections held open."""

    def __init__(self, upstream: tuple[str, int] | None = None) -> None:
        self.upstream, self.silent = upstream, upstream is None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closed = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed:
            ready, _, _ = select.select([self.server], [], [], 0.1)
            if not ready or self.closed:
                continue
            conn, _ = self.server.accept()
            self.held.append(conn)
            if self.upstream is not None and not self.silent:
                up = socket.create_connection(self.upstream)
                self.held.append(up)
                pump = threading.Thread(target=self._pump, args=(conn, up), daemon=True)
                self.threads.append(pump)
                pump.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self.closed:
            ready, _, _ = select.select(list(peers), [], [], 0.1)
            for s in ready:
                try:
                    data = s.recv(65536)
                    if not data:
                        return
                    if not self.silent:
                        peers[s].sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self.closed = True
        for t in self.threads:
            t.join(timeout=5)
        for s in [self.server, *self.held]:
            s.close()


@pytest.fixture
def silent():
    relay = Relay()
    yield relay
    relay.close()


def client_for(host: str, like: client.Configuration | None = None) -> client.ApiClient:
    cfg = client.Configuration()
    if like is not None:
        cfg.ssl_ca_cert, cfg.api_key, cfg.api_key_prefix = like.ssl_ca_cert, dict(like.api_key), dict(like.api_key_prefix)
        cfg.cert_file, cfg.key_file = like.cert_file, like.key_file
    else:
        cfg.verify_ssl = False
    cfg.host = host
    return client.ApiClient(cfg)


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_calls_to_an_apiserver_that_never_answers_give_up_after_the_timeout(store, silent, scheme):
    api = client_for(f"{scheme}://127.0.0.1:{silent.port}")
    elector = LeaseElector(api, "gco-system", request_timeout=0.5)
    started = time.monotonic()
    assert elector.try_acquire_or_renew() is False and not elector.is_leader()
    assert time.monotonic() - started < 1.5

    job = HealthJob(store, api, "local-1", NS, request_timeout=0.5)
    started = time.monotonic()
    r = job.tick()  # the table answers, the cluster does not: the tick ends with an error, in time
    assert r.error and r.writes == 0
    assert time.monotonic() - started < 1.5

    led = HealthJob(store, api, "local-1", NS, request_timeout=0.5, elector=elector)
    started = time.monotonic()
    assert led.tick().leader is False
    assert time.monotonic() - started < 1.5


def test_leader_stops_acting_at_its_own_monotonic_deadline_whatever_the_wall_clock_does(env):
    admin = env.kube("local-1").configuration
    host, port = admin.host.removeprefix("https://").rsplit(":", 1)
    relay = Relay((host, int(port)))
    try:
        api = client_for(f"https://127.0.0.1:{relay.port}", like=admin)
        mono, wall = Clock(1000.0), Clock(time.time())
        elector = LeaseElector(api, "default", "gco-health-monotonic", identity="m", lease_seconds=30, renew_deadline=20,
                               request_timeout=1.0, clock=wall, monotonic=mono)
        assert elector.try_acquire_or_renew() and elector.is_leader()  # through the relay, from the real apiserver

        relay.silent = True  # the apiserver stops answering ...
        wall.t -= 3600  # ... and the wall clock jumps back an hour
        mono.t += 15
        started = time.monotonic()
        assert elector.try_acquire_or_renew()  # not renewed, but still within its deadline
        assert time.monotonic() - started < 2.5  # the read gave up after its timeout
        mono.t += 5.5  # 20.5 s since the last successful renewal began
        assert not elector.is_leader()
        assert not elector.try_acquire_or_renew()

        job = HealthJob(env.store(), api, "local-1", NS, known_regions=["local-1", "local-2"], elector=elector,
                        request_timeout=1.0)
        r = job.tick()
        assert (r.leader, r.writes, r.api_calls) == (False, 0, 0)  # no longer acts at all

        relay.silent = False  # the apiserver answers again: the same holder renews and leads again
        assert elector.try_acquire_or_renew() and elector.is_leader()
        lease = client.CoordinationV1Api(env.kube("local-1")).read_namespaced_lease("gco-health-monotonic", "default")
        assert lease.spec.holder_identity == "m"
    finally:
        relay.close()
