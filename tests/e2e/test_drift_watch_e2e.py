"""The drift watch against a real kube-apiserver and controller manager: objects applied the way
pulumi-kubernetes applies them (server-side apply, its field manager), then edited, scaled and
deleted by others. Our own re-applies and the HPA are not drift; the others are, each reported for
its endpoint within seconds, with no list call after the first ones."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from kubernetes import client

from gco_infra import localenv
from gco_infra.drift import DriftWatch, watch_api_for
from gco_infra.manifests import labels
from gco_infra.program import StackSettings

from .conftest import until

NS = "gco-inference"
OURS = "pulumi-kubernetes-abc123"
APPLY = "application/apply-patch+yaml"
SENTINEL = "drift-sentinel"


@pytest.fixture(scope="module")
def env1(tmp_path_factory):
    missing = [b for b in ("etcd", "kube-apiserver", "kube-controller-manager") if not (localenv.tools_bin() / b).exists()]
    if missing:
        pytest.fail(f"real parts missing from {localenv.tools_bin()}: {', '.join(missing)}", pytrace=False)
    state = tmp_path_factory.mktemp("drift-env")
    e = localenv.LocalEnv.load(state)
    try:
        e.up(regions=("local-1",))
    except localenv.LocalEnvError as exc:
        e.down()
        pytest.fail(f"the local environment did not start: {exc}", pytrace=False)
    yield e
    e.down()
    assert not any(e.status().values()), "local environment left processes behind"
    shutil.rmtree(state, ignore_errors=True)


def deployment(name, image="registry.local/model:1", replicas=1, probe="ours"):
    spec = {"selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": labels(name)},
                         "spec": {"containers": [{"name": "inference", "image": image}]}}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS, "labels": labels(name), "annotations": {"gco.io/probe": probe}},
            "spec": spec}


def service(name):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS, "labels": labels(name)},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8000}]}}


def ingress(name):
    backend = {"service": {"name": name, "port": {"number": 80}}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": f"inference-{name}", "namespace": NS, "labels": labels(name)},
            "spec": {"ingressClassName": "alb", "rules": [{"http": {"paths": [
                {"path": f"/inference/{name}", "pathType": "Prefix", "backend": backend}]}}]}}


def autoscaler(name, min_replicas):
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": NS, "labels": labels(name)},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": min_replicas, "maxReplicas": 4,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": 70}}}]}}


class Cluster:
    def __init__(self, api):
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.net = client.NetworkingV1Api(api)
        self.hpa = client.AutoscalingV2Api(api)

    def apply(self, obj, manager=OURS):
        """Server-side apply as pulumi-kubernetes does it (its field manager, force)."""
        name, kw = obj["metadata"]["name"], {"field_manager": manager, "force": True, "_content_type": APPLY}
        fn = {"Deployment": self.apps.patch_namespaced_deployment, "Service": self.core.patch_namespaced_service,
              "Ingress": self.net.patch_namespaced_ingress,
              "HorizontalPodAutoscaler": self.hpa.patch_namespaced_horizontal_pod_autoscaler}[obj["kind"]]
        fn(name, NS, obj, **kw)

    def edit_deployment(self, name, body, manager="kubectl-edit"):
        self.apps.patch_namespaced_deployment(name, NS, body, field_manager=manager,
                                              _content_type="application/strategic-merge-patch+json")


class Drifts:
    """Everything the watch reported, taken as it comes."""

    def __init__(self, watch):
        self.watch = watch
        self.seen: dict[str, list] = {}

    def poll(self):
        for endpoint, drift in self.watch.take().items():
            self.seen.setdefault(endpoint, []).append(drift)

    def wait_for(self, endpoint, what, timeout=10.0):
        def got():
            self.poll()
            return self.seen.pop(endpoint, None)
        try:
            return until(got, f"drift of endpoint {endpoint} ({what})", timeout=timeout, every=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the watch reported {self.seen}, errors {self.watch.errors}") from None

    def barrier(self, cluster, n=[0]):
        """Every Deployment event before this one has been judged: the same watch stream reports a
        fresh edit of the sentinel (events of a stream are handled in order)."""
        n[0] += 1
        cluster.apply(deployment(SENTINEL))
        cluster.edit_deployment(SENTINEL, {"metadata": {"annotations": {"gco.io/probe": f"edit-{n[0]}"}}})
        drifts = self.wait_for(SENTINEL, "sentinel edit")
        assert [d.reason for d in drifts] == ["changed by kubectl-edit"]


def test_drift_watch_on_a_real_apiserver(env1):
    api = env1.kube("local-1")
    kube = Cluster(api)
    for obj in (deployment("drift-a"), service("drift-a"), ingress("drift-a"), deployment(SENTINEL),
                deployment("drift-h", replicas=1), autoscaler("drift-h", min_replicas=2)):
        kube.apply(obj)
    # not ours (no pulumi-kubernetes manager): ignored whatever happens to it
    kube.apply(deployment("drift-other"), manager="helm")

    settings = StackSettings(stack="local-1", region="local-1", allowed_namespaces=localenv.NAMESPACES,
                             kubeconfig=str(env1.kubeconfig("local-1")))
    watch_api = watch_api_for(settings)
    assert watch_api is not None
    woken = []
    watch = DriftWatch(watch_api, settings.allowed_namespaces, on_change=lambda: woken.append(time.monotonic()),
                       timeout_seconds=30)
    watch.start()
    try:
        until(lambda: watch.ready, "the initial lists", timeout=15)
        initial_lists = watch.lists
        assert initial_lists == 4 * len(localenv.NAMESPACES)
        drifts = Drifts(watch)

        # our own applies, including one that changes the image and one that stops declaring a field
        kube.apply(deployment("drift-a", image="registry.local/model:2"))
        kube.apply(deployment("drift-a", image="registry.local/model:2", replicas=None))
        kube.apply(deployment("drift-a", image="registry.local/model:2", replicas=1))
        kube.apply(service("drift-a"))
        kube.edit_deployment("drift-other", {"spec": {"template": {"spec": {"containers": [
            {"name": "inference", "image": "registry.local/other:9"}]}}}})
        # the HPA raises replicas to its minimum through the scale subresource
        until(lambda: kube.apps.read_namespaced_deployment("drift-h", NS).spec.replicas == 2,
              "the HPA to scale drift-h to its minimum", timeout=60)
        drifts.barrier(kube)
        drifts.poll()
        assert drifts.seen == {}, f"our own applies, the HPA or a foreign object reported as drift: {drifts.seen}"

        # a person edits the image
        kube.edit_deployment("drift-a", {"spec": {"template": {"spec": {"containers": [
            {"name": "inference", "image": "registry.local/hotfix:1"}]}}}})
        got = drifts.wait_for("drift-a", "kubectl edit of the image")
        assert [(d.kind, d.name, d.reason) for d in got] == [("Deployment", "drift-a", "changed by kubectl-edit")]
        assert woken and got[0].seen <= time.monotonic()

        # our repair (re-apply) is not drift; a kubectl scale afterwards is
        kube.apply(deployment("drift-a", image="registry.local/model:2", replicas=1))
        drifts.barrier(kube)
        drifts.poll()
        assert "drift-a" not in drifts.seen, f"our repair was reported as drift: {drifts.seen}"
        kube.apps.patch_namespaced_deployment_scale("drift-a", NS, {"spec": {"replicas": 3}}, field_manager="kubectl",
                                                    _content_type="application/merge-patch+json")
        got = drifts.wait_for("drift-a", "kubectl scale")
        assert [(d.kind, d.reason) for d in got] == [("Deployment", "changed by kubectl (scale)")]

        # someone deletes the Service
        kube.core.delete_namespaced_service("drift-a", NS)
        got = drifts.wait_for("drift-a", "the Service deleted")
        assert [(d.kind, d.namespace, d.name, d.reason) for d in got] == [("Service", NS, "drift-a", "deleted")]

        # and the Ingress, in another stream
        kube.net.delete_namespaced_ingress("inference-drift-a", NS)
        got = drifts.wait_for("drift-a", "the Ingress deleted")
        assert [(d.kind, d.name, d.reason) for d in got] == [("Ingress", "inference-drift-a", "deleted")]

        assert watch.lists == initial_lists, "the watch listed again in steady state"
        assert watch.watches >= 4 * len(localenv.NAMESPACES) and watch.events > 0
        assert watch.errors == {}
    finally:
        started = time.monotonic()
        watch.stop()
        stopped_in = time.monotonic() - started
        watch_api.close()
    assert stopped_in < 5, f"stop() took {stopped_in:.1f}s"
    assert not [t.name for t in threading.enumerate() if t.name.startswith("drift-watch")], "watch threads left running"


def test_a_broken_watch_resumes_without_losing_events(env1):
    """A watch connection that breaks resumes from its resourceVersion (no list): what happened while
    it was down is still reported."""
    api = env1.kube("local-1")
    kube = Cluster(api)
    kube.apply(deployment("drift-r"))
    kube.apply(deployment("drift-r2"))
    watch = DriftWatch(api, [NS], timeout_seconds=30, backoff=(2.0, 30.0))
    watch.start()
    try:
        until(lambda: watch.ready, "the initial lists", timeout=15)
        drifts = Drifts(watch)
        stream = next(s for s in watch._streams if s.kind.kind == "Deployment")
        until(lambda: stream.response is not None and watch.watches == 4, "the Deployment watch to be open")
        watch._shutdown(stream)  # the connection drops; the stream waits out its backoff (2 s)
        until(lambda: "Deployment/gco-inference" in watch.errors, "the broken watch to be reported", timeout=5)
        kube.apps.delete_namespaced_deployment("drift-r", NS)
        got = drifts.wait_for("drift-r", "drift-r deleted while the watch was down")
        assert [(d.kind, d.reason) for d in got] == [("Deployment", "deleted")]
        kube.edit_deployment("drift-r2", {"spec": {"template": {"spec": {"containers": [
            {"name": "inference", "image": "registry.local/hotfix:2"}]}}}})
        got = drifts.wait_for("drift-r2", "kubectl edit after the resume")
        assert [d.reason for d in got] == ["changed by kubectl-edit"]
        assert watch.lists == 4 and watch.watches == 5, (watch.lists, watch.watches)
        assert watch.errors == {} and drifts.seen == {}
    finally:
        watch.stop()
