"""What every regional cluster holds before any endpoint: the gco-system objects (pure, no Pulumi).

The one definition of the runner's and the health job's Kubernetes side. The platform stack
(platform_stack.py) applies all of it to each EKS cluster; the local environment (localenv.py)
applies ``identities`` (namespace, ServiceAccounts, RBAC) to each local region, without the
Deployments, which need an image.

Who is who in a cluster:

- the runner applies the endpoints stacks in its pod as its ServiceAccount (``GCO_IN_CLUSTER=true``:
  the stacks' provider uses the pod's token, program.make_provider); EKS Pod Identity gives that
  ServiceAccount the runner's IAM role. Besides the inference kinds it may only read pods of
  gco-system (is the holder of a stack lock, a runner pod, gone?).
- the health job runs in the cluster with its ServiceAccount's token (``--in-cluster``).
- the preview (pull requests) comes from outside: its IAM role is mapped by an access entry to the
  group ``PREVIEW_GROUP``, which may only read the four kinds the endpoints use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

SYSTEM_NAMESPACE = "gco-system"
RUNNER = "gco-runner"
HEALTH = "gco-health"
PREVIEW = "gco-preview"
PREVIEW_GROUP = "gco-preview"
"""Kubernetes group of the preview's IAM role (EKS access entry): read-only."""
HEALTH_LEASE = "gco-health"
"""The health job's leader-election Lease (health.LeaseElector's default name)."""
LIVENESS_PORT = 8081
RUN_AS = 10001

INFERENCE_KINDS: tuple[tuple[str, str], ...] = (
    ("apps", "deployments"),
    ("", "services"),
    ("networking.k8s.io", "ingresses"),
    ("autoscaling", "horizontalpodautoscalers"),
)
"""(API group, resource) of every kind an endpoint's declaration uses (manifests.ROLES)."""
WRITE = ("get", "list", "watch", "create", "update", "patch", "delete")
READ = ("get", "list", "watch")

PLURALS = {"Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "Role": "roles",
           "RoleBinding": "rolebindings", "Deployment": "deployments",
           "PodDisruptionBudget": "poddisruptionbudgets", "NetworkPolicy": "networkpolicies"}
"""The REST resource of each kind defined here (for a server-side apply by URL)."""

RBAC = "rbac.authorization.k8s.io"


def _labels(app: str | None = None) -> dict[str, str]:
    return {"project": "gco", **({"app": app} if app else {})}


def namespace() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE, "labels": _labels()}}


def service_accounts() -> list[dict[str, Any]]:
    """The runner's and the health job's identities (EKS Pod Identity associates their IAM roles)."""
    return [{"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": _labels(name)}}
            for name in (RUNNER, HEALTH)]


def _role(name: str, namespace: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": f"{RBAC}/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": namespace, "labels": _labels()}, "rules": rules}


def _binding(name: str, namespace: str, subjects: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": f"{RBAC}/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace, "labels": _labels()},
            "subjects": subjects, "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name}}


def _service_account(name: str) -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": name, "namespace": SYSTEM_NAMESPACE}


def _group(name: str) -> dict[str, str]:
    return {"kind": "Group", "apiGroup": RBAC, "name": name}


def runner_rules() -> list[dict[str, Any]]:
    """Full control of exactly the kinds an endpoint's declaration uses, nothing else."""
    return [{"apiGroups": [group], "resources": [resource], "verbs": list(WRITE)} for group, resource in INFERENCE_KINDS]


def health_rules() -> list[dict[str, Any]]:
    """Readiness (Deployments) and the watchdog (it may only delete Ingresses); both kinds are also
    watched (the job's watch cache)."""
    return [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["get", "list", "watch", "delete"]}]


def runner_pod_rules() -> list[dict[str, Any]]:
    """Whether a runner pod that holds a stack lock still exists (state.pod_gone_from_env): ``get`` only."""
    return [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]


def lease_rules() -> list[dict[str, Any]]:
    """One Lease, in gco-system. ``create`` cannot be limited by name (the object does not exist yet)."""
    return [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [HEALTH_LEASE],
             "verbs": ["get", "update"]}]


def preview_rules() -> list[dict[str, Any]]:
    """What a preview reads (``--refresh`` reads every declared object); its server-side dry runs are
    refused, and the provider then diffs on the client side."""
    return [{"apiGroups": [group], "resources": [resource], "verbs": list(READ)} for group, resource in INFERENCE_KINDS]


def rbac(namespaces: Iterable[str]) -> list[dict[str, Any]]:
    """Roles and RoleBindings: in each inference namespace the runner's, the health job's and the
    preview's; in gco-system the health job's Lease and the runner's view of its own pods."""
    out: list[dict[str, Any]] = []
    for ns in namespaces:
        out += [_role(RUNNER, ns, runner_rules()),
                _binding(RUNNER, ns, [_service_account(RUNNER)]),
                _role(HEALTH, ns, health_rules()),
                _binding(HEALTH, ns, [_service_account(HEALTH)]),
                _role(PREVIEW, ns, preview_rules()),
                _binding(PREVIEW, ns, [_group(PREVIEW_GROUP)])]
    lease, pods = f"{HEALTH}-lease", f"{RUNNER}-pods"
    out += [_role(lease, SYSTEM_NAMESPACE, lease_rules()),
            _binding(lease, SYSTEM_NAMESPACE, [_service_account(HEALTH)]),
            _role(pods, SYSTEM_NAMESPACE, runner_pod_rules()),
            _binding(pods, SYSTEM_NAMESPACE, [_service_account(RUNNER)])]
    return out


def identities(namespaces: Iterable[str]) -> list[dict[str, Any]]:
    """Namespace gco-system, the ServiceAccounts and all RBAC, in apply order (what needs no image)."""
    return [namespace(), *service_accounts(), *rbac(namespaces)]


# ---- workloads ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workloads:
    """What the runner's and the health job's Deployments need from the platform stack's config."""

    image: str
    """One image runs the runner and the health job (and the preview)."""
    stack: str
    """The region's endpoints stack (``stacks/Pulumi.<stack>.yaml``): GCO_STACK."""
    aws_region: str
    backend_url: str
    """PULUMI_BACKEND_URL: the S3 state backend, e.g. ``s3://<bucket>?region=us-east-1``."""
    secrets_provider: str
    """Secrets provider of the endpoints stacks, e.g. ``awskms://alias/gco-infra-state?region=us-east-1``."""
    tmp_dir: str = "/tmp"
    """Writable scratch space (the root filesystem is read-only), TMPDIR: an emptyDir. The runner's
    private copy of the project, where the engine runs, lives here."""
    home_dir: str = "/home/gco"
    """HOME of the runner (the image's user), an emptyDir: PULUMI_HOME is ``<home_dir>/.pulumi``."""
    interval: int = 2
    full_every: int = 21600
    """The sweep's period, the backstop: drift is repaired by the runner's watch in seconds."""
    parallel: int = 2
    """Runner operations at once, each in a worker process (the pod's CPU limit is 2)."""
    health_replicas: int = 2

    @property
    def pulumi_home(self) -> str:
        return f"{self.home_dir.rstrip('/')}/.pulumi"


POD_NAME_ENV, POD_NAMESPACE_ENV = "GCO_POD_NAME", "GCO_POD_NAMESPACE"
"""The pod's own name and namespace (downward API), as the runner reads them (state.POD_NAME)."""


def _pod_env(w: Workloads, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    env = [{"name": "GCO_STACK", "value": w.stack}, {"name": "AWS_REGION", "value": w.aws_region},
           {"name": "GCO_IN_CLUSTER", "value": "true"}, {"name": "TMPDIR", "value": w.tmp_dir}]
    env += [{"name": k, "value": v} for k, v in (extra or {}).items()]
    env += [{"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": POD_NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    return env


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _deployment(name: str, replicas: int, pod: dict[str, Any], strategy: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                            "template": {"metadata": {"labels": _labels(name)}, "spec": pod}}
    if strategy:
        spec["strategy"] = strategy
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": _labels(name)}, "spec": spec}


def runner_deployment(w: Workloads) -> dict[str, Any]:
    """One replica, recreated (never two during a rollout): the stack lock would make a second one
    skip its ticks, not corrupt anything, but there is nothing to gain from overlap."""
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]
    container = {
        "name": "runner", "image": w.image,
        "args": ["run", "--stack", "$(GCO_STACK)", "--interval", str(w.interval), "--full-every", str(w.full_every),
                 "--parallel", str(w.parallel),
                 "--liveness-port", str(LIVENESS_PORT)],
        "env": _pod_env(w, {"PULUMI_BACKEND_URL": w.backend_url, "GCO_SECRETS_PROVIDER": w.secrets_provider,
                            "HOME": w.home_dir, "PULUMI_HOME": w.pulumi_home,
                            "PULUMI_SKIP_UPDATE_CHECK": "true"}),
        "ports": [{"name": "liveness", "containerPort": LIVENESS_PORT}],
        # 200 only while ticks keep completing and no operation has run for an hour
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "liveness"}, "periodSeconds": 60,
                          "failureThreshold": 3, "timeoutSeconds": 5},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": w.tmp_dir}, {"name": "home", "mountPath": w.home_dir}],
    }
    pod = {"serviceAccountName": RUNNER,  # its token: the stacks' provider (GCO_IN_CLUSTER), and its IAM role
           "securityContext": _pod_security(), "containers": [container], "volumes": volumes,
           "terminationGracePeriodSeconds": 120}
    return _deployment(RUNNER, 1, pod, strategy={"type": "Recreate"})


def health_deployment(w: Workloads) -> dict[str, Any]:
    """Two replicas: one acts (the Lease), the other takes over within the lease duration."""
    container = {
        "name": "health", "image": w.image,
        "args": ["health", "--stack", "$(GCO_STACK)", "--in-cluster", "--liveness-port", str(LIVENESS_PORT)],
        "env": _pod_env(w),
        "ports": [{"name": "liveness", "containerPort": LIVENESS_PORT}],
        # 200 only while ticks succeed, or while standing by for the lease
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "liveness"}, "periodSeconds": 30,
                          "failureThreshold": 3, "timeoutSeconds": 5},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": w.tmp_dir}],
    }
    pod = {"serviceAccountName": HEALTH, "securityContext": _pod_security(), "containers": [container],
           "volumes": [{"name": "tmp", "emptyDir": {}}],
           # replicas on different nodes, so one node's loss leaves a standby
           "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                          "whenUnsatisfiable": "ScheduleAnyway",
                                          "labelSelector": {"matchLabels": {"app": HEALTH}}}]}
    return _deployment(HEALTH, w.health_replicas, pod)


def disruption_budgets() -> list[dict[str, Any]]:
    """A drain keeps one health replica (the standby takes the Lease); the runner has one replica and
    no budget: a drain may stop it, and the next one resumes from the stacks' state."""
    return [{"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
             "metadata": {"name": HEALTH, "namespace": SYSTEM_NAMESPACE, "labels": _labels(HEALTH)},
             "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": HEALTH}}}}]


POD_IDENTITY_AGENT = "169.254.170.23/32"
"""EKS Pod Identity agent (on each node, port 80): where the pods' AWS SDKs fetch credentials."""


def network_policies() -> list[dict[str, Any]]:
    """gco-system accepts no connection, and opens only DNS, HTTPS (AWS APIs, the Kubernetes API)
    and the Pod Identity agent. Kubelet probes are not subject to NetworkPolicy."""
    every_pod: dict[str, Any] = {}

    def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": _labels()},
                "spec": {"podSelector": every_pod, **spec}}

    return [
        policy("default-deny", {"policyTypes": ["Ingress", "Egress"]}),
        policy("allow-dns", {"policyTypes": ["Egress"], "egress": [{
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
        policy("allow-https", {"policyTypes": ["Egress"], "egress": [{"ports": [{"protocol": "TCP", "port": 443}]}]}),
        policy("allow-pod-identity-agent", {"policyTypes": ["Egress"], "egress": [{
            "to": [{"ipBlock": {"cidr": POD_IDENTITY_AGENT}}], "ports": [{"protocol": "TCP", "port": 80}]}]}),
    ]


def system_objects(namespaces: Iterable[str], workloads: Workloads) -> list[dict[str, Any]]:
    """Everything in one cluster, in apply order."""
    return [*identities(namespaces), runner_deployment(workloads), health_deployment(workloads),
            *disruption_budgets(), *network_policies()]


def object_key(obj: dict[str, Any]) -> str:
    """``Kind/namespace/name`` (``Kind/name`` for cluster-scoped objects): unique within a cluster."""
    meta = obj["metadata"]
    return "/".join(p for p in (obj["kind"], meta.get("namespace"), meta["name"]) if p)


__all__ = ["SYSTEM_NAMESPACE", "RUNNER", "HEALTH", "PREVIEW", "PREVIEW_GROUP", "Workloads",
           "identities", "rbac", "system_objects", "runner_deployment", "health_deployment", "disruption_budgets",
           "network_policies", "object_key", "PLURALS"]
