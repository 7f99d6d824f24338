"""KubernetesObject: declared as the generated Kubernetes classes declare an object, without reading
its outputs back."""

from __future__ import annotations

import inspect

import pulumi
import pulumi_kubernetes as k8s
from pulumi.runtime import resource as sdk_resource
from pulumi.runtime import rpc

from gco_infra import component
from gco_infra import manifests as m

OBJ = {"apiVersion": "apps/v1", "kind": "Deployment",
       "metadata": {"name": "web", "namespace": "ns", "labels": {"app": "web"}},
       "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}}}


class Mocks(pulumi.runtime.Mocks):
    """Answers each registration as the provider does: the live object, with what the cluster added."""

    def __init__(self) -> None:
        self.registered: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args):
        self.registered.append(args)
        live = {**args.inputs, "metadata": {**args.inputs["metadata"], "uid": "u-1"}, "status": {"replicas": 2}}
        return [f"{args.name}-id", live]

    def call(self, args):
        return {}


def declared(make):
    """Register what ``make()`` declares under mocks; returns (the registrations, its resolved outputs)."""
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project="gco-infra", stack="test", preview=False)
    got = {}

    @pulumi.runtime.test
    def body():
        res = make()
        return pulumi.Output.all(res.urn, res.id, res.metadata).apply(lambda v: got.update(urn=v[0], id=v[1], metadata=v[2]))

    body()
    return mocks.registered, got


def test_it_registers_the_type_name_and_inputs_the_generated_class_registers():
    ours, _ = declared(lambda: component.KubernetesObject(component.TYPE_TOKENS[m.DEPLOYMENT], OBJ, OBJ["spec"]))
    theirs, _ = declared(lambda: k8s.apps.v1.Deployment("web", metadata=OBJ["metadata"], spec=OBJ["spec"]))
    assert [(r.typ, r.name, r.inputs) for r in ours] == [(r.typ, r.name, r.inputs) for r in theirs]
    assert ours[0].typ == "kubernetes:apps/v1:Deployment" and ours[0].inputs["metadata"]["namespace"] == "ns"


def test_its_outputs_are_not_read_back_and_other_resources_still_are():
    _, ours = declared(lambda: component.KubernetesObject(component.TYPE_TOKENS[m.DEPLOYMENT], OBJ, OBJ["spec"]))
    assert ours["metadata"] is None
    assert ours["id"] == "web-id" and ours["urn"].endswith("$kubernetes:apps/v1:Deployment::web")
    # the hook is installed in this process now; a generated class still gets the live object
    assert rpc.resolve_outputs is component._resolve_outputs
    _, theirs = declared(lambda: k8s.apps.v1.Deployment("web", metadata=OBJ["metadata"], spec=OBJ["spec"]))
    assert theirs["metadata"]["uid"] == "u-1"


def test_the_sdk_still_resolves_outputs_where_the_hook_expects():
    """The hook replaces ``rpc.resolve_outputs`` (SDK 3.272.0). If an SDK upgrade moves or reshapes it,
    KubernetesObject outputs would be read back again (slower, still correct): this fails first."""
    params = list(inspect.signature(component._SDK_RESOLVE_OUTPUTS).parameters)
    assert params[:6] == ["res", "serialized_props", "outputs", "deps", "resolvers", "custom"], params
    assert list(inspect.signature(rpc.resolve_properties).parameters)[:4] == ["resolvers", "all_properties", "deps",
                                                                             "custom"]
    assert "rpc.resolve_outputs(" in inspect.getsource(sdk_resource.register_resource), \
        "register_resource no longer resolves outputs through rpc.resolve_outputs"
