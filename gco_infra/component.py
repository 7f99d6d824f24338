"""InferenceEndpoint: wires the pure manifests of one endpoint into Kubernetes resources."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import pulumi
from pulumi.runtime import rpc

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


class KubernetesObject(pulumi.CustomResource):
    """One Kubernetes object from a plain manifest, registered as the generated classes
    (``pulumi_kubernetes.apps.v1.Deployment``, ...) register it: the same type token, name, inputs
    and provider, so a stack they applied sees no change.

    Two per-object costs of those classes are left out (bench/RESULTS.md, fourth step): their aliases
    to API versions this program never declared (three for a Deployment and an HPA, two for an
    Ingress), and reading the live object back. The engine answers each registration with it
    (managedFields and status included) and the SDK translates it into typed output classes: a
    third of a declaring worker's CPU, for outputs the program never reads. So every output but
    ``urn`` and ``id`` resolves to None (unknown in a preview, or where the SDK marks it so); read
    the live object from the cluster instead.
    """

    outputs_read_back = False

    def __init__(self, type_token: str, obj: Mapping[str, Any], spec: Any,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        _outputs_not_read_back()
        meta = obj["metadata"]
        super().__init__(type_token, meta["name"],
                         {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": meta, "spec": spec}, opts)


_SDK_RESOLVE_OUTPUTS = rpc.resolve_outputs


def _resolve_outputs(res: Any, serialized_props: Any, outputs: Any, deps: Any, resolvers: Any, custom: bool,
                     transform_using_type_metadata: bool = False, keep_unknowns: bool = False,
                     resolve_missing_as_unknown: bool = False) -> None:
    if getattr(type(res), "outputs_read_back", True) is False:
        rpc.resolve_properties(resolvers, {}, {}, custom, resolve_missing_as_unknown)
        return
    _SDK_RESOLVE_OUTPUTS(res, serialized_props, outputs, deps, resolvers, custom, transform_using_type_metadata,
                         keep_unknowns, resolve_missing_as_unknown)


def _outputs_not_read_back() -> None:
    """Install, once per process, the hook that leaves KubernetesObject outputs unread: the pinned
    SDK (3.272.0) resolves every resource's outputs through ``pulumi.runtime.rpc.resolve_outputs``
    (registered, read or got); any other resource resolves as the SDK does."""
    if rpc.resolve_outputs is _SDK_RESOLVE_OUTPUTS:
        rpc.resolve_outputs = _resolve_outputs


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
        self.resources: dict[str, KubernetesObject] = {}
        for role in m.ROLES:
            obj = args.objects.get(role)
            if obj is None:
                continue
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
            self.resources[role] = KubernetesObject(TYPE_TOKENS[role], obj, spec, opts)
        self.register_outputs({
            "fingerprint": args.fingerprint, "state": args.state,
            "objects": {role: f'{obj["kind"]}/{obj["metadata"]["namespace"]}/{obj["metadata"]["name"]}'
                        for role, obj in args.objects.items()},
        })
