"""The runner end to end: fingerprint skips, targeted updates, safety, locks and crash recovery."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

from gco_infra import state as state_backend
from gco_infra.localenv import stop_pid
from gco_infra.program import settings_from_stack_file
from gco_infra.runner import Runner, RunnerOptions, with_local_overrides
from gco_infra.runner import EXIT_LOCKED
from gco_infra.store import StoreError

from ..moto_store import own_moto_store
from .conftest import Kube, make_runner, until
from .test_endpoints_e2e import container, put, status


def test_single_change_among_many_touches_only_that_endpoint(env, tick, runner, kube1):
    names = [f"many-{i}" for i in range(12)]
    for n in names:
        put(env, n)
    tick()
    versions = {n: kube1.written(n) for n in names}
    ops = runner.operations
    put(env, "many-5", env={"CHANGED": "yes"})
    results = tick()
    assert runner.operations - ops == 1
    r1 = next(r for r in results if r.region == "local-1")
    assert (r1.action, r1.changed, r1.updated) == ("targeted", 1, 1)
    after = {n: kube1.written(n) for n in names}
    assert [n for n in names if after[n] != versions[n]] == ["many-5"]
    assert {e.name: e.value for e in kube1.deployment("many-5").spec.template.spec.containers[0].env} == {"CHANGED": "yes"}
    # The targeted update declared only many-5; the state and the outputs still hold every endpoint,
    # so a full reconcile right after finds nothing to do.
    exported = runner.states["local"].outputs["endpoints"]
    assert set(names) <= set(exported)
    assert exported["many-4"]["fingerprint"] and "record" in exported["many-4"]
    # The runner keeps what the program exported instead of reading the state back: the same values.
    in_state = {k: v.value for k, v in state_backend.workspace(runner.env).stack_outputs("local").items()}
    assert runner.states["local"].outputs == in_state
    full = next(r for r in tick(force_full=True) if r.region == "local-1")
    assert (full.action, full.created, full.updated, full.deleted, full.failed) == ("full", 0, 0, 0, 0), full.summary()
    assert {n: kube1.written(n) for n in names if n != "many-5"} == \
        {n: v for n, v in versions.items() if n != "many-5"}


def test_mass_deletion_refused_then_allowed(env, tick, runner, kube1):
    doomed = [f"mass-{i}" for i in range(4)]
    for n in doomed:
        put(env, n)
    tick()
    for n in doomed:
        put(env, n, state="deleted")
    strict = make_runner(env, stacks=("local",), max_delete_fraction=0.0, max_delete_min=2)  # bound: 2
    try:
        r1 = strict.tick()[0]
    finally:
        strict.close()
    assert r1.action == "refused" and "refusing to remove 4 endpoints" in r1.message and r1.operations == 0
    assert all(kube1.deployment(n) is not None for n in doomed)
    assert status(env, "mass-0")["state"] == "error" and "--allow-mass-delete" in status(env, "mass-0")["error"]
    permissive = make_runner(env, stacks=("local",), allow_mass_delete=True)
    try:
        res = permissive.tick()
    finally:
        permissive.close()
    assert res[0].action in ("targeted", "full") and res[0].deleted >= 4
    assert all(kube1.of(n) == set() for n in doomed)
    assert status(env, "mass-0")["state"] == "deleted"
    runner.states["local"].outputs_loaded = False  # the session runner re-reads what the other runner applied
    runner.states["local"].outputs = None


def test_failing_endpoint_gets_error_while_others_get_states(env, tick, runner, kube1):
    api = env.kube("local-1")
    adm = client.AdmissionregistrationV1Api(api)
    policy = client.V1ValidatingAdmissionPolicy(
        metadata=client.V1ObjectMeta(name="deny-rejected"),
        spec=client.V1ValidatingAdmissionPolicySpec(
            failure_policy="Fail",
            match_constraints=client.V1MatchResources(resource_rules=[client.V1NamedRuleWithOperations(
                api_groups=["apps"], api_versions=["v1"], operations=["CREATE", "UPDATE"], resources=["deployments"])]),
            validations=[client.V1Validation(expression="!object.metadata.name.startsWith('rejected')",
                                             message="deployments named rejected* are not allowed here")]))
    binding = client.V1ValidatingAdmissionPolicyBinding(
        metadata=client.V1ObjectMeta(name="deny-rejected"),
        spec=client.V1ValidatingAdmissionPolicyBindingSpec(policy_name="deny-rejected", validation_actions=["Deny"]))
    adm.create_validating_admission_policy(policy)
    adm.create_validating_admission_policy_binding(binding)
    try:
        time.sleep(2)  # the policy plugin picks up new policies asynchronously
        put(env, "rejected-one")
        put(env, "accepted-one")
        results = runner.tick()
        r1 = next(r for r in results if r.region == "local-1")
        assert "rejected-one" in r1.endpoint_errors, r1.summary()
        bad = status(env, "rejected-one")
        assert bad["state"] == "error" and "not allowed here" in bad["error"]
        assert kube1.deployment("accepted-one") is not None
        assert status(env, "accepted-one")["state"] == "creating"
        # A runner started after that failure (another pod, say) does not know of it but from the
        # stack's history: its start declares every endpoint again rather than judging drift.
        restarted = make_runner(env, stacks=("local",))
        said = []
        restarted.progress = said.append
        try:
            restarted.tick()
        finally:
            restarted.close()
        assert any(m.startswith("local: its last operation (update failed)") for m in said), said
        assert "local: full up --refresh (full reconcile)" in said, said
    finally:
        adm.delete_validating_admission_policy_binding("deny-rejected")
        adm.delete_validating_admission_policy("deny-rejected")
        put(env, "rejected-one", state="deleted")
        time.sleep(2)
        runner.tick(force_full=True)


def test_table_unreachable_mid_read_changes_nothing(env, tick, runner, kube1, tmp_path):
    """A scan that dies between pages is an error, never a shorter list: no Pulumi operation runs."""
    put(env, "survivor")
    tick()
    before = kube1.names()
    with own_moto_store(tmp_path, "big") as (store, pid):
        # The same endpoints, padded past one scan page: a partial read would look like mass deletion.
        with store._table.batch_writer() as w:
            for i in range(150):
                w.put_item(Item={"endpoint_name": f"pad-{i}", "desired_state": "deleted", "target_regions": [],
                                 "spec": {"image": "a/b:1", "env": {"PAD": "x" * 9000}}})
        store._table.meta.client.meta.events.register(
            "after-call.dynamodb.Scan", lambda **kw: stop_pid(pid, "moto_server", timeout=5))
        broken = make_runner(env, stacks=("local",))
        broken.store = store
        try:
            with pytest.raises(StoreError):
                broken.tick()
            assert broken.operations == 0
        finally:
            broken.close()
    assert kube1.names() == before


def _cli(env, *args, extra_env=None, **kw):
    e = dict(os.environ, GCO_STATE_DIR=str(env.path), PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-m", "gco_infra.cli", "--json-logs", *args], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _stop_orphaned_plugins(env):
    """Stop the plugins a SIGKILLed engine left behind: the engine starts each in a process group of
    its own, so killing the runner's group does not reach them (a pod's end would)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        comm, ppid = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()[1]
        if comm.startswith("pulumi-") and ppid == "1" and f"GCO_STATE_DIR={env.path}".encode() in environ:
            os.kill(int(pid), signal.SIGKILL)


def _provider_rate(per_second):
    """The provider's client rate an operator may set (PULUMI_K8S_CLIENT_QPS/BURST): slower, an
    update lasts long enough for a test to act while it runs."""
    return {"PULUMI_K8S_CLIENT_QPS": str(per_second), "PULUMI_K8S_CLIENT_BURST": str(per_second)}


def _lock_files(env, stack):
    from gco_infra.state import backend_for

    return backend_for(env.pulumi_env()).locks(stack)  # file or s3, as the environment runs


def test_two_runners_at_once_one_skips(env, tick, runner, kube1):
    for i in range(25):
        put(env, f"busy-{i}", env={"ROUND": "1"})
    # The first runner's provider sends 5 requests a second (an operator's own client limits win):
    # its update holds the lock for 15 s or more, while the second one starts.
    first = _cli(env, "run", "--once", "--stack", "local",
                 extra_env=_provider_rate(5))
    deadline = time.monotonic() + 60
    while not _lock_files(env, "local") and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert _lock_files(env, "local"), "the first runner never took the stack lock"
    second = _cli(env, "run", "--once", "--stack", "local")
    out2, _ = second.communicate(timeout=120)
    out1, _ = first.communicate(timeout=300)
    assert second.returncode == EXIT_LOCKED, out2
    assert "locked by another update" in out2
    assert first.returncode == 0, out1
    runner.states["local"].outputs_loaded = False
    results = tick()  # nothing corrupted: the session runner converges with no error
    assert all(kube1.deployment(f"busy-{i}") is not None for i in range(25))
    assert next(r for r in results if r.region == "local-1").action in ("none", "targeted", "full")


def test_runner_killed_during_up_recovers_and_converges(env, runner, kube1):
    """SIGKILL of the runner and its engine mid-update: the dead update's lock is cleared at once
    (no stale-lock wait), its pending operations by the next full reconcile; converged in 2 ticks."""
    for i in range(40):
        put(env, f"crash-{i}", env={"ROUND": "1"})
    # A slower provider client (20 requests a second): the refresh of what the stack holds comes first,
    # then the 120 creates take 6 s or more. The kill lands among them, leaving pending operations.
    victim = _cli(env, "run", "--once", "--stack", "local", "--full",
                  extra_env=_provider_rate(20))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and victim.poll() is None and not any(
            d.metadata.name.startswith("crash-") for d in kube1.apps.list_namespaced_deployment("gco-inference").items):
        time.sleep(0.1)
    assert victim.poll() is None, "the update ended before it could be killed:\n" + victim.communicate()[0]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    _stop_orphaned_plugins(env)
    assert _lock_files(env, "local"), "the killed update left no lock: nothing to recover"
    recovering = make_runner(env, stacks=("local",))  # default options: nothing tuned for the test
    said = []
    recovering.progress = said.append
    try:
        first = recovering.tick()[0]
        assert first.action in ("full", "targeted", "none"), first.summary()
        # the dead update's state may not say what it did: every endpoint is declared, not only what a refresh finds
        # ("first apply" when the killed update was the stack's first, as when this test runs alone)
        assert {"local: full up --refresh (full reconcile)", "local: full up --refresh (first apply)"} & set(said), said
        second = recovering.tick(force_full=True)[0]
        assert second.action == "full" and not second.failed, second.summary()
    finally:
        recovering.close()
    assert not _lock_files(env, "local")
    assert all(kube1.deployment(f"crash-{i}") is not None for i in range(40))
    runner.states["local"].outputs_loaded = False


def test_sigterm_waits_for_the_running_operation_and_writes_its_statuses(env, runner, kube1):
    """`gco-infra run` as the runner pod runs it (workers, ticks beside operations, the drift watch)
    stopped by SIGTERM in the middle of an operation: the operation ends, its statuses are written,
    the lock is released and the process exits 0."""
    for i in range(60):
        put(env, f"term-{i}", env={"ROUND": "1"})
    # a slower provider client (20 requests a second) keeps the first update going for 9 s or more
    proc = _cli(env, "run", "--stack", "local", "--interval", "1",
                extra_env=_provider_rate(20))
    try:
        deadline = time.monotonic() + 120
        locked = []
        while not locked and time.monotonic() < deadline and proc.poll() is None:
            locked = _lock_files(env, "local")
            time.sleep(0.05)
        assert locked, f"no operation started (exit code {proc.poll()})"
        time.sleep(0.5)  # inside the update
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "shutting down: waiting for the running operations" in out, out[-3000:]
    assert not _lock_files(env, "local")
    store = env.store()
    states = {store.get(f"term-{i}").get("region_status", {}).get("local-1", {}).get("state") for i in range(60)}
    assert states == {"creating"}, states
    assert all(kube1.deployment(f"term-{i}") is not None for i in range(60))
    runner.states["local"].outputs_loaded = False


def _applied_then_changed_by_someone_else(env, tick, kube1, prefix, count):
    """``count`` endpoints applied; then, while no runner runs, the Service of ``<prefix>-1`` deleted and
    the image of ``<prefix>-2`` changed (fields the stack declares). Returns the names and what our
    updates had written to each Deployment."""
    names = [f"{prefix}-{i}" for i in range(count)]
    for n in names:
        put(env, n)
    tick()
    before = {n: kube1.written(n) for n in names}
    kube1.core.delete_namespaced_service(f"{prefix}-1", "gco-inference")
    kube1.apps.patch_namespaced_deployment(f"{prefix}-2", "gco-inference", {"spec": {"template": {"spec": {
        "containers": [{"name": "inference", "image": "example.com/someone-else:9"}]}}}})
    return names, before


def test_a_runners_start_refreshes_every_object_and_updates_only_what_someone_else_changed(env, tick, runner, kube1):
    names, before = _applied_then_changed_by_someone_else(env, tick, kube1, "start", 4)
    # and a label added to another Deployment (a field the stack does not declare: not drift)
    kube1.apps.patch_namespaced_deployment("start-3", "gco-inference", {"metadata": {"labels": {"team": "x"}}})
    fresh = make_runner(env, stacks=("local",))
    try:
        r = fresh.tick()[0]
        assert (r.action, r.failed) == ("full", 0), r.summary()
        # the refresh, then one targeted update of what it found
        assert r.operations == 2 and r.updated >= 1 and r.created >= 1, r.summary()
        assert "start-1 (start-1 deleted)" in r.message and "start-2 (start-2 changed)" in r.message, r.message
        assert "start-3" not in r.message and "start-0" not in r.message
        assert kube1.service("start-1") is not None
        assert container(kube1.deployment("start-2")).image == "example.com/org/server:1"
        assert kube1.deployment("start-3").metadata.labels["team"] == "x"
        assert {n: kube1.written(n) for n in ("start-0", "start-3")} == {n: before[n] for n in ("start-0", "start-3")}
        in_state = {k: v.value for k, v in state_backend.workspace(fresh.env).stack_outputs("local").items()}
        assert fresh.states["local"].outputs == in_state
        assert set(names) <= set(in_state["endpoints"])
    finally:
        fresh.close()
    # Nothing changed since: a start is the refresh alone, and writes nothing.
    written = {n: kube1.written(n) for n in names}
    again = make_runner(env, stacks=("local",))
    try:
        r = again.tick()[0]
        assert (r.action, r.operations, r.created, r.updated, r.deleted) == ("full", 1, 0, 0, 0), r.summary()
        assert {n: kube1.written(n) for n in names} == written
        # the outputs the refresh's program exported are the state's, unchanged
        assert again.states["local"].outputs == in_state == \
            {k: v.value for k, v in state_backend.workspace(again.env).stack_outputs("local").items()}
    finally:
        again.close()
    # A refresh that changed nothing leaves a checkpoint the next start trusts; --full declares
    # every endpoint again (up --refresh): still nothing to write.
    third = make_runner(env, stacks=("local",))
    said = []
    third.progress = said.append
    try:
        r = third.tick()[0]
        assert "local: full reconcile: refresh, then update what changed or drifted (full reconcile)" in said, said
        assert (r.action, r.operations) == ("full", 1), r.summary()
        r = third.tick(force_full=True)[0]
        assert "local: full up --refresh (full reconcile)" in said, said
        assert (r.action, r.operations, r.created, r.updated, r.deleted) == ("full", 1, 0, 0, 0), r.summary()
    finally:
        third.close()


def test_the_refresh_of_a_start_uses_the_provider_the_program_declares_now(env, tick, runner, kube1, tmp_path):
    """Whoever applied last recorded their credentials in the state (here a kubeconfig path that is gone
    since); a runner's start must refresh with its own (PULUMI_RUN_PROGRAM), as a pod would."""
    put(env, "creds-0")
    tick()
    elsewhere = tmp_path / "someone-elses-kubeconfig"
    shutil.copy(env.kubeconfig("local-1"), elsewhere)
    s = with_local_overrides(settings_from_stack_file("local"), str(elsewhere), env.dynamodb_endpoint, env.table)
    theirs = Runner([s], env.store(), env.pulumi_env(), RunnerOptions())
    try:
        assert theirs.tick(force_full=True)[0].action == "full"
    finally:
        theirs.close()
    providers = [r for r in state_backend.workspace(runner.env).export_stack("local").deployment["resources"]
                 if r["type"] == "pulumi:providers:kubernetes"]
    assert [p["inputs"]["kubeconfig"] for p in providers] == [str(elsewhere)]
    elsewhere.unlink()
    kube1.core.delete_namespaced_service("creds-0", "gco-inference")
    ours = make_runner(env, stacks=("local",))
    try:
        r = ours.tick()[0]
        assert (r.action, r.failed) == ("full", 0), r.summary()
        assert "creds-0 (creds-0 deleted)" in r.message, r.message
        assert kube1.service("creds-0") is not None
    finally:
        ours.close()


def test_a_runners_start_with_the_drift_watch_is_judged_from_its_first_lists(env, tick, runner, kube1):
    names, before = _applied_then_changed_by_someone_else(env, tick, kube1, "listed", 3)
    fresh = make_runner(env, stacks=("local",))
    said = []
    fresh.progress = said.append
    try:
        # the outputs as read from the checkpoint (one export) are those the CLI prints
        fresh.load_outputs(fresh.states["local"])
        in_state = {k: v.value for k, v in state_backend.workspace(fresh.env).stack_outputs("local").items()}
        assert fresh.states["local"].outputs == in_state
        fresh.watch_drift()
        results = []
        deadline = time.monotonic() + 120
        while not fresh.states["local"].full_done and time.monotonic() < deadline:
            results += fresh.tick()
            time.sleep(0.1)
        assert any(m.startswith("local: full reconcile from the drift watch's lists") for m in said), said
        assert "local: listed-1: Service gco-inference/listed-1 deleted while no runner watched; repairing it" in said
        assert any(m.startswith("local: listed-2: Deployment gco-inference/listed-2 changed by ") for m in said), said
        assert not any("listed-0" in m for m in said)
        # no refresh of every object: one targeted update of what drifted
        assert fresh.operations == 1, [r.summary() for r in results]
        assert [r.action for r in results if r.region == "local-1"] == ["targeted"]
        assert kube1.service("listed-1") is not None
        assert container(kube1.deployment("listed-2")).image == "example.com/org/server:1"
        assert kube1.written("listed-0") == before["listed-0"]
        assert fresh.drift["local-1"].first_lists() is None  # judged: the lists are dropped
    finally:
        fresh.close()


def test_a_new_declaration_version_declares_every_endpoint_without_a_refresh_unless_something_drifted(
        env, tick, runner, kube1, monkeypatch):
    from gco_infra import manifests

    names = [f"version-{i}" for i in range(3)]
    for n in names:
        put(env, n)
    tick()
    old = manifests.DECLARATION_VERSION

    def start(version):
        """A new runner's start (with its drift watch) under the program's declaration ``version``."""
        monkeypatch.setattr(manifests, "DECLARATION_VERSION", version)
        fresh = make_runner(env, stacks=("local",))
        said, results = [], []
        fresh.progress = said.append
        try:
            fresh.watch_drift()
            deadline = time.monotonic() + 120
            while not fresh.states["local"].full_done and time.monotonic() < deadline:
                results += fresh.tick()
                time.sleep(0.1)
            assert [r.action for r in results if r.region == "local-1"] == ["full"], [r.summary() for r in results]
            assert fresh.operations == 1
            assert fresh.states["local"].outputs["declarationVersion"] == version
            return said
        finally:
            fresh.close()

    said = start(old + "-next")
    assert any("0 endpoint(s) drifted: every endpoint is declared again without a refresh" in m for m in said), said
    assert "local: full up without a refresh (declaration version changed; the drift watch's lists found nothing " \
           "drifted)" in said
    # a Service deleted while no runner ran: the lists find it, and every endpoint is declared with a refresh
    kube1.core.delete_namespaced_service("version-1", "gco-inference")
    said = start(old)
    assert any("1 endpoint(s) drifted: every endpoint is declared again with a refresh (version-1 drifted)" in m
               for m in said), said
    assert "local: full up --refresh (declaration version changed)" in said
    assert kube1.service("version-1") is not None
    assert all(kube1.deployment(n) is not None for n in names)


def test_a_stack_the_generated_kubernetes_classes_applied_is_declared_by_kubernetes_object_without_a_change(
        env, tick, runner, kube1, monkeypatch):
    """Stacks applied before KubernetesObject hold objects the generated classes declared (with their
    aliases to older API versions): every endpoint declared again finds nothing to change."""
    from gco_infra import component

    from ..unit.test_component import as_generated

    declared_as_before = []

    def as_before(token, obj, spec, opts=None):
        declared_as_before.append(token)
        return as_generated(token, obj, spec, opts)

    monkeypatch.setattr(component, "KubernetesObject", as_before)
    put(env, "generated-plain")
    put(env, "generated-full", autoscaling={"enabled": True, "min_replicas": 2, "max_replicas": 4},
        canary={"image": "example.com/org/server:2", "weight": 10}, env={"API_TOKEN": "t0"})
    tick()
    assert len(declared_as_before) >= 10, declared_as_before  # 3 objects, and 7 with an HPA and a canary
    assert kube1.autoscaler("generated-full") is not None and kube1.deployment("generated-full-canary") is not None
    # the HPA controller raises the Deployment to its minimum within a sync or two, a write of its own
    # (generation 2) that must not be read as ours: record after it
    until(lambda: kube1.deployment("generated-full").spec.replicas == 2,
          "the HPA controller to scale generated-full to minReplicas", timeout=60, every=0.5)
    written = {n: kube1.written(n) for n in ("generated-plain", "generated-full", "generated-full-canary")}
    monkeypatch.undo()
    full = next(r for r in tick(force_full=True) if r.region == "local-1")
    assert (full.action, full.created, full.updated, full.deleted, full.failed) == ("full", 0, 0, 0, 0), full.summary()
    assert {n: kube1.written(n) for n in written} == written
