"""The platform stack: what the endpoints stacks need, declared once (project ``gco-platform``).

Global: the endpoints table (a global table with a replica in every other region), the S3 state
bucket and the KMS key of the stacks' secrets, and three IAM roles (runner, health job, preview)
whose policies come from iam.py. Per region: EKS Pod Identity associations for the runner's and the
health job's ServiceAccounts, an EKS access entry for the preview's role (mapped to a read-only
Kubernetes group, no access policy), and the cluster's gco-system objects from system.py. The
runner and the health job reach their own cluster as their ServiceAccounts (in-cluster), so their
roles need no access entry.

The Kubernetes half (``ClusterSystem``) takes a provider and plain values, so it runs against any
cluster: the EKS ones here, a local one in tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pulumi
import pulumi_kubernetes as k8s

from . import iam, system
from .store import DEFAULT_TABLE

PROJECT = "gco-platform"
TYPE = "gco:platform:ClusterSystem"
STATE_NONCURRENT_DAYS = 30
"""How long an overwritten or deleted state object (a checkpoint's earlier version) is kept."""
STATE_HISTORY_DAYS = 14
"""How long the backend's update history and checkpoint backups are kept."""
KEY_ALIAS = "alias/gco-infra-state"
"""The alias the endpoints stacks' secrets provider names (``awskms://alias/gco-infra-state``)."""
GITHUB_OIDC_URL = f"https://{iam.GITHUB_OIDC_HOST}"

STATE_META_KEY, STATE_META = iam.META, "version: 1\n"
"""The diy backend's ``.pulumi/meta.yaml`` (project layout), as the Pulumi CLI writes it."""

PATCH_FORCE = {"pulumi.com/patchForce": "true"}
SKIP_AWAIT = {"pulumi.com/skipAwait": "true"}

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_CLUSTER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class PlatformError(ValueError):
    """The platform stack's config cannot be declared safely."""


@dataclass(frozen=True)
class RegionSettings:
    region: str
    """AWS region of the cluster (also the region name records use)."""
    cluster_name: str | None = None
    """EKS cluster (None: only the Kubernetes half is declared, through a provider the caller builds)."""
    stack: str = ""
    """The region's endpoints stack (GCO_STACK of its runner and health job); default the region."""
    namespaces: tuple[str, ...] = ("gco-inference",)
    """Inference namespaces (gco:allowedNamespaces of the stack); they exist with the cluster."""

    def __post_init__(self) -> None:
        if not self.stack:
            object.__setattr__(self, "stack", self.region)


@dataclass(frozen=True)
class PlatformSettings:
    home_region: str
    """Region of the table's primary, the state bucket and the key (aws:region)."""
    regions: tuple[RegionSettings, ...]
    state_bucket: str
    image: str
    github_repository: str
    """``<owner>/<repo>`` whose protected environment may assume the preview role."""
    preview_environment: str = "stack-preview"
    github_oidc_provider_arn: str | None = None
    """An existing GitHub OIDC provider of the account (one per account); None: the stack creates it."""
    table: str = DEFAULT_TABLE
    key_alias: str = KEY_ALIAS
    tmp_dir: str = "/tmp"
    home_dir: str = "/home/gco"
    tags: Mapping[str, str] = field(default_factory=lambda: {"project": "gco"})

    @property
    def backend_url(self) -> str:
        return f"s3://{self.state_bucket}?region={self.home_region}"

    @property
    def secrets_provider(self) -> str:
        return f"awskms://{self.key_alias}?region={self.home_region}"

    @property
    def replica_regions(self) -> list[str]:
        return [r.region for r in self.regions if r.region != self.home_region]

    def workloads(self, region: RegionSettings) -> system.Workloads:
        return system.Workloads(image=self.image, stack=region.stack, aws_region=region.region,
                                backend_url=self.backend_url, secrets_provider=self.secrets_provider,
                                tmp_dir=self.tmp_dir, home_dir=self.home_dir)


def settings_from_values(values: Mapping[str, Any], home_region: str | None) -> PlatformSettings:
    """Settings from the ``gco-platform:`` config values (keys without the namespace)."""
    if not home_region:
        raise PlatformError("aws:region is not set (the home region of the table, the state bucket and the key)")
    raw_regions = values.get("regions")
    if isinstance(raw_regions, str):
        raw_regions = json.loads(raw_regions)
    if not isinstance(raw_regions, list) or not raw_regions:
        raise PlatformError("gco-platform:regions must list the regions, e.g. [{region: us-east-1, clusterName: gco-us-east-1}]")
    regions: list[RegionSettings] = []
    for i, raw in enumerate(raw_regions):
        if not isinstance(raw, Mapping) or not raw.get("region"):
            raise PlatformError(f"gco-platform:regions[{i}] needs a region")
        cluster = raw.get("clusterName")
        if not cluster or not _CLUSTER.match(str(cluster)):
            raise PlatformError(f"gco-platform:regions[{i}].clusterName is not an EKS cluster name: {cluster!r}")
        namespaces = tuple(raw.get("namespaces") or ("gco-inference",))
        bad = [n for n in namespaces if not _NAME.match(str(n)) or n == system.SYSTEM_NAMESPACE]
        if bad:
            raise PlatformError(f"gco-platform:regions[{i}].namespaces: not inference namespace names: {bad}")
        regions.append(RegionSettings(region=str(raw["region"]), cluster_name=str(cluster),
                                      stack=str(raw.get("stack") or raw["region"]), namespaces=namespaces))
    names = [r.region for r in regions]
    if len(set(names)) != len(names):
        raise PlatformError(f"gco-platform:regions names a region twice: {names}")
    if home_region not in names:
        raise PlatformError(f"the home region {home_region} (aws:region) must be one of gco-platform:regions {names}")
    bucket = values.get("stateBucket")
    if not bucket or not _BUCKET.match(bucket):
        raise PlatformError(f"gco-platform:stateBucket must be an S3 bucket name, got {bucket!r}")
    for key in ("image", "githubRepository"):
        if not values.get(key):
            raise PlatformError(f"gco-platform:{key} is not set")
    settings = PlatformSettings(
        home_region=home_region, regions=tuple(regions), state_bucket=bucket, image=values["image"],
        github_repository=values["githubRepository"],
        preview_environment=values.get("previewEnvironment") or "stack-preview",
        github_oidc_provider_arn=values.get("githubOidcProviderArn") or None,
        table=values.get("table") or DEFAULT_TABLE,
    )
    iam.github_oidc_trust("arn:aws:iam::000000000000:oidc-provider/x", settings.github_repository,
                          settings.preview_environment)  # validates both (PolicyError)
    return settings


CONFIG_KEYS = ("regions", "stateBucket", "image", "githubRepository", "previewEnvironment", "githubOidcProviderArn",
               "table")


def load_settings() -> PlatformSettings:
    cfg = pulumi.Config(PROJECT)
    values: dict[str, Any] = {k: cfg.get(k) for k in CONFIG_KEYS}
    values["regions"] = cfg.get_object("regions")
    return settings_from_values(values, pulumi.Config("aws").get("region"))


# ---- the Kubernetes half ---------------------------------------------------------------------------------------

_KINDS: dict[str, Any] = {
    "Namespace": k8s.core.v1.Namespace,
    "ServiceAccount": k8s.core.v1.ServiceAccount,
    "Role": k8s.rbac.v1.Role,
    "RoleBinding": k8s.rbac.v1.RoleBinding,
    "Deployment": k8s.apps.v1.Deployment,
    "PodDisruptionBudget": k8s.policy.v1.PodDisruptionBudget,
    "NetworkPolicy": k8s.networking.v1.NetworkPolicy,
}
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def provider_annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    """What the provider does with a system object.

    - patchForce on every object: ``gco-infra local up`` (field manager ``gco-local``) and a hand
      edit may have applied the same objects; our declaration wins a server-side-apply conflict
      instead of failing the update (creating an existing object is an upsert under SSA anyway).
    - skipAwait on the Deployments, as in the endpoints stacks: their rollout waits for pods, i.e.
      for an image pull and node capacity, which an apply of the platform does not wait for (and a
      cluster without nodes, like the local one, never gives). A broken rollout shows in the
      Deployment's status and fails its liveness probe. No other kind here has an await.
    """
    return {**PATCH_FORCE, **(SKIP_AWAIT if obj["kind"] == "Deployment" else {})}


class ClusterSystem(pulumi.ComponentResource):
    """One cluster's gco-system objects (system.system_objects), through the given provider."""

    def __init__(self, name: str, objects: Sequence[Mapping[str, Any]], provider: k8s.Provider,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(TYPE, name, None, opts)
        self.resources: dict[str, pulumi.CustomResource] = {}
        namespace: pulumi.CustomResource | None = None
        for obj in objects:
            meta = dict(obj["metadata"])
            meta["annotations"] = {**meta.get("annotations", {}), **provider_annotations(obj)}
            args = {_SNAKE.sub("_", k).lower(): v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
            in_system = meta.get("namespace") == system.SYSTEM_NAMESPACE
            child = pulumi.ResourceOptions(parent=self, provider=provider,
                                           depends_on=[namespace] if in_system and namespace is not None else None)
            key = system.object_key(obj)
            res = _KINDS[obj["kind"]](f"{name}-{key.lower().replace('/', '-')}", metadata=meta, **args, opts=child)
            if obj["kind"] == "Namespace" and meta["name"] == system.SYSTEM_NAMESPACE:
                namespace = res
            self.resources[key] = res
        self.register_outputs({"objects": sorted(self.resources)})


def declare_cluster(provider: k8s.Provider, region: RegionSettings, workloads: system.Workloads,
                    opts: pulumi.ResourceOptions | None = None) -> ClusterSystem:
    return ClusterSystem(region.region, system.system_objects(region.namespaces, workloads), provider, opts)


# ---- the AWS half ---------------------------------------------------------------------------------------------


def _field(value: Any, name: str) -> Any:
    """A field of an output object, typed (engine) or a plain mapping (snake or camel case)."""
    if isinstance(value, Mapping):
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
        return value.get(name, value.get(camel))
    return getattr(value, name, None)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


@dataclass
class Declared:
    table: Any = None
    bucket: Any = None
    key: Any = None
    roles: dict[str, Any] = field(default_factory=dict)
    clusters: dict[str, ClusterSystem] = field(default_factory=dict)


def declare(settings: PlatformSettings) -> Declared:
    import pulumi_aws as aws

    from .program import eks_kubeconfig

    out = Declared()
    protect = pulumi.ResourceOptions(protect=True)
    tags = dict(settings.tags)
    identity = aws.get_caller_identity_output()
    partition = aws.get_partition_output().partition
    account = identity.account_id

    # -- the key of the stacks' secrets and of the state bucket
    key = aws.kms.Key("state", description="gco-infra: Pulumi state bucket and endpoints stacks' secrets",
                      enable_key_rotation=True, deletion_window_in_days=30, tags=tags, opts=protect)
    aws.kms.Alias("state", name=settings.key_alias, target_key_id=key.key_id)
    out.key = key

    # -- the state bucket
    bucket = aws.s3.Bucket("state", bucket=settings.state_bucket, tags=tags, opts=protect)
    aws.s3.BucketOwnershipControls("state", bucket=bucket.id, rule={"object_ownership": "BucketOwnerEnforced"})
    block = aws.s3.BucketPublicAccessBlock("state", bucket=bucket.id, block_public_acls=True, block_public_policy=True,
                                           ignore_public_acls=True, restrict_public_buckets=True)
    versioning = aws.s3.BucketVersioning("state", bucket=bucket.id, versioning_configuration={"status": "Enabled"})
    # Every update writes a checkpoint (a new version of the same key), a backup and history objects:
    # without expiry the bucket grows for ever, and each `up` lists all of a stack's history. Current
    # checkpoints never expire; old versions can still restore a stack for STATE_NONCURRENT_DAYS.
    aws.s3.BucketLifecycleConfiguration("state", bucket=bucket.id, rules=[
        {"id": "old-versions", "status": "Enabled", "filter": {"prefix": ""},
         "noncurrent_version_expiration": {"noncurrent_days": STATE_NONCURRENT_DAYS},
         "abort_incomplete_multipart_upload": {"days_after_initiation": 1}},
        {"id": "history", "status": "Enabled", "filter": {"prefix": ".pulumi/history/"},
         "expiration": {"days": STATE_HISTORY_DAYS}},
        {"id": "backups", "status": "Enabled", "filter": {"prefix": ".pulumi/backups/"},
         "expiration": {"days": STATE_HISTORY_DAYS}},
    ], opts=pulumi.ResourceOptions(depends_on=[versioning]))
    encryption = aws.s3.BucketServerSideEncryptionConfiguration("state", bucket=bucket.id, rules=[{
        "apply_server_side_encryption_by_default": {"sse_algorithm": "aws:kms", "kms_master_key_id": key.arn},
        "bucket_key_enabled": True}])
    aws.s3.BucketPolicy("state", bucket=bucket.id, policy=bucket.arn.apply(lambda a: _json(iam.state_bucket_policy(a))),
                        opts=pulumi.ResourceOptions(depends_on=[block]))
    # The backend's layout marker, which the Pulumi CLI writes on first use: written here once, so no
    # job needs write access outside its own project's paths (iam.py).
    aws.s3.BucketObjectv2("state-meta", bucket=bucket.id, key=STATE_META_KEY, content=STATE_META,
                          content_type="application/yaml",
                          opts=pulumi.ResourceOptions(depends_on=[encryption], retain_on_delete=True))
    out.bucket = bucket

    # -- the endpoints table: a global table (DynamoDB encrypts with its AWS managed key in each region)
    table = aws.dynamodb.Table(
        "endpoints", name=settings.table, billing_mode="PAY_PER_REQUEST", hash_key="endpoint_name",
        attributes=[{"name": "endpoint_name", "type": "S"}],
        stream_enabled=True, stream_view_type="NEW_AND_OLD_IMAGES",  # global tables need both images
        point_in_time_recovery={"enabled": True}, deletion_protection_enabled=True,
        server_side_encryption={"enabled": True},
        replicas=[{"region_name": r, "point_in_time_recovery": True, "deletion_protection_enabled": True,
                   "propagate_tags": True} for r in settings.replica_regions],
        tags=tags, opts=protect)
    out.table = table

    clusters = [(r.region, r.cluster_name) for r in settings.regions]
    table_regions = [settings.home_region, *settings.replica_regions]

    def names(args: list[Any]) -> iam.AwsNames:
        part, acct, home_stream, replicas, key_arn = args
        by_region = {_field(r, "region_name"): _field(r, "stream_arn") for r in (replicas or [])}
        streams = [home_stream, *(by_region.get(r) for r in settings.replica_regions)]
        if any(not s for s in streams):  # a replica without its stream: no policy may name "*" instead
            raise PlatformError(f"table {settings.table}: a replica has no stream ARN yet: {dict(zip(table_regions, streams))}")
        return iam.AwsNames(partition=part, account=acct, table=settings.table, table_regions=tuple(table_regions),
                            stream_arns=tuple(streams), state_bucket=settings.state_bucket,
                            state_region=settings.home_region, key_arn=key_arn, clusters=tuple(clusters))

    aws_names = pulumi.Output.all(partition, account, table.stream_arn, table.replicas, key.arn).apply(names)

    # -- roles: the runner and the health job through EKS Pod Identity, the preview through GitHub OIDC
    cluster_arns = pulumi.Output.all(partition, account).apply(
        lambda a: [iam.cluster_arn(a[0], region, a[1], name) for region, name in clusters])
    trust = cluster_arns.apply(lambda arns: _json(iam.pod_identity_trust(arns, system.HEALTH, system.SYSTEM_NAMESPACE)))
    health = aws.iam.Role(system.HEALTH, name=system.HEALTH, assume_role_policy=trust, tags=tags,
                          description=f"gco-infra {system.HEALTH} (EKS Pod Identity: {system.SYSTEM_NAMESPACE}/{system.HEALTH})")
    aws.iam.RolePolicy(system.HEALTH, name=system.HEALTH, role=health.id,
                       policy=aws_names.apply(lambda n: _json(iam.health_policy(n))))
    out.roles[system.HEALTH] = health
    # One runner role per region: it may write only its own region's stacks (a runner taken over in
    # one region cannot rewrite another region's checkpoint or break its locks), from its own cluster.
    runner_roles: dict[str, Any] = {}
    for region in settings.regions:
        name = f"{system.RUNNER}-{region.region}"
        arn = pulumi.Output.all(partition, account).apply(
            lambda a, rr=region.region, c=region.cluster_name: [iam.cluster_arn(a[0], rr, a[1], c)])
        role = aws.iam.Role(name, name=name, tags=tags,
                            assume_role_policy=arn.apply(lambda arns: _json(iam.pod_identity_trust(
                                arns, system.RUNNER, system.SYSTEM_NAMESPACE))),
                            description=f"gco-infra {system.RUNNER} of {region.region} (EKS Pod Identity: "
                                        f"{system.SYSTEM_NAMESPACE}/{system.RUNNER}, stack {region.stack})")
        aws.iam.RolePolicy(name, name=name, role=role.id,
                           policy=aws_names.apply(lambda n, st=region.stack: _json(iam.runner_policy(n, [st]))))
        runner_roles[region.region] = out.roles[name] = role

    if settings.github_oidc_provider_arn:
        provider_arn: Any = settings.github_oidc_provider_arn
    else:
        provider_arn = aws.iam.OpenIdConnectProvider("github", url=GITHUB_OIDC_URL, client_id_lists=["sts.amazonaws.com"],
                                                     tags=tags).arn
    preview = aws.iam.Role(
        system.PREVIEW, name=system.PREVIEW, tags=tags,
        description=f"gco-infra stack previews (GitHub {settings.github_repository}, environment {settings.preview_environment})",
        assume_role_policy=pulumi.Output.from_input(provider_arn).apply(lambda arn: _json(iam.github_oidc_trust(
            arn, settings.github_repository, settings.preview_environment))))
    aws.iam.RolePolicy(system.PREVIEW, name=system.PREVIEW, role=preview.id,
                       policy=aws_names.apply(lambda n: _json(iam.preview_policy(n))))
    out.roles[system.PREVIEW] = preview

    # -- per region: cluster access, then the cluster's gco-system objects
    for region in settings.regions:
        r = region.region
        for job, role in ((system.RUNNER, runner_roles[r]), (system.HEALTH, health)):
            aws.eks.PodIdentityAssociation(f"{r}-{job}", region=r, cluster_name=region.cluster_name,
                                           namespace=system.SYSTEM_NAMESPACE, service_account=job,
                                           role_arn=role.arn, tags=tags)
        # A Kubernetes group only, no access policy: RBAC (system.rbac) says what the group may read.
        aws.eks.AccessEntry(f"{r}-{system.PREVIEW}", region=r, cluster_name=region.cluster_name,
                            principal_arn=preview.arn, kubernetes_groups=[system.PREVIEW_GROUP], type="STANDARD",
                            tags=tags)
        cluster = aws.eks.get_cluster_output(name=region.cluster_name, region=r)
        kubeconfig = cluster.apply(lambda c, rr=r, name=region.cluster_name: eks_kubeconfig(
            name, rr, c.endpoint, c.certificate_authorities[0].data))
        provider = k8s.Provider(r, kubeconfig=kubeconfig)
        out.clusters[r] = declare_cluster(provider, region, settings.workloads(region))
    return out


def main(settings: PlatformSettings | None = None) -> Declared:
    settings = settings or load_settings()
    out = declare(settings)
    pulumi.export("tableName", out.table.name)
    pulumi.export("tableStreamArn", out.table.stream_arn)
    pulumi.export("stateBucket", out.bucket.bucket)
    pulumi.export("backendUrl", settings.backend_url)
    pulumi.export("secretsProvider", settings.secrets_provider)
    pulumi.export("keyArn", out.key.arn)
    pulumi.export("roleArns", {job: role.arn for job, role in out.roles.items()})
    pulumi.export("regions", [r.region for r in settings.regions])
    return out


__all__ = ["PlatformSettings", "RegionSettings", "ClusterSystem", "declare_cluster", "declare", "main",
           "settings_from_values", "PlatformError", "KEY_ALIAS"]
