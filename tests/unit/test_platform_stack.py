"""The platform stack under pulumi.runtime.set_mocks: the table, the state bucket and key, every IAM
policy statement, the per-region cluster access and gco-system objects."""

from __future__ import annotations

import json

import pulumi
import pytest

from gco_infra import iam, platform_stack as ps, system

ACCOUNT = "111111111111"
REGIONS = ("us-east-1", "us-west-2", "eu-west-1")
BUCKET = "gco-infra-state-111111111111"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/k-1"


def stream(region, table="gco-inference-endpoints"):
    return f"arn:aws:dynamodb:{region}:{ACCOUNT}:table/{table}/stream/2026-01-01T00:00:00.000"


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []
        self.calls: list[pulumi.runtime.MockCallArgs] = []

    def new_resource(self, args):
        self.resources.append(args)
        state = dict(args.inputs)
        if args.typ == "aws:dynamodb/table:Table":  # what AWS computes: one stream per replica
            state["streamArn"] = stream("us-east-1", state["name"])
            state["replicas"] = [{**r, "streamArn": stream(r["regionName"], state["name"])} for r in state.get("replicas", [])]
        elif args.typ == "aws:kms/key:Key":
            state.update(arn=KEY_ARN, keyId="k-1")
        elif args.typ == "aws:iam/role:Role":
            state["arn"] = f"arn:aws:iam::{ACCOUNT}:role/{state['name']}"
        elif args.typ == "aws:s3/bucket:Bucket":
            state["arn"] = f"arn:aws:s3:::{state['bucket']}"
        elif args.typ == "aws:iam/openIdConnectProvider:OpenIdConnectProvider":
            state["arn"] = f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"
        return [f"{args.name}-id", state]

    def call(self, args):
        self.calls.append(args)
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": ACCOUNT, "arn": f"arn:aws:iam::{ACCOUNT}:user/admin", "userId": "A", "id": ACCOUNT}
        if args.token == "aws:index/getPartition:getPartition":
            return {"partition": "aws", "dnsSuffix": "amazonaws.com", "reverseDnsSuffix": "com.amazonaws", "id": "aws"}
        if args.token == "aws:eks/getCluster:getCluster":
            return {"name": args.args["name"], "endpoint": f"https://{args.args['name']}.eks.example",
                    "certificateAuthorities": [{"data": "Q0E="}], "arn": "unused"}
        raise AssertionError(f"unexpected invoke {args.token}")


VALUES = {
    "regions": [{"region": r, "clusterName": f"gco-{r}", **({"namespaces": ["gco-inference", "team-b"]}
                                                             if r == "us-west-2" else {})} for r in REGIONS],
    "stateBucket": BUCKET, "image": "ghcr.io/example/gco-infra@sha256:abc", "githubRepository": "example/gco-infra",
}


def run(values=None, home="us-east-1"):
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project="gco-platform", stack="test", preview=False)
    settings = ps.settings_from_values(values or VALUES, home)

    @pulumi.runtime.test
    def body():
        out = ps.main(settings)
        return pulumi.Output.all(*[c.urn for c in out.clusters.values()], *[r.urn for r in out.roles.values()])

    body()
    return mocks, settings


@pytest.fixture(scope="module")
def stack():
    mocks, settings = run()
    return {(r.typ, r.name): r for r in mocks.resources}, mocks, settings


def one(resources, typ, name):
    return resources[(typ, name)].inputs


def test_the_table_is_a_global_table_with_stream_pitr_and_deletion_protection(stack):
    res, _, _ = stack
    t = one(res, "aws:dynamodb/table:Table", "endpoints")
    assert t["name"] == "gco-inference-endpoints"
    assert t["hashKey"] == "endpoint_name" and "rangeKey" not in t
    assert t["attributes"] == [{"name": "endpoint_name", "type": "S"}]
    assert t["billingMode"] == "PAY_PER_REQUEST"
    assert (t["streamEnabled"], t["streamViewType"]) == (True, "NEW_AND_OLD_IMAGES")
    assert t["pointInTimeRecovery"] == {"enabled": True}
    assert t["deletionProtectionEnabled"] is True
    assert t["serverSideEncryption"] == {"enabled": True}
    assert t["replicas"] == [{"regionName": r, "pointInTimeRecovery": True, "deletionProtectionEnabled": True,
                              "propagateTags": True} for r in ("us-west-2", "eu-west-1")]  # every other region


def test_the_state_bucket_and_its_key(stack):
    res, _, _ = stack
    assert one(res, "aws:s3/bucket:Bucket", "state")["bucket"] == BUCKET
    assert one(res, "aws:s3/bucketVersioning:BucketVersioning", "state") == {
        "bucket": "state-id", "versioningConfiguration": {"status": "Enabled"}}
    assert one(res, "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration", "state") == {
        "bucket": "state-id", "rules": [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": "aws:kms",
                                                                               "kmsMasterKeyId": KEY_ARN},
                                         "bucketKeyEnabled": True}]}
    assert one(res, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", "state") == {
        "bucket": "state-id", "blockPublicAcls": True, "blockPublicPolicy": True, "ignorePublicAcls": True,
        "restrictPublicBuckets": True}
    assert one(res, "aws:s3/bucketOwnershipControls:BucketOwnershipControls", "state") == {
        "bucket": "state-id", "rule": {"objectOwnership": "BucketOwnerEnforced"}}
    policy = json.loads(one(res, "aws:s3/bucketPolicy:BucketPolicy", "state")["policy"])
    assert policy == iam.state_bucket_policy(f"arn:aws:s3:::{BUCKET}")
    assert one(res, "aws:s3/bucketObjectv2:BucketObjectv2", "state-meta") == {
        "bucket": "state-id", "key": ".pulumi/meta.yaml", "content": "version: 1\n", "contentType": "application/yaml"}
    rules = {r["id"]: r for r in one(res, "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
                                       "state")["rules"]}
    assert rules == {
        "old-versions": {"id": "old-versions", "status": "Enabled", "filter": {"prefix": ""},
                         "noncurrentVersionExpiration": {"noncurrentDays": 30},
                         "abortIncompleteMultipartUpload": {"daysAfterInitiation": 1}},
        "history": {"id": "history", "status": "Enabled", "filter": {"prefix": ".pulumi/history/"},
                    "expiration": {"days": 14}},
        "backups": {"id": "backups", "status": "Enabled", "filter": {"prefix": ".pulumi/backups/"},
                    "expiration": {"days": 14}},
    }, "current checkpoints (.pulumi/stacks/) must never expire"
    key = one(res, "aws:kms/key:Key", "state")
    assert key["enableKeyRotation"] is True and key["deletionWindowInDays"] == 30
    assert "policy" not in key  # the default key policy: the account's IAM policies decide
    assert one(res, "aws:kms/alias:Alias", "state") == {"name": "alias/gco-infra-state", "targetKeyId": "k-1"}


def policy_of(res, name):
    return json.loads(one(res, "aws:iam/rolePolicy:RolePolicy", name)["policy"])


def statements(doc):
    return {st["Sid"]: (st["Action"], st["Resource"], st.get("Condition")) for st in doc["Statement"]}


TABLES = [f"arn:aws:dynamodb:{r}:{ACCOUNT}:table/gco-inference-endpoints" for r in REGIONS]
CLUSTERS = [f"arn:aws:eks:{r}:{ACCOUNT}:cluster/gco-{r}" for r in REGIONS]
B = f"arn:aws:s3:::{BUCKET}"


def own_stack(stack, *kinds):
    paths = {"locks": [f"{B}/.pulumi/locks/organization/gco-infra/{stack}/*",
                       f"{B}/.pulumi/locks/organization/gco-infra/{stack}.shard-*"],
             "stacks": [f"{B}/.pulumi/stacks/gco-infra/{stack}.json*", f"{B}/.pulumi/stacks/gco-infra/{stack}.shard-*"],
             "history": [f"{B}/.pulumi/history/gco-infra/{stack}/*", f"{B}/.pulumi/history/gco-infra/{stack}.shard-*"],
             "backups": [f"{B}/.pulumi/backups/gco-infra/{stack}/*", f"{B}/.pulumi/backups/gco-infra/{stack}.shard-*"]}
    return [p for k in kinds for p in paths[k]]


@pytest.mark.parametrize("region", REGIONS)
def test_runner_role_policy_every_statement(stack, region):
    res, _, _ = stack
    role = f"gco-runner-{region}"
    assert one(res, "aws:iam/rolePolicy:RolePolicy", role)["role"] == f"{role}-id"
    assert statements(policy_of(res, role)) == {
        "ReadEndpoints": (["dynamodb:BatchGetItem", "dynamodb:DescribeTable", "dynamodb:Scan"], TABLES, None),
        "FollowTableStream": (["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator"],
                              [stream(r) for r in REGIONS], None),
        "WriteRegionStatusOnly": (["dynamodb:UpdateItem"], TABLES, {"ForAllValues:StringEquals": {
            "dynamodb:Attributes": ["endpoint_name", "region_status"]}}),
        "ListState": (["s3:ListBucket"], [B], None),
        "ReadState": (["s3:GetObject"], [f"{B}/.pulumi/meta.yaml", f"{B}/.pulumi/stacks/gco-infra/*",
                                         f"{B}/.pulumi/locks/organization/gco-infra/*",
                                         f"{B}/.pulumi/history/gco-infra/*"], None),
        "WriteState": (["s3:PutObject"], own_stack(region, "locks", "stacks", "history", "backups"), None),
        "ReleaseStackLocks": (["s3:DeleteObject"], own_stack(region, "locks"), None),
        "StackSecrets": (["kms:Decrypt", "kms:Encrypt"], [KEY_ARN], None),
        "StateObjectEncryption": (["kms:GenerateDataKey"], [KEY_ARN],
                                  {"StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"}}),
    }


def test_health_role_policy_every_statement(stack):
    res, _, _ = stack
    assert statements(policy_of(res, "gco-health")) == {
        "ReadEndpoints": (["dynamodb:BatchGetItem", "dynamodb:DescribeTable", "dynamodb:Scan"], TABLES, None),
        "FollowTableStream": (["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator"],
                              [stream(r) for r in REGIONS], None),
        "WriteStatusAndPromote": (["dynamodb:UpdateItem"], TABLES, {"ForAllValues:StringEquals": {
            "dynamodb:Attributes": ["endpoint_name", "region_status", "desired_state", "updated_at", "rollout"]}}),
        "PurgeDeletedEndpoints": (["dynamodb:DeleteItem"], TABLES, None),
    }


def test_preview_role_policy_every_statement(stack):
    res, _, _ = stack
    assert statements(policy_of(res, "gco-preview")) == {
        "ReadEndpoints": (["dynamodb:Scan"], TABLES, None),
        "FindRegionalClusters": (["eks:DescribeCluster"], CLUSTERS, None),
        "ListState": (["s3:ListBucket"], [B], None),
        "ReadState": (["s3:GetObject"], [f"{B}/.pulumi/meta.yaml", f"{B}/.pulumi/stacks/gco-infra/*"], None),
        "DecryptState": (["kms:Decrypt"], [KEY_ARN], None),
    }


def test_no_policy_of_the_stack_allows_a_wildcard_action(stack):
    res, _, _ = stack
    docs = [json.loads(r.inputs["policy"]) for (typ, _), r in res.items()
            if typ in ("aws:iam/rolePolicy:RolePolicy", "aws:s3/bucketPolicy:BucketPolicy")]
    docs += [json.loads(r.inputs["assumeRolePolicy"]) for (typ, _), r in res.items() if typ == "aws:iam/role:Role"]
    assert len(docs) == 11  # 3 runner roles, health, preview (policy + trust each) and the bucket policy
    for doc in docs:
        for action in iam.allowed_actions(doc):
            assert "*" not in action, action
    assert not [k for k in res if k[0] in ("aws:iam/rolePolicyAttachment:RolePolicyAttachment",
                                           "aws:iam/policy:Policy", "aws:eks/accessPolicyAssociation:AccessPolicyAssociation")]


def test_trust_policies(stack):
    res, _, _ = stack
    roles = [("gco-health", "gco-health", sorted(CLUSTERS))]
    roles += [(f"gco-runner-{r}", "gco-runner", [c]) for r, c in zip(REGIONS, CLUSTERS)]  # its own cluster only
    for name, job, clusters in roles:
        role = one(res, "aws:iam/role:Role", name)
        assert role["name"] == name
        assert json.loads(role["assumeRolePolicy"]) == {"Version": "2012-10-17", "Statement": [{
            "Sid": "EksPodIdentity", "Effect": "Allow", "Principal": {"Service": "pods.eks.amazonaws.com"},
            "Action": ["sts:AssumeRole", "sts:TagSession"],
            "Condition": {"StringEquals": {"aws:RequestTag/eks-cluster-arn": clusters,
                                           "aws:RequestTag/kubernetes-namespace": "gco-system",
                                           "aws:RequestTag/kubernetes-service-account": job}}}]}
    oidc = one(res, "aws:iam/openIdConnectProvider:OpenIdConnectProvider", "github")
    assert oidc == {"url": "https://token.actions.githubusercontent.com", "clientIdLists": ["sts.amazonaws.com"],
                    "tags": {"project": "gco"}}
    preview = json.loads(one(res, "aws:iam/role:Role", "gco-preview")["assumeRolePolicy"])
    assert preview["Statement"] == [{
        "Sid": "GithubProtectedEnvironment", "Effect": "Allow",
        "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"},
        "Action": ["sts:AssumeRoleWithWebIdentity"],
        "Condition": {"StringEquals": {"token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
                                       "token.actions.githubusercontent.com:sub":
                                           "repo:example/gco-infra:environment:stack-preview"}}}]


def test_an_existing_github_provider_is_used_not_created():
    arn = f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"
    mocks, _ = run({**VALUES, "githubOidcProviderArn": arn, "previewEnvironment": "prod-preview"})
    res = {(r.typ, r.name): r for r in mocks.resources}
    assert not [k for k in res if k[0] == "aws:iam/openIdConnectProvider:OpenIdConnectProvider"]
    trust = json.loads(res[("aws:iam/role:Role", "gco-preview")].inputs["assumeRolePolicy"])["Statement"][0]
    assert trust["Principal"] == {"Federated": arn}
    assert trust["Condition"]["StringEquals"]["token.actions.githubusercontent.com:sub"] == \
        "repo:example/gco-infra:environment:prod-preview"


def test_per_region_pod_identity_and_access_entries(stack):
    res, _, _ = stack
    for r in REGIONS:
        for job in ("gco-runner", "gco-health"):
            assert one(res, "aws:eks/podIdentityAssociation:PodIdentityAssociation", f"{r}-{job}") == {
                "region": r, "clusterName": f"gco-{r}", "namespace": "gco-system", "serviceAccount": job,
                "roleArn": f"arn:aws:iam::{ACCOUNT}:role/{job}" + (f"-{r}" if job == "gco-runner" else ""),
                "tags": {"project": "gco"}}
        assert one(res, "aws:eks/accessEntry:AccessEntry", f"{r}-gco-preview") == {
            "region": r, "clusterName": f"gco-{r}", "principalArn": f"arn:aws:iam::{ACCOUNT}:role/gco-preview",
            "kubernetesGroups": ["gco-preview"], "type": "STANDARD", "tags": {"project": "gco"}}
    kinds = [k[0] for k in res]
    assert kinds.count("aws:eks/podIdentityAssociation:PodIdentityAssociation") == 6
    # the runner and the health job act as their ServiceAccounts in their own cluster: no access entry
    assert kinds.count("aws:eks/accessEntry:AccessEntry") == 3


def test_each_cluster_gets_a_provider_from_its_eks_cluster(stack):
    res, mocks, _ = stack
    for r in REGIONS:
        cfg = json.loads(one(res, "pulumi:providers:kubernetes", r)["kubeconfig"])
        assert cfg["clusters"][0]["cluster"] == {"server": f"https://gco-{r}.eks.example", "certificate-authority-data": "Q0E="}
        assert cfg["users"][0]["user"]["exec"]["args"] == ["eks", "get-token", "--cluster-name", f"gco-{r}",
                                                           "--region", r, "--output", "json"]
    asked = {(c.args["name"], c.args.get("region")) for c in mocks.calls if c.token == "aws:eks/getCluster:getCluster"}
    assert asked == {(f"gco-{r}", r) for r in REGIONS}


def test_each_cluster_gets_exactly_the_system_objects(stack):
    res, _, settings = stack
    for region in settings.regions:
        r = region.region
        objs = system.system_objects(region.namespaces, settings.workloads(region))
        declared = {k: v for k, v in res.items() if k[0].startswith("kubernetes:") and k[1].startswith(f"{r}-")}
        assert len(declared) == len(objs)
        for obj in objs:
            key = system.object_key(obj)
            group = obj["apiVersion"].rpartition("/")[0] or "core"
            version = obj["apiVersion"].rpartition("/")[2]
            typ = f"kubernetes:{group}/{version}:{obj['kind']}"
            got = declared[(typ, f"{r}-{key.lower().replace('/', '-')}")]
            assert f"pulumi:providers:kubernetes::{r}::" in got.provider  # the region's own cluster
            meta = dict(got.inputs["metadata"])
            ann = meta.pop("annotations")
            assert ann == ({"pulumi.com/patchForce": "true", "pulumi.com/skipAwait": "true"} if obj["kind"] == "Deployment"
                           else {"pulumi.com/patchForce": "true"})
            want = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
            assert {**{k: v for k, v in got.inputs.items() if k not in ("apiVersion", "kind")}, "metadata": meta} == want, key
    dep = res[("kubernetes:apps/v1:Deployment", "us-west-2-deployment-gco-system-gco-runner")].inputs
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GCO_STACK"] == "us-west-2" and env["AWS_REGION"] == "us-west-2"
    assert env["PULUMI_BACKEND_URL"] == f"s3://{BUCKET}?region=us-east-1"
    assert env["GCO_SECRETS_PROVIDER"] == "awskms://alias/gco-infra-state?region=us-east-1"
    assert ("kubernetes:rbac.authorization.k8s.io/v1:Role", "us-west-2-role-team-b-gco-runner") in res
    assert ("kubernetes:rbac.authorization.k8s.io/v1:Role", "us-east-1-role-team-b-gco-runner") not in res


def test_outputs_name_what_the_runner_and_the_preview_need():
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project="gco-platform", stack="test", preview=False)
    settings = ps.settings_from_values(VALUES, "us-east-1")
    assert settings.backend_url == f"s3://{BUCKET}?region=us-east-1"
    assert settings.secrets_provider == "awskms://alias/gco-infra-state?region=us-east-1"
    assert settings.replica_regions == ["us-west-2", "eu-west-1"]


@pytest.mark.parametrize("change, message", [
    ({"regions": []}, "must list the regions"),
    ({"regions": [{"region": "us-east-1"}]}, "clusterName"),
    ({"regions": [{"region": "us-east-1", "clusterName": "a b"}]}, "clusterName"),
    ({"regions": [{"region": "us-east-1", "clusterName": "a"}, {"region": "us-east-1", "clusterName": "b"}]}, "twice"),
    ({"regions": [{"region": "us-west-2", "clusterName": "a"}]}, "home region"),
    ({"regions": [{"region": "us-east-1", "clusterName": "a", "namespaces": ["gco-system"]}]}, "namespaces"),
    ({"stateBucket": "Bad_Bucket"}, "stateBucket"),
    ({"image": ""}, "image"),
    ({"githubRepository": "example/*"}, "githubRepository"),
    ({"previewEnvironment": "*"}, "previewEnvironment"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        ps.settings_from_values({**VALUES, **change}, "us-east-1")


def test_home_region_is_required():
    with pytest.raises(ps.PlatformError, match="aws:region"):
        ps.settings_from_values(VALUES, None)


def test_the_project_folder_runs_the_example_config():
    """platform/__main__.py with platform/Pulumi.example.yaml, as `pulumi up` in platform/ would run it."""
    import runpy
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2] / "platform"
    project = yaml.safe_load((root / "Pulumi.yaml").read_text())
    assert project["name"] == ps.PROJECT and project["runtime"]["name"] == "python"
    assert not (root / "__init__.py").exists()  # a Pulumi project folder, not a package (no `platform` module)
    config = yaml.safe_load((root / "Pulumi.example.yaml").read_text())["config"]
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project=ps.PROJECT, stack="example", preview=False)
    pulumi.runtime.set_all_config({k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()})
    try:
        @pulumi.runtime.test
        def body():
            runpy.run_path(str(root / "__main__.py"), run_name="__main__")
            return pulumi.Output.from_input(1)

        body()
    finally:
        pulumi.runtime.set_all_config({})
    regions = [r["region"] for r in config["gco-platform:regions"]]
    assert {r.name for r in mocks.resources if r.typ == "gco:platform:ClusterSystem"} == set(regions)
    table = next(r for r in mocks.resources if r.typ == "aws:dynamodb/table:Table")
    assert [rep["regionName"] for rep in table.inputs["replicas"]] == [r for r in regions if r != config["aws:region"]]
