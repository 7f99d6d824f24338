"""The runner's decisions, pure: what each stack needs this tick, which URNs to target, which
status to write, and where a region's endpoints sit. No engine, no table, no cluster: the runner
(runner.py) does the I/O around these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from . import manifests as m
from .component import TYPE as COMPONENT_TYPE
from .component import TYPE_TOKENS
from .endpoint import Endpoint, Validated, status_entry_problem, stored_region_status, validate_all
from .program import StackSettings, as_declared, previous_records_from_outputs, shard_settings
from .store import utcnow

PROJECT = "gco-infra"


EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STORE, EXIT_REFUSED, EXIT_LOCKED = 0, 1, 2, 3, 4, 75


@dataclass(frozen=True)
class RunnerOptions:
    full_every: float = 21600.0
    """Every endpoint's objects are refreshed (and drift repaired) at least once in this many seconds:
    the backstop for drift the watch did not see. Not one full ``up --refresh`` that would hold a
    stack for minutes, but sweeps: a few endpoints at a time join a targeted update (``sweep_batch``)."""
    sweep_batch: int = 25
    """Endpoints refreshed by one sweep of a stack."""
    deletion_window: float = 0.0
    """Endpoints removed within this many seconds count together against the deletion bound (0: each
    tick on its own; `gco-infra run`, whose ticks are 2 s apart, uses 60)."""
    check_every: float = 30.0
    """Seconds between checks of a stack's locks and checkpoint (an S3 LIST each) while the stack has
    nothing to do; a stack with something to do is always checked before its operation."""
    max_delete_fraction: float = 0.10
    max_delete_min: int = 2
    allow_mass_delete: bool = False
    parallel: int = 1
    """Stacks operated at once (each in its own process)."""
    overlap: bool = False
    """Ticks do not wait for operations: a stack whose operation is still running is left out of
    the next ticks until it ends, and the others go on (the continuous ``run`` loop). At most
    ``parallel - 1`` periodic full reconciles run at once, so one worker stays free for changes."""
    checkpoints: bool = False
    """The engine's intermediate checkpoints (a full state write after every step). Off
    (PULUMI_SKIP_CHECKPOINTS=true), the state is written once, at the end of each operation: an
    interrupted operation leaves its lock and no record of what it did; the runner that removes
    the dead lock runs a full reconcile, which declares every endpoint again (creating an object
    that exists is an upsert under server-side apply) and refreshes what was changed or deleted."""
    pulumi_parallel: int = 32
    table_stream: bool = True
    """Follow the table's stream (when it has one) and re-read only the items written since the
    last read; without it (or without a stream) every tick scans the whole table."""
    rescan_every: float = 300.0
    """Seconds between complete scans even when following the stream."""


@dataclass
class Plan:
    stack: str
    region: str
    desired: dict[str, str]
    """Endpoint -> fingerprint of what should be declared in this region."""
    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    invalid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    full: bool = False
    reason: str = ""
    refresh_first: bool = False
    """A full reconcile that refreshes every object and then updates only the endpoints that need it:
    the touched ones and those whose objects the refresh found changed or deleted by someone else.
    A runner's start does this; the first apply, a new declaration version, --full and the reconcile
    after a failure declare every endpoint (``up --refresh``; a new version without one: ``judged``)."""
    judged: bool = False
    """A full reconcile declaring every endpoint (a new declaration version) whose objects the drift
    watch's first lists found as our last update left them: ``up`` without a refresh, which would only
    read again what the lists have just shown."""
    refused: str | None = None
    applied: int = 0
    """How many endpoints the stack held before this plan."""
    kept: list[str] = field(default_factory=list)
    """Invalid records whose last applied declaration this stack keeps."""
    notes: dict[str, str] = field(default_factory=dict)
    """Endpoint -> what of its record is not declared in this region, and why (region status ``note``)."""
    drifted: list[str] = field(default_factory=list)
    """Unchanged endpoints whose objects someone else changed or deleted (the drift watch): their
    objects are refreshed and declared again in a targeted update; their status is left alone."""
    drift_seen: dict[str, Any] = field(default_factory=dict)
    """Endpoint -> the drift (drift.Drift) its repair answers; put back if the repair does not happen."""
    swept: list[str] = field(default_factory=list)
    """Unchanged endpoints refreshed by this stack's periodic sweep (RunnerOptions.full_every), as drifted ones."""

    @property
    def touched(self) -> list[str]:
        return self.created + self.changed + self.removed

    @property
    def targeted(self) -> list[str]:
        """What a targeted update refreshes and declares: the touched endpoints and the drifted ones."""
        return list(dict.fromkeys(self.touched + self.drifted + self.swept))

    @property
    def needs_operation(self) -> bool:
        return self.full or bool(self.targeted)


@dataclass
class StackResult:
    stack: str
    region: str
    action: str = "none"
    """none | targeted | full | skipped | refused | failed"""
    created: int = 0
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    changed: int = 0
    operations: int = 0
    seconds: float = 0.0
    message: str = ""
    endpoint_errors: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None
    status_writes: int = 0

    def summary(self) -> str:
        return (f"{self.stack} ({self.region}): {self.action}; changed {self.changed}, created {self.created}, "
                f"updated {self.updated}, deleted {self.deleted}, failed {self.failed}, "
                f"status writes {self.status_writes}, {self.seconds:.1f}s"
                + (f" - {self.message}" if self.message else ""))


def desired_for_region(validated: Validated, settings: StackSettings) -> dict[str, str]:
    out = {}
    for ep in validated.endpoints.values():
        objects, fp = m.declaration(ep, settings.region, settings.cluster)
        if objects:
            out[ep.name] = fp
    return out


def applied_fingerprints(outputs: Mapping[str, Any] | None) -> dict[str, str]:
    endpoints = (outputs or {}).get("endpoints") or {}
    return {n: o.get("fingerprint", "") for n, o in endpoints.items() if isinstance(o, Mapping)}


def plan_stack(settings: StackSettings, validated: Validated, outputs: Mapping[str, Any] | None, *,
               full_due: bool, opts: RunnerOptions, desired: dict[str, str] | None = None,
               recently_removed: int = 0) -> Plan:
    """What this tick does to one stack. ``desired``: desired_for_region(validated, settings), if known;
    ``recently_removed``: endpoints removed from the stack within opts.deletion_window."""
    if desired is None:
        desired = desired_for_region(validated, settings)
    applied = applied_fingerprints(outputs)
    plan = Plan(stack=settings.stack, region=settings.region, desired=desired,
                invalid={k: v for k, v in validated.invalid.items()})
    for name, fp in sorted(desired.items()):
        if name not in applied:
            plan.created.append(name)
        elif applied[name] != fp:
            plan.changed.append(name)
    # An invalid record keeps what it had: it is never counted as removed.
    plan.removed = sorted(n for n in applied if n not in desired and n not in validated.invalid)
    if outputs is None or "endpoints" not in outputs:
        plan.full, plan.reason = True, "first apply"
    elif (outputs or {}).get("declarationVersion") != m.DECLARATION_VERSION:
        plan.full, plan.reason = True, "declaration version changed"
    elif full_due:
        plan.full, plan.reason = True, "full reconcile"
    plan.applied = len(applied)
    plan.notes = {n: "; ".join(t) for n in desired if (t := m.declaration_notes(validated.endpoints[n], settings.region,
                                                                              settings.cluster))}
    plan.kept = sorted(n for n in validated.invalid if n in applied)
    plan.refused = removal_refusal(settings.stack, len(plan.removed), len(applied), opts, recent=recently_removed)
    return plan


def trusted_checkpoint(last: Mapping[str, Any] | None) -> bool:
    """Whether a stack's checkpoint records what our updates declared, so that a runner's start may
    judge drift against it (Plan.refresh_first) instead of declaring every endpoint again (pure).

    ``last``: the newest entry of the stack's history (state.last_operation). A succeeded update left
    every object it declared as declared; a refresh that changed nothing left them as they were. After
    a failed or interrupted operation, or a refresh that took in someone else's changes (a person's
    `pulumi refresh`), the checkpoint may hold what nobody declared, and only declaring every
    endpoint again restores it."""
    if not isinstance(last, Mapping) or last.get("result") != "succeeded":
        return False
    if last.get("kind") == "update":
        return True
    changes = last.get("resourceChanges") or {}
    return last.get("kind") == "refresh" and all(op == "same" for op, count in changes.items() if count)


def removal_refusal(where: str, removed: int, applied: int, opts: RunnerOptions, recent: int = 0) -> str | None:
    """Why removing ``removed`` of ``applied`` endpoints is refused, or None when within the bound.

    ``recent``: endpoints this runner removed from there within ``opts.deletion_window``; they count
    against the same bound, so removals that arrive a few at a time are bounded as one would be."""
    before = applied + recent
    bound = max(opts.max_delete_min, int(before * opts.max_delete_fraction))
    if removed + recent <= bound or opts.allow_mass_delete:
        return None
    already = f", {recent} already removed in the last {opts.deletion_window:.0f}s" if recent else ""
    return (f"refusing to remove {removed} endpoints from {where}{already} "
            f"(bound {bound}: max({opts.max_delete_min}, {opts.max_delete_fraction:.0%} of {before})); "
            "re-run with --allow-mass-delete if this is intended")


def bound_sharded_regions(plans: list[tuple[StackSettings, Plan]], opts: RunnerOptions,
                          shards: Mapping[str, int] | None = None, recent: Mapping[str, int] | None = None) -> None:
    """Apply the mass-deletion bound to a sharded region as a whole, not per shard.

    Per shard, the minimum of the bound would let each of k shards remove that many endpoints. When
    the region exceeds the bound, every shard of it is refused, as an unsharded stack would be.
    ``shards``: region stack -> gco:shards; while some shard of a region was not planned this tick
    (locked, unreadable), the others remove nothing, so removals cannot be split across ticks.
    """
    regions: dict[str, list[Plan]] = {}
    for settings, plan in plans:
        if settings.shard is not None:
            regions.setdefault(settings.region_stack, []).append(plan)
    for region_stack, shard_plans in regions.items():
        removed = sum(len(p.removed) for p in shard_plans)
        applied = sum(p.applied for p in shard_plans)
        refusal = removal_refusal(f"{region_stack} (all its shards)", removed, applied, opts,
                                  recent=(recent or {}).get(region_stack, 0))
        expected = (shards or {}).get(region_stack, len(shard_plans))
        if refusal is None and removed and len(shard_plans) < expected and not opts.allow_mass_delete:
            waiting = (f"not removing {removed} endpoint(s) from {region_stack} this tick: only {len(shard_plans)} of "
                       f"its {expected} shards could be planned, so the region's deletion bound cannot be checked")
            for p in shard_plans:
                p.refused = waiting if p.removed else None
            continue
        for p in shard_plans:
            p.refused = refusal


def exact_glob(urn: str) -> str:
    """The URN as a glob that matches only itself: '*' (which is ``[^:]*``) where the name begins.

    The engine requires literal targets to exist, and with ``--refresh`` it checks them against the
    refreshed state; globs are exempt, so an object someone deleted out of band is no error.
    """
    head, sep, name = urn.rpartition("::")
    return f"{head}*{sep}{name}"


def endpoint_urns(stack: str, name: str, roles_objects: Mapping[str, str]) -> list[str]:
    base = f"urn:pulumi:{stack}::{PROJECT}::{COMPONENT_TYPE}"
    urns = [f"{base}::{name}"]
    for role, objname in roles_objects.items():
        urns.append(f"{base}${TYPE_TOKENS[role]}::{objname}")
    return urns


def targets_for(plan: Plan, validated: Validated, settings: StackSettings, outputs: Mapping[str, Any] | None) -> list[str]:
    """Exact globs for the touched endpoints' components and objects, old and new.

    The stack itself is not a target: the engine always updates the root stack's outputs, and
    targeting it would make every resource (all are its children) a candidate for deletion.
    """
    old = (outputs or {}).get("endpoints") or {}
    urns: list[str] = []
    for name in plan.targeted:
        roles: dict[str, str] = {}
        for role, ref in (old.get(name, {}).get("objects") or {}).items():
            roles[role] = ref.split("/", 1)[1]
        ep = validated.endpoints.get(name)
        if ep is not None:
            for role, obj in m.desired_objects(ep, settings.region, settings.cluster).items():
                roles[role] = obj["metadata"]["name"]
        urns += endpoint_urns(plan.stack, name, roles)
    return [exact_glob(u) for u in urns]


GENERAL = "*"
"""endpoint_errors key of a failure that belongs to no single endpoint."""


def endpoint_of_object(objname: str, owners: Mapping[str, str] | None = None) -> str:
    """Kubernetes object name -> endpoint name: from the declared objects when known, else by the
    naming convention (``inference-<name>``, ``<name>-canary``)."""
    if owners and objname in owners:
        return owners[objname]
    name = objname.removeprefix("inference-")
    return name.removesuffix("-canary")


def object_owners(validated: Validated, settings: StackSettings, outputs: Mapping[str, Any] | None) -> dict[str, str]:
    """Object name -> endpoint, for the objects declared now and those the stack last applied.

    Names are unambiguous: validation refuses an endpoint named like another one's canary objects.
    """
    owners: dict[str, str] = {}
    for name, out in ((outputs or {}).get("endpoints") or {}).items():
        for ref in ((out or {}).get("objects") or {}).values() if isinstance(out, Mapping) else ():
            owners[str(ref).rsplit("/", 1)[-1]] = name
    for ep in validated.endpoints.values():
        for obj in m.desired_objects(ep, settings.region, settings.cluster).values():
            owners[obj["metadata"]["name"]] = ep.name
    return owners


def endpoint_of_urn(urn: str, owners: Callable[[], Mapping[str, str]]) -> str | None:
    """The endpoint a resource URN belongs to, or None (the stack itself, the provider)."""
    head, _, name = urn.rpartition("::")
    chain = head.rpartition("::")[2]
    if chain == COMPONENT_TYPE:
        return name
    if chain.startswith(COMPONENT_TYPE + "$"):
        return endpoint_of_object(name, owners())
    return None


def hpa_handbacks(plan: Plan, items: list[dict[str, Any]], settings: StackSettings,
                  outputs: Mapping[str, Any] | None) -> list[str]:
    """Touched endpoints whose HPA this update removes while their Deployment stays running (pure)."""
    old = (outputs or {}).get("endpoints") or {}
    candidates = [n for n in plan.touched if m.HPA in (((old.get(n) or {}).get("objects")) or {})]
    if not candidates:
        return []
    subset = [i for i in items if isinstance(i, Mapping) and i.get("endpoint_name") in candidates]
    # what the region declares: under a rollout policy, the revision it may run
    valid = as_declared(validate_all(subset, allowed_namespaces=settings.allowed_namespaces), settings, subset,
                        lambda: previous_records_from_outputs(outputs or {}))
    out = []
    for name in candidates:
        ep = valid.endpoints.get(name)
        objects = m.desired_objects(ep, settings.region, settings.cluster) if ep else {}
        if m.DEPLOYMENT in objects and m.HPA not in objects and (objects[m.DEPLOYMENT]["spec"].get("replicas") or 0) > 0:
            out.append(name)
    return out


def _desired_replicas(ep: Endpoint) -> int:
    if ep.desired_state == "stopped":
        return 0
    # the primary's, as the health job counts it (the canary's are canary_desired there)
    return ep.spec.autoscaling.min_replicas if ep.spec.autoscaling.enabled else ep.spec.replicas


def status_writable(item: Mapping[str, Any], region: str) -> bool:
    """Whether region_status.<region> can be written: absent, or an entry both writers can read back
    (endpoint.status_entry_problem); anything else is reported and left for a person to look at,
    as the health job does, so neither writer carries a bad field along."""
    statuses = item.get("region_status")
    if statuses is None:
        return True
    if not isinstance(statuses, Mapping):
        return False
    return statuses.get(region) is None or status_entry_problem(statuses.get(region)) is None


def targeted_regions(item: Mapping[str, Any] | None) -> set[str]:
    """The regions an item names in target_regions, read leniently (an invalid record's too)."""
    raw = item.get("target_regions") if isinstance(item, Mapping) else None
    if isinstance(raw, (list, tuple, set, frozenset)):
        return {r for r in raw if isinstance(r, str)}
    return set()


def status_updates(plan: Plan, result: StackResult, validated: Validated, items: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Endpoint -> new region status for this stack's region, only where it differs (pure).

    A record whose stored region status is malformed gets no write (it is reported instead): the
    conditional write needs the stored value, and another writer's data is never overwritten.
    """
    region = plan.region
    now = utcnow()
    updates: dict[str, dict[str, Any]] = {}
    succeeded = result.action in ("full", "targeted", "none")
    touched = set(plan.touched)  # a full reconcile that changed nothing leaves statuses alone
    general_failure = result.action == "failed" and (not result.endpoint_errors or GENERAL in result.endpoint_errors)

    def put(name: str, state: str, error: str | None, desired: int | None) -> None:
        item = items.get(name)
        if item is None or not status_writable(item, region):
            return
        stored = stored_region_status(item, region) or {}
        new = dict(stored)
        new["state"] = state
        if desired is not None:
            new["replicas_desired"] = desired
        new.setdefault("replicas_ready", 0)
        if error:
            new["error"] = error[:1000]
        else:
            new.pop("error", None)
        if plan.notes.get(name):
            new["note"] = plan.notes[name][:1000]
        elif state != "error":
            new.pop("note", None)
        keys = ("state", "error", "replicas_desired", "note")
        if {k: new.get(k) for k in keys} == {k: stored.get(k) for k in keys}:
            return
        new["last_sync"] = now
        updates[name] = new

    for name, errors in plan.invalid.items():
        # only where the record asks to run, or where this stack still holds its last declaration
        if region in targeted_regions(items.get(name)) or name in plan.kept:
            put(name, "error", "; ".join(errors), None)
    if general_failure:
        # Nothing is known to have worked (the program, credentials, the backend): no success anywhere.
        message = result.message or result.endpoint_errors.get(GENERAL) or "the update failed"
        for name in touched:
            if name in validated.endpoints:
                put(name, "error", message, None)
        return updates
    if plan.refused:
        for name in plan.removed:
            put(name, "error", plan.refused, None)
        return updates
    for name, error in result.endpoint_errors.items():
        if name in validated.endpoints:
            put(name, "error", error, None)
    if not succeeded and result.action != "failed":
        return updates
    for name, ep in validated.endpoints.items():
        if name in result.endpoint_errors:
            continue
        stored_state = (stored_region_status(items.get(name) or {}, region) or {}).get("state")
        if name in plan.desired:
            if name not in touched and stored_state not in (None, "pending", "error", "deleting", "deleted"):
                continue
            if ep.desired_state == "stopped":
                state = "stopped"
            elif name in plan.created or stored_state in (None, "pending", "deleted", "deleting"):
                state = "creating"
            else:
                state = "updating" if name in touched else stored_state or "creating"
            if stored_state == "error" and name not in touched:
                state = "updating"
            put(name, state, None, _desired_replicas(ep))
        elif (name in plan.removed and result.action != "failed") or (
                stored_state not in (None, "deleted") and (ep.desired_state == "deleted" or not ep.targets(region))):
            put(name, "deleted", None, 0)
    return updates


def held_endpoints(deployment: Mapping[str, Any]) -> set[str]:
    """The endpoints whose component a checkpoint (``export_stack().deployment``) holds."""
    out = set()
    for res in deployment.get("resources") or []:
        if isinstance(res, Mapping) and res.get("type") == COMPONENT_TYPE:
            out.add(str(res.get("urn", "")).rpartition("::")[2])
    return out


def reconcile_outputs(outputs: Mapping[str, Any], held: set[str]) -> dict[str, Any]:
    """Outputs whose ``endpoints`` are exactly the endpoints the checkpoint holds (pure).

    An endpoint moved out is dropped; one moved in is added with an unknown fingerprint, so it is
    counted where it is (misplacement, deletion bound) and re-applied by the next update.
    """
    result = dict(outputs)
    endpoints = outputs.get("endpoints")
    if not isinstance(endpoints, Mapping):
        if not held:
            return result
        endpoints = {}  # never updated, yet holds endpoints (`pulumi stack init` then `state move`)
    kept = {n: o for n, o in endpoints.items() if n in held}
    for name in sorted(held - set(kept)):
        kept[name] = {"fingerprint": "", "objects": {}, "state": "unknown"}
    result["endpoints"] = dict(sorted(kept.items()))
    return result


def misplaced_endpoints(states: Iterable[Any]) -> dict[str, str]:
    """Region stack -> why it cannot run: endpoints applied in a stack they do not belong to.

    That happens when gco:shards changes, or when a region stack was sharded while it still held
    endpoints. Applying anyway would create objects another stack owns (and later delete them), so
    the region is refused until the endpoints are moved (``pulumi state move``) or gco:shards restored.
    """
    problems: dict[str, list[str]] = {}
    for state in states:
        s = state.settings
        endpoints = ((state.outputs or {}).get("endpoints") or {}) if state.outputs_loaded else {}
        wrong = sorted(n for n in endpoints if not s.owns(n))
        if not wrong:
            continue
        names = ", ".join(wrong[:5]) + (", ..." if len(wrong) > 5 else "")
        holds = (f"is not part of region {s.region_stack} at gco:shards={s.shards} but holds {len(wrong)} endpoint(s)"
                 if s.shard == -1 else f"holds {len(wrong)} endpoint(s) of other shards")
        problems.setdefault(s.region_stack, []).append(f"stack {s.stack} {holds} ({names})")
    return {base: "; ".join(p) + f". Move them into the stacks that own them now (`pulumi state move`), or restore "
                                 f"the previous gco:shards of {base}; until then {base} is not applied"
            for base, p in problems.items()}


def stale_stacks(region: StackSettings, existing: Iterable[str]) -> list[str]:
    """Stacks of the region that gco:shards does not use: the unsharded region stack when sharded,
    and shard stacks beyond gco:shards (or any, when not sharded)."""
    used = {s.stack for s in shard_settings(region)}
    prefix = f"{region.stack}.shard-"
    out = [name for name in existing if name.startswith(prefix) and name[len(prefix):].isdigit() and name not in used]
    if region.shards > 1:
        out.append(region.stack)
    return sorted(out)


def exit_code(results: list[StackResult]) -> int:
    actions = {r.action for r in results}
    if "failed" in actions or any(r.failed for r in results):
        return EXIT_FAILED
    if "refused" in actions:
        return EXIT_REFUSED
    if "skipped" in actions:
        return EXIT_LOCKED
    return EXIT_OK
