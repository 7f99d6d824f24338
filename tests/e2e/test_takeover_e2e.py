"""Taking over from the controller this project replaces: its objects are adopted in place."""

from __future__ import annotations

import time

from kubernetes import client

from .test_endpoints_e2e import put, status

NS = "gco-inference"


def _old_controller_objects(kube, name: str) -> None:
    """Deployment, Service and Ingress as the old controller created them (selector app: <name>)."""
    labels = {"app": name}
    kube.apps.create_namespaced_deployment(NS, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"serviceAccountName": "gco-service-account",
                                       "containers": [{"name": "inference", "image": "example.com/org/server:1",
                                                       "ports": [{"containerPort": 8000}]}]}}}},
        field_manager="old-controller")
    kube.core.create_namespaced_service(NS, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8000}]}}, field_manager="old-controller")
    kube.net.create_namespaced_ingress(NS, {
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": f"inference-{name}", "labels": labels},
        "spec": {"ingressClassName": "alb", "rules": [{"http": {"paths": [{
            "path": f"/inference/{name}", "pathType": "Prefix",
            "backend": {"service": {"name": name, "port": {"number": 80}}}}]}}]}}, field_manager="old-controller")


def _old_pods(kube, name):
    return [p for p in kube.core.list_namespaced_pod(NS, label_selector=f"app={name},!gco.io/track").items
            if p.metadata.deletion_timestamp is None]


def test_old_controller_objects_are_adopted_without_recreation(env, tick, kube1):
    name = "takeover-a"
    _old_controller_objects(kube1, name)
    deadline = time.monotonic() + 60
    while len(_old_pods(kube1, name)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    old_pods = {p.metadata.uid for p in _old_pods(kube1, name)}
    assert len(old_pods) == 2, "the old controller's pods never appeared"
    uids = {kind: obj.metadata.uid for kind, obj in (("Deployment", kube1.deployment(name)),
                                                      ("Service", kube1.service(name)),
                                                      ("Ingress", kube1.ingress(f"inference-{name}")))}

    put(env, name, replicas=2)
    results = tick()
    local1 = next(r for r in results if r.region == "local-1")
    assert not local1.failed and local1.deleted == 0, local1.summary()
    after = {"Deployment": kube1.deployment(name), "Service": kube1.service(name),
             "Ingress": kube1.ingress(f"inference-{name}")}
    assert {k: o.metadata.uid for k, o in after.items()} == uids  # adopted, none deleted or recreated
    # the Service never stopped finding the running pods: same selector, the old pods still there
    assert after["Service"].spec.selector == {"app": name}
    assert {p.metadata.uid for p in _old_pods(kube1, name)} == old_pods
    # and it is ours now: our labels, probes and annotations on the Deployment
    assert after["Deployment"].metadata.labels["gco.io/type"] == "inference"
    assert after["Deployment"].spec.template.spec.containers[0].readiness_probe is not None
    assert status(env, name)["state"] in ("creating", "updating")
    put(env, name, state="deleted")
    tick()
    assert kube1.deployment(name) is None and kube1.service(name) is None
