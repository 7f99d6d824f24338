"""The preview's rollout plan (pure) and how it is shown: the waves a table change goes through, and
whether each previewed region takes it now or later."""

from __future__ import annotations

import html
import json
import re
from dataclasses import replace

from hypothesis import given, settings as hsettings, strategies as st
from markdown_it import MarkdownIt

from gco_infra import rollout
from gco_infra.endpoint import RolloutPolicy, endpoint_to_item, parse_endpoint, spec_revision, validate_all
from gco_infra.preview import (COMMENT_LIMIT, Change, RolloutPlan, StackPreview, render_json, render_markdown,
                               rollout_plan)
from gco_infra.program import StackSettings, as_declared

REGIONS = ["local-1", "local-2"]
POLICY = {"waves": [["local-1"], ["local-2"]], "bake_seconds": 300}


def item(image="img:2", policy=POLICY, name="ep", state=None, **extra):
    it = {"endpoint_name": name, "desired_state": "running", "target_regions": list(REGIONS),
          "spec": {"image": image, "gpu_count": 0}, **extra}
    if policy is not None:
        it["rollout_policy"] = policy
    if state is not None:
        it["rollout"] = rollout.state_to_item(state)
    return it


def applied(*items):
    """Stack outputs as the program exports them: the last applied record per endpoint."""
    out = {}
    for it in items:
        ep = parse_endpoint(it).endpoint
        out[ep.name] = {"record": json.dumps(endpoint_to_item(ep), sort_keys=True)}
    return {"endpoints": out}


def plan_for(region, items, outputs, default=None):
    s = StackSettings(stack=region, region=region, rollout_policy=default)
    validated = validate_all(items)
    plans = rollout_plan(s, validated, items, outputs)
    # The plan says what the program declares: the same revision, or nothing.
    view = as_declared(validated, s, items, lambda: {n: json.loads(o["record"]) for n, o in
                                                       (outputs.get("endpoints") or {}).items()})
    for name, plan in plans.items():
        declared = view.endpoints.get(name)
        assert plan.declared == (declared.revision if declared is not None else None), name
    return plans


def rev(it):
    return spec_revision(parse_endpoint(it).endpoint)


OLD, NEW = item(image="img:1"), item(image="img:2")


# ---- the plan (pure) ---------------------------------------------------------------------------------------------


def test_first_wave_takes_the_change_now():
    plan = plan_for("local-1", [NEW], applied(OLD))["ep"]
    assert plan == RolloutPlan(revision=rev(NEW), previous=rev(OLD), waves=[["local-1"], ["local-2"]],
                               bake_seconds=[300, 300], wave=1, now=True, reason="wave 1", declared=rev(NEW))


def test_a_later_wave_keeps_what_it_runs_until_the_wave_before_has_baked():
    plan = plan_for("local-2", [NEW], applied(OLD))["ep"]
    assert (plan.wave, plan.now, plan.declared) == (2, False, rev(OLD))
    assert plan.reason == "wave 2, after wave 1 is healthy for 300 s"


def test_the_bake_shown_is_the_one_of_the_wave_before():
    policy = {"waves": [["local-1"], ["local-3"], ["local-2"]], "bake_seconds": [60, 600, 0]}
    its = [item(policy=policy, target_regions=["local-1", "local-2", "local-3"], image=i) for i in ("img:1", "img:2")]
    plan = plan_for("local-2", its[1:], applied(its[0]))["ep"]
    assert (plan.wave, plan.bake_seconds) == (3, [60, 600, 0])
    assert plan.reason == "wave 3, after wave 2 is healthy for 600 s"


def test_urgent_goes_everywhere_now():
    urgent = {**POLICY, "urgent": True}
    plan = plan_for("local-2", [item(policy=urgent)], applied(item(image="img:1", policy=urgent)))["ep"]
    assert (plan.now, plan.urgent, plan.reason) == (True, True, "urgent policy: every region at once")


def test_first_deploy_in_a_region_skips_the_waves():
    plan = plan_for("local-2", [NEW], {})["ep"]
    assert (plan.now, plan.previous, plan.wave, plan.reason) == (True, None, 2, "first deploy in this region")


def test_a_recorded_rollout_that_reached_the_region_applies_now():
    state = rollout.RolloutState(revision=rev(NEW), wave=1, regions={"local-1": rev(NEW), "local-2": rev(NEW)})
    plan = plan_for("local-2", [item(state=state)], applied(OLD))["ep"]
    assert (plan.now, plan.phase, plan.reason) == (True, "progressing", "wave 2: the rollout reached it")


def test_a_paused_or_failed_rollout_is_said_so():
    paused = rollout.RolloutState(revision=rev(NEW), phase="paused", regions={"local-1": rev(NEW)})
    plan = plan_for("local-2", [item(state=paused)], applied(OLD))["ep"]
    assert not plan.now and plan.reason == "wave 2, after the paused rollout resumes and wave 1 is healthy for 300 s"
    failed = rollout.RolloutState(revision=rev(NEW), phase="failed", regions={"local-1": rev(OLD)},
                                  base={"local-1": rev(OLD)}, failed=(rev(NEW),))
    plan = plan_for("local-1", [item(state=failed)], applied(OLD))["ep"]
    assert (plan.now, plan.phase, plan.reason) == (False, "failed", "the rollout failed: keeps the revision it runs")


def test_an_unreadable_rollout_state_keeps_the_region_as_it_is():
    it = {**NEW, "rollout": "garbage"}
    plan = plan_for("local-1", [it], applied(OLD))["ep"]
    assert not plan.now and plan.reason.startswith("the table's rollout state cannot be read")


def test_a_waiting_region_whose_applied_spec_no_longer_validates_takes_the_new_revision_early():
    outputs = applied(OLD)
    record = json.loads(outputs["endpoints"]["ep"]["record"])
    record["spec"]["replicas"] = -5  # as if the rules tightened since it was applied
    outputs["endpoints"]["ep"]["record"] = json.dumps(record)
    plan = plan_for("local-2", [NEW], outputs)["ep"]
    assert (plan.now, plan.declared, plan.previous) == (True, plan.revision, None)  # never nothing: that removes it
    assert plan.reason.startswith("early: its last applied spec no longer validates")


def test_records_without_a_policy_have_no_plan():
    its = [item(policy=None)]
    assert plan_for("local-1", its, applied(item(image="img:1", policy=None))) == {}
    assert plan_for("local-2", its, {}) == {}


def test_the_stack_default_policy_applies_to_records_without_one_and_a_records_own_wins():
    default = RolloutPolicy(waves=(("local-2",), ("local-1",)), bake_seconds=(120, 120))
    mine, theirs = item(policy=None), item(name="own")
    outputs = applied(item(image="img:1", policy=None), item(image="img:1", name="own"))
    plans = plan_for("local-1", [mine, theirs], outputs, default=default)
    assert (plans["ep"].wave, plans["ep"].now, plans["ep"].reason) == (2, False, "wave 2, after wave 1 is healthy for 120 s")
    assert (plans["own"].wave, plans["own"].now) == (1, True)


def test_only_a_spec_change_is_a_rollout():
    same_spec = item(image="img:1", labels={"team": "a"})  # a record change, not a spec change
    assert plan_for("local-2", [same_spec], applied(OLD)) == {}
    assert plan_for("local-2", [item(desired_state="deleted")], applied(OLD)) == {}
    assert plan_for("local-2", [item(target_regions=["local-1"])], applied(OLD)) == {}


def test_a_region_still_waiting_from_an_earlier_change_shows_it():
    # The stack applied img:1 (it kept it while wave 1 took img:2); the table still asks for img:2.
    plan = plan_for("local-2", [NEW], applied(OLD))["ep"]
    assert plan.previous == rev(OLD) and not plan.now


# ---- rendering -------------------------------------------------------------------------------------------------


def plan(**kw):
    base = dict(revision="0123456789ab", previous="ba9876543210", waves=[["local-1"], ["local-2"]],
                bake_seconds=[300, 300], wave=1, now=True, reason="wave 1", declared="0123456789ab")
    return RolloutPlan(**{**base, **kw})


def two_stacks():
    return [
        StackPreview(stack="local-1", region="local-1", rollouts={"llama3": plan()}, changes=[
            Change(endpoint="llama3", op="update", resource="Deployment/llama3",
                   fields=["spec.template.spec.containers[0].image"], cause="table")]),
        StackPreview(stack="local-2", region="local-2", rollouts={"llama3": plan(
            wave=2, now=False, reason="wave 2, after wave 1 is healthy for 300 s", declared="ba9876543210")}),
    ]


def test_markdown_shows_one_row_per_endpoint_with_its_waves_and_each_region():
    md = render_markdown(two_stacks())
    assert md.count("**Rollouts.**") == 1
    assert ("| `llama3` | `0123456789ab` | 1: `local-1` (bake 300 s) → 2: `local-2` | "
            "`local-1`: now, wave 1; `local-2`: later, wave 2, after wave 1 is healthy for 300 s |") in md
    assert md.index("**Rollouts.**") < md.index("### local-1")


def test_markdown_without_rollouts_has_no_rollout_section():
    md = render_markdown([StackPreview(stack="s", region="r")])
    assert "Rollouts" not in md and "| endpoint | revision |" not in md


def test_urgent_says_the_waves_are_skipped():
    md = render_markdown([StackPreview(stack="a", region="local-2", rollouts={"x": plan(
        wave=2, urgent=True, reason="urgent policy: every region at once")})])
    assert "2: `local-2` (urgent: waves skipped) | `local-2`: now, urgent policy: every region at once |" in md


def test_json_has_the_plans():
    data = json.loads(render_json(two_stacks()))
    assert data[1]["rollouts"]["llama3"] == {
        "revision": "0123456789ab", "previous": "ba9876543210", "waves": [["local-1"], ["local-2"]],
        "bake_seconds": [300, 300], "wave": 2, "now": False, "reason": "wave 2, after wave 1 is healthy for 300 s",
        "declared": "ba9876543210", "urgent": False, "phase": None}


def test_many_rollouts_are_summarised_to_fit_one_comment():
    previews = [StackPreview(stack=r, region=r, rollouts={f"ep-{i:04d}": plan(previous=None if i % 2 else "x")
                                                          for i in range(3000)}) for r in REGIONS]
    md = render_markdown(previews)
    assert len(md) < COMMENT_LIMIT
    rows = [line for line in md.splitlines() if line.startswith("| `ep-")]
    assert rows and all(line.endswith(" |") and line.count(" | ") == 3 for line in rows)
    assert all(int(line[6:10]) % 2 == 0 for line in rows)  # changes to running endpoints come before first deploys
    assert "more endpoint rollouts (endpoint and region) not listed to fit one comment" in md


# ---- escaping --------------------------------------------------------------------------------------------------

TEMPLATE_TAGS = {"h2", "h3", "p", "blockquote", "ul", "li", "strong", "code", "table", "thead", "tbody", "tr", "th", "td"}
ROLLOUT_SEPARATOR = "|---|---|---|---|"


def rollout_cells(md):
    out = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    assert set(re.findall(r"<(\w+)", out)) <= TEMPLATE_TAGS, out
    body = re.findall(r"<tbody>(.*?)</tbody>", out, re.S)[0]
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)).replace("\u200b", "").strip()
             for cell in re.findall(r"<td>(.*?)</td>", row, re.S)] for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_a_hostile_region_and_endpoint_name_render_inert_in_the_rollout_section():
    name = "x|y`<script>alert(1)</script>\n| injected | row |\n@octocat [a](javascript:alert(1))"
    region = "r|<img src=x onerror=alert(1)>\n- item @team"
    p = StackPreview(stack="s", region=region, rollouts={name: plan(
        waves=[[region], ["local-2|**b**"]], reason="wave 1 <b>")})
    md = render_markdown([p])
    assert "<" not in md and "\n| injected" not in md and "@octocat" not in md and "@team" not in md
    assert "[a](javascript:" not in md
    lines = md.splitlines()
    rows = lines[lines.index(ROLLOUT_SEPARATOR) + 1:]
    assert rows[0].startswith("| ") and rows[1] == ""
    assert len(re.findall(r"(?<!\\)\|", rows[0])) == 5, rows[0]
    (cells,) = rollout_cells(md)
    flat = lambda v: re.sub(" +", " ", v.replace("\n", " ")).strip()  # noqa: E731
    assert cells[0] == flat(name)
    assert cells[2] == f"1: {flat(region)} (bake 300 s) → 2: local-2|**b**"
    assert cells[3] == f"{flat(region)}: now, wave 1 <b>"


NAME = st.one_of(st.text(max_size=30), st.lists(st.sampled_from(
    ["|", "\\", "`", "<script>", "\n", "\u2028", "@x", "*", "[a](b)", "- ", "1. ", "# ", "&lt;", "$"]), max_size=5).map("".join))


@hsettings(max_examples=100, deadline=None)
@given(st.dictionaries(NAME, st.tuples(NAME, NAME), min_size=1, max_size=3), NAME)
def test_rollout_rows_stay_whole_for_any_names(by_name, region):
    p = StackPreview(stack="s", region=region, rollouts={
        n: plan(waves=[[a], [b]]) for n, (a, b) in by_name.items()})
    md = render_markdown([p])
    assert "<" not in md
    assert all(md[i + 1:].startswith("&#8203;") for i, ch in enumerate(md) if ch == "@")
    lines = md.splitlines()
    rows = lines[lines.index(ROLLOUT_SEPARATOR) + 1:][:len(by_name)]
    assert all(r.startswith("| ") and r.endswith(" |") and len(re.findall(r"(?<!\\)\|", r)) == 5 for r in rows), rows
    assert [len(c) for c in rollout_cells(md)] == [4] * len(by_name)
