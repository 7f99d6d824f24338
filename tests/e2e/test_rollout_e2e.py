"""Progressive rollouts on the two local regions: the real runner (engine, provider, control plane with
its controllers), one health job per region, and the table on moto server.

There is no node, so no pod becomes ready on its own: a test marks a Deployment's pods Ready and the
replica-set and deployment controllers count them, replace the old template's pods and report the
rollout in the Deployment's status, as they do on EKS.
"""

from __future__ import annotations

import threading
import time

import pytest

from gco_infra import rollout
from gco_infra.endpoint import parse_endpoint, spec_revision
from gco_infra.health import HealthJob
from gco_infra.manifests import REVISION_ANNOTATION

from .conftest import until
from .test_endpoints_e2e import status
from .test_health_e2e import AGES, _controllers_run

NS = ("gco-inference",)
REGIONS = ("local-1", "local-2")
BAKE = 4
LIMIT = 12


@pytest.fixture(scope="module", autouse=True)
def _need_controllers(env):
    if not _controllers_run(env):
        pytest.fail("the local control plane runs no kube-controller-manager: Deployment rollouts cannot be "
                    "observed (gco-infra local up starts one)", pytrace=False)


def put(env, name, image, *, policy=None, regions=REGIONS):
    item = {"endpoint_name": name, "desired_state": "running", "target_regions": list(regions),
            "spec": {"image": image, "gpu_count": 0},
            "rollout_policy": policy or {"waves": [["local-1"], ["local-2"]], "bake_seconds": BAKE,
                                         "unready_limit_seconds": LIMIT}}
    env.store().put_desired(item)
    return item


def revision_of(env, name):
    return spec_revision(parse_endpoint(env.store().get(name)).endpoint)


def state(env, name):
    got, problem = rollout.read_state(env.store().get(name) or {})
    assert problem is None, problem
    return got


def jobs(env, **kw):
    return {r: HealthJob(env.store(), env.kube(r), r, NS, threshold=AGES, known_regions=REGIONS, table_stream=False, **kw)
            for r in REGIONS}


def health(hjobs):
    reports = {}
    for region, job in hjobs.items():
        reports[region] = job.tick()
        assert reports[region].error is None, reports[region].error
    return reports


def image(kube, name):
    d = kube.deployment(name)
    return d.spec.template.spec.containers[0].image if d else None


def make_ready(kube, name, ns="gco-inference"):
    """Every pod of the Deployment Ready, until its status reports the rollout done (no older pod left)."""
    def done():
        d = kube.apps.read_namespaced_deployment(name, ns)
        want = d.spec.replicas if d.spec.replicas is not None else 1
        selector = ",".join(f"{k}={v}" for k, v in sorted(d.spec.selector.match_labels.items()))
        for pod in kube.core.list_namespaced_pod(ns, label_selector=selector).items:
            ready = [c for c in (pod.status.conditions or []) if c.type == "Ready" and c.status == "True"]
            if not pod.metadata.deletion_timestamp and not ready:
                kube.core.patch_namespaced_pod_status(pod.metadata.name, ns, {"status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]}})
        st = d.status
        return ((st.observed_generation or 0) >= d.metadata.generation and (st.updated_replicas or 0) == want
                and (st.replicas or 0) == want and (st.ready_replicas or 0) == want)

    until(done, f"{name}'s rollout to finish", timeout=60, every=0.5)


def healthy_on(env, hjobs, name, region, revision):
    def check():
        health(hjobs)
        st = status(env, name, region)
        return st.get("revision") == revision and st.get("state") == "running"
    until(check, lambda: f"{name} in {region} to report running {revision}: {status(env, name, region)}", timeout=30, every=0.5)


def deployed(env, tick, kube1, kube2, name, img):
    """A first deploy: every region at once, then complete."""
    put(env, name, img)
    tick()
    assert image(kube1, name) == img and image(kube2, name) == img
    hjobs = jobs(env)
    for kube in (kube1, kube2):
        make_ready(kube, name)
    rev = revision_of(env, name)
    for region in REGIONS:
        healthy_on(env, hjobs, name, region, rev)
    until(lambda: (health(hjobs), state(env, name))[1] is not None and state(env, name).phase == "complete",
          lambda: f"the first deploy of {name} to complete: {state(env, name)}")
    assert state(env, name).regions == {r: rev for r in REGIONS}
    return hjobs, rev


def test_good_rollout_goes_wave_by_wave_and_respects_bake_time(env, tick, kube1, kube2):
    hjobs, r1 = deployed(env, tick, kube1, kube2, "roll-good", "example.com/org/server:1")
    assert kube1.deployment("roll-good").metadata.annotations[REVISION_ANNOTATION] == r1

    put(env, "roll-good", "example.com/org/server:2")
    r2 = revision_of(env, "roll-good")
    tick()
    assert image(kube1, "roll-good") == "example.com/org/server:2"  # wave 1 takes it at once
    assert image(kube2, "roll-good") == "example.com/org/server:1"
    health(hjobs)
    st = state(env, "roll-good")
    assert (st.revision, st.phase, st.wave, st.regions) == (r2, "progressing", 0, {"local-1": r2, "local-2": r1})
    assert st.base == {"local-1": r1, "local-2": r1} and set(st.specs) == {r1, r2}

    make_ready(kube1, "roll-good")
    healthy_on(env, hjobs, "roll-good", "local-1", r2)
    since = until(lambda: (health(hjobs), state(env, "roll-good").healthy_since)[1], "the bake timer to start")
    baking_from = rollout._parse_iso(since)  # the table's clock: the bake counts from there
    # While it bakes, wave 2 keeps the old revision however often the runner ticks.
    while time.time() - baking_from < BAKE - 1.5:
        health(hjobs)
        tick()
        assert state(env, "roll-good").wave == 0
        assert image(kube2, "roll-good") == "example.com/org/server:1"
        time.sleep(0.5)
    until(lambda: (health(hjobs), state(env, "roll-good").wave)[1] == 1, "wave 2 to be allowed", timeout=20, every=0.5)
    st = state(env, "roll-good")
    assert st.regions == {"local-1": r2, "local-2": r2}
    assert rollout._parse_iso(st.updated_at) - rollout._parse_iso(st.healthy_since or st.wave_started) >= 0
    tick()
    assert image(kube2, "roll-good") == "example.com/org/server:2"
    assert kube2.deployment("roll-good").metadata.annotations[REVISION_ANNOTATION] == r2
    make_ready(kube2, "roll-good")
    healthy_on(env, hjobs, "roll-good", "local-2", r2)
    until(lambda: (health(hjobs), state(env, "roll-good").phase)[1] == "complete", "the rollout to complete",
          timeout=30, every=0.5)


def test_bad_image_in_wave_one_never_reaches_wave_two_and_rolls_back(env, tick, kube1, kube2):
    hjobs, r1 = deployed(env, tick, kube1, kube2, "roll-bad", "example.com/org/server:1")
    put(env, "roll-bad", "example.com/org/broken:2")
    bad = revision_of(env, "roll-bad")
    tick()
    assert image(kube1, "roll-bad") == "example.com/org/broken:2"
    # Its pods never become ready; the old pod keeps serving, the Deployment reports the rollout stuck.
    started = time.time()

    def failed():
        health(hjobs)
        tick()
        assert image(kube2, "roll-bad") == "example.com/org/server:1", "the bad revision reached wave 2"
        return state(env, "roll-bad").phase == "failed"

    until(failed, lambda: f"the rollout to fail: {state(env, 'roll-bad')}", timeout=LIMIT + 30, every=1.0)
    assert time.time() - started >= LIMIT - 1
    st = state(env, "roll-bad")
    assert st.failed[-1] == bad and st.regions == {"local-1": r1, "local-2": r1}
    assert "local-1: not healthy on revision" in st.message
    tick()
    assert image(kube1, "roll-bad") == "example.com/org/server:1"  # rolled back
    assert kube1.deployment("roll-bad").metadata.annotations[REVISION_ANNOTATION] == r1
    make_ready(kube1, "roll-bad")
    healthy_on(env, hjobs, "roll-bad", "local-1", r1)
    # not tried again until the record changes
    for _ in range(3):
        health(hjobs)
        tick()
    assert image(kube1, "roll-bad") == "example.com/org/server:1" and state(env, "roll-bad").phase == "failed"
    assert env.store().get("roll-bad")["spec"]["image"] == "example.com/org/broken:2"  # the record is never rewritten


def changed(env, tick, hjobs, name, img):
    """A new image in the record: the runner applies it (to wave 1), the health jobs record the rollout."""
    put(env, name, img)
    tick()
    health(hjobs)
    return revision_of(env, name)


def steer(env, name, fn):
    before = state(env, name)
    assert env.store().write_rollout(name, rollout.state_to_item(fn(before, time.time(), "test")), expected_seq=before.seq)
    return state(env, name)


def test_pause_resume_and_abort(env, tick, kube1, kube2):
    hjobs, r1 = deployed(env, tick, kube1, kube2, "roll-steer", "example.com/org/server:1")
    r2 = changed(env, tick, hjobs, "roll-steer", "example.com/org/server:2")
    assert steer(env, "roll-steer", rollout.pause).phase == "paused"
    make_ready(kube1, "roll-steer")
    healthy_on(env, hjobs, "roll-steer", "local-1", r2)
    time.sleep(BAKE + 1)
    for _ in range(3):
        health(hjobs)
        tick()
    assert state(env, "roll-steer").wave == 0 and image(kube2, "roll-steer") == "example.com/org/server:1"
    assert steer(env, "roll-steer", rollout.resume).phase == "progressing"
    until(lambda: (health(hjobs), state(env, "roll-steer").wave)[1] == 1, "the resumed rollout to move on",
          timeout=BAKE + 20, every=0.5)
    tick()
    assert image(kube2, "roll-steer") == "example.com/org/server:2"
    st = steer(env, "roll-steer", rollout.abort)
    assert st.phase == "aborted" and st.regions == {"local-1": r1, "local-2": r1} and st.failed[-1] == r2
    tick()
    assert image(kube1, "roll-steer") == image(kube2, "roll-steer") == "example.com/org/server:1"


def test_record_edited_during_a_rollout_starts_over_and_a_restarted_job_goes_on(env, tick, kube1, kube2):
    hjobs, r1 = deployed(env, tick, kube1, kube2, "roll-edit", "example.com/org/server:1")
    r2 = changed(env, tick, hjobs, "roll-edit", "example.com/org/server:2")
    assert state(env, "roll-edit").revision == r2
    put(env, "roll-edit", "example.com/org/server:3")
    r3 = revision_of(env, "roll-edit")
    tick()
    assert image(kube1, "roll-edit") == "example.com/org/server:3"
    assert image(kube2, "roll-edit") == "example.com/org/server:1"
    health(hjobs)
    st = state(env, "roll-edit")
    assert (st.revision, st.wave, st.regions) == (r3, 0, {"local-1": r3, "local-2": r1})
    assert st.base == {"local-1": r2, "local-2": r1} and {r1, r2, r3} <= set(st.specs)
    make_ready(kube1, "roll-edit")
    healthy_on(env, hjobs, "roll-edit", "local-1", r3)
    until(lambda: (health(hjobs), state(env, "roll-edit").healthy_since)[1], "the bake timer to start")
    for job in hjobs.values():
        job.close()
    restarted = jobs(env)  # new processes: everything they need is in the table
    until(lambda: (health(restarted), state(env, "roll-edit").wave)[1] == 1, "the restarted jobs to move on",
          timeout=BAKE + 20, every=0.5)
    tick()
    assert image(kube2, "roll-edit") == "example.com/org/server:3"


def test_two_health_jobs_race_on_one_gate_and_one_step_is_taken(env, tick, kube1, kube2):
    hjobs, r1 = deployed(env, tick, kube1, kube2, "roll-race", "example.com/org/server:1")
    r2 = changed(env, tick, hjobs, "roll-race", "example.com/org/server:2")
    make_ready(kube1, "roll-race")
    healthy_on(env, hjobs, "roll-race", "local-1", r2)
    until(lambda: (health(hjobs), state(env, "roll-race").healthy_since)[1], "the bake timer to start")
    time.sleep(BAKE + 0.5)
    before = state(env, "roll-race")
    assert before.wave == 0
    racers = jobs(env)
    barrier = threading.Barrier(2, timeout=30)
    for job in racers.values():
        real = job.store.write_rollout

        def write(name, value, *, expected_seq, real=real):
            if name == "roll-race":
                barrier.wait()  # both judged the same state; now both write
            return real(name, value, expected_seq=expected_seq)
        job.store.write_rollout = write
    reports = {}
    threads = [threading.Thread(target=lambda r=r, j=j: reports.__setitem__(r, j.tick())) for r, j in racers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    advanced = [r for r, rep in reports.items() if rep.rollouts.get("roll-race") == "advanced"]
    assert len(advanced) == 1, reports
    after = state(env, "roll-race")
    assert after.seq == before.seq + 1 and after.wave == 1


def test_records_without_a_policy_carry_no_revision(env, tick, kube1):
    env.store().put_desired({"endpoint_name": "roll-none", "desired_state": "running", "target_regions": ["local-1"],
                             "spec": {"image": "example.com/org/server:1", "gpu_count": 0}})
    tick()
    assert REVISION_ANNOTATION not in (kube1.deployment("roll-none").metadata.annotations or {})
    hjobs = jobs(env)
    make_ready(kube1, "roll-none")
    until(lambda: (health(hjobs), status(env, "roll-none").get("state"))[1] == "running", "roll-none to run")
    item = env.store().get("roll-none")
    assert "rollout" not in item and "revision" not in item["region_status"]["local-1"]
    env.store().put_desired({**{k: item[k] for k in ("endpoint_name", "target_regions", "spec")},
                             "desired_state": "running", "spec": {"image": "example.com/org/server:2", "gpu_count": 0}})
    tick()
    assert image(kube1, "roll-none") == "example.com/org/server:2"  # at once, as always
