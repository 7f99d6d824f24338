"""The Pulumi program for one regional stack.

Reads the stack's config, reads the whole table (fail closed), validates every record and
declares an InferenceEndpoint for each endpoint that targets the region. A record that fails
validation keeps its last applied declaration (taken from the stack's previous outputs) and is
reported; it is never dropped, because dropping it would delete what is running.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import pulumi
import pulumi_kubernetes as k8s

from . import manifests as m
from .component import InferenceEndpoint, InferenceEndpointArgs
from . import rollout
from .endpoint import (DEFAULT_NAMESPACE, Endpoint, RolloutPolicy, Validated, config_rollout_policy, endpoint_to_item,
                       parse_endpoint, record_name, region_statuses, validate_all)
from .store import EndpointStore, StoreConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_SHARD_STACK = re.compile(r"^(?P<base>.+)\.shard-(?P<index>\d+)$")
MAX_SHARDS = 256


class ProgramError(RuntimeError):
    """The stack cannot be declared safely; the update stops before any change."""


@dataclass(frozen=True)
class StackSettings:
    stack: str
    region: str
    """Region name as it appears in records' target_regions."""
    allowed_namespaces: tuple[str, ...] = (DEFAULT_NAMESPACE,)
    cluster_name: str | None = None
    """EKS cluster; the provider is built from it through pulumi-aws."""
    aws_region: str | None = None
    kubeconfig: str | None = None
    """Path of a kubeconfig (local stacks); used when there is no cluster_name."""
    kube_context: str | None = None
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: m.ClusterSettings = field(default_factory=m.ClusterSettings)
    shards: int = 1
    """gco:shards: the region's endpoints are split over this many stacks, ``<stack>.shard-<k>``."""
    shard: int | None = None
    """Which shard this stack is (None: the region's only stack)."""
    rollout_policy: RolloutPolicy | None = None
    """gco:rolloutPolicy: the rollout policy of records that carry none (every region's stack should
    carry the same one: the health jobs of all regions judge one rollout)."""

    @property
    def region_stack(self) -> str:
        """The stack name of the region's config file (``stacks/Pulumi.<region_stack>.yaml``)."""
        match = _SHARD_STACK.match(self.stack)
        return match["base"] if self.shard is not None and match else self.stack

    def owns(self, name: str) -> bool:
        """Whether endpoint ``name`` belongs in this stack."""
        return self.shard is None or shard_of(name, self.shards) == self.shard


def shard_of(name: str, shards: int) -> int:
    """The shard of an endpoint: stable across runs, machines and Python versions."""
    if shards <= 1:
        return 0
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % shards


def shard_stack_name(stack: str, index: int) -> str:
    return f"{stack}.shard-{index}"


def shard_settings(settings: StackSettings) -> list[StackSettings]:
    """The stacks that apply a region: itself, or one per shard when gco:shards > 1."""
    if settings.shards <= 1:
        return [settings]
    return [replace(settings, stack=shard_stack_name(settings.stack, k), shard=k) for k in range(settings.shards)]


def owned(validated: Validated, settings: StackSettings) -> Validated:
    """The part of the validated table that belongs in this stack (all of it without shards)."""
    if settings.shard is None:
        return validated
    return Validated(endpoints={n: e for n, e in validated.endpoints.items() if settings.owns(n)},
                     invalid={n: e for n, e in validated.invalid.items() if settings.owns(n)})


def as_declared(validated: Validated, settings: StackSettings, items: list[Mapping[str, Any]],
                previous: Callable[[], Mapping[str, Mapping[str, Any]]]) -> Validated:
    """This stack's endpoints as it declares them: under a rollout policy, each with the revision the
    region may run (rollout.region_view). ``previous``: the stack's last applied records."""
    if settings.rollout_policy is None and not any(isinstance(i, Mapping) and i.get("rollout_policy") is not None
                                                   for i in items):
        return validated
    by_name = {record_name(i): i for i in items if isinstance(i, Mapping)}
    return rollout.region_view(validated, settings.region, by_name, previous, settings.rollout_policy)


def _value(raw: Any, kind: type) -> Any:
    """Config values arrive native (stack YAML) or as strings (pulumi.Config)."""
    if raw is None or kind is str:
        return raw
    if kind is bool:
        return raw if isinstance(raw, bool) else str(raw).lower() == "true"
    if kind is int:
        return int(raw)
    return json.loads(raw) if isinstance(raw, str) else raw


_CLUSTER_KEYS = (
    ("albGroup", "alb_group", str), ("albScheme", "alb_scheme", str),
    ("ingressClass", "ingress_class", str), ("modelVolumeClaim", "model_volume_claim", str),
    ("modelSyncImage", "model_sync_image", str), ("serviceAccount", "service_account", str),
    ("startupFailureThreshold", "startup_failure_threshold", int),
    ("healthcheckIntervalSeconds", "healthcheck_interval_seconds", int),
    ("gpuNodeSelectors", "gpu_node_selectors", dict),
    ("gpuUtilizationMetric", "gpu_utilization_metric", str),
)
# A custom-metrics API metric name (it becomes a URL path segment): no spaces, no '/'.
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_:.-]{0,252}$")


REMOVED_KEYS = {
    "skipAwaitAll": "every object already skips the awaits that depend on pods (see manifests._meta); "
                    "the local environment runs the same controllers as EKS, so remove the key",
}


def settings_from_values(values: Mapping[str, Any], stack: str) -> StackSettings:
    """Settings from the ``gco:`` config values (keys without the namespace); GCO_* env wins."""
    for key, why in REMOVED_KEYS.items():
        if values.get(key) is not None:
            raise ProgramError(f"stack {stack}: gco:{key} is no longer supported: {why}")
    region = values.get("region")
    if not region:
        raise ProgramError(f"stack {stack}: gco:region is not set")
    overrides = {attr: _value(values[key], kind) for key, attr, kind in _CLUSTER_KEYS if values.get(key) is not None}
    cluster = replace(m.ClusterSettings(), **overrides)
    metric = cluster.gpu_utilization_metric
    if metric is not None and not (isinstance(metric, str) and _METRIC_NAME.match(metric)):
        raise ProgramError(f"stack {stack}: gco:gpuUtilizationMetric must be a metric name (letters, digits, "
                           f"'_', ':', '.', '-'; at most 253), got {metric!r}")
    namespaces = _value(values.get("allowedNamespaces"), list) or [DEFAULT_NAMESPACE]
    if not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces):
        raise ProgramError(f"stack {stack}: gco:allowedNamespaces must be a list of namespace names")
    kubeconfig = os.environ.get("GCO_KUBECONFIG") or values.get("kubeconfig")
    if kubeconfig and not os.path.isabs(kubeconfig):
        kubeconfig = str(PROJECT_ROOT / kubeconfig)
    cluster_name = values.get("clusterName")
    if cluster_name is not None and not _CLUSTER_NAME.match(cluster_name):
        raise ProgramError(f"stack {stack}: gco:clusterName is not a valid EKS cluster name: {cluster_name!r}")
    aws_region = values.get("awsRegion") or values.get("aws:region") or region
    store = StoreConfig.from_env(table=values.get("table"), region=values.get("tableRegion") or aws_region,
                                 endpoint_url=values.get("dynamodbEndpoint"))
    if os.environ.get("GCO_DYNAMODB_ENDPOINT"):
        store = replace(store, endpoint_url=os.environ["GCO_DYNAMODB_ENDPOINT"])
    if os.environ.get("GCO_TABLE"):
        store = replace(store, table=os.environ["GCO_TABLE"])
    try:
        shards = int(values.get("shards") or 1)
    except (TypeError, ValueError):
        raise ProgramError(f"stack {stack}: gco:shards must be a whole number, got {values.get('shards')!r}") from None
    if not 1 <= shards <= MAX_SHARDS:
        raise ProgramError(f"stack {stack}: gco:shards must be between 1 and {MAX_SHARDS}, got {shards}")
    policy, problems = config_rollout_policy(values.get("rolloutPolicy"))
    if problems:
        raise ProgramError(f"stack {stack}: " + "; ".join(problems))
    return StackSettings(
        stack=stack, region=region, allowed_namespaces=tuple(namespaces), cluster_name=cluster_name,
        aws_region=aws_region, kubeconfig=kubeconfig, kube_context=values.get("kubeContext"),
        store=store, cluster=cluster, shards=shards, rollout_policy=policy,
    )


CONFIG_KEYS = ("region", "allowedNamespaces", "clusterName", "awsRegion", "kubeconfig", "kubeContext", "table",
               "tableRegion", "dynamodbEndpoint", "shards", "rolloutPolicy") + tuple(k for k, _, _ in _CLUSTER_KEYS) + tuple(REMOVED_KEYS)


def load_settings() -> StackSettings:
    """Settings inside a Pulumi program, from the stack's ``gco:`` config.

    A shard stack (``<stack>.shard-<k>``) has no config file of its own: it takes the region's,
    ``stacks/Pulumi.<stack>.yaml``, so every shard of a region is configured in one place.
    """
    stack = pulumi.get_stack()
    match = _SHARD_STACK.match(stack)
    if match:
        return shard_of_stack(settings_from_stack_file(match["base"]), int(match["index"]))
    cfg = pulumi.Config("gco")
    values: dict[str, Any] = {k: cfg.get(k) for k in CONFIG_KEYS}
    values["aws:region"] = pulumi.Config("aws").get("region")
    return settings_from_values(values, stack)


def shard_of_stack(region: StackSettings, index: int) -> StackSettings:
    if region.shards <= 1 or index >= region.shards:
        raise ProgramError(f"stack {shard_stack_name(region.stack, index)}: stack {region.stack} has "
                           f"gco:shards={region.shards}, so there is no shard {index}")
    return shard_settings(region)[index]


def settings_from_stack_file(stack: str, root: Path = PROJECT_ROOT) -> StackSettings:
    """Settings outside the engine (runner, CLI), from ``stacks/Pulumi.<stack>.yaml``."""
    import yaml

    path = root / "stacks" / f"Pulumi.{stack}.yaml"
    match = _SHARD_STACK.match(stack)
    if match and (root / "stacks" / f"Pulumi.{match['base']}.yaml").exists():
        # the engine may have written this shard's file (its secrets salt); the config is the region's
        raise ProgramError(f"stack {stack} is a shard of region stack {match['base']}: name {match['base']}, "
                           "which applies all of its shards")
    if not path.exists():
        raise ProgramError(f"stack {stack}: {path} does not exist")
    config = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    values = {k.split(":", 1)[1]: v for k, v in config.items() if k.startswith("gco:")}
    values["aws:region"] = config.get("aws:region")
    return settings_from_values(values, stack)


def rollout_policy_disagreement(root: Path = PROJECT_ROOT) -> str | None:
    """Why the stacks that read one table disagree on gco:rolloutPolicy, or None.

    All regions' health jobs judge one rollout and every region's program declares from it: a stack
    without the default applies every change at once, and its health job forgets the rollouts of
    records without a policy of their own.
    """
    by_table: dict[tuple[Any, ...], dict[str, RolloutPolicy | None]] = {}
    for path in sorted((root / "stacks").glob("Pulumi.*.yaml")):
        stack = path.name[len("Pulumi."):-len(".yaml")]
        try:
            s = settings_from_stack_file(stack, root)
        except ProgramError:
            continue
        key = (s.store.table, s.store.region, s.store.endpoint_url)
        by_table.setdefault(key, {})[stack] = s.rollout_policy
    for (table, _, _), policies in sorted(by_table.items(), key=lambda kv: str(kv[0])):
        if len(set(policies.values())) > 1:
            with_ = sorted(n for n, p in policies.items() if p is not None)
            without = sorted(n for n, p in policies.items() if p is None)
            return (f"stacks reading table {table} carry different gco:rolloutPolicy defaults "
                    f"(set: {', '.join(with_) or 'none'}; unset: {', '.join(without) or 'none'}"
                    f"{'' if without else '; the values differ'}): give them all the same one")
    return None


def _kubeconfig(name: str, server: str, ca_data: str, user: dict[str, Any]) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "users": [{"name": name, "user": user}],
    })


def eks_kubeconfig(cluster_name: str, aws_region: str, endpoint: str, ca_data: str) -> str:
    """A kubeconfig whose token comes from ``aws eks get-token`` (argv, no shell, no secret in state)."""
    return _kubeconfig(cluster_name, endpoint, ca_data, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "aws",
        "args": ["eks", "get-token", "--cluster-name", cluster_name, "--region", aws_region, "--output", "json"],
        "interactiveMode": "Never",
    }})


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where Kubernetes mounts a pod's ServiceAccount token and the cluster's CA."""


def in_cluster(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs in a pod and acts as its ServiceAccount (GCO_IN_CLUSTER=true, set by
    the runner's Deployment, system.py)."""
    return environ.get("GCO_IN_CLUSTER", "").strip().lower() == "true"


def service_account_kubeconfig(name: str, server: str, ca_data: str, token_file: str | None = None) -> str:
    """A kubeconfig for the pod's ServiceAccount: the client reads the (rotated, projected) token
    from ``token_file`` itself, so the state holds a path, never a token. With the same cluster
    (server, CA) as the stack's usual kubeconfig, pulumi-kubernetes sees the same active cluster
    and updates its provider in place instead of replacing it (and with it every object)."""
    return _kubeconfig(name, server, ca_data, {"tokenFile": token_file or f"{SERVICE_ACCOUNT_DIR}/token"})


def in_cluster_server(environ: Mapping[str, str] = os.environ) -> str:
    """The API server as the pod sees it (what client-go's in-cluster config uses)."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ProgramError("GCO_IN_CLUSTER=true but KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT are not set "
                           "(is this process running in a pod?)")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def in_cluster_ca_data(sa_dir: str | None = None) -> str:
    """The mounted cluster CA, base64 as in a kubeconfig; fails clearly when no token is mounted."""
    sa = Path(sa_dir or SERVICE_ACCOUNT_DIR)
    ca, token = sa / "ca.crt", sa / "token"
    missing = [str(f) for f in (token, ca) if not f.is_file()]
    if missing:
        raise ProgramError(f"GCO_IN_CLUSTER=true but {', '.join(missing)} is not mounted "
                           "(the pod needs automountServiceAccountToken or a projected token)")
    return base64.b64encode(ca.read_bytes()).decode()


def make_provider(settings: StackSettings) -> k8s.Provider:
    if settings.cluster_name:
        # clusterIdentifier names the cluster for pulumi-kubernetes: the provider is replaced (and with
        # it every object) only when it changes, so the pod's kubeconfig (in-cluster address) and a
        # person's (the EKS endpoint) update the same provider in place.
        if in_cluster():  # the runner's pod: its ServiceAccount; needs neither the AWS plugin nor the aws CLI
            return k8s.Provider("k8s", kubeconfig=service_account_kubeconfig(
                settings.cluster_name, in_cluster_server(), in_cluster_ca_data()), cluster_identifier=settings.cluster_name)
        import pulumi_aws as aws  # imported only for EKS stacks run outside their cluster: it is large

        cluster = aws.eks.get_cluster(name=settings.cluster_name,
                                      opts=pulumi.InvokeOptions(provider=aws.Provider("aws", region=settings.aws_region)))
        kubeconfig = eks_kubeconfig(settings.cluster_name, settings.aws_region or settings.region,
                                    cluster.endpoint, cluster.certificate_authorities[0].data)
        return k8s.Provider("k8s", kubeconfig=kubeconfig, cluster_identifier=settings.cluster_name)
    if in_cluster():  # a kubeconfig-path stack run in a pod: the pod's own cluster and ServiceAccount
        return k8s.Provider("k8s", kubeconfig=service_account_kubeconfig(
            settings.region, in_cluster_server(), in_cluster_ca_data()))
    if not settings.kubeconfig:
        raise ProgramError(f"stack {settings.stack}: set gco:clusterName (EKS) or gco:kubeconfig (path)")
    if not os.path.exists(settings.kubeconfig):
        raise ProgramError(f"stack {settings.stack}: kubeconfig {settings.kubeconfig} does not exist "
                           "(for the local stack run `gco-infra local up` first)")
    # The path, not the contents, goes into the state: the file holds a token.
    return k8s.Provider("k8s", kubeconfig=settings.kubeconfig, context=settings.kube_context)


def read_previous_outputs(stack: str, cwd: Path = PROJECT_ROOT) -> dict[str, Any]:
    """This stack's outputs as last applied (for invalid records and HPA-managed replicas only)."""
    proc = subprocess.run(["pulumi", "stack", "output", "--json", "--show-secrets", "--stack", stack],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ProgramError(f"reading the previous outputs of stack {stack} failed: {proc.stderr.strip()[:500]}")
    outputs = json.loads(proc.stdout or "{}")
    return outputs if isinstance(outputs, dict) else {}


def previous_records_from_outputs(outputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    endpoints = outputs.get("endpoints") or {}
    result = {}
    for name, out in endpoints.items():
        record = out.get("record") if isinstance(out, Mapping) else None
        if isinstance(record, str):
            result[name] = json.loads(record)
    return result


@dataclass
class Declared:
    endpoints: dict[str, InferenceEndpoint] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    invalid: dict[str, list[str]] = field(default_factory=dict)
    exported: dict[str, Any] = field(default_factory=dict)
    """The stack outputs as exported, plain (records as their JSON text): what `pulumi stack output
    --show-secrets` reads back after a successful update (the runner keeps these instead)."""


def replicas_mode(applied: Mapping[str, Any] | None) -> str:
    """How an HPA-managed Deployment declares replicas, from the endpoint's last applied outputs (pure).

    - ``omit``: not applied by this stack yet (new, or the old controller's Deployment being
      adopted): the field is left alone, so adoption keeps the running count and the HPA raises a
      new Deployment to its minimum.
    - ``seed``: it was applied without an HPA at 0 replicas (stopped): set min_replicas, since an HPA
      never scales a Deployment up from 0.
    - ``ignore``: it runs (with or without an HPA before): keep the live count; the HPA owns it.
    """
    if not isinstance(applied, Mapping):
        return "omit"
    roles = applied.get("objects") if isinstance(applied.get("objects"), Mapping) else {}
    if m.HPA not in roles and (applied.get("state") == "stopped" or m.DEPLOYMENT not in roles):
        return "seed"
    return "ignore"


def declare(settings: StackSettings, items: list[Mapping[str, Any]],
            previous: Callable[[], Mapping[str, Mapping[str, Any]]],
            provider: pulumi.ProviderResource | None = None,
            only: Collection[str] | None = None,
            applied: Callable[[], Mapping[str, Any]] = lambda: {}) -> Declared:
    """Declare the endpoints of the table that target this stack's region.

    ``only`` limits the declaration to those names: the runner's targeted updates declare just the
    endpoints they target, and the engine keeps every untargeted resource as it is (an untargeted
    resource that is not declared is neither updated nor deleted). ``applied`` returns the stack's
    ``endpoints`` output (what it last applied), read only when an HPA or an invalid record needs it.
    """
    validated = as_declared(owned(validate_all(items, allowed_namespaces=settings.allowed_namespaces), settings),
                            settings, items, previous)
    raw_items = {record_name(i): i for i in items if isinstance(i, Mapping)}
    result = Declared()
    opts = pulumi.ResourceOptions(providers=[provider]) if provider else None

    def add(ep: Endpoint, state: str) -> None:
        if only is not None and ep.name not in only:
            return
        objects, fp = m.declaration(ep, settings.region, settings.cluster)
        if not objects:
            return
        mode = replicas_mode(applied().get(ep.name)) if m.HPA in objects else "seed"
        result.endpoints[ep.name] = InferenceEndpoint(
            ep.name, InferenceEndpointArgs(objects=objects, fingerprint=fp, state=state, replicas=mode), opts)
        result.outputs[ep.name] = {
            "state": state, "namespace": ep.namespace, "fingerprint": fp,
            "objects": {role: f'{o["kind"]}/{o["metadata"]["name"]}' for role, o in objects.items()},
            # The record as applied, so a later invalid edit can keep this declaration (a secret
            # output: export() marks it).
            "record": json.dumps(endpoint_to_item(ep), sort_keys=True),
        }

    for ep in validated.endpoints.values():
        add(ep, ep.desired_state)

    invalid = {n: e for n, e in validated.invalid.items() if only is None or n in only}
    result.invalid = {n: list(e) for n, e in sorted(validated.invalid.items())}
    if invalid:
        prior = previous()
        for name, errors in sorted(invalid.items()):
            for e in errors:
                pulumi.log.warn(e)
            kept = prior.get(name)
            if kept is None:
                if name in applied():  # held here (e.g. moved in by `pulumi state move`) without its record
                    raise ProgramError(f'endpoint "{name}" is invalid and stack {settings.stack} holds it without '
                                       "its last applied record; refusing to remove it (fix the record)")
                continue
            parsed = parse_endpoint(kept, allowed_namespaces=settings.allowed_namespaces)
            if parsed.endpoint is None:  # the rules tightened since it was applied: keep it as it was
                raise ProgramError(f'endpoint "{name}" is invalid and its last applied record no longer '
                                   f'validates ({"; ".join(parsed.errors)}); refusing to remove it')
            pulumi.log.warn(f'endpoint "{name}": keeping the last applied declaration in {settings.region}')
            add(with_current_status(parsed.endpoint, raw_items.get(name)), "error")
    return result


def with_current_status(kept: Endpoint, item: Mapping[str, Any] | None) -> Endpoint:
    """A kept (last applied) record with the table's current region status.

    The watchdog's flag lives in the region status, not in the spec: an endpoint whose record turns
    invalid while its Ingress is withdrawn must keep the Ingress withdrawn (and re-admit it when the
    health job says so), even though the rest of its declaration is frozen.
    """
    raw = item.get("region_status") if isinstance(item, Mapping) else None
    return replace(kept, region_status=region_statuses(raw))


def kept_outputs(previous_endpoints: Mapping[str, Any], declared: Declared,
                 only: Collection[str]) -> dict[str, dict[str, Any]]:
    """Outputs after a targeted update: the untargeted endpoints' as they were, the targeted ones' anew."""
    merged: dict[str, dict[str, Any]] = {}
    for name, out in previous_endpoints.items():
        if name in only or not isinstance(out, Mapping):
            continue
        merged[name] = dict(out)
    merged.update(declared.outputs)
    return dict(sorted(merged.items()))


def secret_records(endpoints: Mapping[str, Any]) -> dict[str, Any]:
    """The ``endpoints`` output as the state keeps it: each applied record is a secret (it may carry
    credentials in its env)."""
    return {name: {**out, "record": pulumi.Output.secret(out["record"])}
            if isinstance(out, Mapping) and isinstance(out.get("record"), str) else out
            for name, out in endpoints.items()}


def export(settings: StackSettings, declared: Declared, endpoints: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Export the stack outputs; returns them plain (records as text), as the state will hold them."""
    values = {"region": settings.region, "declarationVersion": m.DECLARATION_VERSION,
              "endpoints": dict(declared.outputs if endpoints is None else endpoints), "invalid": declared.invalid}
    for key, value in values.items():
        pulumi.export(key, secret_records(value) if key == "endpoints" else value)
    return values


async def outputs_settled() -> None:
    """Wait until every output the program created has resolved, one pass per round.

    An inline program returns this for the SDK to await before its own wait for outstanding
    outputs, which calls ``asyncio.wait(FIRST_COMPLETED)`` over all of them again each time one
    resolves: quadratic in a stack's outputs, 14 % of a declaring worker's CPU at 100 endpoints
    per shard (bench/RESULTS.md). After this the SDK finds them resolved and raises any failure
    as before (a failed output stays where it tracks them). Only where the pinned SDK keeps them
    (``pulumi.runtime.settings.SETTINGS.outputs``); elsewhere the SDK's own wait does it all.
    """
    from pulumi.runtime import settings

    holder = settings.SETTINGS
    while isinstance(getattr(holder, "outputs", None), set) and hasattr(holder, "lock"):
        if getattr(settings._get_rpc_manager(), "unhandled_exception", None) is not None:
            return  # the SDK raises it right away
        with holder.lock:
            pending = [task for task in holder.outputs if not task.done()]
        if not pending:
            return
        await asyncio.wait(pending)


def main(items: list[Mapping[str, Any]] | None = None,
         previous: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
         settings: StackSettings | None = None, *,
         only: Collection[str] | None = None,
         previous_endpoints: Mapping[str, Any] | None = None) -> Declared:
    """Entry point of ``__main__.py`` and of the runner's inline program.

    The runner's targeted updates pass ``only`` (the targeted endpoints) and ``previous_endpoints``
    (the stack's ``endpoints`` output), so the program declares just those endpoints and the
    exports still describe every endpoint in the stack.
    """
    settings = settings or load_settings()
    if settings.shards > 1 and settings.shard is None:
        raise ProgramError(
            f"stack {settings.stack} is split into {settings.shards} shard stacks (gco:shards): apply "
            f"{shard_stack_name(settings.stack, 0)} .. {shard_stack_name(settings.stack, settings.shards - 1)} "
            "(`gco-infra run` does), not the region stack itself")
    if items is None:
        items = EndpointStore(settings.store).list_endpoints()  # StoreError stops the update
    if only is not None and previous_endpoints is None:
        raise ProgramError("a targeted declaration needs the stack's previous endpoint outputs")
    provider = make_provider(settings)
    cache: dict[str, Mapping[str, Any]] = {}

    def outputs_now() -> Mapping[str, Any]:  # one `pulumi stack output` call, only when needed
        if "outputs" not in cache:
            cache["outputs"] = read_previous_outputs(settings.stack)
        return cache["outputs"]

    def applied() -> Mapping[str, Any]:
        if previous_endpoints is not None:
            return previous_endpoints
        endpoints = outputs_now().get("endpoints")
        return endpoints if isinstance(endpoints, Mapping) else {}

    declared = declare(settings, items, previous or (lambda: previous_records_from_outputs(outputs_now())),
                       provider, only, applied)
    endpoints = None if only is None else kept_outputs(previous_endpoints or {}, declared, only)
    declared.exported = export(settings, declared, endpoints)
    return declared
