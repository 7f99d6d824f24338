"""The program's shape under pulumi.runtime.set_mocks: which resources a table becomes."""

from __future__ import annotations

import json

import pulumi
import pytest

from gco_infra.endpoint import endpoint_to_item, parse_endpoint
from gco_infra.program import (
    CONFIG_KEYS, ProgramError, StackSettings, declare, export, kept_outputs, secret_records, settings_from_stack_file,
    settings_from_values,
)

REGION = "us-east-1"
DEP, SVC, ING, HPA = ("kubernetes:apps/v1:Deployment", "kubernetes:core/v1:Service",
                      "kubernetes:networking.k8s.io/v1:Ingress", "kubernetes:autoscaling/v2:HorizontalPodAutoscaler")
COMP = "gco:inference:Endpoint"


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args):
        self.resources.append(args)
        return [f"{args.name}-id", args.inputs]

    def call(self, args):
        return {}


def run(items, *, region=REGION, previous=None, only=None, applied=None):
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project="gco-infra", stack="test", preview=False)
    settings = StackSettings(stack="test", region=region)
    calls = []
    holder = {}

    def prev():
        calls.append(1)
        return previous or {}

    @pulumi.runtime.test
    def body():
        declared = declare(settings, items, prev, None, only, lambda: applied or {})
        export(settings, declared)
        holder["declared"] = declared
        urns = [r.urn for e in declared.endpoints.values() for r in e.resources.values()]
        return pulumi.Output.all(*urns)

    body()
    got = {(r.typ, r.name) for r in mocks.resources}
    return got, {r.name + "|" + r.typ: r.inputs for r in mocks.resources}, holder["declared"], calls


def item(name="llama3", state="running", regions=(REGION,), **spec):
    return {"endpoint_name": name, "desired_state": state, "target_regions": list(regions),
            "spec": {"image": "org/server:1", **spec}}


def plain(name="llama3"):
    return {(COMP, name), (DEP, name), (SVC, name), (ING, f"inference-{name}")}


def test_plain_endpoint():
    got, _, declared, _ = run([item()])
    assert got == plain()
    assert declared.outputs["llama3"]["state"] == "running"


def test_stopped_endpoint():
    got, inputs, _, _ = run([item(state="stopped", canary={"image": "a/b:2", "weight": 10})])
    assert got == {(COMP, "llama3"), (DEP, "llama3"), (SVC, "llama3")}
    assert inputs[f"llama3|{DEP}"]["spec"]["replicas"] == 0


def test_deleted_endpoint_declares_nothing():
    got, _, declared, _ = run([item(state="deleted")])
    assert got == set() and declared.outputs == {}


def test_untargeted_region_declares_nothing():
    got, _, _, _ = run([item(regions=("eu-west-1",))])
    assert got == set()


def test_hpa():
    got, inputs, _, _ = run([item(replicas=3, autoscaling={"enabled": True, "max_replicas": 5})])
    assert got == plain() | {(HPA, "llama3")}
    assert "replicas" not in inputs[f"llama3|{DEP}"]["spec"]  # new here (or adopted): the count is left alone


def test_hpa_replicas_follow_what_the_stack_last_applied():
    """Restarting a stopped endpoint with autoscaling seeds min_replicas (an HPA never scales up from
    0); a running one keeps its live count (the component ignores spec.replicas)."""
    from gco_infra.program import replicas_mode

    rec = item(replicas=3, autoscaling={"enabled": True, "min_replicas": 2, "max_replicas": 5})
    stopped = {"llama3": {"state": "stopped", "objects": {"deployment": "Deployment/llama3", "service": "Service/llama3"}}}
    _, inputs, _, _ = run([rec], applied=stopped)
    assert inputs[f"llama3|{DEP}"]["spec"]["replicas"] == 2
    assert replicas_mode(stopped["llama3"]) == "seed"
    assert replicas_mode({"state": "running", "objects": {"deployment": "D", "hpa": "H"}}) == "ignore"
    assert replicas_mode({"state": "running", "objects": {"deployment": "D"}}) == "ignore"  # switched on: keep pods
    assert replicas_mode(None) == "omit"


def test_canary():
    got, inputs, _, _ = run([item(canary={"image": "org/server:2", "weight": 30})])
    assert got == plain() | {(DEP, "llama3-canary"), (SVC, "llama3-canary"), (ING, "inference-llama3-canary")}
    ann = inputs[f"inference-llama3-canary|{ING}"]["metadata"]["annotations"]
    assert '"weight":30' in ann["alb.ingress.kubernetes.io/actions.weighted"]


def test_neuron():
    _, inputs, _, _ = run([item(accelerator="neuron", gpu_count=2)])
    pod = inputs[f"llama3|{DEP}"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["aws.amazon.com/neuron"] == "2"
    assert pod["tolerations"][0]["key"] == "aws.amazon.com/neuron"


def test_spot():
    _, inputs, _, _ = run([item(capacity_type="spot")])
    assert inputs[f"llama3|{DEP}"]["spec"]["template"]["spec"]["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"


def test_s3_model_source():
    _, inputs, _, _ = run([item(model_source="s3://bucket/llama3")])
    init = inputs[f"llama3|{DEP}"]["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][:4] == ["s3", "sync", "s3://bucket/llama3", "/models/llama3"]


def test_vllm_root_path():
    _, inputs, _, _ = run([item(image="vllm/vllm-openai:v0.6.0")])
    assert inputs[f"llama3|{DEP}"]["spec"]["template"]["spec"]["containers"][0]["args"] == ["--root-path", "/inference/llama3"]


def test_withdrawn_ingress():
    rec = item()
    rec["region_status"] = {REGION: {"state": "running", "ingress": "withdrawn"}}
    got, _, _, _ = run([rec])
    assert got == {(COMP, "llama3"), (DEP, "llama3"), (SVC, "llama3")}


def test_invalid_record_next_to_valid_ones_keeps_last_applied_declaration():
    last_good = endpoint_to_item(parse_endpoint(item("broken", replicas=2)).endpoint)
    broken = item("broken", replicas=-2)
    got, inputs, declared, calls = run([item("ok-one"), broken, item("ok-two")], previous={"broken": last_good})
    assert got == plain("ok-one") | plain("ok-two") | plain("broken")
    assert inputs[f"broken|{DEP}"]["spec"]["replicas"] == 2  # the last applied value, not -2
    assert declared.invalid == {"broken": ['endpoint "broken": spec.replicas must be >= 0, got -2']}
    assert declared.outputs["broken"]["state"] == "error"
    assert calls == [1]


def test_invalid_record_keeps_the_watchdogs_withdrawal():
    """The kept declaration is frozen, the watchdog's flag is not: an endpoint whose record turned
    invalid while its Ingress was withdrawn gets neither Ingress back, nor the canary's."""
    last_good = endpoint_to_item(parse_endpoint(item("broken", canary={"image": "a/b:2", "weight": 10})).endpoint)
    broken = item("broken", replicas=-2)
    broken["region_status"] = {REGION: {"state": "running", "ingress": "withdrawn"}}
    got, _, declared, _ = run([broken], previous={"broken": last_good})
    assert (ING, "inference-broken") not in got and (ING, "inference-broken-canary") not in got
    assert (DEP, "broken") in got and (DEP, "broken-canary") in got
    broken["region_status"][REGION]["ingress"] = "active"  # re-admitted by the health job
    got2, _, declared2, _ = run([broken], previous={"broken": last_good})
    assert {(ING, "inference-broken"), (ING, "inference-broken-canary")} <= got2
    assert declared.outputs["broken"]["fingerprint"] != declared2.outputs["broken"]["fingerprint"]


def test_new_invalid_record_is_reported_and_declares_nothing():
    got, _, declared, _ = run([item("fresh", image="bad image")])
    assert got == set()
    assert "spec.image" in declared.invalid["fresh"][0]


def test_previous_outputs_read_only_when_a_record_is_invalid():
    _, _, _, calls = run([item()])
    assert calls == []


def test_kept_record_that_no_longer_validates_stops_the_run():
    with pytest.raises(Exception, match="refusing to remove it"):
        run([item("broken", replicas=-2)], previous={"broken": item("broken", replicas=-5)})


SECRET_SIG = "4dabf18193072939515e22adb298388d"


def test_sensitive_env_values_are_secret_in_state():
    # The SDK marks the whole top-level input secret when a value inside it is secret.
    _, inputs, _, _ = run([item(env={"HF_TOKEN": "hf_abc", "MODEL": "x"})])
    spec = inputs[f"llama3|{DEP}"]["spec"]
    assert SECRET_SIG in spec
    env = spec["value"]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"] for e in env} == {"HF_TOKEN", "MODEL"}
    _, inputs, _, _ = run([item(env={"MODEL": "x"})])
    assert SECRET_SIG not in inputs[f"llama3|{DEP}"]["spec"]


def test_outputs_carry_fingerprint_and_record():
    _, _, declared, _ = run([item()])
    out = declared.outputs["llama3"]
    assert len(out["fingerprint"]) == 16
    assert out["objects"] == {"deployment": "Deployment/llama3", "service": "Service/llama3",
                              "ingress": "Ingress/inference-llama3"}


def test_many_endpoints_each_get_own_components():
    items = [item(f"ep{i}") for i in range(20)]
    got, _, _, _ = run(items)
    assert len(got) == 20 * 4


def test_program_error_type_exported():
    assert issubclass(ProgramError, RuntimeError)
    assert json.loads(json.dumps(endpoint_to_item(parse_endpoint(item()).endpoint)))["endpoint_name"] == "llama3"



def test_targeted_declaration_declares_only_the_targeted_endpoints():
    items = [item(f"ep{i}") for i in range(10)]
    got, _, declared, calls = run(items, only={"ep3", "ep7"})
    assert got == plain("ep3") | plain("ep7")
    assert set(declared.outputs) == {"ep3", "ep7"}
    assert calls == []


def test_targeted_declaration_still_reports_every_invalid_record():
    items = [item("ok"), item("bad", replicas=-1)]
    got, _, declared, calls = run(items, only={"ok"})
    assert got == plain("ok")
    assert "bad" in declared.invalid
    assert calls == []  # an untargeted invalid record keeps its resources without reading old outputs


def test_targeted_declaration_keeps_an_invalid_targeted_record():
    last_good = endpoint_to_item(parse_endpoint(item("broken", replicas=2)).endpoint)
    got, inputs, _, calls = run([item("broken", replicas=-2)], previous={"broken": last_good}, only={"broken"})
    assert got == plain("broken") and calls == [1]
    assert inputs[f"broken|{DEP}"]["spec"]["replicas"] == 2


def test_kept_outputs_merge_untargeted_entries_with_the_new_ones():
    _, _, declared, _ = run([item("a"), item("b")], only={"b"})
    previous = {"a": {"state": "running", "fingerprint": "aaaa", "record": "{}"},
                "b": {"state": "running", "fingerprint": "old"},
                "gone": {"state": "running", "fingerprint": "gggg"}}
    merged = kept_outputs(previous, declared, only={"b", "gone"})
    assert sorted(merged) == ["a", "b"]  # "gone" was targeted and is not declared: removed
    assert merged["a"]["fingerprint"] == "aaaa"
    assert merged["a"]["record"] == "{}"
    assert isinstance(secret_records(merged)["a"]["record"], pulumi.Output)  # kept records stay secret
    assert merged["b"]["fingerprint"] == declared.outputs["b"]["fingerprint"] != "old"


# ---- stack config: cluster conventions --------------------------------------------------------------


@pytest.mark.parametrize("stack", ["us-east-1", "us-west-2", "eu-west-1"])
def test_eks_stacks_take_the_platform_cluster_defaults(stack):
    cluster = settings_from_stack_file(stack).cluster
    assert cluster.model_volume_claim == "efs-claim"
    assert cluster.service_account == "gco-service-account"
    assert cluster.gpu_node_selectors["nvidia"] == {"eks.amazonaws.com/instance-gpu-manufacturer": "nvidia"}
    assert cluster.gpu_node_selectors["neuron"] == {"accelerator": "neuron"}
    assert cluster.gpu_utilization_metric is None


def test_cluster_conventions_are_overridable_in_stack_config():
    cluster = settings_from_values({
        "region": REGION, "modelVolumeClaim": "models", "serviceAccount": "team-sa",
        "gpuNodeSelectors": '{"nvidia": {"nvidia.com/gpu.present": "true"}}',
        "gpuUtilizationMetric": "DCGM_FI_DEV_GPU_UTIL",
    }, "s").cluster
    assert (cluster.model_volume_claim, cluster.service_account) == ("models", "team-sa")
    assert cluster.gpu_node_selectors == {"nvidia": {"nvidia.com/gpu.present": "true"}}
    assert cluster.gpu_utilization_metric == "DCGM_FI_DEV_GPU_UTIL"
    assert "gpuUtilizationMetric" in CONFIG_KEYS  # read by pulumi.Config inside the engine too


@pytest.mark.parametrize("bad", ["", "   ", "has space", "x" * 300])
def test_gpu_utilization_metric_must_be_a_metric_name(bad):
    with pytest.raises(ProgramError, match="gco:gpuUtilizationMetric"):
        settings_from_values({"region": REGION, "gpuUtilizationMetric": bad}, "s")


# ---- names ending in -canary ------------------------------------------------------------------------


def test_endpoint_named_like_another_endpoints_canary_is_reported_not_declared():
    # x ran without a canary and x-canary beside it; x now asks for a canary: both are reported, and
    # each keeps exactly its last applied declaration (no object changes hands)
    last = {n: endpoint_to_item(parse_endpoint(item(n)).endpoint) for n in ("x", "x-canary")}
    got, _, declared, _ = run([item("x", canary={"image": "org/server:2", "weight": 10}), item("x-canary")],
                              previous=last)
    assert got == plain("x") | plain("x-canary")
    assert 'endpoint "x"' in declared.invalid["x-canary"][0] and "x" in declared.invalid
    got, _, declared, _ = run([item("x"), item("x-canary")])
    assert got == plain("x") | plain("x-canary") and not declared.invalid


def test_the_program_waits_for_its_outputs_in_rounds_not_once_per_output(monkeypatch):
    """outputs_settled waits for every output the SDK tracks, with one asyncio.wait per round
    (the SDK's own wait runs one per resolved output), and leaves a failed one for the SDK to raise."""
    import asyncio

    from pulumi.runtime import settings as sdk_settings

    from gco_infra.program import outputs_settled

    waits = []
    real_wait = asyncio.wait

    async def counted(tasks, *a, **kw):
        waits.append(len(tasks))
        return await real_wait(tasks, *a, **kw)

    async def scenario():
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(200)]
        known = loop.create_future()
        known.set_result(True)
        outputs = [pulumi.Output(set(), f, known) for f in futures]
        derived = [o.apply(lambda v: v + 1) for o in outputs[:50]]  # a second round, made from the first
        tracked = set(sdk_settings.SETTINGS.outputs)
        assert len(tracked) >= 200, "the pinned SDK no longer tracks outputs where outputs_settled looks"
        for i, f in enumerate(futures[:-1]):
            loop.call_later(0.001 * (i % 20), f.set_result, i)
        loop.call_later(0.02, futures[-1].set_exception, RuntimeError("boom"))
        monkeypatch.setattr(asyncio, "wait", counted)
        await asyncio.wait_for(outputs_settled(), 10)
        monkeypatch.setattr(asyncio, "wait", real_wait)
        assert all(t.done() for t in tracked)
        assert [await d.future() for d in derived] == list(range(1, 51))
        left = [t for t in sdk_settings.SETTINGS.outputs if t.exception() is not None]
        assert len(left) == 1 and "boom" in str(left[0].exception())  # the SDK's own wait raises it
        sdk_settings.SETTINGS.outputs.clear()

    try:
        asyncio.run(scenario())
    finally:
        sdk_settings.SETTINGS.outputs.clear()
    assert 1 <= len(waits) <= 4, waits
