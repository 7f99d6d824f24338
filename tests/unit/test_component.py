"""KubernetesObject: registered as the generated Kubernetes classes register an object, without
reading its outputs back."""

from __future__ import annotations

import inspect

import pulumi
import pulumi_kubernetes as k8s
from pulumi.runtime import resource as sdk_resource
from pulumi.runtime import rpc

from gco_infra import component
from gco_infra import manifests as m
from gco_infra.endpoint import parse_endpoint
from gco_infra.program import StackSettings

from .test_program import item, run

GENERATED = {"kubernetes:apps/v1:Deployment": k8s.apps.v1.Deployment, "kubernetes:core/v1:Service": k8s.core.v1.Service,
             "kubernetes:networking.k8s.io/v1:Ingress": k8s.networking.v1.Ingress,
             "kubernetes:autoscaling/v2:HorizontalPodAutoscaler": k8s.autoscaling.v2.HorizontalPodAutoscaler}


def as_generated(token, obj, spec, opts=None):
    """The object as the program declared it before KubernetesObject: with the generated class."""
    return GENERATED[token](obj["metadata"]["name"], metadata=obj["metadata"], spec=spec, opts=opts)


FULL = item(replicas=3, autoscaling={"enabled": True, "min_replicas": 2, "max_replicas": 5},
            canary={"image": "org/server:2", "weight": 30}, env={"API_TOKEN": "t0", "MODE": "fast"})
OBJ = {"apiVersion": "apps/v1", "kind": "Deployment",
       "metadata": {"name": "web", "namespace": "ns", "labels": {"app": "web"}},
       "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}}}


def test_every_role_registers_the_type_name_and_inputs_the_generated_classes_register(monkeypatch):
    ours, our_inputs, _, _ = run([FULL])
    monkeypatch.setattr(component, "KubernetesObject", as_generated)
    theirs, their_inputs, _, _ = run([FULL])
    assert len(ours) == 8 and ours == theirs  # the component and its 7 objects
    assert our_inputs == their_inputs
    spec = our_inputs["llama3|kubernetes:apps/v1:Deployment"]["spec"]  # a secret: its env holds a token
    assert spec[rpc._special_sig_key] == rpc._special_secret_sig
    assert {e["name"]: e["value"] for e in spec["value"]["template"]["spec"]["containers"][0]["env"]}["API_TOKEN"] == "t0"


def test_each_roles_manifest_names_the_api_version_and_kind_of_its_type_token():
    ep = parse_endpoint(FULL).endpoint
    objects = m.desired_objects(ep, "us-east-1", StackSettings(stack="test", region="us-east-1").cluster)
    assert set(objects) == set(m.ROLES)
    for role, obj in objects.items():
        group, _, version = obj["apiVersion"].rpartition("/")
        assert component.TYPE_TOKENS[role] == f"kubernetes:{group or 'core'}/{version}:{obj['kind']}", role


def outputs_of(make, preview=False):
    """What ``make()`` declares under mocks that answer with the live object; its resolved outputs."""
    class Mocks(pulumi.runtime.Mocks):
        def new_resource(self, args):
            return [f"{args.name}-id", {**args.inputs, "metadata": {**args.inputs["metadata"], "uid": "u-1"},
                                        "status": {"replicas": 2}}]

        def call(self, args):
            return {}

    pulumi.runtime.set_mocks(Mocks(), project="gco-infra", stack="test", preview=preview)
    got = {}

    @pulumi.runtime.test
    def body():
        res = make()
        res.metadata.apply(lambda v: got.update(metadata=v))
        return pulumi.Output.all(res.urn, res.id).apply(lambda v: got.update(urn=v[0], id=v[1]))

    body()
    return got


def test_its_outputs_are_not_read_back_and_other_resources_still_are():
    ours = outputs_of(lambda: component.KubernetesObject(component.TYPE_TOKENS[m.DEPLOYMENT], OBJ, OBJ["spec"]))
    assert ours == {"metadata": None, "id": "web-id",
                    "urn": "urn:pulumi:test::gco-infra::pulumi:pulumi:Stack$kubernetes:apps/v1:Deployment::web"}
    assert rpc.resolve_outputs is component._resolve_outputs  # installed by the first KubernetesObject
    theirs = outputs_of(lambda: k8s.apps.v1.Deployment("web", metadata=OBJ["metadata"], spec=OBJ["spec"]))
    assert theirs["metadata"]["uid"] == "u-1"


def test_in_a_preview_its_outputs_are_unknown():
    got = outputs_of(lambda: component.KubernetesObject(component.TYPE_TOKENS[m.DEPLOYMENT], OBJ, OBJ["spec"]),
                     preview=True)
    assert "metadata" not in got  # an unknown output never runs its apply


def test_outputs_the_sdk_marks_unknown_stay_unknown(monkeypatch):
    """A registration the engine did not complete (continue-on-error) resolves its outputs as unknown."""
    monkeypatch.setattr(pulumi.runtime.settings.SETTINGS, "dry_run", False)  # an update
    seen = []

    class Unread:
        outputs_read_back = False

    resolvers = {"metadata": lambda value, known, secret, deps, exn: seen.append((value, known, exn))}
    component._resolve_outputs(Unread(), {}, {}, {}, resolvers, True, False, False, True)
    component._resolve_outputs(Unread(), {}, {}, {}, resolvers, True)
    assert seen == [(None, False, None), (None, True, None)]


def test_the_sdk_still_resolves_outputs_where_the_hook_expects():
    """The hook replaces ``rpc.resolve_outputs`` of the pinned SDK (3.272.0) and passes every argument
    through for other resources: an SDK upgrade that reshapes it fails here first."""
    params = list(inspect.signature(component._SDK_RESOLVE_OUTPUTS).parameters)
    assert params == list(inspect.signature(component._resolve_outputs).parameters), params
    assert list(inspect.signature(rpc.resolve_properties).parameters) == [
        "resolvers", "all_properties", "deps", "custom", "resolve_missing_as_unknown"]
    for caller in (sdk_resource.register_resource, sdk_resource.read_resource):
        assert "rpc.resolve_outputs(" in inspect.getsource(caller), caller.__name__
