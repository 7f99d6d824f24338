"""Rendering of the pull-request preview: pure, no engine."""

from __future__ import annotations

from gco_infra.preview import COMMENT_LIMIT, Change, StackPreview, render_json, render_markdown


def big(region, n):
    changes = [Change(endpoint=f"ep-{i:04d}", op="update", resource=f"Deployment/ep-{i:04d}",
                      fields=["spec.template.spec.containers[0].startupProbe.failureThreshold"], cause="code")
               for i in range(n)]
    changes.insert(0, Change(endpoint="old", op="delete", resource="Ingress/inference-old", cause="table"))
    changes.insert(0, Change(endpoint="swap", op="replace", resource="Deployment/swap", fields=["spec.selector"], cause="table"))
    return StackPreview(stack=region, region=region, changes=changes)


def test_many_endpoints_fit_one_comment_summarised_not_cut():
    previews = [big(r, 3000) for r in ("us-east-1", "us-west-2", "eu-west-1")]
    md = render_markdown(previews)
    assert len(md) < COMMENT_LIMIT
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.endswith("|") and line.count("|") == 6, line  # every table row is whole
    assert md.count("more changes not listed to fit one comment") == 3
    assert "update (code)" in md


def test_replacements_and_deletions_called_out_first():
    md = render_markdown([big("us-east-1", 3)])
    top = md.split("### ")[0]
    assert "1 replacement(s) and 1 deletion(s)" in top
    assert "**replace** Deployment/swap" in top and "**delete** Ingress/inference-old" in top


def test_causes_explained_in_plain_words_and_empty_case():
    md = render_markdown([StackPreview(stack="s", region="r")])
    assert "No changes in any region." in md
    assert "**code**" in md and "**table**" in md


def test_failed_preview_is_reported():
    md = render_markdown([StackPreview(stack="s", region="r", error="error: cannot reach the cluster")])
    assert "preview failed: error: cannot reach the cluster" in md


def test_json_round_trips():
    import json

    data = json.loads(render_json([big("r", 2)]))
    assert data[0]["changes"][0]["op"] == "replace"


def test_previews_without_rollouts_read_as_before():
    import json

    previews = [big("r", 2)]
    assert "rollouts" not in json.loads(render_json(previews))[0]
    assert "Rollouts" not in render_markdown(previews)
