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
    assert d["metadata"]["annotations"] == {"pulumi.com/skipAwait": "true", m.DELETION_POLICY: "background"}
    assert all(x["metadata"]["annotations"][m.DELETION_POLICY] == "background" for x in o.values())
    assert d["spec"]["replicas"] == 1
    assert "pulumi.com/skipAwait" not in o[m.SERVICE]["metadata"]["annotations"]
    ing = o[m.INGRESS]
    assert ing["metadata"]["name"] == "inference-llama3"
    assert ing["metadata"]["annotations"][m.ALB + "healthcheck-path"] == "/health"
    assert ing["metadata"]["annotations"][m.ALB + "group.name"] == "gco-inference"
    path = ing["spec"]["rules"][0]["http"]["paths"][0]
    assert path["path"] == "/inference/llama3" and path["backend"]["service"] == {"name": "llama3", "port": {"number": 80}}
    svc = o[m.SERVICE]["spec"]
    assert svc["ports"][0]["port"] == 80 and svc["ports"][0]["targetPort"] == 8000
    assert svc["selector"] == {"app": "llama3", "gco.io/track": "primary"}


def test_probes_on_health_path():
    c = container(objs(health_check_path="/ready", port=9000)[m.DEPLOYMENT])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["ports"][0]["containerPort"] == 9000


def test_gpu_requests_tolerations_and_selector_only_with_gpus():
    gpu = objs(gpu_count=2)[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert container({"spec": {"template": {"spec": gpu}}})["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    cpu = objs(gpu_count=0)[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert "tolerations" not in cpu and "nodeSelector" not in cpu
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]


def test_neuron_and_spot():
    pod = objs(gpu_count=1, accelerator="neuron", capacity_type="spot")[m.DEPLOYMENT]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["aws.amazon.com/neuron"] == "1"
    assert pod["tolerations"][0]["key"] == "aws.amazon.com/neuron"
    assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
    assert pod["nodeSelector"]["aws.amazon.com/neuron.present"] == "true"


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
    assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "gco-models-efs"}}]
    assert pod["containers"][0]["volumeMounts"][0] == {"name": "models", "mountPath": "/models/llama3", "readOnly": True}


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


def test_hpa_unpins_replicas():
    o = objs(replicas=3, autoscaling={"enabled": True, "min_replicas": 2, "max_replicas": 8,
                                      "metrics": [{"type": "cpu", "target": 60}, {"type": "memory", "target": 80}]})
    assert "replicas" not in o[m.DEPLOYMENT]["spec"]
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
    assert o[m.CANARY_SERVICE]["spec"]["selector"] == {"app": "llama3", "gco.io/track": "canary"}
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


def test_skip_await_all_annotates_every_object():
    o = m.desired_objects(ep(canary={"image": "a/b:2", "weight": 5}, autoscaling={"enabled": True}), REGION,
                          m.ClusterSettings(skip_await_all=True))
    assert all(x["metadata"]["annotations"]["pulumi.com/skipAwait"] == "true" for x in o.values())


def test_inference_pods_get_no_service_account_token():
    assert objs()[m.DEPLOYMENT]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
