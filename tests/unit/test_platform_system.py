"""The gco-system objects (pure): least-privilege RBAC, the workloads' hardening, network policies."""

from __future__ import annotations

from gco_infra import localenv, system
from gco_infra.manifests import ROLES

NAMESPACES = ("gco-inference", "gco-inference-team-b")
WORKLOADS = system.Workloads(image="registry.example/gco-infra@sha256:abc", stack="us-east-1", aws_region="us-east-1",
                             backend_url="s3://gco-state?region=us-east-1",
                             secrets_provider="awskms://alias/gco-infra-state?region=us-east-1")
ALL = ["get", "list", "watch", "create", "update", "patch", "delete"]


def by_key(objs):
    return {system.object_key(o): o for o in objs}


def rules(objs, key):
    return by_key(objs)[key]["rules"]


def test_identities_are_namespace_service_accounts_and_rbac_in_apply_order():
    objs = system.identities(NAMESPACES)
    assert objs[0] == {"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "gco-system", "labels": {"project": "gco"}}}
    keys = [system.object_key(o) for o in objs]
    assert keys == [
        "Namespace/gco-system", "ServiceAccount/gco-system/gco-runner", "ServiceAccount/gco-system/gco-health",
        *[f"{kind}/{ns}/{name}" for ns in NAMESPACES for name in ("gco-runner", "gco-health", "gco-preview")
          for kind in ("Role", "RoleBinding")],
        "Role/gco-system/gco-health-lease", "RoleBinding/gco-system/gco-health-lease",
        "Role/gco-system/gco-runner-pods", "RoleBinding/gco-system/gco-runner-pods",
    ]
    assert {o["kind"] for o in objs} == {"Namespace", "ServiceAccount", "Role", "RoleBinding"}  # no cluster-wide rights


def test_runner_may_do_everything_to_exactly_the_four_inference_kinds():
    objs = system.identities(NAMESPACES)
    for ns in NAMESPACES:
        assert rules(objs, f"Role/{ns}/gco-runner") == [
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ALL},
            {"apiGroups": [""], "resources": ["services"], "verbs": ALL},
            {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ALL},
            {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": ALL},
        ]
        assert by_key(objs)[f"RoleBinding/{ns}/gco-runner"]["subjects"] == [
            {"kind": "ServiceAccount", "name": "gco-runner", "namespace": "gco-system"}]
    # the kinds are those an endpoint's declaration uses
    assert len(system.INFERENCE_KINDS) == len({"deployment", "service", "ingress", "hpa"}) and "hpa" in ROLES


def test_health_reads_deployments_deletes_ingresses_and_holds_one_lease():
    objs = system.identities(NAMESPACES)
    for ns in NAMESPACES:
        assert rules(objs, f"Role/{ns}/gco-health") == [
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["get", "list", "watch", "delete"]},
        ]
        assert by_key(objs)[f"RoleBinding/{ns}/gco-health"]["subjects"] == [
            {"kind": "ServiceAccount", "name": "gco-health", "namespace": "gco-system"}]
    assert rules(objs, "Role/gco-system/gco-health-lease") == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["gco-health"],
         "verbs": ["get", "update"]},
    ]
    assert by_key(objs)["RoleBinding/gco-system/gco-health-lease"]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gco-health-lease"}


def test_runner_may_only_get_pods_of_gco_system():
    """Whether the pod that holds a stack lock is gone (state.pod_gone_from_env)."""
    objs = system.identities(NAMESPACES)
    assert rules(objs, "Role/gco-system/gco-runner-pods") == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    assert by_key(objs)["RoleBinding/gco-system/gco-runner-pods"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "gco-runner", "namespace": "gco-system"}]


def test_pod_env_names_are_what_the_runner_reads():
    from gco_infra import state

    assert (system.POD_NAME_ENV, system.POD_NAMESPACE_ENV) == (state.POD_NAME, state.POD_NAMESPACE)


def test_preview_group_only_reads():
    objs = system.identities(NAMESPACES)
    for ns in NAMESPACES:
        assert rules(objs, f"Role/{ns}/gco-preview") == [
            {"apiGroups": [g], "resources": [r], "verbs": ["get", "list", "watch"]} for g, r in system.INFERENCE_KINDS]
        assert by_key(objs)[f"RoleBinding/{ns}/gco-preview"]["subjects"] == [
            {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "gco-preview"}]


def test_no_rule_anywhere_uses_a_wildcard_or_reaches_secrets():
    for obj in system.system_objects(NAMESPACES, WORKLOADS):
        for rule in obj.get("rules", []):
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (system.object_key(obj), rule)
            assert "secrets" not in rule["resources"]
            if "pods" in rule["resources"]:
                assert obj["metadata"]["namespace"] == "gco-system" and rule["verbs"] == ["get"]


def test_localenv_applies_the_same_identities():
    assert localenv.platform_rbac(localenv.NAMESPACES) == system.identities(localenv.NAMESPACES)
    for obj in system.system_objects(NAMESPACES, WORKLOADS):
        assert obj["kind"] in system.PLURALS  # apply_object can address every kind


def test_runner_deployment():
    d = system.runner_deployment(WORKLOADS)
    assert d["metadata"] == {"name": "gco-runner", "namespace": "gco-system",
                             "labels": {"project": "gco", "app": "gco-runner"}}
    spec = d["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "gco-runner" and "automountServiceAccountToken" not in pod
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    (c,) = pod["containers"]
    assert c["image"] == WORKLOADS.image
    assert c["args"] == ["run", "--stack", "$(GCO_STACK)", "--interval", "2", "--full-every", "21600", "--parallel", "2",
                         "--liveness-port", "8081"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env == {
        "GCO_STACK": "us-east-1", "AWS_REGION": "us-east-1", "GCO_IN_CLUSTER": "true", "TMPDIR": "/tmp",
        "PULUMI_BACKEND_URL": "s3://gco-state?region=us-east-1",
        "GCO_SECRETS_PROVIDER": "awskms://alias/gco-infra-state?region=us-east-1",
        "HOME": "/home/gco", "PULUMI_HOME": "/home/gco/.pulumi", "PULUMI_SKIP_UPDATE_CHECK": "true",
        "GCO_POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
        "GCO_POD_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": "/home/gco"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert c["ports"] == [{"name": "liveness", "containerPort": 8081}]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}


def test_writable_paths_are_parameters():
    w = system.Workloads(**{**WORKLOADS.__dict__, "tmp_dir": "/scratch", "home_dir": "/var/lib/gco"})
    runner = system.runner_deployment(w)["spec"]["template"]["spec"]["containers"][0]
    assert [m["mountPath"] for m in runner["volumeMounts"]] == ["/scratch", "/var/lib/gco"]
    env = {e["name"]: e.get("value") for e in runner["env"]}
    assert (env["HOME"], env["PULUMI_HOME"], env["TMPDIR"]) == ("/var/lib/gco", "/var/lib/gco/.pulumi", "/scratch")
    health = system.health_deployment(w)["spec"]["template"]["spec"]["containers"][0]
    assert [m["mountPath"] for m in health["volumeMounts"]] == ["/scratch"]


def test_health_deployment_and_its_disruption_budget():
    d = system.health_deployment(WORKLOADS)
    spec = d["spec"]
    assert spec["replicas"] == 2 and "strategy" not in spec
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "gco-health" and "automountServiceAccountToken" not in pod  # --in-cluster
    (c,) = pod["containers"]
    assert c["args"] == ["health", "--stack", "$(GCO_STACK)", "--in-cluster", "--liveness-port", "8081"]
    env = {e["name"] for e in c["env"]}
    assert env == {"GCO_STACK", "AWS_REGION", "GCO_IN_CLUSTER", "TMPDIR", "GCO_POD_NAME", "GCO_POD_NAMESPACE"}  # no state
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["livenessProbe"]["periodSeconds"] == 30
    (pdb,) = system.disruption_budgets()
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": {"app": "gco-health"}}}
    assert spec["selector"] == pdb["spec"]["selector"]
    assert spec["template"]["metadata"]["labels"]["app"] == "gco-health"


def test_network_policies_deny_ingress_and_open_only_dns_https_and_the_pod_identity_agent():
    pols = {p["metadata"]["name"]: p["spec"] for p in system.network_policies()}
    assert all(p["podSelector"] == {} for p in pols.values())  # every pod of gco-system
    assert pols["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert not any("ingress" in p for p in pols.values())  # nothing may connect (kubelet probes are exempt)
    egress = [(name, rule) for name, p in pols.items() for rule in p.get("egress", [])]
    ports = sorted((r["port"], r["protocol"]) for _, rule in egress for r in rule["ports"])
    assert ports == [(53, "TCP"), (53, "UDP"), (80, "TCP"), (443, "TCP")]
    dns = pols["allow-dns"]["egress"][0]["to"]
    assert dns == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert pols["allow-pod-identity-agent"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "169.254.170.23/32"}}]


def test_system_objects_are_unique_and_all_in_gco_system_or_inference_namespaces():
    objs = system.system_objects(NAMESPACES, WORKLOADS)
    keys = [system.object_key(o) for o in objs]
    assert len(keys) == len(set(keys))
    assert {o["metadata"].get("namespace") for o in objs} == {None, "gco-system", *NAMESPACES}
    assert [o["kind"] for o in objs if o["metadata"].get("namespace") is None] == ["Namespace"]
