"""The state as in production: an S3 backend (moto's server) with secrets encrypted by a KMS key
(moto's), for the runner, the preview, two runners racing on one stack and a dead runner pod's lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from kubernetes import client

from gco_infra import localenv, state
from gco_infra.program import PROJECT_ROOT
from gco_infra.runner import EXIT_LOCKED, EXIT_OK

from .test_endpoints_e2e import put, status

STACK = "local"
CHECKPOINT = f".pulumi/stacks/gco-infra/{STACK}.json"


@pytest.fixture
def s3(env):
    if env.backend != "s3":
        pytest.fail("these tests need the S3 state backend, but the local environment runs with --backend file "
                    "(unset GCO_LOCAL_BACKEND)", pytrace=False)
    return env._aws("s3")


def _objects(s3):
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=localenv.STATE_BUCKET)
            for o in p.get("Contents") or []]
    return {k: s3.get_object(Bucket=localenv.STATE_BUCKET, Key=k)["Body"].read() for k in keys}


def _checkpoint(s3):
    return json.loads(s3.get_object(Bucket=localenv.STATE_BUCKET, Key=CHECKPOINT)["Body"].read())["checkpoint"]["latest"]


def _secrets(value):
    """The secret values (ciphertexts) in a piece of checkpoint JSON."""
    if isinstance(value, dict):
        if value.get("4dabf18193072939515e22adb298388d") == "1b47061264138c4ac30d75fd1eb44270":
            return [value["ciphertext"]]
        return [c for v in value.values() for c in _secrets(v)]
    if isinstance(value, list):
        return [c for v in value for c in _secrets(v)]
    return []


def _pulumi(env, *args):
    """The CLI in the engine's private project copy, as the runner runs it."""
    proc = subprocess.run(["pulumi", *args, "--non-interactive"], cwd=state.project_dir(env.backend_url),
                          env={**os.environ, **state.engine_env(env.pulumi_env())},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_runner_applies_on_s3_state_with_kms_secrets_and_never_writes_the_stack_files(env, s3, tick, runner, kube1):
    tracked = {f.name: f.read_bytes() for f in (PROJECT_ROOT / "stacks").glob("Pulumi.*.yaml")}
    put(env, "s3-one", env={"ROUND": "1"})
    first = next(r for r in tick() if r.region == "local-1")
    assert kube1.deployment("s3-one") is not None and status(env, "s3-one")["state"] == "creating", first.summary()
    put(env, "s3-one", env={"ROUND": "2"})
    changed = next(r for r in tick() if r.region == "local-1")
    assert (changed.action, changed.updated) == ("targeted", 1), changed.summary()
    assert {e.name: e.value for e in kube1.deployment("s3-one").spec.template.spec.containers[0].env} == {"ROUND": "2"}
    assert status(env, "s3-one")["state"] == "updating" and "error" not in status(env, "s3-one")

    latest = _checkpoint(s3)  # the key layout of pulumi v3.274.1's project-scoped S3 backend
    assert latest["secrets_providers"] == {"type": "cloud", "state": {
        "url": "awskms://alias/gco-infra-state?region=us-east-1", "encryptedkey": latest["secrets_providers"]["state"]["encryptedkey"]}}
    assert "s3-one" in json.loads(_pulumi(env, "stack", "output", "--json", "--stack", STACK))["endpoints"]
    # The engine wrote its secrets settings into its private copy of the project, never into stacks/.
    assert {f.name: f.read_bytes() for f in (PROJECT_ROOT / "stacks").glob("Pulumi.*.yaml")} == tracked
    assert state.project_dir() != str(PROJECT_ROOT)


def test_a_secret_env_value_is_stored_encrypted_by_kms(env, s3, tick, kube1):
    token = f"hf_{uuid.uuid4().hex}"
    put(env, "s3-secret", env={"HF_TOKEN": token, "PLAIN": "visible"})
    tick()
    assert {e.name: e.value for e in kube1.deployment("s3-secret").spec.template.spec.containers[0].env}["HF_TOKEN"] == token
    objects = _objects(s3)
    assert CHECKPOINT in objects and any(k.startswith(".pulumi/history/") for k in objects)
    assert not [k for k, body in objects.items() if token.encode() in body], "a secret in plaintext in the state bucket"
    deployment = next(r for r in _checkpoint(s3)["resources"]
                      if r["type"] == "kubernetes:apps/v1:Deployment" and r["urn"].endswith("::s3-secret"))
    assert _secrets(deployment["inputs"]) and _secrets(deployment["outputs"])  # ciphertext, both sides
    assert token in _pulumi(env, "stack", "export", "--show-secrets", "--stack", STACK)  # and KMS decrypts it


def test_preview_reads_s3_state_and_changes_nothing(env, s3, tick):
    put(env, "s3-pv-old")
    tick()
    put(env, "s3-pv-new")
    before = state.checkpoint_token(STACK, env.pulumi_env())
    proc = subprocess.run([sys.executable, "-m", "gco_infra.cli", "--json-logs", "preview", "--json", "--stack", STACK],
                          env={**os.environ, "GCO_STATE_DIR": str(env.path)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [report] = json.loads(proc.stdout)
    assert report["error"] is None and report["stack"] == STACK
    assert {(c["op"], c["resource"], c["cause"]) for c in report["changes"] if c["endpoint"] == "s3-pv-new"} >= {
        ("create", "Deployment/s3-pv-new", "table"), ("create", "Service/s3-pv-new", "table")}
    assert not [c for c in report["changes"] if c["endpoint"] == "s3-pv-old"]
    assert state.checkpoint_token(STACK, env.pulumi_env()) == before
    assert state.backend_for(env.pulumi_env()).locks(STACK) == []


def _run_once(env):
    return subprocess.Popen([sys.executable, "-m", "gco_infra.cli", "--json-logs", "run", "--once", "--stack", STACK],
                            env={**os.environ, "GCO_STATE_DIR": str(env.path), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_two_runners_started_at_once_the_backend_lock_decides(env, s3, runner, tick, kube1):
    names = [f"race-{i}" for i in range(12)]
    for n in names:
        put(env, n)
    racers = [_run_once(env), _run_once(env)]
    outs = [p.communicate(timeout=300)[0] for p in racers]
    codes = sorted(p.returncode for p in racers)
    # One applies and the other is stopped by the lock; both may see each other's lock (the
    # backend writes its lock, then checks for others), and then neither applies. Never both.
    assert codes in ([EXIT_OK, EXIT_LOCKED], [EXIT_LOCKED, EXIT_LOCKED]), outs
    assert all("locked by another update" in o for o, p in zip(outs, racers) if p.returncode == EXIT_LOCKED), outs

    assert state.backend_for(env.pulumi_env()).locks(STACK) == []
    exported = json.loads(_pulumi(env, "stack", "export", "--stack", STACK))  # the checkpoint is intact
    assert not exported["deployment"].get("pending_operations")
    assert state.pending_operations(STACK, env.pulumi_env()) == 0  # read from S3 as the engine's export says
    in_state = {r["urn"].rsplit("::", 1)[1] for r in exported["deployment"]["resources"]
                if r["type"] == "kubernetes:apps/v1:Deployment" and r["urn"].rsplit("::", 1)[1].startswith("race-")}
    in_cluster = {n for n in names if kube1.deployment(n) is not None}
    assert in_state == in_cluster
    assert in_cluster == (set(names) if EXIT_OK in codes else set())

    after = next(r for r in tick() if r.region == "local-1")  # the session runner sees the other writer's checkpoint
    assert set(names) <= {n for n in names if kube1.deployment(n) is not None}
    if EXIT_OK in codes:
        assert (after.created, after.updated, after.deleted, after.failed) == (0, 0, 0, 0), after.summary()
    again = next(r for r in tick() if r.region == "local-1")
    assert (again.action, again.operations) == ("none", 0), again.summary()
    assert all(status(env, n)["state"] == "creating" for n in names)


def test_a_dead_runner_pods_lock_is_removed_and_no_other(env, s3):
    """In a cluster the lock's host is the runner's pod name: a sibling pod of the runner's Deployment
    that no longer exists held a dead update; a live pod's lock and anyone else's stay."""
    stack = f"pods-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(env.kube("local-1"))
    live = "gco-runner-5d8f7c9b6-live1"
    core.create_namespaced_pod(localenv.SYSTEM_NAMESPACE, client.V1Pod(
        metadata=client.V1ObjectMeta(name=live),
        spec=client.V1PodSpec(automount_service_account_token=False,
                              containers=[client.V1Container(name="c", image="example.com/none:1")])))
    try:
        holders = {"gco-runner-5d8f7c9b6-gone1": "dead", live: "kept", "alices-laptop": "kept",
                   "gco-health-5d8f7c9b6-gone2": "kept"}
        for i, host in enumerate(holders):
            s3.put_object(Bucket=localenv.STATE_BUCKET, Key=f".pulumi/locks/organization/gco-infra/{stack}/{i}.json",
                          Body=json.dumps({"pid": 4242, "username": "x", "hostname": host,
                                           "timestamp": "2026-01-01T00:00:00Z"}).encode())
        in_pod = {**env.pulumi_env(), "GCO_KUBECONFIG": str(env.kubeconfig("local-1")),
                  state.POD_NAME: "gco-runner-5d8f7c9b6-me123", state.POD_NAMESPACE: localenv.SYSTEM_NAMESPACE}
        logged: list[str] = []
        removed, remaining = state.recover_dead_locks(stack, in_pod, logged.append)
        assert removed and len(logged) == 1 and "gco-runner-5d8f7c9b6-gone1" in logged[0], logged
        assert sorted(lock.info["hostname"] for lock, _, _ in remaining) == sorted(
            h for h, fate in holders.items() if fate == "kept")
        # Without its pod identity the runner removes none of them.
        assert state.recover_dead_locks(stack, env.pulumi_env(), logged.append)[0] is False
    finally:
        core.delete_namespaced_pod(live, localenv.SYSTEM_NAMESPACE, grace_period_seconds=0)
        for lock in state.backend_for(env.pulumi_env()).locks(stack):
            state.backend_for(env.pulumi_env()).remove(lock)


def test_the_runner_needs_no_writable_repository(env, s3, kube1):
    """As in the image (read-only root filesystem): with the whole checkout mounted read-only, a
    runner process creates or updates its stack; the engine writes only its private project copy."""
    if os.geteuid() != 0 or not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind {PROJECT_ROOT} {PROJECT_ROOT}"], capture_output=True).returncode:
        pytest.fail("a private read-only mount of the checkout needs root and unshare(1) (util-linux); "
                    "run the e2e tier as root", pytrace=False)
    put(env, "s3-readonly", env={"RUN": uuid.uuid4().hex[:8]})
    root = str(PROJECT_ROOT)
    script = (f"mount --bind {root} {root} && mount -o remount,bind,ro {root} && ! touch {root}/stacks/probe 2>/dev/null"
              f" && exec {sys.executable} -m gco_infra.cli --json-logs run --once --stack {STACK}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GCO_STATE_DIR": str(env.path), "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    assert kube1.deployment("s3-readonly") is not None
