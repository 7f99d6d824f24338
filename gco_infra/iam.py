"""IAM policy documents of the runner, the health job and the preview (pure, no Pulumi, no AWS calls).

Least privilege, derived from the code each identity runs; no action carries a wildcard and every
resource is named:

- DynamoDB (store.py is the only module that calls it). The runner scans (``list_endpoints``, in
  its tick and in each stack's program), re-reads written items with ``BatchGetItem``
  (``get_many``), finds the table's stream with ``DescribeTable`` and follows it
  (``DescribeStream``, ``GetShardIterator``, ``GetRecords``), and writes ``region_status`` with
  conditional ``UpdateItem``. The health job reads the table as the runner does (store.TableCache:
  ``DescribeTable``, ``Scan``, ``BatchGetItem`` and the stream), writes ``region_status``, promotes
  ``desired_state`` (with ``updated_at``), moves rollouts on (``rollout``, conditionally) and purges
  deleted records (``DeleteItem``). The preview
  only scans (the CLI's read and each stack's program). ``GetItem`` is used by none of them
  (``endpoints set-state`` is an operator command).
- The Pulumi state (S3 ``diy`` backend, project layout). An update takes a lock
  (``.pulumi/locks/organization/<project>/<stack>/<id>.json``: list, read, write, delete), reads and
  writes the checkpoint (``.pulumi/stacks/<project>/<stack>.json``, a ``.bak`` copy beside it), and
  writes a history entry and a backup (``.pulumi/history/<project>/...``,
  ``.pulumi/backups/<project>/...``); the Automation API's ``up`` then reads the last history entry.
  Every operation reads ``.pulumi/meta.yaml`` (the platform stack writes it once). A preview takes
  no lock and writes nothing (``diy.Preview`` calls ``apply`` with a discarding persister, without
  ``Lock``): it lists and reads the checkpoints only. Nobody here may touch another project's state
  in the bucket (the platform stack's own).
- KMS (one key): the stacks' secrets provider decrypts each stack's data key (``Decrypt``) and
  encrypts a new stack's (``Encrypt``: the runner creates shard stacks); the bucket's SSE-KMS needs
  ``GenerateDataKey`` for writes (through S3 only) and ``Decrypt`` for reads.
- EKS: the preview's ``DescribeCluster`` (``aws.eks.get_cluster`` in the stacks' program, run outside
  the clusters: the endpoint and CA). The runner in its pod reaches its own cluster through the
  in-cluster address (program.make_provider) and needs no EKS permission. Rights inside a cluster
  come from RBAC (system.py), not IAM: the runner and the health job act as their ServiceAccounts;
  the preview's ``aws eks get-token`` (no permission needed) is mapped by its access entry to a
  read-only group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

PROJECT = "gco-infra"
"""The endpoints stacks' Pulumi project (plan.PROJECT): their state lives under this project's paths."""
VERSION = "2012-10-17"
GITHUB_OIDC_HOST = "token.actions.githubusercontent.com"
POD_IDENTITY_PRINCIPAL = "pods.eks.amazonaws.com"

# diy backend paths (project layout), relative to the bucket
META = ".pulumi/meta.yaml"
STACKS = f".pulumi/stacks/{PROJECT}/*"
LOCKS = f".pulumi/locks/organization/{PROJECT}/*"
HISTORY = f".pulumi/history/{PROJECT}/*"
BACKUPS = f".pulumi/backups/{PROJECT}/*"

_STACK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REPOSITORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}$")
_ENVIRONMENT = re.compile(r"^[^*?:\s][^*?:]{0,254}$")


class PolicyError(ValueError):
    """A policy cannot be written as asked (it would grant more than intended)."""


@dataclass(frozen=True)
class AwsNames:
    """Every AWS resource the policies name."""

    partition: str
    account: str
    table: str
    table_regions: tuple[str, ...]
    """Regions of the global table: the home region and every replica."""
    stream_arns: tuple[str, ...]
    """The table's current stream in each of those regions (DynamoDB gives each replica its own)."""
    state_bucket: str
    state_region: str
    key_arn: str
    """The KMS key of the stacks' secrets and of the state bucket's encryption."""
    clusters: tuple[tuple[str, str], ...]
    """(AWS region, EKS cluster name) of every regional cluster."""

    @property
    def table_arns(self) -> list[str]:
        return [f"arn:{self.partition}:dynamodb:{r}:{self.account}:table/{self.table}" for r in self.table_regions]

    @property
    def cluster_arns(self) -> list[str]:
        return [cluster_arn(self.partition, r, self.account, name) for r, name in self.clusters]

    @property
    def bucket_arn(self) -> str:
        return f"arn:{self.partition}:s3:::{self.state_bucket}"

    def objects(self, *paths: str) -> list[str]:
        return [f"{self.bucket_arn}/{p}" for p in paths]


def cluster_arn(partition: str, region: str, account: str, name: str) -> str:
    return f"arn:{partition}:eks:{region}:{account}:cluster/{name}"


def _statement(sid: str, actions: Iterable[str], resources: Iterable[str], condition: dict[str, Any] | None = None,
               effect: str = "Allow") -> dict[str, Any]:
    st: dict[str, Any] = {"Sid": sid, "Effect": effect, "Action": sorted(actions), "Resource": list(resources)}
    if condition:
        st["Condition"] = condition
    return st


def _document(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": VERSION, "Statement": list(statements)}


def _only_attributes(*names: str) -> dict[str, Any]:
    """UpdateItem may name only these top-level attributes (key, update and condition expressions)."""
    return {"ForAllValues:StringEquals": {"dynamodb:Attributes": list(names)}}


def _state_reads(n: AwsNames, *, updates: bool) -> list[dict[str, Any]]:
    """An update also reads the locks (whose is it?) and the last history entry (the Automation
    API's ``up`` ends with ``pulumi stack history --page-size 1``)."""
    return [_statement("ListState", ["s3:ListBucket"], [n.bucket_arn]),
            _statement("ReadState", ["s3:GetObject"], n.objects(META, STACKS, *([LOCKS, HISTORY] if updates else [])))]


def stack_paths(stacks: Iterable[str], *, locks_only: bool = False) -> list[str]:
    """The state objects of these endpoints stacks and their shards (``<stack>.shard-<k>``): the
    checkpoint (``.json``, ``.json.bak``, compressed forms), locks, history and backups."""
    out: list[str] = []
    for stack in stacks:
        if not _STACK.match(stack or ""):
            raise PolicyError(f"stack name {stack!r} cannot name state objects (letters, digits, '.', '_', '-')")
        out += [f".pulumi/locks/organization/{PROJECT}/{stack}/*", f".pulumi/locks/organization/{PROJECT}/{stack}.shard-*"]
        if not locks_only:
            out += [f".pulumi/stacks/{PROJECT}/{stack}.json*", f".pulumi/stacks/{PROJECT}/{stack}.shard-*",
                    f".pulumi/history/{PROJECT}/{stack}/*", f".pulumi/history/{PROJECT}/{stack}.shard-*",
                    f".pulumi/backups/{PROJECT}/{stack}/*", f".pulumi/backups/{PROJECT}/{stack}.shard-*"]
    return out


def runner_policy(n: AwsNames, stacks: Iterable[str]) -> dict[str, Any]:
    """The runner of one region: it reads the whole table and the project's state (listing stacks
    reads their checkpoints), but writes only its own region's stacks (``stacks``, with their shards)."""
    stacks = list(stacks)
    if not stacks:
        raise PolicyError("a runner's policy needs the stacks it applies")
    return _document(
        _statement("ReadEndpoints", ["dynamodb:DescribeTable", "dynamodb:Scan", "dynamodb:BatchGetItem"], n.table_arns),
        _statement("FollowTableStream", ["dynamodb:DescribeStream", "dynamodb:GetShardIterator", "dynamodb:GetRecords"],
                   n.stream_arns),
        _statement("WriteRegionStatusOnly", ["dynamodb:UpdateItem"], n.table_arns,
                   _only_attributes("endpoint_name", "region_status")),
        *_state_reads(n, updates=True),
        _statement("WriteState", ["s3:PutObject"], n.objects(*stack_paths(stacks))),
        _statement("ReleaseStackLocks", ["s3:DeleteObject"], n.objects(*stack_paths(stacks, locks_only=True))),
        _statement("StackSecrets", ["kms:Decrypt", "kms:Encrypt"], [n.key_arn]),
        _statement("StateObjectEncryption", ["kms:GenerateDataKey"], [n.key_arn],
                   {"StringEquals": {"kms:ViaService": f"s3.{n.state_region}.amazonaws.com"}}),
    )


def health_policy(n: AwsNames) -> dict[str, Any]:
    """The health job of one region: it follows the table's stream as the runner does."""
    return _document(
        _statement("ReadEndpoints", ["dynamodb:DescribeTable", "dynamodb:Scan", "dynamodb:BatchGetItem"], n.table_arns),
        _statement("FollowTableStream", ["dynamodb:DescribeStream", "dynamodb:GetShardIterator", "dynamodb:GetRecords"],
                   n.stream_arns),
        _statement("WriteStatusAndPromote", ["dynamodb:UpdateItem"], n.table_arns,
                   _only_attributes("endpoint_name", "region_status", "desired_state", "updated_at", "rollout")),
        _statement("PurgeDeletedEndpoints", ["dynamodb:DeleteItem"], n.table_arns),
    )


def preview_policy(n: AwsNames) -> dict[str, Any]:
    return _document(
        _statement("ReadEndpoints", ["dynamodb:Scan"], n.table_arns),
        _statement("FindRegionalClusters", ["eks:DescribeCluster"], n.cluster_arns),
        *_state_reads(n, updates=False),
        _statement("DecryptState", ["kms:Decrypt"], [n.key_arn]),
    )


def pod_identity_trust(cluster_arns: Iterable[str], service_account: str, namespace: str) -> dict[str, Any]:
    """EKS Pod Identity may assume the role for this ServiceAccount of these clusters only (on the
    session tags EKS Pod Identity sets, documented for this purpose), so another association in the
    account, for another ServiceAccount or cluster, cannot use it."""
    return _document({
        "Sid": "EksPodIdentity", "Effect": "Allow", "Principal": {"Service": POD_IDENTITY_PRINCIPAL},
        "Action": ["sts:AssumeRole", "sts:TagSession"],
        "Condition": {"StringEquals": {
            "aws:RequestTag/eks-cluster-arn": sorted(cluster_arns),
            "aws:RequestTag/kubernetes-namespace": namespace,
            "aws:RequestTag/kubernetes-service-account": service_account,
        }},
    })


def github_oidc_trust(provider_arn: str, repository: str, environment: str) -> dict[str, Any]:
    """Only jobs of ``repository`` that run in the protected ``environment`` (its reviewers approved
    the run) get an OIDC token with this subject; nothing else can assume the role."""
    if not _REPOSITORY.match(repository or ""):
        raise PolicyError(f"githubRepository must be <owner>/<repo>, got {repository!r}")
    if not _ENVIRONMENT.match(environment or ""):
        raise PolicyError(f"previewEnvironment must be a GitHub environment name (no '*', '?' or ':'), got {environment!r}")
    return _document({
        "Sid": "GithubProtectedEnvironment", "Effect": "Allow", "Principal": {"Federated": provider_arn},
        "Action": ["sts:AssumeRoleWithWebIdentity"],
        "Condition": {"StringEquals": {
            f"{GITHUB_OIDC_HOST}:aud": "sts.amazonaws.com",
            f"{GITHUB_OIDC_HOST}:sub": f"repo:{repository}:environment:{environment}",
        }},
    })


def state_bucket_policy(bucket_arn: str) -> dict[str, Any]:
    """TLS only. A Deny names every S3 action (``s3:*``): listing some would leave the others open
    over plain HTTP. It grants nothing."""
    return _document(_statement("TlsOnly", ["s3:*"], [bucket_arn, f"{bucket_arn}/*"],
                                {"Bool": {"aws:SecureTransport": "false"}}, effect="Deny") | {"Principal": "*"})


def allowed_actions(document: dict[str, Any]) -> list[str]:
    """Every action a document allows (for checks: none may carry a wildcard)."""
    out: list[str] = []
    for st in document["Statement"]:
        if st["Effect"] == "Allow":
            actions = st["Action"]
            out += [actions] if isinstance(actions, str) else list(actions)
    return out


__all__ = ["AwsNames", "PolicyError", "runner_policy", "health_policy", "preview_policy", "pod_identity_trust",
           "github_oidc_trust", "state_bucket_policy", "allowed_actions", "cluster_arn", "PROJECT"]
