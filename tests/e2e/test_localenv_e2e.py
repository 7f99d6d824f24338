"""The local environment itself: idempotent up, a working status, and a down that leaves nothing."""

from __future__ import annotations

from pathlib import Path

from gco_infra import localenv


def _ours(pids):
    return [p for p in pids if p and Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/cmdline").read_bytes()]


def test_up_twice_is_harmless_and_down_leaves_no_process(tmp_path):
    env = localenv.LocalEnv.load(tmp_path)
    try:
        env.up(regions=("local-1",))
        first = (env.etcd_pid, env.moto_pid, env.apiservers["local-1"].pid)
        assert all(env.status().values())
        assert env.kubeconfig("local-1").stat().st_mode & 0o077 == 0  # holds a token: owner only
        again = localenv.LocalEnv.load(tmp_path)
        again.up(regions=("local-1",))
        assert (again.etcd_pid, again.moto_pid, again.apiservers["local-1"].pid) == first
        from kubernetes import client

        names = {n.metadata.name for n in client.CoreV1Api(again.kube("local-1")).list_namespace().items}
        assert set(localenv.NAMESPACES) <= names
    finally:
        localenv.LocalEnv.load(tmp_path).down()
    assert _ours(first) == []
    assert not any(localenv.LocalEnv.load(tmp_path).status().values())


def test_the_control_plane_runs_controllers_like_eks(env):
    """Deployments get ReplicaSets and Pods (Pending: there is no node), the garbage collector
    removes them after a background delete, and every component answers its health check."""
    import time

    from kubernetes import client

    assert all(env.status().values()), env.status()
    api = env.kube("local-2")
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    ns = "gco-inference"
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "cp-probe", "namespace": ns},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "cp-probe"}},
                     "template": {"metadata": {"labels": {"app": "cp-probe"}},
                                  "spec": {"serviceAccountName": localenv.INFERENCE_SERVICE_ACCOUNT,
                                           "automountServiceAccountToken": False,
                                           "containers": [{"name": "c", "image": "example.com/none:1"}]}}}}
    apps.create_namespaced_deployment(ns, body)

    def pods():
        return [p for p in core.list_namespaced_pod(ns, label_selector="app=cp-probe").items
                if p.metadata.deletion_timestamp is None]

    deadline = time.monotonic() + 60
    while len(pods()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(pods()) == 2, "the deployment and replica-set controllers did not create the pods"
    assert {p.status.phase for p in pods()} == {"Pending"}  # no node: like a GPU endpoint waiting for capacity
    apps.delete_namespaced_deployment("cp-probe", ns, propagation_policy="Background")
    deadline = time.monotonic() + 60
    while (pods() or apps.list_namespaced_replica_set(ns, label_selector="app=cp-probe").items) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pods() and not apps.list_namespaced_replica_set(ns, label_selector="app=cp-probe").items, \
        "the garbage collector left the deployment's replica sets or pods behind"


def test_the_health_job_identity_has_exactly_what_it_needs(env):
    """local up creates gco-system and the health job's RBAC from the platform's definitions (system.py): with the
    gco-health ServiceAccount's own token, the Lease works and writing Deployments does not."""
    from kubernetes import client

    from gco_infra.health import LeaseElector

    api = env.kube("local-1")
    token = client.CoreV1Api(api).create_namespaced_service_account_token(
        "gco-health", localenv.SYSTEM_NAMESPACE,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)))
    cfg = client.Configuration()
    cfg.host = api.configuration.host
    cfg.ssl_ca_cert = str(env.ca_file("local-1"))
    cfg.api_key = {"authorization": f"Bearer {token.status.token}"}
    health_api = client.ApiClient(cfg)
    elector = LeaseElector(health_api, localenv.SYSTEM_NAMESPACE, name="gco-health", identity="e2e")
    assert elector.try_acquire_or_renew() and elector.try_acquire_or_renew()
    assert client.AppsV1Api(health_api).list_namespaced_deployment("gco-inference-team-b").items is not None
    try:
        client.AppsV1Api(health_api).delete_namespaced_deployment("anything", "gco-inference")
        raise AssertionError("the health job's identity may delete Deployments")
    except client.ApiException as exc:
        assert exc.status == 403
    client.CoordinationV1Api(api).delete_namespaced_lease("gco-health", localenv.SYSTEM_NAMESPACE)


def test_health_once_works_as_the_readme_shows(env):
    """`gco-infra health --stack local --once` with leader election (the default) exits 0."""
    import os
    import subprocess
    import sys

    from kubernetes import client

    e = dict(os.environ, GCO_STATE_DIR=str(env.path))
    proc = subprocess.run([sys.executable, "-m", "gco_infra.cli", "--json-logs", "health", "--stack", "local", "--once"],
                          env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lease = client.CoordinationV1Api(env.kube("local-1")).read_namespaced_lease("gco-health", localenv.SYSTEM_NAMESPACE)
    assert lease.spec.holder_identity
    client.CoordinationV1Api(env.kube("local-1")).delete_namespaced_lease("gco-health", localenv.SYSTEM_NAMESPACE)
