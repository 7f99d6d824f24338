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

from .endpoint import Endpoint, Metric, serves_root_path

# Bump when the declaration for an unchanged record changes (objects, resource options, what is kept
# secret), so every endpoint is re-applied: a runner's start declares again only the endpoints whose
# fingerprint changed or whose objects someone else changed, and the fingerprint covers the objects alone.
DECLARATION_VERSION = "2"

SKIP_AWAIT = {"pulumi.com/skipAwait": "true"}
PATCH_FORCE = {"pulumi.com/patchForce": "true"}
DELETION_POLICY = "pulumi.com/deletionPropagationPolicy"
REVISION_ANNOTATION = "gco.io/revision"
"""On the Deployments of an endpoint rolled out under a policy: the revision (spec digest) declared,
which the health job reports per region (see rollout.py)."""
ALB = "alb.ingress.kubernetes.io/"

# Object roles, in the order they are declared.
DEPLOYMENT, SERVICE, INGRESS, HPA = "deployment", "service", "ingress", "hpa"
CANARY_DEPLOYMENT, CANARY_SERVICE, CANARY_INGRESS = "canary-deployment", "canary-service", "canary-ingress"
ROLES = (DEPLOYMENT, SERVICE, INGRESS, HPA, CANARY_DEPLOYMENT, CANARY_SERVICE, CANARY_INGRESS)

ACCELERATOR_RESOURCE = {"nvidia": "nvidia.com/gpu", "neuron": "aws.amazon.com/neuron"}
SERVING_CONTAINER, MODEL_SYNC_CONTAINER = "inference", "model-sync"
# amazon-eks-pod-identity-webhook: containers listed here get no AWS credentials (IRSA or EKS Pod
# Identity); every other container of the pod does.
SKIP_CONTAINERS = "eks.amazonaws.com/skip-containers"


@dataclass(frozen=True)
class ClusterSettings:
    """What a regional cluster provides; comes from stack config, never from a record."""

    alb_group: str = "gco-inference"
    """ALB IngressGroup shared by all endpoints of the cluster."""
    alb_scheme: str = "internet-facing"
    ingress_class: str = "alb"
    model_volume_claim: str = "efs-claim"
    """PersistentVolumeClaim (EFS) shared by all endpoints; each one mounts only its own
    directory ``<name>`` on it (subPath), at spec.model_path."""
    model_sync_image: str = "public.ecr.aws/aws-cli/aws-cli:2.27.50"
    """Pinned image of the S3 model-sync init container."""
    gpu_node_selectors: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: {
        "nvidia": {"eks.amazonaws.com/instance-gpu-manufacturer": "nvidia"},
        "neuron": {"accelerator": "neuron"},
    })
    """Per accelerator, the node labels of the cluster's GPU / Neuron nodes."""
    capacity_type_label: str = "karpenter.sh/capacity-type"
    startup_period_seconds: int = 10
    startup_failure_threshold: int = 90
    """Startup probe budget: 90 x 10 s = 15 minutes to load a model."""
    readiness_period_seconds: int = 10
    liveness_period_seconds: int = 20
    healthcheck_interval_seconds: int = 15
    service_account: str | None = "gco-service-account"
    """ServiceAccount of inference pods; its IAM role (S3 read) reaches only the model-sync container."""
    gpu_utilization_metric: str | None = None
    """Per-pod metric (custom metrics API) that autoscaling metric ``gpu`` scales on; None: the
    cluster serves none, so that metric is left out of the HPA (see declaration_notes)."""


def labels(name: str) -> dict[str, str]:
    return {"app": name, "project": "gco", "gco.io/type": "inference"}


def _meta(ep: Endpoint, name: str, settings: ClusterSettings, *, track: str | None = None,
          annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Object metadata: labels, and what the provider does with the object.

    - skipAwait on every kind: whatever the provider would wait for depends on pods being ready
      (Deployment rollout, Service endpoints, Ingress address from the ALB controller), and an
      apply never waits for model loading or GPU capacity; readiness is the health job's business.
    - patchForce: our declared fields win a server-side-apply conflict with another field manager
      (`kubectl scale`, a hand edit, the HPA after autoscaling is switched off), so drift is
      repaired instead of failing every following update.
    - background deletion: the provider waits until a deleted object is gone (skipAwait does not
      cover deletes of these kinds); foreground would make that wait include every pod's graceful
      termination. The garbage collector removes replica sets and pods afterwards.
    """
    meta: dict[str, Any] = {"name": name, "namespace": ep.namespace, "labels": labels(ep.name)}
    if track:
        meta["labels"]["gco.io/track"] = track
    meta["annotations"] = {DELETION_POLICY: "background", **SKIP_AWAIT, **PATCH_FORCE, **(annotations or {})}
    return meta


def container_args(ep: Endpoint, image: str | None = None) -> list[str] | None:
    """spec.args, plus --root-path when ``image`` is vLLM/TGI, unless a command overrides the entrypoint.

    ``image`` is the image the Deployment runs as the record names it: spec.image for the primary
    (its region_image_uris are copies of it), canary.image for the canary. Default spec.image.
    """
    args = list(ep.spec.args or [])
    if ep.spec.command is None and serves_root_path(image or ep.spec.image) \
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


def pod_spec(ep: Endpoint, region: str, settings: ClusterSettings, image: str,
             args_image: str | None = None) -> dict[str, Any]:
    """The pod of a Deployment running ``image``; ``args_image`` decides --root-path (container_args)."""
    spec = ep.spec
    container: dict[str, Any] = {
        "name": SERVING_CONTAINER,
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
    args = container_args(ep, args_image)
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
        # Only the endpoint's own directory <name> of the shared claim is mounted (subPath), so no
        # container of it can see or write another endpoint's files; the serving side reads only.
        pod["volumes"] = [{"name": "models", "persistentVolumeClaim": {"claimName": settings.model_volume_claim}}]
        mount = {"name": "models", "mountPath": spec.model_path, "subPath": ep.name}
        container["volumeMounts"] = [{**mount, "readOnly": True}]
        if spec.model_source:
            # The URI travels as one argv element: no shell ever parses it.
            pod["initContainers"] = [{
                "name": MODEL_SYNC_CONTAINER,
                "image": settings.model_sync_image,
                "command": ["aws"],
                "args": ["s3", "sync", spec.model_source, spec.model_path, "--no-progress", "--only-show-errors"],
                "volumeMounts": [dict(mount)],
                "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
            }]
    return pod


def pod_selector(name: str, track: str) -> dict[str, str]:
    """The labels a Deployment and its Service select pods by.

    The primary selects ``app: <name>``, exactly as the controller this project replaces did, so
    its Deployments and Services are adopted in place (a Deployment's selector cannot change, and
    the Service keeps finding the running pods throughout the takeover). Canary pods therefore carry
    ``app: <name>-canary`` (and ``gco.io/canary-of: <name>``), never ``app: <name>``, so neither the
    primary Deployment nor the primary Service ever picks them up.
    """
    if track == "primary":
        return {"app": name}
    return {"app": canary_name(name), "gco.io/track": track}


def pod_labels(name: str, track: str) -> dict[str, str]:
    extra = {} if track == "primary" else {"gco.io/canary-of": name}
    return {**labels(name), "gco.io/track": track, **extra, **pod_selector(name, track)}


def _deployment(ep: Endpoint, region: str, settings: ClusterSettings, *, name: str, track: str,
                image: str, replicas: int | None, args_image: str | None = None) -> dict[str, Any]:
    pod = pod_spec(ep, region, settings, image, args_image)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": pod_selector(ep.name, track)},
        "template": {
            "metadata": {
                "labels": pod_labels(ep.name, track),
                # The ServiceAccount's AWS role is for the model-sync init container only.
                "annotations": {SKIP_CONTAINERS: ",".join(c["name"] for c in pod["containers"])},
            },
            "spec": pod,
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    notes = {REVISION_ANNOTATION: ep.revision} if ep.revision else None
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(ep, name, settings, track=track, annotations=notes), "spec": spec}


def _service(ep: Endpoint, settings: ClusterSettings, *, name: str, track: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(ep, name, settings, track=track),
            "spec": {"type": "ClusterIP", "selector": pod_selector(ep.name, track),
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
             annotations: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": _meta(ep, name, settings, annotations=annotations),
            "spec": {"ingressClassName": settings.ingress_class,
                     "rules": [{"http": {"paths": [{"path": ep.ingress_path, "pathType": "Prefix",
                                                    "backend": {"service": backend}}]}}]}}


def ingress_name(name: str) -> str:
    return f"inference-{name}"


def canary_name(name: str) -> str:
    return f"{name}-canary"


def _hpa_metric(m: Metric, settings: ClusterSettings) -> dict[str, Any] | None:
    if m.type == "gpu":
        if not settings.gpu_utilization_metric:
            return None
        return {"type": "Pods", "pods": {"metric": {"name": settings.gpu_utilization_metric},
                                         "target": {"type": "AverageValue", "averageValue": str(m.target)}}}
    return {"type": "Resource", "resource": {
        "name": m.type, "target": {"type": "Utilization", "averageUtilization": m.target}}}


def _hpa_spec(ep: Endpoint, region: str, settings: ClusterSettings) -> tuple[dict[str, Any], list[str]]:
    """The HPA spec and, for each metric the cluster cannot serve, why it was left out.

    A ``gpu`` metric needs the stack's gco:gpuUtilizationMetric; without it that metric is left out,
    never the endpoint. When no metric is left, the spec has no ``metrics`` key at all: the API server
    then defaults it to 80% average CPU utilization (as it does for an empty list), and leaving the
    field to that default keeps the declared object equal to the stored one. The note says so.
    """
    a = ep.spec.autoscaling
    metrics, notes = [], []
    for i, m in enumerate(a.metrics):
        declared = _hpa_metric(m, settings)
        if declared is None:
            notes.append(f'endpoint "{ep.name}": spec.autoscaling.metrics[{i}] type {m.type} is not declared in '
                         f"region {region}: the stack sets no gco:gpuUtilizationMetric")
        else:
            metrics.append(declared)
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ep.name},
        "minReplicas": a.min_replicas,
        "maxReplicas": a.max_replicas,
    }
    if metrics:
        spec["metrics"] = metrics
    elif notes:
        notes[-1] += ("; with no other metric the HPA scales on the Kubernetes default, "
                      "80% average CPU utilization")
    return spec, notes


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
        # With an HPA the count only seeds a new Deployment: the component ignores later changes
        # of spec.replicas, so the HPA owns it (see component.InferenceEndpoint).
        DEPLOYMENT: _deployment(ep, region, settings, name=ep.name, track="primary", image=image,
                                replicas=spec.autoscaling.min_replicas if hpa else spec.replicas),
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
            "spec": _hpa_spec(ep, region, settings)[0],
        }
    if spec.canary:
        cname = canary_name(ep.name)
        objects[CANARY_DEPLOYMENT] = _deployment(ep, region, settings, name=cname, track="canary",
                                                 image=spec.canary.image, replicas=spec.canary.replicas,
                                                 args_image=spec.canary.image)
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
                ep, settings, name=ingress_name(cname), annotations=notes,
                backend={"name": "weighted", "port": {"name": "use-annotation"}})
    return objects


def declaration(ep: Endpoint, region: str, settings: ClusterSettings) -> tuple[dict[str, dict[str, Any]], str]:
    """The objects for an endpoint in a region and their fingerprint, as program and runner see them.

    The fingerprint also covers the watchdog's ingress flag: an Ingress the health job deleted and
    then re-admitted must be applied again even though the declared objects are the same as before.
    """
    objects = desired_objects(ep, region, settings)
    return objects, fingerprint(objects, marker=ep.status_in(region).ingress or "")


def declaration_notes(ep: Endpoint, region: str, settings: ClusterSettings) -> tuple[str, ...]:
    """What of the record is not declared in this region and why, for the region status message.

    Empty when everything is declared. Today: autoscaling metrics the cluster cannot serve (a
    ``gpu`` metric without gco:gpuUtilizationMetric). The endpoint itself is declared either way.
    """
    if ep.desired_state not in ("deploying", "running") or not ep.targets(region) or not ep.spec.autoscaling.enabled:
        return ()
    return tuple(_hpa_spec(ep, region, settings)[1])


def fingerprint(objects: Mapping[str, Any], marker: str = "") -> str:
    """Stable digest of a declaration: equal fingerprints mean nothing to apply."""
    payload: dict[str, Any] = {"v": DECLARATION_VERSION, "objects": objects}
    if marker:
        payload["marker"] = marker
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
