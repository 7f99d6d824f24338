"""Pure functions: a validated endpoint and a region -> the Kubernetes objects that serve it.

No Pulumi calls here. The declaration is a pure function of the record, the region and the
cluster settings, so every spec change reaches the cluster and the fingerprint of the result tells
the runner whether anything must be applied at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .endpoint import Endpoint

# Bump when the declaration for an unchanged record changes, so every endpoint is re-applied.
DECLARATION_VERSION = "1"

SKIP_AWAIT = {"pulumi.com/skipAwait": "true"}
DELETION_POLICY = "pulumi.com/deletionPropagationPolicy"
ALB = "alb.ingress.kubernetes.io/"

# Object roles, in the order they are declared.
DEPLOYMENT, SERVICE, INGRESS, HPA = "deployment", "service", "ingress", "hpa"
CANARY_DEPLOYMENT, CANARY_SERVICE, CANARY_INGRESS = "canary-deployment", "canary-service", "canary-ingress"
ROLES = (DEPLOYMENT, SERVICE, INGRESS, HPA, CANARY_DEPLOYMENT, CANARY_SERVICE, CANARY_INGRESS)

ACCELERATOR_RESOURCE = {"nvidia": "nvidia.com/gpu", "neuron": "aws.amazon.com/neuron"}


@dataclass(frozen=True)
class ClusterSettings:
    """What a regional cluster provides; comes from stack config, never from a record."""

    alb_group: str = "gco-inference"
    """ALB IngressGroup shared by all endpoints of the cluster."""
    alb_scheme: str = "internet-facing"
    ingress_class: str = "alb"
    model_volume_claim: str = "gco-models-efs"
    """PersistentVolumeClaim (EFS) that holds model files, mounted at spec.model_path."""
    model_sync_image: str = "public.ecr.aws/aws-cli/aws-cli:2.27.50"
    """Pinned image of the S3 model-sync init container."""
    gpu_node_selectors: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: {
        "nvidia": {"nvidia.com/gpu.present": "true"},
        "neuron": {"aws.amazon.com/neuron.present": "true"},
    })
    capacity_type_label: str = "karpenter.sh/capacity-type"
    startup_period_seconds: int = 10
    startup_failure_threshold: int = 90
    """Startup probe budget: 90 x 10 s = 15 minutes to load a model."""
    readiness_period_seconds: int = 10
    liveness_period_seconds: int = 20
    healthcheck_interval_seconds: int = 15
    service_account: str | None = None
    skip_await_all: bool = False
    """Add pulumi.com/skipAwait to every object (clusters without controllers, e.g. local)."""


def labels(name: str) -> dict[str, str]:
    return {"app": name, "project": "gco", "gco.io/type": "inference"}


def _meta(ep: Endpoint, name: str, settings: ClusterSettings, *, track: str | None = None,
          skip_await: bool = False, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ep.namespace, "labels": labels(ep.name)}
    if track:
        meta["labels"]["gco.io/track"] = track
    # Background deletion, as kubectl does: deletes never wait on the garbage collector.
    notes = {DELETION_POLICY: "background", **(annotations or {})}
    if skip_await or settings.skip_await_all:
        notes.update(SKIP_AWAIT)
    meta["annotations"] = notes
    return meta


def container_args(ep: Endpoint) -> list[str] | None:
    """spec.args, plus --root-path for vLLM/TGI images unless a command overrides the entrypoint."""
    args = list(ep.spec.args or [])
    if ep.spec.command is None and ep.spec.serves_root_path \
            and not any(a == "--root-path" or a.startswith("--root-path=") for a in args):
        args += ["--root-path", ep.ingress_path]
    return args or None


def _resources(ep: Endpoint) -> dict[str, dict[str, str]]:
    requests = dict(sorted(ep.spec.resources.requests.items()))
    limits = dict(sorted(ep.spec.resources.limits.items()))
    if ep.spec.gpu_count > 0:
        key = ACCELERATOR_RESOURCE[ep.spec.accelerator]
        requests[key] = limits[key] = str(ep.spec.gpu_count)
    return {"requests": requests, "limits": limits}


def _probe(ep: Endpoint, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": ep.spec.health_check_path, "port": "http"},
        "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures,
    }


def pod_spec(ep: Endpoint, region: str, settings: ClusterSettings, image: str) -> dict[str, Any]:
    spec = ep.spec
    container: dict[str, Any] = {
        "name": "inference",
        "image": image,
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in sorted(spec.env.items())],
        "resources": _resources(ep),
        "startupProbe": _probe(ep, settings.startup_period_seconds, settings.startup_failure_threshold),
        "readinessProbe": _probe(ep, settings.readiness_period_seconds, 3),
        "livenessProbe": _probe(ep, settings.liveness_period_seconds, 3),
    }
    if spec.command:
        container["command"] = list(spec.command)
    args = container_args(ep)
    if args:
        container["args"] = args
    pod: dict[str, Any] = {"automountServiceAccountToken": False, "containers": [container]}
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account

    selector: dict[str, str] = {}
    if spec.gpu_count > 0:
        selector.update(settings.gpu_node_selectors.get(spec.accelerator, {}))
        key = ACCELERATOR_RESOURCE[spec.accelerator]
        pod["tolerations"] = [{"key": key, "operator": "Exists", "effect": "NoSchedule"}]
    if spec.capacity_type:
        selector[settings.capacity_type_label] = spec.capacity_type
    selector.update(spec.node_selector)
    if selector:
        pod["nodeSelector"] = dict(sorted(selector.items()))

    if spec.model_path:
        pod["volumes"] = [{"name": "models", "persistentVolumeClaim": {"claimName": settings.model_volume_claim}}]
        container["volumeMounts"] = [{"name": "models", "mountPath": spec.model_path, "readOnly": True}]
        if spec.model_source:
            # The URI travels as one argv element: no shell ever parses it.
            pod["initContainers"] = [{
                "name": "model-sync",
                "image": settings.model_sync_image,
                "command": ["aws"],
                "args": ["s3", "sync", spec.model_source, spec.model_path, "--no-progress", "--only-show-errors"],
                "volumeMounts": [{"name": "models", "mountPath": spec.model_path}],
                "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
            }]
    return pod


def _deployment(ep: Endpoint, region: str, settings: ClusterSettings, *, name: str, track: str,
                image: str, replicas: int | None) -> dict[str, Any]:
    match = {"app": ep.name, "gco.io/track": track}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": match},
        "template": {
            "metadata": {"labels": {**labels(ep.name), "gco.io/track": track}},
            "spec": pod_spec(ep, region, settings, image),
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(ep, name, settings, track=track, skip_await=True), "spec": spec}


def _service(ep: Endpoint, settings: ClusterSettings, *, name: str, track: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(ep, name, settings, track=track),
            "spec": {"type": "ClusterIP", "selector": {"app": ep.name, "gco.io/track": track},
                     "ports": [{"name": "http", "port": 80, "targetPort": ep.spec.port, "protocol": "TCP"}]}}


def _alb_annotations(ep: Endpoint, settings: ClusterSettings) -> dict[str, str]:
    return {
        ALB + "group.name": settings.alb_group,
        ALB + "scheme": settings.alb_scheme,
        ALB + "target-type": "ip",
        ALB + "healthcheck-path": ep.spec.health_check_path,
        ALB + "healthcheck-port": "traffic-port",
        ALB + "healthcheck-interval-seconds": str(settings.healthcheck_interval_seconds),
        ALB + "healthy-threshold-count": "2",
        ALB + "unhealthy-threshold-count": "3",
        ALB + "success-codes": "200",
    }


def _ingress(ep: Endpoint, settings: ClusterSettings, *, name: str, backend: dict[str, Any],
             annotations: Mapping[str, str], skip_await: bool = False) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": _meta(ep, name, settings, annotations=annotations, skip_await=skip_await),
            "spec": {"ingressClassName": settings.ingress_class,
                     "rules": [{"http": {"paths": [{"path": ep.ingress_path, "pathType": "Prefix",
                                                    "backend": {"service": backend}}]}}]}}


def ingress_name(name: str) -> str:
    return f"inference-{name}"


def canary_name(name: str) -> str:
    return f"{name}-canary"


def desired_objects(ep: Endpoint, region: str, settings: ClusterSettings) -> dict[str, dict[str, Any]]:
    """Role -> Kubernetes object for this endpoint in this region; empty when nothing is declared."""
    if ep.desired_state == "deleted" or not ep.targets(region):
        return {}
    spec = ep.spec
    image = spec.image_for(region)
    if ep.desired_state == "stopped":
        return {
            DEPLOYMENT: _deployment(ep, region, settings, name=ep.name, track="primary", image=image, replicas=0),
            SERVICE: _service(ep, settings, name=ep.name, track="primary"),
        }
    hpa = spec.autoscaling.enabled
    objects = {
        DEPLOYMENT: _deployment(ep, region, settings, name=ep.name, track="primary", image=image,
                                replicas=None if hpa else spec.replicas),
        SERVICE: _service(ep, settings, name=ep.name, track="primary"),
    }
    withdrawn = ep.status_in(region).ingress_withdrawn
    if not withdrawn:
        objects[INGRESS] = _ingress(ep, settings, name=ingress_name(ep.name),
                                    backend={"name": ep.name, "port": {"number": 80}},
                                    annotations=_alb_annotations(ep, settings))
    if hpa:
        objects[HPA] = {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(ep, ep.name, settings),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ep.name},
                "minReplicas": spec.autoscaling.min_replicas,
                "maxReplicas": spec.autoscaling.max_replicas,
                "metrics": [{"type": "Resource", "resource": {
                    "name": m.type, "target": {"type": "Utilization", "averageUtilization": m.target}}}
                    for m in spec.autoscaling.metrics],
            },
        }
    if spec.canary:
        cname = canary_name(ep.name)
        objects[CANARY_DEPLOYMENT] = _deployment(ep, region, settings, name=cname, track="canary",
                                                 image=spec.canary.image, replicas=spec.canary.replicas)
        objects[CANARY_SERVICE] = _service(ep, settings, name=cname, track="canary")
        if not withdrawn:
            # Evaluated before the primary rule on the same path (lower group.order); deleting it
            # on rollback leaves the primary Ingress exactly as it always was.
            forward = {"type": "forward", "forwardConfig": {"targetGroups": [
                {"serviceName": ep.name, "servicePort": "80", "weight": 100 - spec.canary.weight},
                {"serviceName": cname, "servicePort": "80", "weight": spec.canary.weight},
            ]}}
            notes = _alb_annotations(ep, settings)
            notes[ALB + "group.order"] = "-1"
            notes[ALB + "actions.weighted"] = json.dumps(forward, sort_keys=True, separators=(",", ":"))
            objects[CANARY_INGRESS] = _ingress(
                ep, settings, name=ingress_name(cname), skip_await=True, annotations=notes,
                backend={"name": "weighted", "port": {"name": "use-annotation"}})
    return objects


def declaration(ep: Endpoint, region: str, settings: ClusterSettings) -> tuple[dict[str, dict[str, Any]], str]:
    """The objects for an endpoint in a region and their fingerprint, as program and runner see them.

    The fingerprint also covers the watchdog's ingress flag: an Ingress the health job deleted and
    then re-admitted must be applied again even though the declared objects are the same as before.
    """
    objects = desired_objects(ep, region, settings)
    return objects, fingerprint(objects, marker=ep.status_in(region).ingress or "")


def fingerprint(objects: Mapping[str, Any], marker: str = "") -> str:
    """Stable digest of a declaration: equal fingerprints mean nothing to apply."""
    payload: dict[str, Any] = {"v": DECLARATION_VERSION, "objects": objects}
    if marker:
        payload["marker"] = marker
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
