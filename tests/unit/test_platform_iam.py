"""IAM documents (pure): every statement of every role, exactly; no wildcard action; named resources."""

from __future__ import annotations

import pytest

from gco_infra import iam
from gco_infra.plan import PROJECT

ACCOUNT = "111111111111"
TABLE = f"arn:aws:dynamodb:{{}}:{ACCOUNT}:table/gco-inference-endpoints"
REGIONS = ("us-east-1", "us-west-2", "eu-west-1")
STREAMS = tuple(TABLE.format(r) + "/stream/2026-01-01T00:00:00.000" for r in REGIONS)
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BUCKET = "arn:aws:s3:::gco-infra-state-111111111111"
CLUSTERS = [f"arn:aws:eks:{r}:{ACCOUNT}:cluster/gco-{r}" for r in REGIONS]
NAMES = iam.AwsNames(partition="aws", account=ACCOUNT, table="gco-inference-endpoints", table_regions=REGIONS,
                     stream_arns=STREAMS, state_bucket="gco-infra-state-111111111111", state_region="us-east-1",
                     key_arn=KEY, clusters=tuple((r, f"gco-{r}") for r in REGIONS))
TABLES = [TABLE.format(r) for r in REGIONS]


def allow(sid, actions, resources, condition=None):
    st = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}
    if condition:
        st["Condition"] = condition
    return st


def runner_policy(names):
    return iam.runner_policy(names, ["us-east-1"])


def own_stack(*kinds):
    paths = {"locks": [f"{BUCKET}/.pulumi/locks/organization/gco-infra/us-east-1/*",
                       f"{BUCKET}/.pulumi/locks/organization/gco-infra/us-east-1.shard-*"],
             "stacks": [f"{BUCKET}/.pulumi/stacks/gco-infra/us-east-1.json*",
                        f"{BUCKET}/.pulumi/stacks/gco-infra/us-east-1.shard-*"],
             "history": [f"{BUCKET}/.pulumi/history/gco-infra/us-east-1/*",
                         f"{BUCKET}/.pulumi/history/gco-infra/us-east-1.shard-*"],
             "backups": [f"{BUCKET}/.pulumi/backups/gco-infra/us-east-1/*",
                         f"{BUCKET}/.pulumi/backups/gco-infra/us-east-1.shard-*"]}
    return [p for k in kinds for p in paths[k]]


def test_a_runner_writes_only_its_own_regions_stacks():
    assert [NAMES.bucket_arn + "/" + path for path in iam.stack_paths(["us-east-1"])] == \
        own_stack("locks", "stacks", "history", "backups")
    assert not [p for p in iam.stack_paths(["us-east-1"]) if "us-west-2" in p or "/gco-platform/" in p]
    for bad in ("", "*", "us-*", "a/b", "../x"):
        with pytest.raises(iam.PolicyError):
            iam.runner_policy(NAMES, [bad])
    with pytest.raises(iam.PolicyError):
        iam.runner_policy(NAMES, [])


def test_runner_policy_exactly():
    assert runner_policy(NAMES) == {"Version": "2012-10-17", "Statement": [
        allow("ReadEndpoints", ["dynamodb:BatchGetItem", "dynamodb:DescribeTable", "dynamodb:Scan"], TABLES),
        allow("FollowTableStream", ["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator"],
              list(STREAMS)),
        allow("WriteRegionStatusOnly", ["dynamodb:UpdateItem"], TABLES,
              {"ForAllValues:StringEquals": {"dynamodb:Attributes": ["endpoint_name", "region_status"]}}),
        allow("ListState", ["s3:ListBucket"], [BUCKET]),
        allow("ReadState", ["s3:GetObject"], [f"{BUCKET}/.pulumi/meta.yaml", f"{BUCKET}/.pulumi/stacks/gco-infra/*",
                                              f"{BUCKET}/.pulumi/locks/organization/gco-infra/*",
                                              f"{BUCKET}/.pulumi/history/gco-infra/*"]),
        allow("WriteState", ["s3:PutObject"], own_stack("locks", "stacks", "history", "backups")),
        allow("ReleaseStackLocks", ["s3:DeleteObject"], own_stack("locks")),
        allow("StackSecrets", ["kms:Decrypt", "kms:Encrypt"], [KEY]),
        allow("StateObjectEncryption", ["kms:GenerateDataKey"], [KEY],
              {"StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"}}),
    ]}


def test_health_policy_exactly():
    assert iam.health_policy(NAMES) == {"Version": "2012-10-17", "Statement": [
        allow("ReadEndpoints", ["dynamodb:BatchGetItem", "dynamodb:DescribeTable", "dynamodb:Scan"], TABLES),
        allow("FollowTableStream", ["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator"],
              list(STREAMS)),
        allow("WriteStatusAndPromote", ["dynamodb:UpdateItem"], TABLES,
              {"ForAllValues:StringEquals": {"dynamodb:Attributes": ["endpoint_name", "region_status", "desired_state",
                                                                      "updated_at", "rollout"]}}),
        allow("PurgeDeletedEndpoints", ["dynamodb:DeleteItem"], TABLES),
    ]}


def test_preview_policy_reads_only():
    assert iam.preview_policy(NAMES) == {"Version": "2012-10-17", "Statement": [
        allow("ReadEndpoints", ["dynamodb:Scan"], TABLES),
        allow("FindRegionalClusters", ["eks:DescribeCluster"], CLUSTERS),
        allow("ListState", ["s3:ListBucket"], [BUCKET]),
        allow("ReadState", ["s3:GetObject"], [f"{BUCKET}/.pulumi/meta.yaml", f"{BUCKET}/.pulumi/stacks/gco-infra/*"]),
        allow("DecryptState", ["kms:Decrypt"], [KEY]),
    ]}
    writes = {"dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:PutItem", "s3:PutObject", "s3:DeleteObject",
              "kms:Encrypt", "kms:GenerateDataKey"}
    assert not writes & set(iam.allowed_actions(iam.preview_policy(NAMES)))


@pytest.mark.parametrize("policy", [runner_policy, iam.health_policy, iam.preview_policy])
def test_no_wildcard_action_and_every_resource_named(policy):
    doc = policy(NAMES)
    for action in iam.allowed_actions(doc):
        assert "*" not in action and "?" not in action, action
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
        for res in st["Resource"]:
            assert res != "*" and res.startswith("arn:aws:"), res
            # a wildcard only ends an S3 prefix of this project's state
            assert "*" not in res or (res.startswith(f"{BUCKET}/.pulumi/") and res.endswith("*")
                                      and res.count("*") == 1 and f"/{PROJECT}/" in res), res
            assert "?" not in res


def test_state_paths_are_the_endpoints_project():
    assert iam.PROJECT == PROJECT  # the runner's stacks (plan.PROJECT), not the platform's own state


def test_pod_identity_trust():
    assert iam.pod_identity_trust(CLUSTERS, "gco-runner", "gco-system") == {"Version": "2012-10-17", "Statement": [{
        "Sid": "EksPodIdentity", "Effect": "Allow", "Principal": {"Service": "pods.eks.amazonaws.com"},
        "Action": ["sts:AssumeRole", "sts:TagSession"],
        "Condition": {"StringEquals": {
            "aws:RequestTag/eks-cluster-arn": sorted(CLUSTERS),
            "aws:RequestTag/kubernetes-namespace": "gco-system",
            "aws:RequestTag/kubernetes-service-account": "gco-runner",
        }},
    }]}


def test_github_oidc_trust_names_one_protected_environment():
    provider = f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"
    assert iam.github_oidc_trust(provider, "example/gco-infra", "stack-preview") == {"Version": "2012-10-17", "Statement": [{
        "Sid": "GithubProtectedEnvironment", "Effect": "Allow", "Principal": {"Federated": provider},
        "Action": ["sts:AssumeRoleWithWebIdentity"],
        "Condition": {"StringEquals": {
            "token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
            "token.actions.githubusercontent.com:sub": "repo:example/gco-infra:environment:stack-preview",
        }},
    }]}


@pytest.mark.parametrize("repository, environment", [
    ("example/*", "stack-preview"), ("example", "stack-preview"), ("", "stack-preview"),
    ("example/gco-infra", "*"), ("example/gco-infra", "prod*"), ("example/gco-infra", ""),
    ("example/gco-infra", "x:ref:refs/heads/main"),
])
def test_github_oidc_trust_refuses_wildcards_and_malformed_names(repository, environment):
    with pytest.raises(iam.PolicyError):
        iam.github_oidc_trust("arn:aws:iam::1:oidc-provider/x", repository, environment)


def test_state_bucket_policy_denies_plain_http():
    assert iam.state_bucket_policy(BUCKET) == {"Version": "2012-10-17", "Statement": [{
        "Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": ["s3:*"], "Resource": [BUCKET, f"{BUCKET}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }]}
    assert iam.allowed_actions(iam.state_bucket_policy(BUCKET)) == []  # grants nothing
