"""End-to-end fixtures: the real Pulumi engine, Kubernetes provider, a control plane per region (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler) and the moto server."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

import pytest
from kubernetes import client

from gco_infra import localenv
from gco_infra.program import settings_from_stack_file
from gco_infra.runner import Runner, RunnerOptions, with_local_overrides

REQUIRED = ("pulumi", "pulumi-resource-kubernetes", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    missing = [b for b in REQUIRED if not (localenv.tools_bin() / b).exists()]
    if missing:
        pytest.fail(f"real parts missing from {localenv.tools_bin()}: {', '.join(missing)}; "
                    "build them with scripts/tools build (scripts/test does this)", pytrace=False)
    state = tmp_path_factory.mktemp("local-env")
    e = localenv.LocalEnv.load(state)
    try:
        e.up()
    except localenv.LocalEnvError as exc:
        e.down()
        pytest.fail(f"the local environment did not start: {exc}", pytrace=False)
    yield e
    e.down()
    assert not any(e.status().values()), "local environment left processes behind"
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def node_env(tmp_path_factory):
    """A second local environment whose regions each have a real node (kubelet, containerd, runc, CNI,
    kube-proxy) running the images scripts/image built; torn down at the end, and checked to leave no
    process, mount, network namespace or link behind."""
    from gco_infra import localnode

    problems = localnode.missing_prerequisites(localenv.tools_bin())
    if problems:
        pytest.fail("a local node cannot run here: " + "; ".join(problems), pytrace=False)
    state = tmp_path_factory.mktemp("node-env")
    e = localenv.LocalEnv.load(state)
    try:
        e.up(node=True)
    except localenv.LocalEnvError as exc:
        e.down()
        pytest.fail(f"the local environment with nodes did not start: {exc}", pytrace=False)
    yield e
    nodes = [replace(n) for n in e.nodes.values()]  # with their pids, which down clears
    pod_netns = set().union(*(n.pod_netns() for n in nodes))
    containers = set().union(*(set(n.ctr("containers", "ls", "-q").stdout.split()) for n in nodes))
    assert pod_netns and containers, "the node tests left no pod to clean up: the teardown check would prove nothing"
    e.down()
    assert not any(e.status().values()), "local environment left processes behind"
    leftovers = localnode.leftovers(nodes, containers, pod_netns)
    assert not leftovers, f"local down left these behind: {leftovers}"
    shutil.rmtree(state, ignore_errors=True)


def until(check, what, timeout=30.0, every=0.1):
    """``check()``'s first truthy value, polled every ``every`` s; fails after ``timeout`` s (``what``
    may be a function: the message is built when it fails)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")
        time.sleep(every)


def make_runner(env, stacks=("local", "local-2"), **opts) -> Runner:
    settings = [with_local_overrides(settings_from_stack_file(s), str(env.kubeconfig(settings_from_stack_file(s).region)),
                                     env.dynamodb_endpoint, env.table) for s in stacks]
    return Runner(settings, env.store(), env.pulumi_env(), RunnerOptions(**opts))


@pytest.fixture(scope="session")
def runner(env):
    r = make_runner(env)
    yield r
    r.close()


class Kube:
    """Reads objects back from one region's apiserver."""

    def __init__(self, env, region):
        api = env.kube(region)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.net = client.NetworkingV1Api(api)
        self.hpa = client.AutoscalingV2Api(api)

    def _get(self, fn, name, ns):
        try:
            return fn(name, ns)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def deployment(self, name, ns="gco-inference"):
        return self._get(self.apps.read_namespaced_deployment, name, ns)

    def written(self, name, ns="gco-inference"):
        """What our updates last wrote to a Deployment: its generation and the times of the Pulumi
        provider's managedFields entries. Unlike the resourceVersion, the controllers' status writes
        (which go on for a while after an apply) leave it alone."""
        d = self.deployment(name, ns)
        return (d.metadata.generation, sorted(str(f.time) for f in d.metadata.managed_fields or []
                                              if (f.manager or "").startswith("pulumi-kubernetes")))

    def service(self, name, ns="gco-inference"):
        return self._get(self.core.read_namespaced_service, name, ns)

    def ingress(self, name, ns="gco-inference"):
        return self._get(self.net.read_namespaced_ingress, name, ns)

    def autoscaler(self, name, ns="gco-inference"):
        return self._get(self.hpa.read_namespaced_horizontal_pod_autoscaler, name, ns)

    def names(self, label="gco.io/type=inference"):
        out = set()
        for d in self.apps.list_deployment_for_all_namespaces(label_selector=label).items:
            out.add(("Deployment", d.metadata.name))
        for s in self.core.list_service_for_all_namespaces(label_selector=label).items:
            out.add(("Service", s.metadata.name))
        for i in self.net.list_ingress_for_all_namespaces(label_selector=label).items:
            out.add(("Ingress", i.metadata.name))
        for h in self.hpa.list_horizontal_pod_autoscaler_for_all_namespaces(label_selector=label).items:
            out.add(("HPA", h.metadata.name))
        return out

    def of(self, endpoint):
        return {(k, n) for k, n in self.names(f"app={endpoint}")}


@pytest.fixture(scope="session")
def kube1(env):
    return Kube(env, "local-1")


@pytest.fixture(scope="session")
def kube2(env):
    return Kube(env, "local-2")


@pytest.fixture
def tick(runner):
    def run(**kw):
        results = runner.tick(**kw)
        for r in results:
            assert r.action not in ("failed", "refused", "skipped"), r.summary() + f" {r.endpoint_errors}"
        return results
    return run


__all__ = ["Kube", "make_runner", "replace", "until"]
