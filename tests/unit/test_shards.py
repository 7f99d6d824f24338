"""Sharded regions (gco:shards): which stack owns which endpoint, and what the runner refuses."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pulumi
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gco_infra import manifests as m
from gco_infra.endpoint import validate_all
from gco_infra.program import (
    MAX_SHARDS, ProgramError, StackSettings, declare, load_settings, main, owned, settings_from_stack_file,
    settings_from_values, shard_of, shard_of_stack, shard_settings,
)
from gco_infra.plan import (
    RunnerOptions, bound_sharded_regions, misplaced_endpoints, stale_stacks, plan_stack, status_updates, StackResult,
)
from gco_infra.runner import StackState

REGION = "us-east-1"
BASE = StackSettings(stack="us-east-1", region=REGION, shards=4)
NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,40}", fullmatch=True)


def item(name, state="running"):
    return {"endpoint_name": name, "desired_state": state, "target_regions": [REGION], "spec": {"image": "org/server:1"}}


def outputs_for(names, settings):
    eps = {}
    for ep in validate_all([item(n) for n in names]).endpoints.values():
        objs, fp = m.declaration(ep, settings.region, settings.cluster)
        eps[ep.name] = {"fingerprint": fp, "objects": {r: f'{o["kind"]}/{o["metadata"]["name"]}' for r, o in objs.items()}}
    return {"endpoints": eps, "declarationVersion": m.DECLARATION_VERSION}


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.names: list[str] = []

    def new_resource(self, args):
        self.names.append(args.name)
        return [f"{args.name}-id", args.inputs]

    def call(self, args):
        return {}


@given(NAMES, st.integers(min_value=1, max_value=MAX_SHARDS))
def test_every_endpoint_has_exactly_one_shard(name, shards):
    stacks = shard_settings(replace(BASE, shards=shards))
    assert len(stacks) == shards
    assert sum(s.owns(name) for s in stacks) == 1
    assert 0 <= shard_of(name, shards) < shards


def test_shard_is_stable_across_processes_and_versions():
    # sha256-based, not hash(): these values must never change, or every sharded region reshuffles.
    assert [shard_of(n, 8) for n in ("llama3", "mistral-7b", "e0", "e999")] == [
        shard_of(n, 8) for n in ("llama3", "mistral-7b", "e0", "e999")]
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"llama3").digest()[:8], "big") % 8
    assert shard_of("llama3", 8) == expected


def test_shards_are_balanced():
    counts = Counter(shard_of(f"endpoint-{i}", 10) for i in range(1000))
    assert len(counts) == 10
    assert min(counts.values()) > 60 and max(counts.values()) < 140, counts


def test_shard_stacks_are_named_after_the_region_stack():
    stacks = shard_settings(BASE)
    assert [s.stack for s in stacks] == [f"us-east-1.shard-{k}" for k in range(4)]
    assert {s.region_stack for s in stacks} == {"us-east-1"}
    assert shard_settings(replace(BASE, shards=1)) == [replace(BASE, shards=1)]


def test_owned_splits_valid_and_invalid_records():
    items = [item(f"e{i}") for i in range(40)] + [{"endpoint_name": "broken", "desired_state": "running"}]
    validated = validate_all(items)
    parts = [owned(validated, s) for s in shard_settings(BASE)]
    assert sorted(n for p in parts for n in p.endpoints) == sorted(validated.endpoints)
    assert [n for p in parts for n in p.invalid] == ["broken"]
    assert owned(validated, replace(BASE, shards=1)) is validated


def test_shards_setting_is_validated():
    assert settings_from_values({"region": REGION, "shards": "6"}, "s").shards == 6
    assert settings_from_values({"region": REGION}, "s").shards == 1
    for bad in ("0", "-1", str(MAX_SHARDS + 1), "two"):
        with pytest.raises(ProgramError, match="gco:shards"):
            settings_from_values({"region": REGION, "shards": bad}, "s")


def test_shard_stack_config_comes_from_the_region_stack():
    assert shard_of_stack(BASE, 2).stack == "us-east-1.shard-2"
    with pytest.raises(ProgramError, match="no shard 4"):
        shard_of_stack(BASE, 4)
    with pytest.raises(ProgramError, match="stack local.shard-0 is a shard of region stack local: name local"):
        settings_from_stack_file("local.shard-0")


def test_shard_stack_of_an_unsharded_region_is_refused_inside_the_engine():
    pulumi.runtime.set_mocks(Mocks(), project="gco-infra", stack="local.shard-1", preview=False)
    with pytest.raises(ProgramError, match="gco:shards=1, so there is no shard 1"):
        load_settings()


def test_the_region_stack_of_a_sharded_region_is_not_applied():
    with pytest.raises(ProgramError, match=r"us-east-1.shard-0 .. us-east-1.shard-3"):
        main(items=[], settings=BASE)


def test_a_shard_declares_only_its_endpoints():
    items = [item(f"e{i}") for i in range(20)]
    shard = shard_settings(BASE)[1]
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project="gco-infra", stack=shard.stack, preview=False)
    holder = {}

    @pulumi.runtime.test
    def body():
        holder["declared"] = declare(shard, items, lambda: {}, None)

    body()
    mine = {f"e{i}" for i in range(20) if shard_of(f"e{i}", 4) == 1}
    assert mine and set(holder["declared"].endpoints) == mine
    assert {n.removeprefix("inference-") for n in mocks.names} == mine


def _state(settings, names):
    return StackState(settings=settings, outputs=outputs_for(names, settings), outputs_loaded=True)


def test_endpoints_in_the_wrong_shard_block_the_region():
    stacks = shard_settings(BASE)
    names = [f"e{i}" for i in range(30)]
    right = [_state(s, [n for n in names if s.owns(n)]) for s in stacks]
    assert misplaced_endpoints(right) == {}
    # gco:shards changed from 4 to 3: the stacks now hold endpoints of other shards
    resharded = [replace(st_, settings=replace(st_.settings, shards=3)) for st_ in right[:3]]
    problems = misplaced_endpoints(resharded)
    assert list(problems) == ["us-east-1"] and "pulumi state move" in problems["us-east-1"]
    # the region stack itself still holds endpoints from before it was sharded
    guard = _state(replace(BASE, shard=-1), ["e1"])
    message = misplaced_endpoints([guard, *right])["us-east-1"]
    assert "stack us-east-1 is not part of region us-east-1 at gco:shards=4 but holds 1 endpoint(s) (e1)" in message


def test_stacks_that_gco_shards_does_not_use_are_found():
    existing = ["us-east-1", "us-east-1.shard-0", "us-east-1.shard-5", "us-east-1.shard-x", "us-east-1-b.shard-9"]
    assert stale_stacks(BASE, existing) == ["us-east-1", "us-east-1.shard-5"]
    # back to one stack: every shard stack is stale, the region stack is used again
    assert stale_stacks(replace(BASE, shards=1), existing) == ["us-east-1.shard-0", "us-east-1.shard-5"]


def test_the_deletion_bound_holds_for_the_region_not_per_shard():
    names = [f"e{i}" for i in range(40)]
    stacks = shard_settings(BASE)
    keep = set(names)
    # two removals in every shard: within each shard's own bound, eight for the region (bound 4)
    for s in stacks:
        keep -= set([n for n in names if s.owns(n)][:2])
    opts = RunnerOptions()
    plans = []
    for s in stacks:
        mine = [n for n in names if s.owns(n)]
        validated = owned(validate_all([item(n) for n in keep]), s)
        plan = plan_stack(s, validated, outputs_for(mine, s), full_due=False, opts=opts)
        assert plan.refused is None and len(plan.removed) == 2
        plans.append((s, plan))
    bound_sharded_regions(plans, opts)
    assert all(p.refused and "8 endpoints from us-east-1 (all its shards)" in p.refused for _, p in plans)
    # refused plans write the refusal to the records they would have removed
    s, plan = plans[0]
    by_name = {n: item(n) for n in names}
    res = StackResult(stack=plan.stack, region=REGION, action="refused", message=plan.refused)
    assert set(status_updates(plan, res, validate_all(list(by_name.values())), by_name)) == set(plan.removed)
    bound_sharded_regions(plans, replace(opts, allow_mass_delete=True))
    assert not any(p.refused for _, p in plans)


def test_removals_wait_while_a_shard_of_the_region_is_not_planned():
    names = [f"e{i}" for i in range(40)]
    stacks = shard_settings(BASE)
    opts = RunnerOptions()
    plans = []
    for s in stacks[:3]:  # the fourth shard is locked by another update this tick
        mine = [n for n in names if s.owns(n)]
        keep = [n for n in names if n != mine[0]] if s is stacks[0] else names
        plans.append((s, plan_stack(s, owned(validate_all([item(n) for n in keep]), s), outputs_for(mine, s),
                                    full_due=False, opts=opts)))
    bound_sharded_regions(plans, opts, shards={"us-east-1": 4})
    assert "only 3 of its 4 shards could be planned" in plans[0][1].refused
    assert plans[1][1].refused is None and plans[2][1].refused is None  # nothing to remove: not held back
    bound_sharded_regions(plans, opts, shards={"us-east-1": 3})
    assert plans[0][1].refused is None


def test_unsharded_stacks_keep_their_own_bound():
    opts = RunnerOptions()
    plan = plan_stack(StackSettings(stack="s", region=REGION), validate_all([]), outputs_for(["a", "b", "c"], BASE),
                      full_due=False, opts=opts)
    assert plan.refused and "3 endpoints from s " in plan.refused
    bound_sharded_regions([(StackSettings(stack="s", region=REGION), plan)], opts)
    assert plan.refused  # untouched: not a shard
