"""Progressive rollouts, pure: which revision each region may run, and how a rollout moves on.

A record with a rollout policy (its own ``rollout_policy``, or a stack's ``gco:rolloutPolicy``) does
not take a spec change to every region at once. Every spec has a revision (``spec_revision``). The
table's ``rollout`` attribute (written by the health job and ``gco-infra rollout``, conditionally on
its ``seq``) records which revision each region may run; a region that may not run the record's
current revision keeps running the one it may (its spec is kept in ``rollout.specs``, or, before any
rollout was recorded, the stack's last applied record). The health job moves a rollout on (``step``):
wave by wave, each healthy for its bake time, and rolls every region that got a failing revision
back to what it ran before.

Only ``spec`` is rolled out: ``desired_state`` (stop, delete), targets, namespace and path apply to
every region at once, as without a policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from .endpoint import (Endpoint, RegionStatus, RolloutPolicy, Validated, endpoint_to_item, parse_endpoint,
                       spec_revision)
from .watchdog import _iso, _parse_iso

ATTRIBUTE = "rollout"
"""The table attribute this module's state lives in (additive: other writers never touch it)."""
PHASES = ("progressing", "paused", "complete", "failed", "aborted")
STOPPED_PHASES = ("failed", "aborted")
"""A rollout that stopped: every region that got its revision went back to its base revision, and
the revision is not tried again until the record's spec changes."""
MAX_FAILED = 20


@dataclass(frozen=True)
class RolloutState:
    """The table's ``rollout`` attribute, as read."""

    revision: str
    """The revision being rolled out (the record's spec's revision when it was written)."""
    phase: str = "progressing"
    wave: int = 0
    """The wave that is baking (every wave before it passed its gate)."""
    wave_started: str | None = None
    healthy_since: str | None = None
    """When every region of the current wave was first seen healthy on the revision (the bake timer)."""
    regions: Mapping[str, str] = field(default_factory=dict)
    """Region -> the revision it may run. A region without an entry keeps what it runs."""
    base: Mapping[str, str] = field(default_factory=dict)
    """Region -> the revision it might run before this rollout: where a failed rollout goes back to."""
    specs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Revision -> the spec, for every revision in ``regions`` and ``base``: nothing rolled back is lost."""
    failed: tuple[str, ...] = ()
    approved: int = -1
    """A wave a person approved: it advances as soon as it is healthy, without its bake time."""
    seq: int = 0
    message: str = ""
    updated_at: str | None = None
    started: str | None = None
    """When this rollout was recorded: a watchdog withdrawal before it is not this revision's."""
    waves: tuple[tuple[str, ...], ...] = ()
    """The waves as they were when the rollout started (a policy or targets edited midway do not
    move ``wave`` onto other regions); empty in states written before waves were recorded."""
    bakes: tuple[int, ...] = ()
    """The bake time of each recorded wave."""
    unhealthy: Mapping[str, str] = field(default_factory=dict)
    """Region -> since when it has not been healthy on the revision (regions that may run it only):
    the unready limit counts from there, so a blip after hours of health is not a failure."""
    held: bool = False
    """The endpoint is stopped: the wave waits, its timers start again when it runs."""


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def read_state(item: Mapping[str, Any]) -> tuple[RolloutState | None, str | None]:
    """(the rollout state, None) or (None, why it cannot be read); (None, None) when there is none."""
    raw = item.get(ATTRIBUTE) if isinstance(item, Mapping) else None
    if raw is None:
        return None, None
    if not isinstance(raw, Mapping):
        return None, f"rollout must be a map, got {_show(raw)}"
    revision, phase = raw.get("revision"), raw.get("phase")
    if not isinstance(revision, str) or not revision:
        return None, "rollout.revision must be a revision string"
    if phase not in PHASES:
        return None, f"rollout.phase must be one of {', '.join(PHASES)}, got {_show(phase)}"
    if raw.get("seq") is None:
        return None, "rollout.seq is missing (every write of the rollout sets it)"
    numbers = {}
    for key, default in (("wave", 0), ("approved", -1), ("seq", 0)):
        value = raw.get(key, default)
        try:
            numbers[key] = int(value)
        except (TypeError, ValueError):
            return None, f"rollout.{key} must be a whole number, got {_show(value)}"
        if isinstance(value, bool) or numbers[key] != value or (key != "approved" and numbers[key] < 0):
            return None, f"rollout.{key} must be a whole number, got {_show(value)}"
    maps = {}
    for key in ("regions", "base", "unhealthy"):
        value = raw.get(key) or {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return None, f"rollout.{key} must map regions to revisions"
        maps[key] = dict(value)
    specs = raw.get("specs") or {}
    if not isinstance(specs, Mapping) or not all(isinstance(k, str) and isinstance(v, Mapping) for k, v in specs.items()):
        return None, "rollout.specs must map revisions to specs"
    failed = raw.get("failed") or []
    if not isinstance(failed, (list, tuple)) or not all(isinstance(f, str) for f in failed):
        return None, "rollout.failed must be a list of revisions"
    texts = {}
    for key in ("wave_started", "healthy_since", "message", "updated_at", "started"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            return None, f"rollout.{key} must be a string, got {_show(value)}"
        if key not in ("message", "updated_at") and value is not None and _parse_iso(value) is None:
            return None, f"rollout.{key} must be an ISO-8601 time, got {_show(value)}"
        texts[key] = value
    for region, since in maps["unhealthy"].items():
        if _parse_iso(since) is None:
            return None, f"rollout.unhealthy.{region} must be an ISO-8601 time, got {_show(since)}"
    waves = raw.get("waves") or []
    if not isinstance(waves, (list, tuple)) or not all(
            isinstance(w, (list, tuple)) and all(isinstance(r, str) for r in w) for w in waves):
        return None, "rollout.waves must be a list of lists of regions"
    bakes = raw.get("bakes") or []
    try:
        bakes = [int(b) for b in bakes] if isinstance(bakes, (list, tuple)) else None
    except (TypeError, ValueError):
        bakes = None
    if bakes is None or len(bakes) != len(waves) or any(b < 0 for b in bakes):
        return None, "rollout.bakes must hold one bake time (seconds) per recorded wave"
    held = raw.get("held", False)
    if not isinstance(held, bool):
        return None, f"rollout.held must be true or false, got {_show(held)}"
    return RolloutState(revision=revision, phase=phase, regions=maps["regions"], base=maps["base"],
                        specs={k: dict(v) for k, v in specs.items()}, failed=tuple(failed),
                        wave_started=texts["wave_started"], healthy_since=texts["healthy_since"],
                        message=texts["message"] or "", updated_at=texts["updated_at"], started=texts["started"],
                        waves=tuple(tuple(w) for w in waves), bakes=tuple(bakes), unhealthy=maps["unhealthy"],
                        held=held, **numbers), None


def state_to_item(state: RolloutState) -> dict[str, Any]:
    item: dict[str, Any] = {
        "revision": state.revision, "phase": state.phase, "wave": state.wave, "regions": dict(state.regions),
        "base": dict(state.base), "specs": {k: dict(v) for k, v in state.specs.items()},
        "failed": list(state.failed), "approved": state.approved, "seq": state.seq, "message": state.message,
        "waves": [list(w) for w in state.waves], "bakes": list(state.bakes), "unhealthy": dict(state.unhealthy),
        "held": state.held,
    }
    for key in ("wave_started", "healthy_since", "updated_at", "started"):
        if getattr(state, key) is not None:
            item[key] = getattr(state, key)
    return item


# ---- which revision a region may run ---------------------------------------------------------------------------


def policy_for(ep: Endpoint, default: RolloutPolicy | None) -> RolloutPolicy | None:
    """The record's policy, else the stack's default; None: the record is applied as without rollouts."""
    return ep.rollout_policy or default


def waves_for(policy: RolloutPolicy, targets: Iterable[str]) -> list[tuple[str, ...]]:
    """The policy's waves restricted to the endpoint's target regions; targets in no wave go last."""
    targets = list(targets)
    waves = [tuple(r for r in wave if r in targets) for wave in policy.waves]
    waves = [w for w in waves if w]
    placed = {r for w in waves for r in w}
    rest = tuple(r for r in targets if r not in placed)
    return waves + [rest] if rest else waves


def bakes_for(policy: RolloutPolicy, targets: Iterable[str]) -> list[int]:
    """The bake time of each of ``waves_for``'s waves: a wave keeps its own bake time when waves with
    none of the targets are left out; the last wave's is the policy's last."""
    targets = list(targets)
    bakes = [policy.bake_for(i) for i, wave in enumerate(policy.waves) if any(r in targets for r in wave)]
    placed = {r for w in policy.waves for r in w}
    if any(r not in placed for r in targets):
        bakes.append(policy.bake_for(len(policy.waves) - 1))
    return bakes


def allowed_revision(ep: Endpoint, policy: RolloutPolicy, state: RolloutState | None, region: str,
                     runs_here: bool) -> str | None:
    """The revision ``region`` may run; None: it keeps the one it runs (the stack's last applied record).

    A region where the endpoint runs nothing has nothing to protect: it takes the current revision
    (a first deploy skips waves), unless that revision failed. Before the health job records a new
    revision's rollout, its first wave may already take it.
    """
    current = spec_revision(ep)
    if policy.urgent:
        return current
    if state is not None and state.revision == current:
        if region in state.regions:
            return state.regions[region]
        if state.phase in STOPPED_PHASES:
            return None
        return None if runs_here else current
    # A change the health job has not recorded yet.
    if not runs_here:
        return current
    waves = waves_for(policy, ep.target_regions)
    if waves and region in waves[0]:
        return current
    return None  # what it runs (an older rollout's entries may be stale: the policy may have come and gone)


def region_view(validated: Validated, region: str, items: Mapping[str, Mapping[str, Any]],
                kept: Callable[[], Mapping[str, Mapping[str, Any]]], default: RolloutPolicy | None) -> Validated:
    """The table as this region declares it: each endpoint under a policy with the spec of the revision
    the region may run (and that revision, for the Deployment's annotation). ``kept`` returns the
    stack's last applied records by name (read only when needed). Endpoints without a policy are
    the very same objects."""
    out: dict[str, Endpoint] = {}
    changed = False
    memo: list[Mapping[str, Mapping[str, Any]]] = []

    def applied() -> Mapping[str, Mapping[str, Any]]:
        if not memo:
            memo.append(kept())
        return memo[0]

    for name, ep in validated.endpoints.items():
        policy = policy_for(ep, default)
        if policy is None or ep.desired_state == "deleted" or not ep.targets(region):
            out[name] = ep
            continue
        changed = True
        item = items.get(name) or {}
        state, problem = read_state(item)
        previous = applied().get(name)
        out[name] = declared_revision(ep, policy, state, region, previous, broken=problem is not None)
    if not changed:
        return validated
    return Validated(endpoints=out, invalid=validated.invalid)


def declared_revision(ep: Endpoint, policy: RolloutPolicy, state: RolloutState | None, region: str,
                      previous: Mapping[str, Any] | None, *, broken: bool = False) -> Endpoint:
    """``ep`` as ``region`` declares it, always something: leaving a valid endpoint out would remove
    what runs. ``broken``: the rollout state cannot be read, so the region keeps what it runs until
    someone fixes or resets it."""
    current = spec_revision(ep)
    if broken:
        allowed = None if previous is not None else current
    else:
        allowed = allowed_revision(ep, policy, state, region, previous is not None)
    if allowed == current:
        return replace(ep, revision=current)
    stored = state.specs.get(allowed) if state is not None and allowed is not None else None
    if stored is not None:
        spec_ep = spec_of(ep, {"spec": stored})
        if spec_ep is not None:
            return replace(ep, spec=spec_ep.spec, revision=allowed)
    kept = spec_of(ep, previous) if previous is not None else None  # parsed only when the region keeps it
    if kept is not None:
        return replace(ep, spec=kept.spec, revision=spec_revision(kept))
    if previous is not None:
        # What runs here was applied under rules that no longer accept its spec, and the table holds no
        # copy that does: the current (valid) revision goes here early rather than nothing (a removal).
        return replace(ep, revision=current)
    if state is not None and state.revision == current and state.phase in STOPPED_PHASES:
        # Nothing runs here and the revision failed elsewhere: a good revision the table holds, if any.
        for good in sorted(set(state.base.values())):
            spec_ep = spec_of(ep, {"spec": state.specs[good]}) if good in state.specs else None
            if spec_ep is not None:
                return replace(ep, spec=spec_ep.spec, revision=good)
    return replace(ep, revision=current)


def spec_of(ep: Endpoint, record: Mapping[str, Any]) -> Endpoint | None:
    """``ep`` with ``record``'s spec, if that spec validates today."""
    item = {**endpoint_to_item(ep), "spec": record.get("spec")}
    parsed = parse_endpoint(item, allowed_namespaces=(ep.namespace,))
    return replace(ep, spec=parsed.endpoint.spec) if parsed.endpoint is not None else None


# ---- the gate: how the health job moves a rollout on -------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    state: RolloutState | None = None
    """The state to write (conditional on the state read), or None when nothing changes."""
    event: str | None = None
    """started, recorded, healthy, advanced, completed, failed."""


def region_health(ep: Endpoint, status: RegionStatus, revision: str, since: float | None = None) -> str:
    """healthy, withdrawn (the watchdog took its Ingress off the ALB while this revision ran, after
    ``since``, the rollout's start) or waiting. With a canary, the canary must be ready too: it takes
    its weight of the traffic in every region the revision reaches."""
    if status.revision != revision:
        return "waiting"
    if ep.desired_state == "stopped":
        return "healthy" if status.state == "stopped" else "waiting"
    if status.ingress_withdrawn:
        dead_from = _parse_iso(status.unready_since)
        if since is None or (dead_from is not None and dead_from >= since):
            return "withdrawn"
        return "waiting"  # withdrawn while an older revision was dead: this one has to come up first
    ready, desired = status.replicas_ready or 0, status.replicas_desired or 0
    if not (status.state == "running" and desired > 0 and ready >= desired):
        return "waiting"
    if ep.spec.canary is not None:
        c_ready, c_desired = status.canary_ready or 0, status.canary_desired or 0
        if not (c_desired > 0 and c_ready >= c_desired):
            return "waiting"
    return "healthy"


def _time(text: str | None, default: float) -> float:
    t = _parse_iso(text)
    return default if t is None else t


RUNNING_STATES = ("running", "updating", "stopping", "stopped")


def _with(state: RolloutState, now: float, **changes: Any) -> RolloutState:
    return replace(state, seq=state.seq + 1, updated_at=_iso(now), **changes)


def start(ep: Endpoint, policy: RolloutPolicy, state: RolloutState | None, spec: Mapping[str, Any],
          now: float) -> RolloutState | None:
    """A rollout of the record's current revision, from what every region may run now; None: not yet.

    Before the first recorded rollout, what a region runs is what its status reports. A region that
    runs the endpoint but reports no revision yet (the policy is new, the runner has not annotated
    its Deployment, or its health job has not looked since) is waited for: then a policy added to an
    unchanged spec records it as complete, instead of rolling the same spec out again.
    """
    current = spec_revision(ep)
    targets = ep.target_regions
    waves = waves_for(policy, targets)
    statuses = {r: s for r, s in ep.region_status.items() if r in targets}
    failed = state.failed if state is not None else ()
    seq = (state.seq if state is not None else 0) + 1
    if state is None:
        if not policy.urgent and any(not s.revision and s.state in RUNNING_STATES for s in statuses.values()):
            return None
        # the first wave may already run the new revision (it takes it before anything is recorded)
        base = {r: s.revision for r, s in statuses.items() if s.revision and not (waves and r in waves[0])}
        first = not any(s.revision and s.revision != current for s in statuses.values())
    else:
        base = {r: rev for r, rev in state.regions.items() if r in targets}
        first = False
    everywhere = {r: current for r in targets}
    if policy.urgent or first or all(base.get(r) == current for r in targets):
        why = ("urgent: every region at once" if policy.urgent else
               "first deploy (or every region already runs it): every region at once" if first else
               "every region already may run it")
        return RolloutState(revision=current, phase="complete", wave=len(waves), wave_started=_iso(now),
                            started=_iso(now), regions=everywhere, base=base, specs={current: dict(spec)},
                            failed=failed, seq=seq, message=why, updated_at=_iso(now),
                            waves=tuple(waves), bakes=tuple(bakes_for(policy, targets)))
    regions = dict(base)
    for r in waves[0]:
        regions[r] = current
    specs = {rev: state.specs[rev] for rev in set(base.values()) if state is not None and rev in state.specs}
    specs[current] = dict(spec)
    return RolloutState(revision=current, phase="progressing", wave=0, wave_started=_iso(now), started=_iso(now),
                        regions=regions, base=base, specs=specs, failed=failed, seq=seq,
                        message=f"wave 1 of {len(waves)}: {', '.join(waves[0])}", updated_at=_iso(now),
                        waves=tuple(waves), bakes=tuple(bakes_for(policy, targets)),
                        unhealthy={r: _iso(now) for r in waves[0]})


def step(ep: Endpoint, policy: RolloutPolicy, state: RolloutState | None, spec: Mapping[str, Any],
         now: float) -> Step:
    """The next rollout state of one endpoint, from its record and every region's status (pure).

    ``spec`` is the record's raw spec, kept in the state so the revision can be rolled back to
    later. The table's statuses are written by each region's health job; any of them may take the
    step, and the conditional write on ``seq`` lets exactly one do it. Every step this moment allows
    is taken in one write (a rollout recorded when its first wave already runs it healthy starts
    its bake timer at once), so the gate costs no extra ticks.
    """
    first = _step(ep, policy, state, spec, now)
    if first.state is None:
        return first
    taken = first
    for _ in range(MAX_STEPS_AT_ONCE):
        nxt = _step(ep, policy, taken.state, spec, now)
        if nxt.state is None:
            break
        taken = Step(replace(nxt.state, seq=first.state.seq), nxt.event)  # one write: seq moves once
    return taken


MAX_STEPS_AT_ONCE = 8


def recorded_waves(state: RolloutState, policy: RolloutPolicy, targets: Iterable[str]) -> tuple[list[tuple[str, ...]], list[int]]:
    """The rollout's waves (as recorded when it started) over today's targets, and their bake times.
    A wave whose regions are no longer targeted stays, empty, so ``state.wave`` keeps its meaning."""
    targets = list(targets)
    if not state.waves:
        return waves_for(policy, targets), bakes_for(policy, targets)
    return [tuple(r for r in w if r in targets) for w in state.waves], list(state.bakes)


def due(ep: Endpoint, policy: RolloutPolicy, state: RolloutState | None) -> float | None:
    """When this rollout's gate can next change with nothing else happening: a bake time ends or an
    unready limit passes (epoch seconds; None: not progressing)."""
    if state is None or state.phase != "progressing" or state.held or state.revision != spec_revision(ep):
        return None
    waves, bakes = recorded_waves(state, policy, ep.target_regions)
    if state.wave >= len(waves):
        return None
    times = [t + policy.unready_limit_seconds for t in (_parse_iso(v) for v in state.unhealthy.values()) if t is not None]
    healthy = _parse_iso(state.healthy_since)
    if healthy is not None:
        times.append(healthy + bakes[state.wave])
    return min(times) if times else None


def _step(ep: Endpoint, policy: RolloutPolicy, state: RolloutState | None, spec: Mapping[str, Any],
          now: float) -> Step:
    if ep.desired_state == "deleted":
        return Step()
    current = spec_revision(ep)
    targets = ep.target_regions
    if state is None or state.revision != current:
        new = start(ep, policy, state, spec, now)
        if new is None:
            return Step()
        return Step(new, "completed" if new.phase == "complete" else "started")
    everywhere = {r: current for r in targets}
    if policy.urgent and state.phase != "complete":
        return Step(_with(state, now, phase="complete", regions=everywhere, unhealthy={}, healthy_since=None,
                          held=False, message="urgent: every region at once"), "completed")
    if state.phase == "complete":
        if dict(state.regions) != everywhere:  # targets changed: they run what passed every wave
            return Step(_with(state, now, regions=everywhere), "recorded")
        return Step()
    if state.phase != "progressing":
        return Step()
    if ep.desired_state == "stopped":
        if state.held:
            return Step()
        return Step(_with(state, now, held=True, healthy_since=None, unhealthy={},
                          message=f"wave {state.wave + 1} held: the endpoint is stopped"), "held")
    waves, bakes = recorded_waves(state, policy, targets)
    if state.held:
        fresh = {r: _iso(now) for r in waves[state.wave]} if state.wave < len(waves) else {}
        return Step(_with(state, now, held=False, wave_started=_iso(now), healthy_since=None, unhealthy=fresh,
                          message=f"wave {state.wave + 1} goes on: the endpoint runs again"), "resumed")
    if state.wave >= len(waves):
        return Step(_with(state, now, phase="complete", message="every wave passed"), "completed")
    wave = set(waves[state.wave])
    started = _parse_iso(state.started or state.wave_started)
    judged = {r for r in targets if state.regions.get(r) == current} | wave
    health = {r: region_health(ep, ep.status_in(r), current, started) for r in sorted(judged)}
    unhealthy = {r: since for r, since in state.unhealthy.items() if r in judged and health.get(r) != "healthy"}
    for r, h in health.items():
        if h != "healthy" and r not in unhealthy:
            unhealthy[r] = _iso(now)
    bad = [r for r, h in health.items() if h == "withdrawn"]
    slow = [r for r, since in sorted(unhealthy.items())
            if now - _time(since, now) >= policy.unready_limit_seconds]
    if bad or slow:
        why = (f"{', '.join(bad)}: Ingress withdrawn by the watchdog on revision {current}" if bad else
               f"{', '.join(slow)}: not healthy on revision {current} for {policy.unready_limit_seconds}s")
        return Step(rollback(state, now, "failed", f"rolled back: {why}"), "failed")
    changes: dict[str, Any] = {"unhealthy": unhealthy} if unhealthy != dict(state.unhealthy) else {}
    if any(h != "healthy" for h in health.values()):  # the wave, and every wave before it
        if state.healthy_since is not None:
            changes["healthy_since"] = None
        return Step(_with(state, now, **changes), "unhealthy") if changes else Step()
    if wave and state.healthy_since is None:
        return Step(_with(state, now, healthy_since=_iso(now), **changes), "healthy")
    baked = not wave or now - _time(state.healthy_since, now) >= bakes[state.wave]
    if not baked and state.approved != state.wave:
        return Step(_with(state, now, **changes), "unhealthy" if unhealthy else "baking") if changes else Step()
    return Step(advance(replace(state, **changes), waves, now), "advanced")


def advance(state: RolloutState, waves: list[tuple[str, ...]], now: float) -> RolloutState:
    """The next wave may run the revision (or the rollout is complete)."""
    nxt = state.wave + 1
    if nxt >= len(waves):
        return _with(state, now, wave=nxt, phase="complete", healthy_since=None, unhealthy={},
                     message="every wave passed")
    regions = {**state.regions, **{r: state.revision for r in waves[nxt]}}
    unhealthy = {**state.unhealthy, **{r: _iso(now) for r in waves[nxt]}}
    return _with(state, now, wave=nxt, regions=regions, wave_started=_iso(now), healthy_since=None, unhealthy=unhealthy,
                 message=f"wave {nxt + 1} of {len(waves)}: {', '.join(waves[nxt]) or '(no region targeted)'}")


def rollback(state: RolloutState, now: float, phase: str, message: str) -> RolloutState:
    """Every region that got the revision goes back to its base; the revision is marked failed.

    A region whose base spec is not known (it ran nothing before, or what it ran before the first
    recorded rollout) keeps the revision: the message says so, and a person decides.
    """
    regions = dict(state.regions)
    unknown = []
    for r, rev in state.regions.items():
        if rev != state.revision:
            continue
        if state.base.get(r) in state.specs:
            regions[r] = state.base[r]
        else:
            unknown.append(r)
    failed = tuple(f for f in state.failed if f != state.revision)[-(MAX_FAILED - 1):] + (state.revision,)
    if unknown:
        message += f"; {', '.join(unknown)} keep it: the revision they ran before is not known"
    return _with(state, now, phase=phase, regions=regions, failed=failed, healthy_since=None, unhealthy={},
                 held=False, message=message)


def describe(ep: Endpoint, policy: RolloutPolicy | None, state: RolloutState | None) -> str:
    """One line for tables: where the endpoint's rollout stands."""
    if policy is None:
        return ""
    current = spec_revision(ep)
    if state is None or state.revision != current:
        return f"{current} pending"
    waves, _ = recorded_waves(state, policy, ep.target_regions)
    where = f"wave {min(state.wave + 1, len(waves))}/{len(waves)}" if state.phase in ("progressing", "paused") else ""
    return " ".join(p for p in (current, state.phase, where) if p)


# ---- a person's steering (gco-infra rollout ...) ------------------------------------------------------------------


class SteerError(ValueError):
    """The rollout is not in a phase that allows this."""


def pause(state: RolloutState, now: float, who: str) -> RolloutState:
    if state.phase != "progressing":
        raise SteerError(f"the rollout of {state.revision} is {state.phase}, not progressing")
    return _with(state, now, phase="paused", healthy_since=None, message=f"paused by {who}")


def resume(state: RolloutState, now: float, who: str) -> RolloutState:
    """The paused wave starts over: its unready limits and bake time count from now."""
    if state.phase != "paused":
        raise SteerError(f"the rollout of {state.revision} is {state.phase}, not paused")
    return _with(state, now, phase="progressing", wave_started=_iso(now), healthy_since=None,
                 unhealthy={r: _iso(now) for r in state.unhealthy}, message=f"resumed by {who}")


def abort(state: RolloutState, now: float, who: str) -> RolloutState:
    """Stop and roll back as a failed gate would; the revision is not tried again until the spec changes."""
    if state.phase not in ("progressing", "paused"):
        raise SteerError(f"the rollout of {state.revision} is {state.phase}: nothing to abort")
    return rollback(state, now, "aborted", f"aborted by {who}: rolled back")


def approve(state: RolloutState, now: float, who: str) -> RolloutState:
    """The current wave advances as soon as it is healthy, without waiting for its bake time."""
    if state.phase not in ("progressing", "paused"):
        raise SteerError(f"the rollout of {state.revision} is {state.phase}: nothing to approve")
    return _with(state, now, approved=state.wave, message=f"wave {state.wave + 1} approved by {who}")
