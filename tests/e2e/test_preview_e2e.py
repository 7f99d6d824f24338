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
