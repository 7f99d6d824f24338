"""Real pods: endpoints on a local node (kubelet, containerd, runc, CNI, kube-proxy) running the test
model server image (images/model-server), probed by the kubelet through their real probes, with the
production cluster settings (probe periods and thresholds, skipAwait, the model volume claim).

Readiness here is never written by a test: a test makes the server itself healthy or unhealthy
(POST /admin/fail, /admin/recover on each pod) and waits for the kubelet, the controllers and the
health job to see it.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import replace

import pytest
from kubernetes import client

from gco_infra import localnode
from gco_infra.health import HealthJob

from .conftest import Kube, make_runner
from .conftest import until as wait

NS = "gco-inference"
SMALL = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}}


@pytest.fixture(scope="module")
def kube(node_env):
    return Kube(node_env, "local-1")


@pytest.fixture(scope="module")
def runner(node_env):
    """The host's runner for local-1 (conftest's ``tick`` uses this one in this module)."""
    r = make_runner(node_env, stacks=("local",))
    yield r
    r.close()


def put(env, name, state="running", **spec):
    spec.setdefault("resources", SMALL)
    item = {"endpoint_name": name, "desired_state": state, "target_regions": ["local-1"],
            "spec": {"image": localnode.image_ref("model-server"), "gpu_count": 0, **spec}}
    env.store().put_desired(item)
    return item


def status(env, name):
    return ((env.store().get(name) or {}).get("region_status") or {}).get("local-1", {})


def until(check, what, timeout=120.0, every=1.0):
    """conftest's, with a pod's pace: its probes run every 10 s."""
    return wait(check, what, timeout, every)


def pods(kube, name):
    return [p for p in kube.core.list_namespaced_pod(NS, label_selector=f"app={name}").items
            if not p.metadata.deletion_timestamp]


def http(pod, path, method="GET", port=8000):
    req = urllib.request.Request(f"http://{pod.status.pod_ip}:{port}{path}", method=method,
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def health_job(env, **kw):
    return HealthJob(env.store(), env.kube("local-1"), "local-1", (NS,), known_regions=["local-1", "local-2"], **kw)


def test_both_regions_have_a_ready_node(node_env):
    st = node_env.status()
    assert st["node local-1-node"] and st["node local-2-node"] and st["pod identity"], st
    for region in ("local-1", "local-2"):
        node = client.CoreV1Api(node_env.kube(region)).read_node(f"{region}-node")
        assert {a.type: a.address for a in node.status.addresses}["InternalIP"] == node_env.nodes[region].ip
        assert node.status.node_info.kubelet_version == "v1.37.2"
        assert node.status.node_info.container_runtime_version.startswith("containerd://2.")


def test_endpoint_becomes_ready_through_its_probe_and_is_promoted(node_env, tick, kube):
    put(node_env, "real-a", state="deploying", replicas=2)
    tick()
    job = health_job(node_env)

    def running():
        job.tick()
        st = status(node_env, "real-a")
        return st if st.get("state") == "running" else None

    st = until(running, "real-a to run with its 2 replicas ready")
    assert (st["replicas_ready"], st["replicas_desired"]) == (2, 2)
    ready = [p for p in pods(kube, "real-a") if p.status.pod_ip]
    assert len(ready) == 2 and all(http(p, "/health")[0] == 200 for p in ready)
    job.tick()  # promotion happens once every target region runs it
    assert node_env.store().get("real-a")["desired_state"] == "running"


def test_watchdog_withdraws_a_server_that_stops_answering_and_readmits_it(node_env, tick, kube):
    put(node_env, "real-sick")
    tick()
    starting = health_job(node_env)  # the default threshold: loading a model is no reason to withdraw
    until(lambda: starting.tick() and status(node_env, "real-sick").get("state") == "running", "real-sick to run")
    assert kube.ingress("inference-real-sick") is not None
    job = health_job(node_env, threshold=5.0)
    (pod,) = pods(kube, "real-sick")
    assert http(pod, "/admin/fail", "POST")[0] == 200 and http(pod, "/health")[0] == 503

    # the kubelet's readiness probe fails 3 times (10 s apart), the Deployment counts 0 ready, and the
    # watchdog withdraws the Ingress once the endpoint has been unready for its threshold
    until(lambda: "real-sick" in job.tick().withdrawn, "the watchdog to withdraw real-sick", timeout=150, every=2)
    assert kube.ingress("inference-real-sick") is None
    assert status(node_env, "real-sick")["ingress"] == "withdrawn"
    tick()  # the runner agrees with the watchdog
    assert kube.ingress("inference-real-sick") is None and kube.deployment("real-sick") is not None

    assert http(pod, "/admin/recover", "POST")[0] == 200
    until(lambda: "real-sick" in job.tick().readmitted, "real-sick to be readmitted", timeout=120, every=2)
    assert status(node_env, "real-sick")["ingress"] == "active"
    tick()
    assert kube.ingress("inference-real-sick") is not None


def test_a_slow_model_never_blocks_the_runner(node_env, tick, kube):
    put(node_env, "real-slow", args=["--startup-seconds", "45"])
    tick()
    # the tick is over and the server is still loading: the apply did not wait for it
    (pod,) = until(lambda: pods(kube, "real-slow"), "real-slow's pod")
    assert not any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
    put(node_env, "real-slow-neighbour")
    results = tick()  # another change goes through while the model still loads
    assert kube.deployment("real-slow-neighbour") is not None and all(r.action != "failed" for r in results)
    (pod,) = pods(kube, "real-slow")
    assert not any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
    job = health_job(node_env)
    until(lambda: job.tick() and status(node_env, "real-slow").get("state") == "running",
          "real-slow to finish loading and run", timeout=150, every=2)


def test_model_is_synced_from_s3_into_the_endpoints_own_directory(node_env, tick, kube):
    s3 = node_env._aws("s3")
    s3.create_bucket(Bucket="gco-models")
    files = {"config.json": b'{"layers": 2}', "weights/part-0.bin": bytes(range(256)) * 64}
    for key, body in files.items():
        s3.put_object(Bucket="gco-models", Key=f"real-synced/{key}", Body=body)
    put(node_env, "real-synced", model_path="/models/real-synced", model_source="s3://gco-models/real-synced/",
        args=["--model-dir", "/models/real-synced"])
    tick()
    job = health_job(node_env)
    until(lambda: job.tick() and status(node_env, "real-synced").get("state") == "running",
          "real-synced to sync its model and run", timeout=150, every=2)
    (pod,) = pods(kube, "real-synced")
    code, served = http(pod, "/v1/models")
    assert code == 200
    assert served["files"] == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    # in the endpoint's own directory of the shared volume, written by the init container only
    on_node = node_env.nodes["local-1"].path / "models" / NS / "real-synced"
    assert sorted(str(p.relative_to(on_node)) for p in on_node.rglob("*") if p.is_file()) == sorted(files)
    spec = pod.spec
    sync, = spec.init_containers
    env = {e.name for e in sync.env or []}
    assert {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} <= env  # from its ServiceAccount's role
    assert not {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} & {e.name for e in spec.containers[0].env or []}


def endpoint_objects(kube) -> dict[str, str]:
    """kind/namespace/name -> resourceVersion of every endpoint object of the region."""
    label = "gco.io/type=inference"
    found = {}
    for kind, items in (("Deployment", kube.apps.list_deployment_for_all_namespaces(label_selector=label).items),
                        ("Service", kube.core.list_service_for_all_namespaces(label_selector=label).items),
                        ("Ingress", kube.net.list_ingress_for_all_namespaces(label_selector=label).items)):
        for o in items:
            found[f"{kind}/{o.metadata.namespace}/{o.metadata.name}"] = o.metadata.resource_version
    return found


def system_logs(api) -> str:
    """The last lines of every gco-system pod's log (what a failed in-cluster test needs to say why)."""
    core = client.CoreV1Api(api)
    out = []
    for pod in core.list_namespaced_pod("gco-system").items:
        try:
            log = core.read_namespaced_pod_log(pod.metadata.name, "gco-system", tail_lines=8)
        except client.ApiException as exc:
            log = f"(no log: {exc.reason})"
        out.append(f"--- {pod.metadata.name} ({pod.status.phase}):\n{log}")
    return "\n".join(out)


def test_runner_and_health_run_as_deployments_from_the_image(node_env, runner, kube):
    """The platform stack's Deployments (system.py) with the project's image, its ServiceAccounts and
    Roles, credentials from their roles (web identity at moto's STS), the S3 state and KMS secrets,
    the Kubernetes API through the kubernetes Service (kube-proxy)."""
    from gco_infra import localenv, system

    workloads = system.Workloads(image=localnode.image_ref("gco-infra"), stack="local", aws_region="us-east-1",
                                 backend_url=node_env.backend_url, secrets_provider=node_env.secrets_provider)
    api = node_env.kube("local-1")
    apps = client.AppsV1Api(api)
    for obj in (system.runner_deployment(workloads), system.health_deployment(workloads)):
        localenv.apply_object(api, obj)
    try:
        put(node_env, "real-incluster", replicas=1)

        def served_by_the_pods():
            st = status(node_env, "real-incluster")
            return st if st.get("state") == "running" and kube.deployment("real-incluster") is not None else None

        try:
            st = until(served_by_the_pods, "the in-cluster runner to apply real-incluster and the health job to see it run",
                       timeout=240, every=3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{system_logs(api)}") from None
        assert (st["replicas_ready"], st["replicas_desired"]) == (1, 1)
        for name, want in ((system.RUNNER, 1), (system.HEALTH, 2)):
            d = apps.read_namespaced_deployment(name, system.SYSTEM_NAMESPACE)
            assert (d.status.ready_replicas or 0) == want, f"{name}: {d.status}"
        runner_pod, = client.CoreV1Api(api).list_namespaced_pod(system.SYSTEM_NAMESPACE, label_selector=f"app={system.RUNNER}").items
        assert {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} <= {e.name for e in runner_pod.spec.containers[0].env}
        # the host's runner, forced to a full reconcile of the same stack, finds nothing to change
        apps.patch_namespaced_deployment_scale(system.RUNNER, system.SYSTEM_NAMESPACE, {"spec": {"replicas": 0}})
        until(lambda: not client.CoreV1Api(api).list_namespaced_pod(
            system.SYSTEM_NAMESPACE, label_selector=f"app={system.RUNNER}").items, "the runner pod to stop", timeout=150)
        before = endpoint_objects(kube)
        (result,) = runner.tick(force_full=True)
        # nothing to create, delete or change; the one update allowed is the stack's provider, whose
        # credentials differ (the pod's ServiceAccount, the host's kubeconfig: an in-place update)
        assert result.action == "full" and (result.created, result.deleted, result.failed) == (0, 0, 0) \
            and result.updated <= 1, result.summary()
        assert endpoint_objects(kube) == before
    finally:
        for name in (system.RUNNER, system.HEALTH):
            try:
                apps.delete_namespaced_deployment(name, system.SYSTEM_NAMESPACE)
            except client.ApiException:
                pass


def test_a_node_whose_containerd_died_is_cleaned_up_and_started_again(node_env):
    """The forced path of `down`: containerd killed under running pods (its shims and containers keep
    running); stopping the node still leaves nothing behind, and `up` starts it afresh."""
    import os
    import signal

    region = "local-2"
    apps = client.AppsV1Api(node_env.kube(region))
    core = client.CoreV1Api(node_env.kube(region))
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "orphans", "namespace": NS},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "orphans"}}, "template": {
               "metadata": {"labels": {"app": "orphans"}},
               "spec": {"automountServiceAccountToken": False, "containers": [{
                   "name": "server", "image": localnode.image_ref("model-server"), "resources": SMALL}]}}}}
    apps.create_namespaced_deployment(NS, dep)
    until(lambda: len([p for p in core.list_namespaced_pod(NS, label_selector="app=orphans").items
                       if p.status.phase == "Running"]) == 2, "2 running pods on local-2")
    node = node_env.nodes[region]
    containers = set(node.ctr("containers", "ls", "-q").stdout.split())
    pod_netns = node.pod_netns()
    assert len(pod_netns) >= 2 and node.shim_pids()
    before = replace(node)
    os.kill(node.containerd_pid, signal.SIGKILL)
    assert node.shim_pids(), "the shims outlive containerd"
    node_env._stop_node(node, None, lambda s: None)  # no apiserver help: everything by force
    assert localnode.leftovers([before], containers, pod_netns) == []
    node_env.up()  # the stopped node is started again, in a fresh slot
    assert node_env.status()[f"node {region}-node"]
    apps.delete_namespaced_deployment("orphans", NS)
