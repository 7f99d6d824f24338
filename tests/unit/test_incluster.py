"""The runner's credentials in a pod: a kubeconfig for its ServiceAccount that names the same cluster
as the stack's usual kubeconfig (so pulumi-kubernetes updates its provider instead of replacing it,
and with it every object) and holds a token file's path, never a token."""

from __future__ import annotations

import base64
import json

import pulumi
import pytest

from gco_infra import localenv
from gco_infra.program import (SERVICE_ACCOUNT_DIR, ProgramError, StackSettings, eks_kubeconfig, in_cluster,
                               in_cluster_ca_data, in_cluster_server, make_provider, service_account_kubeconfig)

CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
ENDPOINT = "https://ABCDEF.gr7.us-east-1.eks.amazonaws.com"


def active_cluster(kubeconfig: str) -> dict:
    """What pulumi-kubernetes' DiffConfig compares (getActiveClusterFromConfig): the cluster of the
    current context. A change here plans a replacement of the provider and everything it manages."""
    cfg = json.loads(kubeconfig)
    context = {c["name"]: c["context"] for c in cfg["contexts"]}[cfg["current-context"]]
    return {c["name"]: c["cluster"] for c in cfg["clusters"]}[context["cluster"]]


def user(kubeconfig: str) -> dict:
    cfg = json.loads(kubeconfig)
    context = {c["name"]: c["context"] for c in cfg["contexts"]}[cfg["current-context"]]
    return {u["name"]: u["user"] for u in cfg["users"]}[context["user"]]


def test_service_account_kubeconfig_reads_the_token_from_its_file():
    cfg = service_account_kubeconfig("gco-us-east-1", ENDPOINT, CA)
    assert user(cfg) == {"tokenFile": f"{SERVICE_ACCOUNT_DIR}/token"}
    assert active_cluster(cfg) == {"server": ENDPOINT, "certificate-authority-data": CA}
    assert len(json.loads(cfg)["users"]) == 1 and "exec" not in cfg  # a path: no token, no command


def test_eks_stack_names_the_same_cluster_in_a_pod_as_outside():
    outside = eks_kubeconfig("gco-us-east-1", "us-east-1", ENDPOINT, CA)
    inside = service_account_kubeconfig("gco-us-east-1", ENDPOINT, CA)
    assert active_cluster(inside) == active_cluster(outside)
    assert json.loads(inside)["current-context"] == json.loads(outside)["current-context"]
    assert user(outside)["exec"]["command"] == "aws" and "exec" not in user(inside)


def test_eks_kubeconfig_is_unchanged_for_existing_stacks():
    """Byte for byte what the states hold: any change would show as a provider diff on every stack."""
    assert eks_kubeconfig("c", "us-east-1", "https://e", "Q0E=") == (
        '{"apiVersion": "v1", "kind": "Config", "current-context": "c", "clusters": [{"name": "c", "cluster": '
        '{"server": "https://e", "certificate-authority-data": "Q0E="}}], "contexts": [{"name": "c", "context": '
        '{"cluster": "c", "user": "c"}}], "users": [{"name": "c", "user": {"exec": {"apiVersion": '
        '"client.authentication.k8s.io/v1beta1", "command": "aws", "args": ["eks", "get-token", "--cluster-name", '
        '"c", "--region", "us-east-1", "--output", "json"], "interactiveMode": "Never"}}}]}')


def test_local_stack_names_the_same_cluster_in_a_pod_as_through_its_kubeconfig(tmp_path):
    """The local environment's kubeconfig (path stacks) and the pod's view of the same apiserver:
    KUBERNETES_SERVICE_HOST/PORT and the mounted ca.crt give the same active cluster."""
    env = localenv.LocalEnv(dir=str(tmp_path))
    api = localenv.ApiServer(region="local-1", port=6443)
    env.ca_file("local-1").parent.mkdir(parents=True)
    env.ca_file("local-1").write_bytes(b"-----BEGIN CERTIFICATE-----\nlocal\n-----END CERTIFICATE-----\n")
    env.admin_token = "secret-admin-token"
    env._write_kubeconfig(api)
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(env.ca_file("local-1").read_bytes())
    (sa / "token").write_text("a-token")
    inside = service_account_kubeconfig(
        "local-1", in_cluster_server({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}),
        in_cluster_ca_data(str(sa)))
    assert active_cluster(inside) == active_cluster(env.kubeconfig("local-1").read_text())
    assert "a-token" not in inside and "secret-admin-token" not in inside


@pytest.mark.parametrize("environ, expected", [
    ({"GCO_IN_CLUSTER": "true"}, True), ({"GCO_IN_CLUSTER": "True "}, True),
    ({"GCO_IN_CLUSTER": "false"}, False), ({"GCO_IN_CLUSTER": "1"}, False), ({}, False),
])
def test_in_cluster_only_when_the_deployment_says_so(environ, expected):
    assert in_cluster(environ) is expected


def test_in_cluster_server_as_client_go_builds_it():
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.100.0.1", "KUBERNETES_SERVICE_PORT": "443"}) == \
        "https://10.100.0.1:443"
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}) == \
        "https://[fd00::1]:443"
    with pytest.raises(ProgramError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_server({"KUBERNETES_SERVICE_PORT": "443"})


def test_missing_service_account_files_are_named(tmp_path):
    (tmp_path / "ca.crt").write_text("ca")
    with pytest.raises(ProgramError, match=f"{tmp_path}/token is not mounted"):
        in_cluster_ca_data(str(tmp_path))
    (tmp_path / "token").write_text("t")
    assert base64.b64decode(in_cluster_ca_data(str(tmp_path))) == b"ca"


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []
        self.calls: list[pulumi.runtime.MockCallArgs] = []

    def new_resource(self, args):
        self.resources.append(args)
        return [f"{args.name}-id", args.inputs]

    def call(self, args):
        self.calls.append(args)
        assert args.token == "aws:eks/getCluster:getCluster"
        return {"name": args.args["name"], "endpoint": ENDPOINT, "certificateAuthorities": [{"data": CA}]}


def provider_inputs(settings: StackSettings, mocks: "Mocks | None" = None) -> dict:
    mocks = mocks or Mocks()
    pulumi.runtime.set_mocks(mocks, project="gco-infra", stack=settings.stack, preview=False)

    @pulumi.runtime.test
    def body():
        return make_provider(settings).urn

    body()
    return {r.name: r.inputs for r in mocks.resources if r.typ == "pulumi:providers:kubernetes"}["k8s"]


def _pod(monkeypatch, tmp_path, host="10.100.0.1", port="443"):
    import gco_infra.program as program

    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_text("the-ca")
    (sa / "token").write_text("a-token")
    monkeypatch.setattr(program, "SERVICE_ACCOUNT_DIR", str(sa))
    monkeypatch.setenv("GCO_IN_CLUSTER", "true")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    return sa


def test_eks_provider_in_a_pod_uses_the_service_account_and_no_aws_call(monkeypatch, tmp_path):
    """The image has neither the AWS provider plugin nor the aws CLI: in its pod the runner needs neither."""
    sa = _pod(monkeypatch, tmp_path)
    settings = StackSettings(stack="us-east-1", region="us-east-1", cluster_name="gco-us-east-1", aws_region="us-east-1")
    mocks = Mocks()
    inputs = provider_inputs(settings, mocks)
    assert mocks.calls == []
    assert user(inputs["kubeconfig"]) == {"tokenFile": f"{sa}/token"}
    assert active_cluster(inputs["kubeconfig"]) == {
        "server": "https://10.100.0.1:443", "certificate-authority-data": base64.b64encode(b"the-ca").decode()}
    # the same cluster for pulumi-kubernetes as the kubeconfig a person's `pulumi up` uses: an update, never a replacement
    assert inputs["clusterIdentifier"] == "gco-us-east-1"
    assert "a-token" not in json.dumps(inputs)


def test_eks_provider_outside_a_pod_keeps_aws_exec(monkeypatch):
    monkeypatch.delenv("GCO_IN_CLUSTER", raising=False)
    settings = StackSettings(stack="us-east-1", region="us-east-1", cluster_name="gco-us-east-1", aws_region="us-east-1")
    mocks = Mocks()
    inputs = provider_inputs(settings, mocks)
    assert [c.token for c in mocks.calls] == ["aws:eks/getCluster:getCluster"]
    assert inputs["kubeconfig"] == eks_kubeconfig("gco-us-east-1", "us-east-1", ENDPOINT, CA)
    assert inputs["clusterIdentifier"] == "gco-us-east-1"


def test_kubeconfig_path_stack_in_a_pod_uses_the_pods_cluster(monkeypatch, tmp_path):
    sa = _pod(monkeypatch, tmp_path, host="127.0.0.1", port="6443")
    settings = StackSettings(stack="local", region="local-1", kubeconfig="/nowhere/kubeconfig-local-1")
    inputs = provider_inputs(settings)
    assert active_cluster(inputs["kubeconfig"]) == {
        "server": "https://127.0.0.1:6443", "certificate-authority-data": base64.b64encode(b"the-ca").decode()}
    assert user(inputs["kubeconfig"]) == {"tokenFile": f"{sa}/token"}
    assert "a-token" not in json.dumps(inputs)
