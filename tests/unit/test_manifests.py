"""Manifest builders: pure functions of (record, region, cluster settings); no mocks."""

from __future__ import annotations

import json

from gco_infra import manifests as m
from gco_infra.endpoint import parse_endpoint

S = m.ClusterSettings()
REGION = "us-east-1"


def ep(**spec):
    extra = spec.pop("_item", {})
    item = {"endpoint_name": "llama3", "desired_state": "running", "target_regions": [REGION],
            "spec": {"image": "org/server:1", **spec}, **extra}
    r = parse_endpoint(item)
    assert r.ok, r.errors
    return r.endpoint


def objs(**spec):
    return m.desired_objects(ep(**spec), REGION, S)


def container(obj):
    return obj["spec"]["template"]["spec"]["containers"][0]


def test_plain_endpoint_objects_and_labels():
    o = objs()
    assert set(o) == {m.DEPLOYMENT, m.SERVICE, m.INGRESS}
    for obj in o.values():
        assert {"app": "llama3", "project": "gco", "gco.io/type": "inference"}.items() <= obj["metadata"]["labels"].items()
        assert obj["metadata"]["namespace"] == "gco-inference"
    d = o[m.DEPLOYMENT]
    assert d["metadata"]["annotations"] == {"pulumi.com/skipAwait": "true", "pulumi.com/patchForce": "true",
                                            m.DELETION_POLICY: "background"}
    assert all(x["metadata"]["annotations"][m.DELETION_POLICY] == "background" for x in o.values())
    assert d["spec"]["replicas"] == 1
    ing = o[m.INGRESS]
    assert ing["metadata"]["name"] == "inference-llama3"
    assert ing["metadata"]["annotations"][m.ALB + "healthcheck-path"] == "/health"
    assert ing["metadata"]["annotations"][m.ALB + "group.name"] == "gco-inference"
    path = ing["spec"]["rules"][0]["http"]["paths"][0]
    assert path["path"] == "/inference/llama3" and path["backend"]["service"] == {"name": "llama3", "port": {"number": 80}}
    svc = o[m.SERVICE]["spec"]
    assert svc["ports"][0]["port"] == 80 and svc["ports"][0]["targetPort"] == 8000
    assert svc["selector"] == {"app": "llama3"}  # as the old controller's: adopted in place


def test_probes_on_health_path():
    c = container(objs(health_check_path="/ready", port=9000)[m.DEPLOYMENT])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["ports"][0]["containerPort"] == 9000


def test_gpu_requests_tolerations_and_selector_only_with_gpus():
    gpu = objs(gpu_count=2)[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert container({"spec": {"template": {"spec": gpu}}})["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["nodeSelector"] == {"eks.amazonaws.com/instance-gpu-manufacturer": "nvidia"}
    cpu = objs(gpu_count=0)[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert "tolerations" not in cpu and "nodeSelector" not in cpu
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]


def test_neuron_and_spot():
    pod = objs(gpu_count=1, accelerator="neuron", capacity_type="spot")[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["aws.amazon.com/neuron"] == "1"
    assert pod["tolerations"][0]["key"] == "aws.amazon.com/neuron"
    assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
    assert pod["nodeSelector"]["accelerator"] == "neuron"


def test_user_node_selector_wins():
    pod = objs(gpu_count=0, node_selector={"karpenter.sh/capacity-type": "on-demand", "zone": "a"}, capacity_type="spot")[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand", "zone": "a"}


def test_model_sync_passes_uri_as_one_argument():
    uri = "s3://models-bucket/llama3/weights=v1/"
    pod = objs(model_source=uri, model_path="/models/llama3")[m.DEPLOYMENT]["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["command"] == ["aws"]
    assert init["args"] == ["s3", "sync", uri, "/models/llama3", "--no-progress", "--only-show-errors"]
    assert init["image"] == S.model_sync_image
    assert not any(a in ("sh", "-c", "bash") for a in init["command"] + init["args"])
    assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "efs-claim"}}]
    assert pod["containers"][0]["volumeMounts"][0] == {"name": "models", "mountPath": "/models/llama3",
                                                       "subPath": "llama3", "readOnly": True}


def test_model_path_without_source_mounts_volume_without_sync():
    pod = objs(model_path="/models/x")[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert "initContainers" not in pod and pod["volumes"]


def test_vllm_root_path_injected_unless_command_or_present():
    c = container(objs(image="vllm/vllm-openai:v0.6.0", args=["--model", "/m"])[m.DEPLOYMENT])
    assert c["args"] == ["--model", "/m", "--root-path", "/inference/llama3"]
    c = container(objs(image="vllm/vllm-openai:v0.6.0", command=["python", "serve.py"])[m.DEPLOYMENT])
    assert "args" not in c and c["command"] == ["python", "serve.py"]
    c = container(objs(image="vllm/vllm-openai:v0.6.0", args=["--root-path=/x"])[m.DEPLOYMENT])
    assert c["args"] == ["--root-path=/x"]
    assert "args" not in container(objs()[m.DEPLOYMENT])


def test_hpa_seeds_replicas_at_its_minimum():
    o = objs(replicas=3, autoscaling={"enabled": True, "min_replicas": 2, "max_replicas": 8,
                                      "metrics": [{"type": "cpu", "target": 60}, {"type": "memory", "target": 80}]})
    assert o[m.DEPLOYMENT]["spec"]["replicas"] == 2  # a seed: component ignores later changes
    hpa = o[m.HPA]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 8)
    assert [x["resource"]["name"] for x in hpa["metrics"]] == ["cpu", "memory"]
    assert hpa["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}


def test_canary_objects_and_weighted_ingress():
    o = objs(canary={"image": "org/server:2", "weight": 20, "replicas": 2})
    assert set(o) == {m.DEPLOYMENT, m.SERVICE, m.INGRESS, m.CANARY_DEPLOYMENT, m.CANARY_SERVICE, m.CANARY_INGRESS}
    cd = o[m.CANARY_DEPLOYMENT]
    assert cd["metadata"]["name"] == "llama3-canary" and cd["spec"]["replicas"] == 2
    assert container(cd)["image"] == "org/server:2"
    assert o[m.CANARY_SERVICE]["spec"]["selector"] == {"app": "llama3-canary", "gco.io/track": "canary"}
    ci = o[m.CANARY_INGRESS]
    assert ci["metadata"]["annotations"]["pulumi.com/skipAwait"] == "true"
    action = json.loads(ci["metadata"]["annotations"][m.ALB + "actions.weighted"])
    assert action["forwardConfig"]["targetGroups"] == [
        {"serviceName": "llama3", "servicePort": "80", "weight": 80},
        {"serviceName": "llama3-canary", "servicePort": "80", "weight": 20}]
    # The primary Ingress is the same with or without a canary.
    assert o[m.INGRESS] == objs()[m.INGRESS]


def test_stopped_keeps_service_scales_to_zero():
    e = ep(replicas=3, canary={"image": "a/b:2", "weight": 5}, autoscaling={"enabled": True}, _item={"desired_state": "stopped"})
    o = m.desired_objects(e, REGION, S)
    assert set(o) == {m.DEPLOYMENT, m.SERVICE}
    assert o[m.DEPLOYMENT]["spec"]["replicas"] == 0


def test_deleted_and_untargeted_declare_nothing():
    assert m.desired_objects(ep(_item={"desired_state": "deleted"}), REGION, S) == {}
    assert m.desired_objects(ep(), "eu-west-1", S) == {}


def test_withdrawn_ingress_not_declared():
    e = ep(canary={"image": "a/b:2", "weight": 5},
           _item={"region_status": {REGION: {"state": "running", "ingress": "withdrawn"}}})
    o = m.desired_objects(e, REGION, S)
    assert m.INGRESS not in o and m.CANARY_INGRESS not in o
    assert m.DEPLOYMENT in o and m.CANARY_DEPLOYMENT in o


def test_region_image_wins_for_its_region():
    e = ep(region_image_uris={REGION: "123.dkr.ecr.us-east-1.amazonaws.com/server:1"})
    assert container(m.desired_objects(e, REGION, S)[m.DEPLOYMENT])["image"].startswith("123.dkr")
    e2 = parse_endpoint({**{"endpoint_name": "llama3", "desired_state": "running", "target_regions": ["eu-west-1"]},
                         "spec": {"image": "org/server:1", "region_image_uris": {REGION: "x/y:1"}}}).endpoint
    assert container(m.desired_objects(e2, "eu-west-1", S)[m.DEPLOYMENT])["image"] == "org/server:1"


def test_every_spec_field_changes_the_declaration_and_fingerprint():
    base = objs()
    variants = [dict(env={"A": "1"}), dict(resources={"limits": {"memory": "20Gi"}}), dict(args=["--x"]),
                dict(command=["serve"]), dict(port=9000), dict(health_check_path="/h"), dict(node_selector={"z": "a"}),
                dict(gpu_count=2), dict(accelerator="neuron"), dict(capacity_type="spot"), dict(replicas=4),
                dict(model_path="/m"), dict(image="org/server:2")]
    prints = {m.fingerprint(base)}
    for v in variants:
        o = objs(**v)
        assert o != base, v
        prints.add(m.fingerprint(o))
    assert len(prints) == len(variants) + 1


def test_fingerprint_is_stable():
    assert m.fingerprint(objs(env={"B": "2", "A": "1"})) == m.fingerprint(objs(env={"A": "1", "B": "2"}))


def test_no_apply_waits_on_pods_and_our_fields_win_conflicts():
    """On EKS an apply must not wait for model loading or capacity: every kind skips the awaits
    that depend on ready pods, and server-side-apply conflicts are forced, in every cluster."""
    o = m.desired_objects(ep(canary={"image": "a/b:2", "weight": 5}, autoscaling={"enabled": True}), REGION,
                          m.ClusterSettings())
    assert set(o) == set(m.ROLES)
    for x in o.values():
        assert x["metadata"]["annotations"]["pulumi.com/skipAwait"] == "true"
        assert x["metadata"]["annotations"]["pulumi.com/patchForce"] == "true"


def test_hpa_deployment_declares_a_seed_count_only():
    """With autoscaling, replicas seeds a new Deployment at min_replicas (the component ignores later
    changes); without, the record's replicas is declared and enforced."""
    on = m.desired_objects(ep(replicas=3, autoscaling={"enabled": True, "min_replicas": 2}), REGION, m.ClusterSettings())
    off = m.desired_objects(ep(replicas=3), REGION, m.ClusterSettings())
    assert on[m.DEPLOYMENT]["spec"]["replicas"] == 2 and m.HPA in on
    assert off[m.DEPLOYMENT]["spec"]["replicas"] == 3 and m.HPA not in off


def test_skip_await_all_is_refused_with_a_reason():
    import pytest

    from gco_infra.program import ProgramError, settings_from_values

    with pytest.raises(ProgramError, match="gco:skipAwaitAll is no longer supported"):
        settings_from_values({"region": "r", "skipAwaitAll": "true"}, "local")


def test_inference_pods_get_no_service_account_token():
    assert objs()[m.DEPLOYMENT]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ---- model files: each endpoint its own directory on the shared claim -------------------------------


def model_mounts(pod):
    """(container name, mount) for every mount of the shared model volume in a pod."""
    return [(c["name"], vm) for c in pod.get("initContainers", []) + pod["containers"]
            for vm in c.get("volumeMounts", []) if vm["name"] == "models"]


def test_model_volume_is_mounted_at_the_endpoints_own_directory_never_the_root():
    o = objs(model_source="s3://bucket/llama3/", canary={"image": "org/server:2", "weight": 10})
    for role in (m.DEPLOYMENT, m.CANARY_DEPLOYMENT):
        pod = o[role]["spec"]["template"]["spec"]
        assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "efs-claim"}}]
        assert dict(model_mounts(pod)) == {
            "model-sync": {"name": "models", "mountPath": "/models/llama3", "subPath": "llama3"},
            "inference": {"name": "models", "mountPath": "/models/llama3", "subPath": "llama3", "readOnly": True},
        }
        assert pod["initContainers"][0]["args"][:4] == ["s3", "sync", "s3://bucket/llama3/", "/models/llama3"]


def test_explicit_model_path_is_the_mount_point_of_the_endpoints_own_directory():
    pod = objs(model_source="s3://bucket/m/", model_path="/opt/model")[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert {n: (vm["mountPath"], vm["subPath"]) for n, vm in model_mounts(pod)} == {
        "model-sync": ("/opt/model", "llama3"), "inference": ("/opt/model", "llama3")}
    assert pod["initContainers"][0]["args"][3] == "/opt/model"
    pod = objs(model_path="/opt/model")[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert model_mounts(pod) == [("inference", {"name": "models", "mountPath": "/opt/model", "subPath": "llama3",
                                                "readOnly": True})]


def test_only_the_sync_container_may_write_models():
    pod = objs(model_source="s3://bucket/x/")[m.DEPLOYMENT]["spec"]["template"]["spec"]
    writers = [n for n, vm in model_mounts(pod) if not vm.get("readOnly")]
    assert writers == ["model-sync"]


# ---- identity ----------------------------------------------------------------------------------------


def test_pods_run_under_the_inference_service_account_without_an_api_token():
    o = objs(model_source="s3://bucket/x/", canary={"image": "org/server:2", "weight": 10})
    for role in (m.DEPLOYMENT, m.CANARY_DEPLOYMENT):
        pod = o[role]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "gco-service-account"
        assert pod["automountServiceAccountToken"] is False
    custom = m.desired_objects(ep(), REGION, m.ClusterSettings(service_account="team-sa"))
    assert custom[m.DEPLOYMENT]["spec"]["template"]["spec"]["serviceAccountName"] == "team-sa"


def test_only_the_model_sync_container_gets_the_aws_web_identity():
    o = objs(model_source="s3://bucket/x/", canary={"image": "org/server:2", "weight": 10})
    for role in (m.DEPLOYMENT, m.CANARY_DEPLOYMENT):
        template = o[role]["spec"]["template"]
        serving = [c["name"] for c in template["spec"]["containers"]]
        skipped = template["metadata"]["annotations"]["eks.amazonaws.com/skip-containers"].split(",")
        assert skipped == serving == ["inference"]
        assert "model-sync" not in skipped
    # the pod template's annotations never reach the Deployment's own metadata
    assert "eks.amazonaws.com/skip-containers" not in o[m.DEPLOYMENT]["metadata"]["annotations"]


# ---- cluster defaults --------------------------------------------------------------------------------


def test_cluster_defaults_are_those_of_the_platforms_clusters():
    s = m.ClusterSettings()
    assert s.model_volume_claim == "efs-claim"
    assert s.service_account == "gco-service-account"
    assert s.gpu_node_selectors == {"nvidia": {"eks.amazonaws.com/instance-gpu-manufacturer": "nvidia"},
                                    "neuron": {"accelerator": "neuron"}}
    assert s.gpu_utilization_metric is None


# ---- --root-path per image ---------------------------------------------------------------------------


def test_canary_root_path_follows_the_canarys_own_image():
    o = objs(image="org/server:1", canary={"image": "vllm/vllm-openai:v0.6.0", "weight": 10})
    assert "args" not in container(o[m.DEPLOYMENT])
    assert container(o[m.CANARY_DEPLOYMENT])["args"] == ["--root-path", "/inference/llama3"]
    o = objs(image="vllm/vllm-openai:v0.6.0", canary={"image": "org/server:2", "weight": 10})
    assert container(o[m.DEPLOYMENT])["args"] == ["--root-path", "/inference/llama3"]
    assert "args" not in container(o[m.CANARY_DEPLOYMENT])
    e = ep(image="org/server:1", canary={"image": "ghcr.io/huggingface/text-generation-inference:2.0", "weight": 5})
    assert m.container_args(e, e.spec.canary.image) == ["--root-path", "/inference/llama3"]
    assert m.container_args(e, e.spec.image) is None


# ---- autoscaling on GPU utilisation ------------------------------------------------------------------

GPU_METRIC = "DCGM_FI_DEV_GPU_UTIL"


def gpu_ep(*metrics):
    return ep(autoscaling={"enabled": True, "min_replicas": 1, "max_replicas": 4,
                           "metrics": [{"type": t, "target": n} for t, n in metrics]})


def test_gpu_metric_is_a_pods_metric_named_by_the_stack():
    s = m.ClusterSettings(gpu_utilization_metric=GPU_METRIC)
    e = gpu_ep(("gpu", 60), ("cpu", 80))
    hpa = m.desired_objects(e, REGION, s)[m.HPA]["spec"]
    assert hpa["metrics"] == [
        {"type": "Pods", "pods": {"metric": {"name": GPU_METRIC}, "target": {"type": "AverageValue", "averageValue": "60"}}},
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}},
    ]
    assert m.declaration_notes(e, REGION, s) == ()


def test_gpu_metric_without_a_stack_metric_is_left_out_with_a_note():
    e = gpu_ep(("cpu", 80), ("gpu", 60))
    o = m.desired_objects(e, REGION, S)
    assert set(o) >= {m.DEPLOYMENT, m.HPA}  # the endpoint is never dropped
    assert [x["type"] for x in o[m.HPA]["spec"]["metrics"]] == ["Resource"]
    (note,) = m.declaration_notes(e, REGION, S)
    assert note == (f'endpoint "llama3": spec.autoscaling.metrics[1] type gpu is not declared in region {REGION}: '
                    "the stack sets no gco:gpuUtilizationMetric")


def test_hpa_whose_only_metric_is_left_out_declares_no_metrics():
    e = gpu_ep(("gpu", 60))
    hpa = m.desired_objects(e, REGION, S)[m.HPA]["spec"]
    assert "metrics" not in hpa and (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)
    (note,) = m.declaration_notes(e, REGION, S)
    assert "spec.autoscaling.metrics[0] type gpu is not declared" in note
    assert "80% average CPU utilization" in note  # says what Kubernetes scales on instead


def test_no_notes_where_no_hpa_is_declared():
    e = gpu_ep(("gpu", 60))
    assert m.declaration_notes(e, "eu-west-1", S) == ()
    stopped = ep(autoscaling={"enabled": True, "metrics": [{"type": "gpu", "target": 60}]}, _item={"desired_state": "stopped"})
    assert m.declaration_notes(stopped, REGION, S) == ()
    assert m.declaration_notes(ep(), REGION, S) == ()


def test_gpu_metric_config_changes_the_fingerprint():
    e = gpu_ep(("gpu", 60), ("cpu", 80))
    prints = {m.declaration(e, REGION, m.ClusterSettings(gpu_utilization_metric=name))[1]
              for name in (None, GPU_METRIC, "nvidia_gpu_utilization")}
    assert len(prints) == 3
    plain = ep()
    assert len({m.declaration(plain, REGION, m.ClusterSettings(gpu_utilization_metric=n))[1]
                for n in (None, GPU_METRIC)}) == 1  # endpoints without a gpu metric are not re-applied


def test_primary_selectors_are_the_old_controllers_and_never_select_canary_pods():
    """The primary Deployment and Service select app=<name>, as the replaced controller did (its
    objects are adopted in place); canary pods never carry app=<name>, so no selector overlaps."""
    o = objs(canary={"image": "org/server:2", "weight": 20})
    primary = o[m.DEPLOYMENT]["spec"]["selector"]["matchLabels"]
    assert primary == {"app": "llama3"} == o[m.SERVICE]["spec"]["selector"]
    canary_pods = o[m.CANARY_DEPLOYMENT]["spec"]["template"]["metadata"]["labels"]
    assert not primary.items() <= canary_pods.items()
    assert canary_pods["gco.io/canary-of"] == "llama3" and canary_pods["gco.io/type"] == "inference"
    for role in (m.DEPLOYMENT, m.CANARY_DEPLOYMENT):
        d = o[role]["spec"]
        assert d["selector"]["matchLabels"].items() <= d["template"]["metadata"]["labels"].items()
    assert o[m.CANARY_SERVICE]["spec"]["selector"] == o[m.CANARY_DEPLOYMENT]["spec"]["selector"]["matchLabels"]
