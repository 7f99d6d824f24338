"""Stack previews for pull requests: what a change would do to the running endpoints, per region.

The program reads live data, so a preview mixes two causes. Each change is labelled: ``table``
when the endpoint's record differs from the record the stack last applied (new, edited, removed,
or its watchdog ingress flag moved), ``code`` when the record is the same, so the repository
change is what alters the declaration. A spec change under a rollout policy is shown with the waves
it goes through, so a region whose wave has not come is not mistaken for one the change missed.
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from . import manifests as m
from . import rollout
from .endpoint import Validated, endpoint_to_item, record_name, spec_revision, validate_all
from . import state
from .program import StackSettings, owned, previous_records_from_outputs
from .plan import PROJECT, endpoint_of_object
from .runner import _engine_message, quiet_sdk_debug

COMMENT_LIMIT = 65_536
"""GitHub's limit on an issue comment, in characters."""
OPS = ("replace", "delete", "create", "update")
_TIMESTAMPS = ("created_at", "updated_at", "created_by")


@dataclass
class Change:
    endpoint: str
    op: str
    resource: str
    fields: list[str] = field(default_factory=list)
    cause: str = "code"


@dataclass
class RolloutPlan:
    """How one endpoint's new spec revision reaches this stack's region under its rollout policy."""

    revision: str
    """The record's spec revision (what the table asks for)."""
    previous: str | None
    """The revision this stack last applied; None when it runs nothing of the endpoint yet (or its
    last applied spec no longer validates)."""
    waves: list[list[str]]
    """The policy's waves over the endpoint's target regions, in order (rollout.waves_for)."""
    bake_seconds: list[int]
    """Per wave: how long it stays healthy before the next wave may take the revision."""
    wave: int
    """This stack's region's wave, from 1."""
    now: bool
    """Whether this preview declares the new revision here. When False, the endpoint's resource
    changes in this stack's preview carry no spec change."""
    reason: str
    """Why now or why later, in plain words."""
    declared: str | None = None
    """The revision this preview declares here."""
    urgent: bool = False
    phase: str | None = None
    """The phase of the health job's recorded rollout of this revision; None before it records one."""


@dataclass
class StackPreview:
    stack: str
    region: str
    changes: list[Change] = field(default_factory=list)
    record_changes: dict[str, str] = field(default_factory=dict)
    """Endpoint -> why its record differs from the last applied one."""
    invalid: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    rollouts: dict[str, RolloutPlan] = field(default_factory=dict)
    """Endpoint -> how its new spec revision reaches this region (endpoints under a rollout policy)."""

    def count(self, op: str) -> int:
        return sum(1 for c in self.changes if c.op == op)


def _comparable(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in _TIMESTAMPS}


def record_changes(settings: StackSettings, validated: Validated, outputs: Mapping[str, Any] | None) -> dict[str, str]:
    """Which endpoints' table records (validated, this stack's part) differ from what it last applied (pure)."""
    applied = previous_records_from_outputs(outputs or {})
    applied_fp = {n: o.get("fingerprint") for n, o in ((outputs or {}).get("endpoints") or {}).items()}
    out: dict[str, str] = {}
    for name, ep in validated.endpoints.items():
        objects, fp = m.declaration(ep, settings.region, settings.cluster)
        if name not in applied:
            if objects:
                out[name] = "new record"
            continue
        if _comparable(endpoint_to_item(ep)) != _comparable(applied[name]):
            out[name] = "record changed" if objects else f"record now {ep.desired_state}" if ep.desired_state == "deleted" else "no longer targets this region"
        elif applied_fp.get(name) != fp and ep.status_in(settings.region).ingress:
            out[name] = f"ingress {ep.status_in(settings.region).ingress} by the health job"
    for name in validated.invalid:
        out[name] = "record invalid (last applied declaration kept)"
    for name in applied:
        if name not in validated.endpoints and name not in validated.invalid:
            out[name] = "record removed from the table"
    return out


def rollout_plan(settings: StackSettings, validated: Validated, items: list[Mapping[str, Any]],
                 outputs: Mapping[str, Any] | None) -> dict[str, RolloutPlan]:
    """For each endpoint under a rollout policy whose spec revision differs from the one this stack
    last applied: its waves, and whether this region takes the revision now (pure).

    "Now" is decided as the program decides it (rollout.declared_revision), so the plan and the
    engine's preview agree; the reason is worded from the same inputs.
    """
    applied = previous_records_from_outputs(outputs or {})
    raw = {record_name(i): i for i in items if isinstance(i, Mapping)}
    region = settings.region
    plans: dict[str, RolloutPlan] = {}
    for name, ep in sorted(validated.endpoints.items()):
        policy = rollout.policy_for(ep, settings.rollout_policy)
        if policy is None or ep.desired_state == "deleted" or not ep.targets(region):
            continue  # no waves: applied as without a policy
        current = spec_revision(ep)
        previous = applied.get(name)
        applied_ep = rollout.spec_of(ep, previous) if previous is not None else None
        before = spec_revision(applied_ep) if applied_ep is not None else None  # None: it no longer validates
        if previous is not None and before == current:
            continue
        recorded, problem = rollout.read_state(raw.get(name) or {})
        declared = rollout.declared_revision(ep, policy, recorded, region, previous, broken=problem is not None).revision
        waves = rollout.waves_for(policy, ep.target_regions)
        bakes = rollout.bakes_for(policy, ep.target_regions)
        wave = next(i for i, w in enumerate(waves) if region in w)
        ours = recorded if recorded is not None and recorded.revision == current else None
        now = declared == current
        if now:
            reason = ("urgent policy: every region at once" if policy.urgent else
                      "first deploy in this region" if previous is None else
                      "early: its last applied spec no longer validates and the table holds no copy of it"
                      if before is None and wave != 0 else
                      "wave 1" if wave == 0 else f"wave {wave + 1}: the rollout reached it")
        elif problem is not None:
            reason = "the table's rollout state cannot be read: keeps the revision it runs"
        elif ours is not None and ours.phase in rollout.STOPPED_PHASES:
            reason = f"the rollout {ours.phase}: keeps the revision it runs"
        elif wave == 0:
            reason = "keeps the revision it runs"
        elif ours is not None and ours.phase == "paused":
            reason = f"wave {wave + 1}, after the paused rollout resumes and wave {wave} is healthy for {bakes[wave - 1]} s"
        else:
            reason = f"wave {wave + 1}, after wave {wave} is healthy for {bakes[wave - 1]} s"
        plans[name] = RolloutPlan(
            revision=current, previous=before, waves=[list(w) for w in waves],
            bake_seconds=list(bakes), wave=wave + 1, now=now, reason=reason,
            declared=declared, urgent=policy.urgent, phase=ours.phase if ours is not None else None)
    return plans


def _fields(meta: Any) -> list[str]:
    if meta.detailed_diff:
        return sorted(meta.detailed_diff)
    return sorted(meta.diffs or [])


def preview_stack(settings: StackSettings, items: list[dict[str, Any]], env: Mapping[str, str], *,
                  refresh: bool = False) -> StackPreview:
    """A real engine preview of one stack, turned into per-endpoint changes."""
    from pulumi import automation as auto

    from . import program

    result = StackPreview(stack=settings.stack, region=settings.region)
    started = time.monotonic()
    events: list[Any] = []
    os.environ.update(env)
    quiet_sdk_debug()  # five debug events per resource, kept in ``events`` for nothing
    try:
        ws = state.workspace(env)  # the engine's private project copy (state.py), never the repository's
        outputs: dict[str, Any] = {}
        if settings.stack in {s.name for s in ws.list_stacks()}:
            outputs = {k: v.value for k, v in ws.stack_outputs(settings.stack).items()}
        previous = previous_records_from_outputs(outputs)
        def declare() -> Awaitable[None]:
            program.main(items=items, previous=lambda: previous, settings=settings,
                         previous_endpoints=outputs.get("endpoints") or {})
            return program.outputs_settled()

        stack = auto.create_or_select_stack(stack_name=settings.stack, project_name=PROJECT, program=declare,
                                            opts=state.workspace_options(settings.stack, env))
        stack.preview(diff=True, refresh=refresh, on_event=events.append, suppress_progress=True, color="never")
    except auto.CommandError as exc:
        result.error = _engine_message(str(exc))
        result.seconds = time.monotonic() - started
        return result
    validated = owned(validate_all(items, allowed_namespaces=settings.allowed_namespaces), settings)
    result.record_changes = record_changes(settings, validated, outputs)
    result.rollouts = rollout_plan(settings, validated, items, outputs)
    result.invalid = {k: list(v) for k, v in validated.invalid.items()}
    for event in events:
        pre = getattr(event, "resource_pre_event", None)
        if pre is None:
            continue
        meta = pre.metadata
        op = meta.op.value if hasattr(meta.op, "value") else str(meta.op)
        op = {"create-replacement": "replace", "delete-replaced": ""}.get(op, op)
        if op not in OPS or not meta.type.startswith("kubernetes:") or meta.type.startswith("pulumi:providers"):
            continue
        objname = meta.urn.rsplit("::", 1)[-1]
        endpoint = endpoint_of_object(objname)
        kind = meta.type.rsplit(":", 1)[-1]
        result.changes.append(Change(endpoint=endpoint, op=op, resource=f"{kind}/{objname}", fields=_fields(meta) if op in ("update", "replace") else [],
                                     cause="table" if endpoint in result.record_changes else "code"))
    result.changes.sort(key=lambda c: (OPS.index(c.op), c.endpoint, c.resource))
    result.seconds = time.monotonic() - started
    return result


# ---- rendering (pure) ---------------------------------------------------------------------------------------------

_BREAKS = ("Cc", "Cf", "Zl", "Zp", "Cs")
"""Unicode categories that become a space: line breaks, controls, bidi overrides and other format characters."""
_BACKSLASHED = re.compile(r"([\\`*_~\[\]|$#])")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "@": "@&#8203;"}
"""HTML out of the way, and a zero-width space after @ so no one is mentioned (GitHub links mentions
after rendering, so a backslash would not stop it)."""
_LIST_START = re.compile(r"^([-+=]|[0-9]+(?=[.)]))")
"""What would start a list inside a list item (``> - <region>``) if a value began with it."""
_CODE_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/\[\]-]*")


def md_text(value: Any, limit: int = 200) -> str:
    """``value`` (text from the table or the engine) as inert Markdown inline text, on one line.

    Every comment value goes through here: line breaks and control characters become spaces (a
    table row stays one row), Markdown punctuation is backslash-escaped (pipes cannot split cells,
    no code spans, emphasis, links or math), HTML is written as entities, and ``@`` cannot mention.
    Long values are cut to ``limit`` characters.
    """
    text = "".join(" " if unicodedata.category(ch) in _BREAKS else ch for ch in str(value))
    text = re.sub(" +", " ", text).strip()
    if len(text) > limit:
        text = text[:limit - 1].rstrip() + "…"
    text = _BACKSLASHED.sub(r"\\\1", text)
    text = "".join(_ENTITIES.get(ch, ch) for ch in text)
    start = _LIST_START.match(text)
    if start:  # "-x" -> "\-x", "1. x" -> "1\. x"
        cut = 0 if start.group(1) in "-+=" else start.end()
        text = text[:cut] + "\\" + text[cut:]
    return text


def _code(value: Any) -> str:
    """A name in code format when it is plainly one (letters, digits, ``._:/[]-``); else md_text."""
    text = str(value)
    return f"`{text}`" if len(text) <= 200 and _CODE_SAFE.fullmatch(text) else md_text(text)


def _summary_line(p: StackPreview) -> str:
    if p.error:
        return f"preview failed: {md_text(p.error, limit=2_000)}"
    counts = ", ".join(f"{p.count(op)} to {op}" for op in ("create", "update", "replace", "delete"))
    return counts


def _waves_cell(plan: RolloutPlan) -> str:
    """``1: `a` (bake 300 s) → 2: `b```: the last wave has no bake (nothing waits for it)."""
    parts = []
    for i, wave in enumerate(plan.waves):
        bake = f" (bake {plan.bake_seconds[i]} s)" if i < len(plan.waves) - 1 and i < len(plan.bake_seconds) else ""
        parts.append(f"{i + 1}: " + ", ".join(_code(r) for r in wave) + bake)
    return (" → ".join(parts)) + (" (urgent: waves skipped)" if plan.urgent else "")


def _rollout_lines(previews: list[StackPreview], limit: int) -> list[str]:
    """One table across stacks, a row per endpoint and revision (its waves), each previewed region's
    part in the last cell. Rows that do not fit ``limit`` characters are counted, not cut."""
    rows: dict[tuple[Any, ...], list[tuple[str, RolloutPlan]]] = {}
    for p in previews:
        for name, plan in p.rollouts.items():
            key = (name, plan.revision, tuple(map(tuple, plan.waves)), tuple(plan.bake_seconds), plan.urgent)
            rows.setdefault(key, []).append((p.region, plan))
    if not rows:
        return []
    lines = ["**Rollouts.** These endpoints' spec changes go region by region under their rollout policy: a wave "
             "takes the new revision once the wave before it has been healthy for its bake time. A region whose "
             "wave has not come keeps the revision it runs, so its section lists no spec change for the endpoint.",
             "", "| endpoint | revision | waves | in this preview |", "|---|---|---|---|"]
    budget = limit - sum(len(line) + 1 for line in lines) - 200
    left: list[tuple[str, RolloutPlan]] = []
    # Changes to running endpoints first: a first deploy skips the waves anyway.
    for key in sorted(rows, key=lambda k: (all(plan.previous is None for _, plan in rows[k]), k[0], k[1])):
        where = "; ".join(f"{_code(region)}: {'now' if plan.now else 'later'}, {md_text(plan.reason)}"
                          for region, plan in rows[key])
        plan = rows[key][0][1]
        line = f"| {_code(key[0])} | {_code(plan.revision)} | {_waves_cell(plan)} | {where} |"
        if len(line) + 1 > budget:
            left += rows[key]
            continue
        lines.append(line)
        budget -= len(line) + 1
    if left:
        now = sum(1 for _, plan in left if plan.now)
        lines += ["", f"... and {len(left)} more endpoint rollouts (endpoint and region) not listed to fit one "
                      f"comment: {now} now, {len(left) - now} later."]
    return lines + [""]


def render_markdown(previews: list[StackPreview], limit: int = COMMENT_LIMIT - 1_000) -> str:
    """One comment for all regions; summarised (never cut mid-table) to stay under ``limit``."""
    head = ["## gco-infra stack preview", ""]
    risky = [(p, c) for p in previews for c in p.changes if c.op in ("replace", "delete")]
    if risky:
        reps = sum(1 for _, c in risky if c.op == "replace")
        dels = len(risky) - reps
        head.append(f"> **Warning: {reps} replacement(s) and {dels} deletion(s).** Replacements recreate running objects; "
                    "deletions remove them.")
        for p, c in risky[:20]:
            head.append(f"> - {md_text(p.region)}: **{c.op}** {md_text(c.resource)} (endpoint {_code(c.endpoint)}, "
                        f"cause: {md_text(c.cause)})")
        if len(risky) > 20:
            head.append(f"> - ... and {len(risky) - 20} more, listed per region below")
        head.append("")
    head += [
        "This preview reads the live endpoints table, so it shows two kinds of change. "
        "**code**: the endpoint's record is what the stack last applied, so this pull request's code changes it. "
        "**table**: the endpoint's record in the table differs from what was last applied (new, edited, removed); "
        "that change will be applied by the next runner tick whether or not this pull request merges.",
        "",
    ]
    if not any(p.changes or p.error or p.invalid for p in previews):
        head += ["No changes in any region.", ""] if any(p.rollouts for p in previews) else ["No changes in any region."]
    head += _rollout_lines(previews, limit // 4)
    sections: list[list[str]] = []
    for p in previews:
        sec = [f"### {md_text(p.region)} (stack {_code(p.stack)}): {_summary_line(p)}", ""]
        if p.invalid:
            sec.append("Invalid records (their last applied declaration is kept): " +
                       "; ".join(f"{_code(n)}: {md_text(e[0], limit=500)}" for n, e in sorted(p.invalid.items())))
            sec.append("")
        if p.changes:
            sec.append("| endpoint | cause | op | resource | changed fields |")
            sec.append("|---|---|---|---|---|")
        sections.append(sec)

    def row(c: Change) -> str:
        fields = ", ".join(_code(f) for f in c.fields[:6]) + (f" (+{len(c.fields) - 6})" if len(c.fields) > 6 else "")
        return f"| {_code(c.endpoint)} | {md_text(c.cause)} | {c.op} | {md_text(c.resource)} | {fields} |"

    # Fill rows round-robin across regions while the budget lasts; then summarise what is left.
    budget = limit - len("\n".join(head)) - sum(len("\n".join(s)) + 400 for s in sections)
    shown = [0] * len(previews)
    progress = True
    while progress:
        progress = False
        for i, p in enumerate(previews):
            if shown[i] < len(p.changes):
                line = row(p.changes[shown[i]])
                if len(line) + 1 > budget:
                    continue
                sections[i].append(line)
                budget -= len(line) + 1
                shown[i] += 1
                progress = True
    for i, p in enumerate(previews):
        rest = p.changes[shown[i]:]
        if rest:
            by: dict[tuple[str, str], int] = {}
            for c in rest:
                by[(c.op, c.cause)] = by.get((c.op, c.cause), 0) + 1
            parts = ", ".join(f"{n} {op} ({md_text(cause)})" for (op, cause), n in sorted(by.items()))
            sections[i] += ["", f"... and {len(rest)} more changes not listed to fit one comment: {parts}."]
        sections[i].append("")
    return "\n".join(head + [line for s in sections for line in s]).rstrip() + "\n"


def render_json(previews: list[StackPreview]) -> str:
    """Each preview as a map; ``rollouts`` only where there are some, so previews without rollout
    policies read exactly as before."""
    data = [asdict(p) for p in previews]
    for d in data:
        if not d["rollouts"]:
            del d["rollouts"]
    return json.dumps(data, indent=2, sort_keys=True)


__all__ = ["Change", "RolloutPlan", "StackPreview", "preview_stack", "record_changes", "rollout_plan",
           "render_markdown", "render_json", "Callable"]
