"""Leader election against clock skew: a holder that keeps renewing is never taken over."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

from kubernetes import client

from gco_infra.health import LeaseElector


class FakeCoord:
    """The Lease another replica ("a") holds; it renews (a new resourceVersion) while ``alive``."""

    def __init__(self, renew_time: float) -> None:
        self.alive, self.version, self.renew_time, self.replaced = True, 1, renew_time, []

    def read_namespaced_lease(self, name, namespace, **_):
        if self.alive:
            self.version += 1
        spec = client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=30,
                                  renew_time=datetime.fromtimestamp(self.renew_time, timezone.utc))
        return client.V1Lease(metadata=client.V1ObjectMeta(name=name, resource_version=str(self.version)), spec=spec)

    def replace_namespaced_lease(self, name, namespace, lease, **_):
        self.replaced.append(lease.spec.holder_identity)


def test_a_renewing_holder_is_not_taken_over_by_a_replica_whose_clock_runs_ahead():
    clocks = SimpleNamespace(wall=1_000_000.0, mono=100.0)
    b = LeaseElector(client.ApiClient(), "gco-system", identity="b", clock=lambda: clocks.wall,
                     monotonic=lambda: clocks.mono)
    # b's wall clock is 60 s ahead of a's: a's fresh renewals look 60 s old, i.e. expired, to b
    coord = FakeCoord(renew_time=clocks.wall - 60)
    b.coord = coord
    b._seen, b._seen_at = ("a", 0.0, "0"), 0.0  # b has watched the Lease before
    for _ in range(10):
        clocks.mono += 5
        assert not b.try_acquire_or_renew()
    assert coord.replaced == []
    coord.alive = False  # a stops renewing: after a whole lease unchanged on b's own clock, b takes over
    taken = False
    for _ in range(10):
        clocks.mono += 5
        taken = b.try_acquire_or_renew() or taken
    assert taken and set(coord.replaced) == {"b"}  # taken over, then renewed by b


def test_a_fresh_process_takes_over_an_expired_lease_at_once():
    clocks = SimpleNamespace(wall=1_000_000.0, mono=5.0)
    b = LeaseElector(client.ApiClient(), "gco-system", identity="b", clock=lambda: clocks.wall,
                     monotonic=lambda: clocks.mono)
    b.coord = FakeCoord(renew_time=clocks.wall - 3600)
    b.coord.alive = False
    assert b.try_acquire_or_renew() and b.coord.replaced == ["b"]
