"""InferenceEndpoint: wires the pure manifests of one endpoint into Kubernetes resources."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import pulumi
import pulumi_kubernetes as k8s

from . import manifests as m

TYPE = "gco:inference:Endpoint"

# Env values whose name looks like a credential are stored as secrets in the stack state.
_SENSITIVE = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY)", re.I)

TYPE_TOKENS = {
    m.DEPLOYMENT: "kubernetes:apps/v1:Deployment",
    m.CANARY_DEPLOYMENT: "kubernetes:apps/v1:Deployment",
    m.SERVICE: "kubernetes:core/v1:Service",
    m.CANARY_SERVICE: "kubernetes:core/v1:Service",
    m.INGRESS: "kubernetes:networking.k8s.io/v1:Ingress",
    m.CANARY_INGRESS: "kubernetes:networking.k8s.io/v1:Ingress",
    m.HPA: "kubernetes:autoscaling/v2:HorizontalPodAutoscaler",
}

_KINDS = {
    m.DEPLOYMENT: k8s.apps.v1.Deployment,
    m.CANARY_DEPLOYMENT: k8s.apps.v1.Deployment,
    m.SERVICE: k8s.core.v1.Service,
    m.CANARY_SERVICE: k8s.core.v1.Service,
    m.INGRESS: k8s.networking.v1.Ingress,
    m.CANARY_INGRESS: k8s.networking.v1.Ingress,
    m.HPA: k8s.autoscaling.v2.HorizontalPodAutoscaler,
}


@dataclass(frozen=True)
class InferenceEndpointArgs:
    objects: Mapping[str, Mapping[str, Any]]
    """Role -> Kubernetes object, from manifests.desired_objects (plain values, API field names)."""
    fingerprint: str
    """Digest of ``objects``; exported so the runner can skip unchanged endpoints."""
    state: str
    """What was declared: the record's desired_state, or ``error`` when a last-good record is kept."""
    replicas: str = "seed"
    """With an HPA: how the Deployment declares replicas (program.replicas_mode): ``omit``, ``seed``
    or ``ignore``."""


def _protect_secrets(obj: Mapping[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec")
    if not pod:
        return dict(spec)
    containers = []
    for c in pod.get("containers", []):
        env = [{"name": e["name"], "value": pulumi.Output.secret(e["value"])} if _SENSITIVE.search(e["name"]) else e
               for e in c.get("env", [])]
        containers.append({**c, "env": env})
    return {**spec, "template": {**spec["template"], "spec": {**pod, "containers": containers}}}


class InferenceEndpoint(pulumi.ComponentResource):
    """One endpoint in one region: Deployment, Service, Ingress, HPA and canary objects."""

    def __init__(self, name: str, args: InferenceEndpointArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(TYPE, name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.resources: dict[str, pulumi.CustomResource] = {}
        for role in m.ROLES:
            obj = args.objects.get(role)
            if obj is None:
                continue
            meta = obj["metadata"]
            opts, spec = child, _protect_secrets(obj)
            if role == m.DEPLOYMENT and m.HPA in args.objects:
                # The HPA owns the replica count. "ignore": the provider keeps the live count while
                # we still own the field and leaves it alone once the HPA has taken it, so switching
                # autoscaling on never drops running pods and no apply fights the HPA. "omit": a
                # Deployment new to this stack (or adopted) gets no count from us at all.
                if args.replicas == "ignore":
                    opts = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(ignore_changes=["spec.replicas"]))
                elif args.replicas == "omit":
                    spec = {k: v for k, v in spec.items() if k != "replicas"}
            self.resources[role] = _KINDS[role](meta["name"], metadata=meta, spec=spec, opts=opts)
        self.register_outputs({
            "fingerprint": args.fingerprint, "state": args.state,
            "objects": {role: f'{obj["kind"]}/{obj["metadata"]["namespace"]}/{obj["metadata"]["name"]}'
                        for role, obj in args.objects.items()},
        })
