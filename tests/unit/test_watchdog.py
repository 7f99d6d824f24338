"""The health job's decisions, as pure functions of a table item and what the cluster shows."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gco_infra.endpoint import validate_all
from gco_infra.watchdog import (Observed, Record, Track, _iso, decide, entry_problem, purge_blocker, read_records,
                                stored_entry, track_of)

NOW = 1_700_000_000.0
ING = [("gco-inference", "inference-x"), ("gco-inference", "inference-x-canary")]


def obs(ready=0, desired=1, canary=None, ingresses=ING, updated=True):
    o = Observed(primary=Track(seen=True, ready=ready, desired=desired, updated=updated), ingresses=list(ingresses))
    if canary is not None:
        o.canary = Track(seen=True, ready=canary[0], desired=canary[1])
    return o


def run(stored, o, desired_state="running", threshold=300.0, now=NOW):
    return decide(stored, o, desired_state=desired_state, now=now, threshold=threshold)


# ---- 1. the runner's error state ------------------------------------------------------------------------------------


def test_error_state_and_message_stay_while_replicas_are_updated():
    stored = {"state": "error", "error": "update failed: quota", "replicas_ready": 0, "replicas_desired": 1}
    d = run(stored, obs(ready=1))
    assert d.status["state"] == "error" and d.status["error"] == "update failed: quota"
    assert (d.status["replicas_ready"], d.status["replicas_desired"]) == (1, 1)


def test_error_state_stays_for_a_stopped_endpoint_too():
    d = run({"state": "error", "error": "boom"}, obs(ready=0, desired=0), desired_state="stopped")
    assert d.status["state"] == "error" and d.status["error"] == "boom"
    assert d.delete == tuple(ING)


def test_a_dead_endpoint_in_error_is_still_withdrawn_without_losing_the_error():
    stored = {"state": "error", "error": "boom", "unready_since": _iso(NOW - 400), "replicas_ready": 0, "replicas_desired": 1}
    d = run(stored, obs(ready=0))
    assert d.event == "withdrawn" and d.status["ingress"] == "withdrawn" and d.delete == tuple(ING)
    assert (d.status["state"], d.status["error"]) == ("error", "boom")


def test_error_with_nothing_applied_here_is_the_runners():
    assert run({"state": "error", "error": "invalid"}, Observed()) == run(None, Observed())
    assert run(None, Observed()).status is None


# ---- 2. primary and canary apart ----------------------------------------------------------------------------------


def test_live_canary_does_not_carry_a_dead_primary():
    stored = {"state": "running", "unready_since": _iso(NOW - 301), "replicas_ready": 1, "replicas_desired": 2}
    d = run(stored, obs(ready=0, desired=1, canary=(1, 1)))
    assert d.event == "withdrawn" and set(d.delete) == set(ING)
    s = d.status
    assert (s["replicas_ready"], s["replicas_desired"], s["canary_ready"], s["canary_desired"]) == (0, 1, 1, 1)


def test_dead_canary_does_not_make_a_live_primary_unready():
    d = run({"state": "creating"}, obs(ready=2, desired=2, canary=(0, 1)))
    assert d.status["state"] == "running" and "unready_since" not in d.status and d.event is None
    assert (d.status["replicas_ready"], d.status["replicas_desired"]) == (2, 2)


def test_canary_fields_go_when_the_canary_does():
    stored = {"state": "running", "replicas_ready": 1, "replicas_desired": 1, "canary_ready": 1, "canary_desired": 1}
    d = run(stored, obs(ready=1))
    assert "canary_ready" not in d.status and "canary_desired" not in d.status


def test_track_comes_from_the_label_or_the_name():
    assert track_of("x", "x-canary", {"gco.io/track": "canary"}) == "canary"
    assert track_of("x", "x", {"gco.io/track": "primary"}) == "primary"
    assert track_of("x", "x-canary", {}) == "canary"
    assert track_of("x", "x", {}) == "primary"


# ---- the watchdog as before -------------------------------------------------------------------------------------


def test_unready_timer_starts_then_withdraws_then_readmits():
    first = run({"state": "running", "replicas_ready": 1, "replicas_desired": 1}, obs(ready=0))
    assert first.status["unready_since"] == _iso(NOW) and first.event is None and first.delete == ()
    later = run(first.status, obs(ready=0), now=NOW + 300)
    assert later.event == "withdrawn" and later.status["unready_since"] == _iso(NOW)
    again = run(later.status, obs(ready=0), now=NOW + 400)
    assert again.status is None and again.delete == tuple(ING)  # re-created while dead: deleted again
    back = run(later.status, obs(ready=1, ingresses=[]), now=NOW + 500)
    assert back.event == "readmitted" and back.status["ingress"] == "active" and "unready_since" not in back.status


def test_a_timer_in_the_future_restarts_now():
    d = run({"state": "running", "unready_since": "2999-01-01T00:00:00Z"}, obs(ready=0))
    assert d.status["unready_since"] == _iso(NOW)


def test_nothing_written_when_nothing_changed():
    stored = {"state": "running", "replicas_ready": Decimal(1), "replicas_desired": Decimal(1), "last_sync": "t"}
    assert run(stored, obs(ready=1)).status is None


# ---- 4. invalid records -------------------------------------------------------------------------------------------


def test_invalid_records_are_read_leniently():
    items = [
        {"endpoint_name": "ok", "desired_state": "running", "target_regions": ["local-1"], "spec": {"image": "a/b:1"}},
        {"endpoint_name": "bad", "desired_state": "running", "target_regions": ["local-1", 7], "namespace": "gco-inference",
         "spec": {"image": "a/b:1", "replicas": -2}, "region_status": {"local-1": {"state": "running", "ingress": "withdrawn"}}},
        {"endpoint_name": 12, "desired_state": "running"},
    ]
    records, problems = read_records(items, validate_all(items))
    by = {r.name: r for r in records}
    assert by["ok"].valid and not by["bad"].valid
    assert by["bad"].targets == ("local-1",) and by["bad"].namespace == "gco-inference"
    assert stored_entry(by["bad"].item, "local-1")[0]["ingress"] == "withdrawn"
    assert list(problems) == ["<unnamed>"]


def test_invalid_record_keeps_its_withdrawn_flag_and_its_ingress_stays_deleted():
    stored = {"state": "error", "error": "spec.replicas must be >= 0", "ingress": "withdrawn",
              "unready_since": _iso(NOW - 900), "replicas_ready": 0, "replicas_desired": 1}
    d = run(stored, obs(ready=0), desired_state=None)
    assert d.status is None and d.delete == tuple(ING)
    back = run(stored, obs(ready=1, ingresses=[]), desired_state=None)
    assert back.event == "readmitted" and back.status["state"] == "error"


# ---- 5. malformed region_status ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("statuses, why", [
    ("garbage", "region_status must be a map"),
    (["local-1"], "region_status must be a map"),
    ({"local-1": "nope"}, "region_status.local-1 must be a map"),
    ({"local-1": None}, "region_status.local-1 must be a map"),
    ({"local-1": {"state": "exploded"}}, "region_status.local-1.state must be one of"),
    ({"local-1": {"state": ["running"]}}, "region_status.local-1.state must be one of"),
    ({"local-1": {"ingress": "maybe"}}, "region_status.local-1.ingress must be active or withdrawn"),
    ({"local-1": {"unready_since": ["x"]}}, "region_status.local-1.unready_since must be an ISO-8601 time"),
    ({"local-1": {"unready_since": "yesterday"}}, "region_status.local-1.unready_since"),
    ({"local-1": {"replicas_ready": "many"}}, "region_status.local-1.replicas_ready must be a count"),
    ({"local-1": {"replicas_ready": True}}, "region_status.local-1.replicas_ready must be a count"),
    ({"local-1": {"replicas_desired": Decimal("1.5")}}, "region_status.local-1.replicas_desired must be a count"),
    ({"local-1": {"replicas_desired": Decimal("NaN")}}, "region_status.local-1.replicas_desired must be a count"),
    ({"local-1": {"error": {"a": 1}}}, "region_status.local-1.error must be a string"),
    ({"local-1": {"message": "x" * 100_000}}, "region_status.local-1 holds more than"),
    ({"local-1": {"message": "x" * 5000}}, "region_status.local-1.message must be at most 4096"),
    ({"local-1": {"other": [["x" * 9000], {"y": "z" * 9000}]}}, "region_status.local-1 holds more than"),
])
def test_malformed_status_is_a_problem_not_a_crash(statuses, why):
    entry, problem = stored_entry({"region_status": statuses}, "local-1")
    assert entry is None and problem.startswith(why), problem


def test_well_formed_status_is_returned_as_stored():
    raw = {"state": "running", "replicas_ready": Decimal(1), "replicas_desired": 1, "ingress": "active",
           "unready_since": "2024-05-01T10:00:00Z", "last_sync": "2024-05-01T10:00:00Z", "error": "x", "extra": {"a": [1]}}
    entry, problem = stored_entry({"region_status": {"local-1": raw}}, "local-1")
    assert problem is None and entry is raw
    assert stored_entry({}, "local-1") == (None, None)
    assert stored_entry({"region_status": {"local-2": raw}}, "local-1") == (None, None)
    assert entry_problem({}) is None
    assert entry_problem({"replicas_ready": "2", "replicas_desired": 3.0}) is None  # as other writers store counts


# ---- 3. purge ----------------------------------------------------------------------------------------------------------


def deleted(targets, statuses=None):
    item = {"endpoint_name": "x", "desired_state": "deleted", "target_regions": list(targets)}
    if statuses is not None:
        item["region_status"] = statuses
    return Record("x", tuple(targets), "gco-inference", item)


KNOWN = ("local-1", "local-2")


def blocker(record, objects_here=False, known=KNOWN):
    return purge_blocker(record, region="local-1", known_regions=known, objects_here=objects_here)


def test_purged_when_no_region_ever_applied_it():
    assert blocker(deleted(KNOWN)) is None
    never = {"state": "error", "error": "invalid", "replicas_ready": 0, "last_sync": "t"}
    assert blocker(deleted(KNOWN, {"local-1": never, "local-2": {"state": "pending"}})) is None


def test_purged_when_every_target_region_reports_deleted():
    gone = {"state": "deleted", "replicas_ready": 0, "replicas_desired": 0}
    assert blocker(deleted(KNOWN, {"local-1": gone, "local-2": gone})) is None
    assert blocker(deleted(("local-1",), {"local-1": gone})) is None


def test_not_purged_with_an_unknown_target_region():
    assert "ap-typo-1 is not a known region" in blocker(deleted(("ap-typo-1",)))
    gone = {"state": "deleted"}
    assert "ap-gone-1" in blocker(deleted(("local-1", "ap-gone-1"), {"local-1": gone}))


def test_not_purged_while_a_region_still_runs_it_or_shows_objects():
    assert "local-2 reports 'running'" in blocker(deleted(KNOWN, {"local-1": {"state": "deleted"}, "local-2": {"state": "running"}}))
    failed_after_apply = {"state": "error", "error": "x", "replicas_ready": 0, "replicas_desired": 2}
    assert blocker(deleted(KNOWN, {"local-2": failed_after_apply})) is not None
    assert blocker(deleted(KNOWN, {"local-2": {"state": "error", "ingress": "withdrawn"}})) is not None


def test_not_purged_while_its_objects_exist_here_whatever_the_table_says():
    gone = {"state": "deleted"}
    assert "still exist in local-1" in blocker(deleted(KNOWN, {"local-1": gone, "local-2": gone}), objects_here=True)


def test_not_purged_on_a_malformed_status():
    assert "region_status must be a map" in blocker(deleted(KNOWN, "garbage"))
    assert "region_status.local-2.state" in blocker(deleted(KNOWN, {"local-2": {"state": "gone"}}))


# ---- a record leaving this region while its objects still run ------------------------------------------------------


def test_a_leaving_endpoint_is_still_withdrawn_but_its_state_stays_the_runners():
    """Deleted (or no longer targeted) while the objects still run, e.g. a removal refused by the
    deletion bound: a dead one still leaves the shared ALB, and the runner's state is kept."""
    stored = {"state": "error", "error": "refusing to remove 30 endpoints", "unready_since": _iso(NOW - 400),
              "replicas_ready": 0, "replicas_desired": 1}
    d = decide(stored, obs(ready=0), desired_state=None, now=NOW, threshold=300.0, keep_state=True)
    assert d.event == "withdrawn" and d.delete == tuple(ING)
    assert (d.status["state"], d.status["error"]) == ("error", "refusing to remove 30 endpoints")
    d2 = decide({"state": "deleting"}, obs(ready=1), desired_state=None, now=NOW, threshold=300.0, keep_state=True)
    assert d2.status["state"] == "deleting" and d2.status["replicas_ready"] == 1


def test_the_job_watches_a_deleted_record_whose_objects_remain():
    from gco_infra.health import HealthJob

    job = HealthJob.__new__(HealthJob)
    job.region = "us-east-1"
    items = [{"endpoint_name": "x", "desired_state": "deleted", "target_regions": ["us-east-1"],
              "spec": {"image": "org/server:1"}}]
    (rec,), _ = read_records(items, validate_all(items))
    assert job._watches(rec, obs()) and job._leaving(rec)
    assert not job._watches(rec, Observed())
