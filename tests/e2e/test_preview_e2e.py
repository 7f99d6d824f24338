"""Previews from the real engine on the local environment: a data change and a code change."""

from __future__ import annotations

from dataclasses import replace

from gco_infra.preview import preview_stack, render_markdown

from .test_endpoints_e2e import put


def test_preview_tells_table_changes_from_code_changes(env, tick, runner, kube1):
    put(env, "pv-old")
    tick()
    put(env, "pv-new")  # a data change: a new record in the table
    settings = runner.states["local"].settings
    items = env.store().list_endpoints()
    data = preview_stack(settings, items, env.pulumi_env())
    assert data.error is None
    new = [c for c in data.changes if c.endpoint == "pv-new"]
    assert {c.op for c in new} == {"create"} and {c.cause for c in new} == {"table"}
    assert {c.resource for c in new} >= {"Deployment/pv-new", "Service/pv-new", "Ingress/inference-pv-new"}
    assert not [c for c in data.changes if c.endpoint == "pv-old"]
    assert data.record_changes["pv-new"] == "new record"
    assert kube1.deployment("pv-new") is None  # a preview changes nothing

    # A code change: a new default startup-probe budget, same records.
    code = replace(settings, cluster=replace(settings.cluster, startup_failure_threshold=120))
    changed = preview_stack(code, items, env.pulumi_env())
    old = [c for c in changed.changes if c.endpoint == "pv-old"]
    assert [(c.op, c.resource, c.cause) for c in old] == [("update", "Deployment/pv-old", "code")]
    assert any("startupProbe" in f for f in old[0].fields), old[0].fields
    md = render_markdown([changed])
    assert "| `pv-old` | code | update | Deployment/pv-old |" in md
    assert "| `pv-new` | table | create | Deployment/pv-new |" in md
    assert kube1.deployment("pv-old").spec.template.spec.containers[0].startup_probe.failure_threshold == 90


def test_preview_of_a_spec_change_under_a_rollout_policy_shows_its_waves(env, tick, runner, kube1):
    policy = {"waves": [["local-1"], ["local-2"]], "bake_seconds": 120}
    item = {"endpoint_name": "pv-waves", "desired_state": "running", "target_regions": ["local-1", "local-2"],
            "spec": {"image": "example.com/org/server:1", "gpu_count": 0}, "rollout_policy": policy}
    env.store().put_desired(item)
    tick()
    env.store().put_desired({**item, "spec": {"image": "example.com/org/server:2", "gpu_count": 0}})
    items = env.store().list_endpoints()
    first, second = (preview_stack(runner.states[s].settings, items, env.pulumi_env()) for s in ("local", "local-2"))
    assert first.error is None and second.error is None
    # wave 1 takes the change now; wave 2 keeps what it runs, so its engine preview changes nothing for it
    assert [(c.op, c.resource) for c in first.changes if c.endpoint == "pv-waves"] == [("update", "Deployment/pv-waves")]
    assert not [c for c in second.changes if c.endpoint == "pv-waves"]
    assert (first.rollouts["pv-waves"].now, first.rollouts["pv-waves"].wave) == (True, 1)
    assert (second.rollouts["pv-waves"].now, second.rollouts["pv-waves"].wave) == (False, 2)
    md = render_markdown([first, second])
    assert "**Rollouts.**" in md and "1: `local-1` (bake 120 s) → 2: `local-2`" in md, md
    assert kube1.deployment("pv-waves").spec.template.spec.containers[0].image == "example.com/org/server:1"
