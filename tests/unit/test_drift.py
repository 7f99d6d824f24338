"""Drift attribution on managedFields as the apiserver writes them: what our own applies, the HPA and
other controllers do is not drift; a person's edit, scale or delete is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gco_infra.drift import (KINDS, REPLICAS, DriftWatch, _Gone, _Stream, deleted_reason, field_paths, judge,
                             newest_writer, owned_by_us, parse_selector)

OURS = "pulumi-kubernetes-4f2a9c1b"
T0, T1, T2 = "2025-01-01T00:00:00Z", "2025-01-01T00:00:05Z", "2025-01-01T00:00:09Z"

DEPLOYMENT_FIELDS = {
    "f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:project": {}, "f:gco.io/type": {}},
                   "f:annotations": {".": {}, "f:pulumi.com/skipAwait": {}}},
    "f:spec": {"f:replicas": {}, "f:selector": {}, "f:template": {"f:spec": {"f:containers": {
        'k:{"name":"inference"}': {".": {}, "f:image": {}, "f:name": {}, "f:ports": {}}}}}},
}
IMAGE = ("f:spec", "f:template", "f:spec", "f:containers", 'k:{"name":"inference"}', "f:image")


def entry(manager, fields, *, time=T0, operation="Apply", subresource=None):
    e = {"manager": manager, "operation": operation, "apiVersion": "apps/v1", "fieldsType": "FieldsV1", "fieldsV1": fields}
    if time:
        e["time"] = time
    if subresource:
        e["subresource"] = subresource
    return e


def without(fields, path):
    """``fields`` with the leaf at ``path`` removed (what the apiserver does when ownership moves)."""
    if len(path) == 1:
        return {k: v for k, v in fields.items() if k != path[0]}
    return {k: (without(v, path[1:]) if k == path[0] else v) for k, v in fields.items()}


def only(path):
    out: dict = {}
    for key in reversed(path):
        out = {key: out}
    return out


def our_apply(fields=DEPLOYMENT_FIELDS, time=T0):
    return entry(OURS, fields, time=time)


def baseline(managed):
    owned, reason = judge(None, managed)
    assert reason is None
    return owned


def test_field_paths_flattens_to_leaves():
    paths = field_paths({"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": {"f:replicas": {}}})
    assert paths == {("f:metadata", "f:labels", "."), ("f:metadata", "f:labels", "f:app"), ("f:spec", "f:replicas")}


def test_our_apply_is_a_baseline_not_drift():
    owned = baseline([our_apply()])
    assert IMAGE in owned and REPLICAS in owned


def test_objects_without_our_manager_are_ignored():
    assert judge(None, [entry("kubectl-create", DEPLOYMENT_FIELDS, operation="Update")]) == (None, None)


def test_kubectl_edit_of_the_image_is_drift():
    before = baseline([our_apply()])
    after = [our_apply(without(DEPLOYMENT_FIELDS, IMAGE)), entry("kubectl-edit", only(IMAGE), time=T1, operation="Update")]
    owned, reason = judge(before, after)
    assert reason == "changed by kubectl-edit"
    assert IMAGE not in owned
    # the same edit seen again (a later, unrelated event) is not reported twice
    assert judge(owned, after + [entry("kube-controller-manager", {"f:status": {}}, time=T2,
                                       operation="Update", subresource="status")])[1] is None


@pytest.mark.parametrize("time", [T1, None], ids=["timed", "untimed"])
def test_kubectl_scale_through_the_scale_subresource_is_drift(time):
    """kube-apiserver 1.37 writes scale subresource entries without a time: they still count."""
    before = baseline([our_apply()])
    after = [our_apply(without(DEPLOYMENT_FIELDS, REPLICAS)),
             entry("kubectl", only(REPLICAS), time=time, operation="Update", subresource="scale")]
    assert judge(before, after)[1] == "changed by kubectl (scale)"


@pytest.mark.parametrize("time", [T1, None], ids=["timed", "untimed"])
def test_the_hpa_taking_replicas_is_not_drift(time):
    before = baseline([our_apply()])
    after = [our_apply(without(DEPLOYMENT_FIELDS, REPLICAS)),
             entry("kube-controller-manager", only(REPLICAS), time=time, operation="Update", subresource="scale")]
    owned, reason = judge(before, after)
    assert reason is None and REPLICAS not in owned


def test_an_old_untimed_scale_entry_does_not_blame_our_later_apply():
    """A kubectl scale long ago (untimed entry) owns only replicas; our apply that later stops declaring
    something else is still our own change."""
    before = baseline([our_apply(without(DEPLOYMENT_FIELDS, REPLICAS))])
    fields = without(without(DEPLOYMENT_FIELDS, REPLICAS), ("f:metadata", "f:annotations", "f:pulumi.com/skipAwait"))
    after = [our_apply(fields, time=T2), entry("kubectl", only(REPLICAS), time=None, operation="Update", subresource="scale")]
    assert judge(before, after)[1] is None


def test_the_hpa_exception_covers_replicas_only():
    before = baseline([our_apply()])
    fields = without(without(DEPLOYMENT_FIELDS, REPLICAS), IMAGE)
    after = [our_apply(fields), entry("kube-controller-manager", only(REPLICAS), time=T1, operation="Update",
                                      subresource="scale")]
    assert judge(before, after)[1] == "changed by kube-controller-manager (scale)"
    # nor does it cover the controller manager writing the object itself
    after = [our_apply(without(DEPLOYMENT_FIELDS, REPLICAS)),
             entry("kube-controller-manager", only(REPLICAS), time=T1, operation="Update")]
    assert judge(before, after)[1] == "changed by kube-controller-manager"


def test_a_finalizer_added_by_another_controller_is_not_drift():
    before = baseline([our_apply()])
    after = [our_apply(), entry("controller", {"f:metadata": {"f:finalizers": {".": {}, 'v:"ingress.k8s.aws/resources"': {}}}},
                                time=T1, operation="Update")]
    assert judge(before, after)[1] is None


def test_status_updates_are_not_drift():
    before = baseline([our_apply()])
    status = entry("kube-controller-manager", {"f:status": {"f:replicas": {}, "f:conditions": {}}},
                   time=T1, operation="Update", subresource="status")
    assert judge(before, [our_apply(), status])[1] is None
    revision = entry("kube-controller-manager", {"f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}}},
                     time=T1, operation="Update")
    assert judge(before, [our_apply(), revision, status])[1] is None


def test_our_apply_that_stops_declaring_a_field_is_not_drift():
    before = baseline([our_apply()])
    assert judge(before, [our_apply(without(DEPLOYMENT_FIELDS, REPLICAS), time=T1)])[1] is None
    # a status write in the same second does not make it foreign
    status = entry("kube-controller-manager", {"f:status": {}}, time=T1, operation="Update", subresource="status")
    assert judge(before, [status, our_apply(without(DEPLOYMENT_FIELDS, REPLICAS), time=T1)])[1] is None


def test_a_foreign_write_in_the_same_second_wins_the_tie():
    before = baseline([our_apply()])
    after = [our_apply(without(DEPLOYMENT_FIELDS, IMAGE), time=T1),
             entry("kubectl-patch", only(IMAGE), time=T1, operation="Update")]
    assert judge(before, after)[1] == "changed by kubectl-patch"
    assert newest_writer(list(reversed(after)))["manager"] == "kubectl-patch"


def test_losing_our_entry_altogether_is_drift():
    before = baseline([our_apply()])
    owned, reason = judge(before, [entry("kubectl-replace", DEPLOYMENT_FIELDS, time=T1, operation="Update")])
    assert reason == "changed by kubectl-replace" and owned == frozenset()


def test_only_applies_on_the_object_itself_count_as_ours():
    managed = [entry(OURS, DEPLOYMENT_FIELDS, operation="Update"), entry(OURS, only(REPLICAS), subresource="scale")]
    assert owned_by_us(managed) == frozenset()


def test_deletes():
    labels = {"app": "llama3", "project": "gco", "gco.io/type": "inference"}
    ours = {"metadata": {"name": "llama3", "labels": labels, "managedFields": [our_apply()]}}
    assert deleted_reason(ours, None, "gco.io/type=inference") == "deleted"
    foreign = {"metadata": {"name": "x", "labels": labels, "managedFields": [entry("kubectl-create", {}, operation="Update")]}}
    assert deleted_reason(foreign, None, "gco.io/type=inference") is None
    relabelled = {"metadata": {"name": "llama3", "labels": {**labels, "gco.io/type": "other"}, "managedFields": [
        our_apply(), entry("kubectl-label", {"f:metadata": {"f:labels": {"f:gco.io/type": {}}}}, time=T1, operation="Update")]}}
    assert deleted_reason(relabelled, baseline([our_apply()]), "gco.io/type=inference") == \
        "changed by kubectl-label (no longer selected by gco.io/type=inference)"


def test_parse_selector():
    assert parse_selector("gco.io/type=inference,app==x") == {"gco.io/type": "inference", "app": "x"}
    assert parse_selector("app!=x") is None and parse_selector("app in (x)") is None


def test_event_sequence_reports_each_endpoint_once_until_taken():
    woken = []
    w = DriftWatch(None, ["ns"], on_change=lambda: woken.append(1))
    s = _Stream(KINDS[0], "ns")

    def event(kind, managed, name="llama3", uid="u1"):
        w._event(s, {"type": kind, "object": {"metadata": {
            "name": name, "uid": uid, "resourceVersion": "1",
            "labels": {"app": name, "gco.io/type": "inference"}, "managedFields": managed}}})

    event("ADDED", [our_apply()])
    event("MODIFIED", [our_apply()])
    assert w.take() == {} and not woken
    edited = [our_apply(without(DEPLOYMENT_FIELDS, IMAGE)), entry("kubectl-edit", only(IMAGE), time=T1, operation="Update")]
    event("MODIFIED", edited)
    event("DELETED", edited)
    drifts = w.take()
    assert set(drifts) == {"llama3"} and drifts["llama3"].reason == "changed by kubectl-edit"
    assert (drifts["llama3"].kind, drifts["llama3"].namespace, drifts["llama3"].name) == ("Deployment", "ns", "llama3")
    assert len(woken) == 2 and w.take() == {} and w.events == 4
    event("ADDED", [entry("kubectl-create", DEPLOYMENT_FIELDS, operation="Update")], name="other", uid="u2")
    event("DELETED", [entry("kubectl-create", DEPLOYMENT_FIELDS, operation="Update")], name="other", uid="u2")
    assert w.take() == {}


def obj(name, uid, managed, rv="1"):
    return {"metadata": {"name": name, "uid": uid, "resourceVersion": rv,
                         "labels": {"app": name, "gco.io/type": "inference"}, "managedFields": managed}}


def test_a_relist_after_410_reports_what_changed_or_vanished_meanwhile():
    w = DriftWatch(None, ["ns"])
    s = _Stream(KINDS[0], "ns")
    w._listed(s, {"metadata": {"resourceVersion": "10"},
                  "items": [obj("a", "u1", [our_apply()]), obj("b", "u2", [our_apply()]), obj("c", "u3", [our_apply()])]})
    assert s.listed and s.rv == "10" and w.take() == {}
    with pytest.raises(_Gone):
        w._event(s, {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}})
    w._event(s, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}})
    assert s.rv == "12" and w.events == 0
    edited = [our_apply(without(DEPLOYMENT_FIELDS, IMAGE)), entry("kubectl-edit", only(IMAGE), time=T1, operation="Update")]
    w._listed(s, {"metadata": {"resourceVersion": "20"}, "items": [obj("a", "u1", [our_apply()]), obj("b", "u2", edited)]})
    assert {k: v.reason for k, v in w.take().items()} == {"b": "changed by kubectl-edit", "c": "deleted"}
    assert s.rv == "20"


# ---- properties -------------------------------------------------------------------------------------------

_paths = st.lists(st.sampled_from(sorted(field_paths(DEPLOYMENT_FIELDS) | {("f:metadata", "f:finalizers", ".")})),
                  unique=True)
_times = st.sampled_from([T0, T1, T2])
_foreign = st.builds(lambda m, paths, t, sub: entry(m, _tree(paths), time=t, operation="Update", subresource=sub),
                     st.sampled_from(["kubectl-edit", "kube-controller-manager", "controller", "helm"]), _paths,
                     st.sampled_from([T0, T1, T2, None]),
                     st.sampled_from([None, "status", "scale"]))


def _tree(paths):
    out: dict = {}
    for path in paths:
        node = out
        for key in path:
            node = node.setdefault(key, {})
    return out


@given(before=_paths, extra=_paths, others=st.lists(_foreign, max_size=4), t=_times)
def test_never_drift_while_our_fields_only_grow(before, extra, others, t):
    """Whatever anyone else writes, if we still own everything we owned, nothing is reported."""
    owned = frozenset(map(tuple, before))
    assert judge(owned, [entry(OURS, _tree(before + extra), time=t)] + others)[1] is None


@given(before=_paths.filter(lambda p: any(x != REPLICAS for x in p)), others=st.lists(_foreign, max_size=4))
def test_a_lost_field_with_a_newer_foreign_write_is_always_drift(before, others):
    owned = frozenset(map(tuple, before))
    lost = next(p for p in before if p != REPLICAS)
    editor = entry("kubectl-edit", _tree([lost]), time="2025-01-01T00:01:00Z", operation="Update")
    kept = [p for p in before if p != lost]
    assert judge(owned, [entry(OURS, _tree(kept), time=T0), editor] + others)[1] == "changed by kubectl-edit"


def test_watch_api_for(tmp_path, monkeypatch):
    from gco_infra.drift import watch_api_for
    from gco_infra.program import StackSettings

    monkeypatch.delenv("GCO_IN_CLUSTER", raising=False)
    eks = StackSettings(stack="us-east-1", region="us-east-1", cluster_name="gco-us-east-1", aws_region="us-east-1")
    assert watch_api_for(eks) is None  # not available outside the cluster: the full reconcile repairs drift
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "a",'
        ' "clusters": [{"name": "a", "cluster": {"server": "https://127.0.0.1:6443"}},'
        '              {"name": "b", "cluster": {"server": "https://127.0.0.2:6443"}}],'
        ' "users": [{"name": "u", "user": {"token": "t"}}],'
        ' "contexts": [{"name": "a", "context": {"cluster": "a", "user": "u"}},'
        '              {"name": "b", "context": {"cluster": "b", "user": "u"}}]}')
    api = watch_api_for(StackSettings(stack="local", region="local-1", kubeconfig=str(kubeconfig), kube_context="b"))
    assert api.configuration.host == "https://127.0.0.2:6443"
    assert api.configuration.connection_pool_maxsize >= 32
    api.close()


# ---- a runner's start: what the checkpoint recorded against the first lists ---------------------------------

def _resource(kind_type, name, endpoint, managed, ns="ns"):
    return {"urn": f"urn:pulumi:s::gco-infra::gco:inference:Endpoint${kind_type}::{name}", "type": kind_type,
            "id": f"{ns}/{name}", "parent": f"urn:pulumi:s::gco-infra::gco:inference:Endpoint::{endpoint}",
            "outputs": {"metadata": {"name": name, "namespace": ns, "managedFields": managed}}}


def test_the_checkpoint_records_each_objects_fields_as_the_last_operation_saw_them():
    from gco_infra.drift import recorded_objects

    resources = [
        {"urn": "urn:pulumi:s::gco-infra::pulumi:pulumi:Stack::gco-infra-s", "type": "pulumi:pulumi:Stack"},
        {"urn": "urn:pulumi:s::gco-infra::gco:inference:Endpoint::a", "type": "gco:inference:Endpoint",
         "parent": "urn:pulumi:s::gco-infra::pulumi:pulumi:Stack::gco-infra-s"},
        _resource("kubernetes:apps/v1:Deployment", "a", "a", [our_apply(), entry("kube-controller-manager", {})]),
        _resource("kubernetes:networking.k8s.io/v1:Ingress", "inference-a", "a", [our_apply({"f:spec": {}})]),
        {**_resource("kubernetes:core/v1:Service", "a", "a", []), "outputs": {"4dabf18193072939515e22adb298388d": "secret"}},
        _resource("kubernetes:core/v1:Service", "imported", "b", [entry("kubectl-create", {"f:spec": {}}, operation="Update")]),
        _resource("kubernetes:policy/v1:PodDisruptionBudget", "a", "a", [our_apply()]),
    ]
    recorded = recorded_objects(resources)
    assert recorded == {("Deployment", "ns", "a"): ("a", owned_by_us([our_apply()])),
                        ("Ingress", "ns", "inference-a"): ("a", frozenset({("f:spec",)})),
                        ("Service", "ns", "a"): ("a", None),  # metadata kept secret
                        ("Service", "ns", "imported"): ("b", None),  # no field of ours by apply
                        ("kubernetes:policy/v1:PodDisruptionBudget", "ns", "a"): ("a", None)}  # a kind not listed


def test_a_start_finds_what_changed_while_no_runner_watched():
    from gco_infra.drift import judge_since

    ours = owned_by_us([our_apply()])
    recorded = {("Deployment", "ns", "edited"): ("edited", ours), ("Deployment", "ns", "gone"): ("gone", ours),
                ("Deployment", "ns", "labelled"): ("labelled", ours), ("Deployment", "ns", "scaled"): ("scaled", ours),
                ("Deployment", "ns", "secret"): ("secret", None), ("Deployment", "ns", "same"): ("same", ours)}
    replicas_only = {"f:spec": {"f:replicas": {}}}
    listed = {
        ("Deployment", "ns", "edited"): [our_apply(without(DEPLOYMENT_FIELDS, IMAGE)),
                                         entry("kubectl-edit", only(IMAGE), time=T1, operation="Update")],
        ("Deployment", "ns", "labelled"): [our_apply(), entry("kubectl-label", {"f:metadata": {"f:labels": {"f:x": {}}}},
                                                              time=T1, operation="Update")],
        ("Deployment", "ns", "scaled"): [our_apply(without(DEPLOYMENT_FIELDS, REPLICAS)),
                                         entry("kube-controller-manager", replicas_only, time=T1, operation="Update",
                                               subresource="scale")],
        ("Deployment", "ns", "secret"): [our_apply()],
        ("Deployment", "ns", "same"): [our_apply(time=T2)],
    }
    found = judge_since(recorded, listed, 5.0)
    assert {n: d.reason for n, d in found.items()} == {
        "edited": "changed by kubectl-edit", "gone": "deleted",
        "secret": "unknown to the checkpoint (no fields of ours recorded)"}
    assert (found["gone"].kind, found["gone"].namespace, found["gone"].name, found["gone"].seen) == ("Deployment", "ns", "gone", 5.0)


def test_the_first_lists_are_kept_until_forgotten_and_later_lists_do_not_replace_them():
    w = DriftWatch(None, ["ns"])
    assert w.first_lists() is None  # nothing listed yet
    streams = w._streams
    for s in streams:
        w._listed(s, {"metadata": {"resourceVersion": "1"},
                      "items": [obj("a", "u1", [our_apply()])] if s.kind.kind == "Deployment" else []})
    first = w.first_lists()
    assert first == {("Deployment", "ns", "a"): [our_apply()]}
    deployments = next(s for s in streams if s.kind.kind == "Deployment")
    w._listed(deployments, {"metadata": {"resourceVersion": "2"}, "items": [obj("b", "u2", [our_apply()])]})
    assert w.first_lists() == first
    w.forget_first_lists()
    assert w.first_lists() is None
