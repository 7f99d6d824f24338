"""The Automation API runner: applies regional stacks on a schedule, only where something changed.

Each tick reads the table once (fail closed), plans every stack by comparing each endpoint's
desired fingerprint with what the stack last applied (its outputs), and then per stack does
nothing, a targeted ``up`` of the changed endpoints, or a full ``up --refresh``. Status is
written back only where it changed, with conditional writes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import traceback
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Mapping

from . import state as state_backend
from .drift import recorded_objects
from .endpoint import Validated, region_status_problem, stored_region_status, validate_all
from .program import ProgramError, StackSettings, as_declared, owned, previous_records_from_outputs, shard_settings
from .store import EndpointStore, StoreError, TableCache
from .plan import (EXIT_CONFIG, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED, EXIT_STORE, GENERAL, PROJECT, Plan,
                   RunnerOptions, StackResult, bound_sharded_regions, desired_for_region, endpoint_of_urn, exit_code,
                   held_endpoints, hpa_handbacks, misplaced_endpoints, object_owners, plan_stack, reconcile_outputs,
                   stale_stacks, status_updates, targets_for, trusted_checkpoint)

_STACKS: dict[tuple[str, str, str], Any] = {}
"""Automation API stacks of this process, by name (workers are long-lived)."""


# ---- the Pulumi operation (runs in a worker process) ----------------------------------------------


# Lock recovery and checkpoint tokens work on file:// and s3:// backends (state.py); the old names stay.
lock_holder = state_backend.lock_holder
_recover_file_backend = state_backend.recover_dead_locks


def _clear_pending(stack_obj: Any, stack: str, log: Callable[[str], None], env: Mapping[str, str]) -> bool:
    """Drop pending operations left by a killed update; the following refresh finds the truth."""
    from pulumi.automation import Deployment

    if state_backend.pending_operations(stack, env) == 0:
        return False
    dep = stack_obj.export_stack()
    pending = (dep.deployment or {}).get("pending_operations") or []
    if not pending:
        return False
    log(f"{stack}: clearing {len(pending)} pending operation(s) left by an interrupted update")
    dep.deployment["pending_operations"] = []
    stack_obj.import_stack(Deployment(version=dep.version, deployment=dep.deployment))
    return True


def quiet_sdk_debug() -> None:
    """Drop the Python SDK's debug messages in this process.

    The SDK sends about five per resource ("registering resource ...", "resource registration
    successful ..."), each a blocking RPC to the engine, which turns it into an event of the event log
    that the Automation API parses back here: 2,822 events for a 100-endpoint apply, against 800 for
    the resources themselves. The runner and the preview never show the debug channel (`pulumi up
    --debug` from a checkout does, and is unaffected: this runs only in their processes)."""
    import pulumi.log

    pulumi.log.debug = _no_debug


def _no_debug(*_args: Any, **_kwargs: Any) -> None:
    return None


@contextmanager
def answered_by_the_operation(stack_obj: Any, captured: dict[str, Any]) -> Iterator[None]:
    """Within it, ``stack_obj.up()`` does not read the state back.

    After the update, Stack.up() runs `pulumi stack output --show-secrets` and `pulumi stack history`:
    three more CLI processes that each load and decrypt the whole state (about 0.8 s and 0.7 CPU-s
    per operation, a quarter of a one-endpoint update). After a successful update the stack's outputs
    are what the program exported (``captured["outputs"]``, kept by the inline program) and the
    change counts come from the summary event, so those answer instead. A program that did not
    finish fails the update before either is asked; should it be asked anyway, the state answers."""
    from pulumi import automation as auto

    def outputs() -> dict[str, Any]:
        if "outputs" not in captured:
            return type(stack_obj).outputs(stack_obj)
        return {k: auto.OutputValue(value=v, secret=False) for k, v in captured["outputs"].items()}

    def info(show_secrets: bool = True) -> Any:  # noqa: ARG001 - Stack.info's signature
        return auto.UpdateSummary(kind="update", start_time=datetime.now(timezone.utc), message="", environment={},
                                  config={}, result="succeeded")

    stack_obj.outputs, stack_obj.info = outputs, info
    try:
        yield
    finally:
        del stack_obj.outputs, stack_obj.info


def operate(settings: StackSettings, items: list[dict[str, Any]], plan: Plan, outputs: Mapping[str, Any] | None,
            env: Mapping[str, str], opts: RunnerOptions, targets: list[str] | None) -> StackResult:
    """Run one Pulumi operation for one stack; never raises (errors are in the result)."""
    from pulumi import automation as auto

    from . import program

    result = StackResult(stack=plan.stack, region=plan.region, action="full" if plan.full else "targeted")
    started = time.monotonic()
    quiet_sdk_debug()
    captured: dict[str, Any] = {}
    state_backend.clear_engine_tmp()  # the previous operation's provider kubeconfig copies
    messages: list[str] = []
    diags: dict[str, list[str]] = {}

    def log(msg: str) -> None:
        messages.append(msg)

    known: dict[str, str] = {}
    validated: list[Validated] = []

    def valid() -> Validated:  # validated once, when first needed (targets, owners of failed objects)
        if not validated:
            validated.append(owned(validate_all(items, allowed_namespaces=settings.allowed_namespaces), settings))
        return validated[0]

    def owners() -> Mapping[str, str]:  # built on the first failure only
        if not known:
            known.update(object_owners(valid(), settings, outputs))
        return known

    def on_event(event: Any) -> None:
        summary = getattr(event, "summary_event", None)
        if summary is not None:
            captured["changes"] = dict(summary.resource_changes or {})
        d = getattr(event, "diagnostic_event", None)
        if d is not None and d.severity == "error":
            endpoint = endpoint_of_urn(d.urn, owners) if d.urn else None
            text = d.message.strip()
            if endpoint is None and _GENERIC_DIAG.match(text):
                return  # the engine's summary of the errors below ("update failed"), not one of them
            # An error that belongs to no endpoint (the program, the backend, credentials) fails them all.
            diags.setdefault(endpoint or GENERAL, []).append(text)
        f = getattr(event, "res_op_failed_event", None)
        if f is not None and f.metadata and f.metadata.urn:
            diags.setdefault(endpoint_of_urn(f.metadata.urn, owners) or GENERAL, [])

    previous = previous_records_from_outputs(outputs or {})
    full = plan.full

    only = None if full else set(plan.targeted)
    previous_endpoints = (outputs or {}).get("endpoints") or {}

    def declaring(names: set[str] | None, applied: Mapping[str, Any]) -> Callable[[], Awaitable[None]]:
        """The inline program, declaring ``names`` (None: every endpoint) over the stack's ``applied``
        endpoint outputs; it keeps what it exported for answered_by_the_operation."""
        def run() -> Awaitable[None]:
            declared = program.main(items=items, previous=lambda: previous, settings=settings, only=names,
                                    previous_endpoints=applied)
            captured["outputs"] = json.loads(json.dumps(declared.exported))  # as the state will return them
            return program.outputs_settled()
        return run

    def changes(summary: Any) -> Mapping[str, int]:
        """The change counts of the update that just ended: its summary event, or, should that not have
        reached us (the CLI only logs it), the stack's history."""
        counts = captured.pop("changes", None)
        if counts is None:
            counts = (type(stack).info(stack, False) or summary).resource_changes or {}
        return counts

    pulumi_program = declaring(only, previous_endpoints)

    try:
        os.environ.update(env)
        unlocked, _ = state_backend.recover_dead_locks(plan.stack, env, log)
        key = (plan.stack, env.get("PULUMI_BACKEND_URL", ""), env.get("PULUMI_HOME", ""))
        stack = _STACKS.get(key)
        if stack is None:
            # A private copy of the project (never the repository's stacks/), and the declared
            # secrets provider for a stack that does not exist yet (state.py).
            ws_opts = state_backend.workspace_options(plan.stack, env)
            try:
                stack = auto.create_or_select_stack(stack_name=plan.stack, project_name=PROJECT,
                                                    program=pulumi_program, opts=ws_opts)
            except auto.StackAlreadyExistsError:  # another runner created it between our select and our init
                stack = auto.select_stack(stack_name=plan.stack, project_name=PROJECT, program=pulumi_program,
                                          opts=ws_opts)
            _STACKS[key] = stack
        # Pending operations only exist after an interrupted update; full reconciles (the first
        # tick of a runner, and the tick after any failure) clear them.
        cleared = full and _clear_pending(stack, plan.stack, log, env)
        kwargs: dict[str, Any] = dict(on_event=on_event, parallel=opts.pulumi_parallel, continue_on_error=True,
                                      suppress_progress=True, suppress_outputs=True, color="never")
        kwargs["program"] = pulumi_program
        up: Any = None
        if full and plan.refresh_first and (unlocked or cleared):
            log("an interrupted update left a lock or pending operations: declaring every endpoint again")
        if full and plan.refresh_first and not (unlocked or cleared):
            # An interrupted update (a dead lock, pending operations) may have left what its state does
            # not record: then every endpoint is declared, below.
            with answered_by_the_operation(stack, captured):
                found = refresh_all(stack, declaring(set(), previous_endpoints), on_event, opts, owners)
            captured.pop("changes", None)
            result.operations += 1
            if found:
                shown = ", ".join(f"{name} ({'; '.join(what)})" for name, what in sorted(found.items())[:5])
                log(f"the refresh found objects of {len(found)} endpoint(s) changed or deleted by someone else: "
                    f"{shown}{', ...' if len(found) > 5 else ''}; declaring them again")
            work = replace(plan, full=False, refresh_first=False,
                           drifted=sorted((set(plan.drifted) | set(found)) - set(plan.touched)))
            if not work.targeted:  # nothing to update: the outputs stand as the program exported them
                result.outputs = captured.pop("outputs", None) or dict(outputs or {})
            else:
                kwargs["program"] = declaring(set(work.targeted), previous_endpoints)
                captured.pop("outputs", None)
                with answered_by_the_operation(stack, captured):
                    # no refresh: the one above has just read every object
                    up = stack.up(target=targets_for(work, valid(), settings, outputs), **kwargs)
        else:
            with answered_by_the_operation(stack, captured):
                if full:  # a lock or pending operations just cleared: the state may not say what that update did
                    up = stack.up(refresh=bool(not plan.judged or unlocked or cleared), **kwargs)
                else:
                    # Refreshing just the targets sees what the health job or a person removed out of band.
                    up = stack.up(target=targets, refresh=True, **kwargs)
        if up is not None:
            result.operations += 1
            counts = changes(up.summary)
            result.created, result.updated, result.deleted = counts.get("create", 0), counts.get("update", 0) + counts.get("replace", 0), counts.get("delete", 0)
            result.outputs = {k: v.value for k, v in up.outputs.items()}
        handbacks = hpa_handbacks(plan, items, settings, outputs)
        if handbacks:
            # The HPA was deleted at the end of that update (deletes come last), so it may have
            # scaled the Deployment once more after we set its count: refresh those Deployments now
            # that no HPA is left, and the declared count wins (patchForce) in this same tick.
            back = replace(plan, created=[], changed=handbacks, removed=[], full=False)
            after = result.outputs or {}
            kwargs["program"] = declaring(set(handbacks), after.get("endpoints") or {})
            captured.pop("outputs", None)
            with answered_by_the_operation(stack, captured):
                again = stack.up(target=targets_for(back, valid(), settings, after), refresh=True, **kwargs)
            result.operations += 1
            result.updated += changes(again.summary).get("update", 0)
            result.outputs = {k: v.value for k, v in again.outputs.items()}
    except auto.ConcurrentUpdateError:
        result.action, result.message = "skipped", "stack is locked by another update; skipped this tick"
    except auto.CommandError as exc:
        if _LOCK_RACE.search(str(exc)):
            # The engine lists the stack's locks, then reads each: another process's lock that went
            # away in between fails the command (pulumi v3.274.1); it is contention, not a failure.
            result.action, result.message = "skipped", "stack is locked by another update; skipped this tick"
            return _finish(result, messages, started)
        result.operations += 1
        result.action = "failed"
        text = str(exc)
        result.message = _engine_message(text)
        try:
            result.outputs = {k: v.value for k, v in stack.outputs().items()}  # type: ignore[possibly-undefined]
        except Exception:  # noqa: BLE001 - outputs are best effort after a failure
            result.outputs = None
    except Exception as exc:  # noqa: BLE001 - a worker reports, it does not crash the runner
        result.action, result.message = "failed", f"{type(exc).__name__}: {exc}"
        result.endpoint_errors[GENERAL] = traceback.format_exc(limit=3)
    for name, texts in diags.items():
        result.endpoint_errors[name] = "; ".join(dict.fromkeys(t for t in texts if t)) or "the engine reported a failure"
    if result.action == "failed" and GENERAL in result.endpoint_errors and diags.get(GENERAL):
        result.message = "; ".join(dict.fromkeys(diags[GENERAL]))[:1000]
    result.failed = len(result.endpoint_errors)
    return _finish(result, messages, started)


def refresh_all(stack: Any, program: Callable[[], None], on_event: Callable[[Any], None], opts: RunnerOptions,
                owners: Callable[[], Mapping[str, str]]) -> dict[str, list[str]]:
    """Refresh every object of the stack; returns endpoint -> its objects the refresh found changed or
    deleted by someone else.

    The program runs (PULUMI_RUN_PROGRAM) only so that the refresh uses the provider it declares now,
    with this process's credentials: it declares no endpoint and exports the outputs as they are. The
    refresh keeps, of each object, the fields the stack declared, so a field another writer added
    (a label, an annotation, the status) reads as unchanged, and one of ours that it changed as an
    update; an object gone reads as a deletion."""
    found: dict[str, list[str]] = {}

    def seen(event: Any) -> None:
        on_event(event)
        meta = getattr(getattr(event, "res_outputs_event", None), "metadata", None)
        if meta is None:
            return
        op = str(getattr(meta.op, "value", meta.op))
        if op in ("same", "refresh", "read"):
            return
        name = endpoint_of_urn(meta.urn, owners)
        if name is not None:
            found.setdefault(name, []).append(f"{meta.urn.rpartition('::')[2]} {'deleted' if op == 'delete' else 'changed'}")

    stack.refresh(program=program, run_program=True, on_event=seen, parallel=opts.pulumi_parallel,
                  suppress_progress=True, suppress_outputs=True, color="never")
    return found


def _finish(result: StackResult, messages: list[str], started: float) -> StackResult:
    if messages:
        result.message = "; ".join(messages + ([result.message] if result.message else []))
    result.seconds = time.monotonic() - started
    return result


_LOCK_RACE = re.compile(r'key "[^"]*\.pulumi/locks/[^"]*"\) \(code=NotFound\)')
_GENERIC_DIAG = re.compile(r"^(error: )?(\d+ errors? occurred|update failed|preview failed|an error occurred)\b.{0,20}$",
                          re.I | re.S)
_GENERIC_ERROR = re.compile(r"error: (\d+ errors? occurred|update failed|preview failed)\s*:?\s*$")


def _engine_message(text: str) -> str:
    """The engine's specific error lines (not "2 errors occurred"), or its last line."""
    lines = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    specific = [ln for ln in lines if not _GENERIC_ERROR.search(ln)]
    chosen = "; ".join(dict.fromkeys(specific)) if specific else (lines[-1] if lines else "")
    if not chosen:
        chosen = text.strip().splitlines()[-1] if text.strip() else "pulumi failed"
    return chosen[:1000]


# ---- status write-back ---------------------------------------------------------------------------------


def write_statuses(store: EndpointStore, region: str, updates: Mapping[str, Mapping[str, Any]],
                   items: dict[str, Mapping[str, Any]]) -> int:
    """Conditional writes of the statuses; ``items`` (the table as read) then holds what was written,
    so a later write of the same tick expects the value the table now has."""
    writes = 0
    for name, status in updates.items():
        item = items.get(name) or {}
        stored = stored_region_status(item, region)
        if store.write_region_status(name, region, status, expected=stored,
                                     map_exists=isinstance(item.get("region_status"), Mapping)):
            writes += 1
            statuses = item.get("region_status")
            items[name] = {**item, "region_status": {**(statuses if isinstance(statuses, Mapping) else {}),
                                                     region: dict(status)}}
    return writes


# ---- the runner ------------------------------------------------------------------------------------------


@dataclass
class StackState:
    settings: StackSettings
    outputs: dict[str, Any] | None = None
    outputs_loaded: bool = False
    last_full: float = 0.0
    """When the last full reconcile started (0: the next tick runs one: a runner's first, after a failure)."""
    full_done: bool = False
    """Whether the stack has had its full reconcile since the runner started (or since --full, or a dead
    lock was removed); a failure does not undo it (last_full says when the next one is due)."""
    next_sweep: float = 0.0
    checked: float = 0.0
    """When its locks and checkpoint were last checked (opts.check_every)."""
    sweep_cursor: str = ""
    """The last endpoint the periodic sweep refreshed (it goes on after it, in name order)."""
    checkpoint: Any = None
    """_checkpoint_token when the outputs were last read or written by this runner."""
    forced: bool = False
    """A full reconcile was asked for (--full, tick(force_full=True)) and has not run yet."""
    failed: bool = False
    """The stack's last operation failed, or a dead update's lock was removed: its next full
    reconcile declares every endpoint."""
    recorded: dict[Any, Any] | None = None
    """drift.recorded_objects of the checkpoint as last read (a runner's start judges drift from it)."""
    pending: int = 0
    """Pending operations in the checkpoint as last read."""
    history_read: bool = False
    """Whether its start has read the stack's last history entry (plan.trusted_checkpoint)."""


class Runner:
    def __init__(self, stacks: list[StackSettings], store: EndpointStore, env: Mapping[str, str],
                 opts: RunnerOptions = RunnerOptions(), progress: Callable[[str], None] = lambda s: None) -> None:
        self.states: dict[str, StackState] = {}
        self.regions = {region.stack: region for region in stacks}
        self.guards: dict[str, StackState] = {}
        """Stacks of a region that gco:shards does not use (see stale_stacks): never operated, and
        they must hold no endpoint. Found on the first tick and whenever a region is blocked."""
        self._guards_found = False
        for region in stacks:
            for s in shard_settings(region):
                self.states[s.stack] = StackState(settings=s)
        self.store = store
        self.env = dict(env)
        if not opts.checkpoints:
            self.env["PULUMI_SKIP_CHECKPOINTS"] = "true"
        else:
            self.env.pop("PULUMI_SKIP_CHECKPOINTS", None)
        self.opts = opts
        self.progress = progress
        self.operations = 0
        self._pool: ProcessPoolExecutor | None = None
        self._cache: TableCache | None = None
        self._memo: dict[Any, Any] = {}
        """Validation and fingerprints of the current table generation (reused while nothing is written)."""
        self._inflight: dict[str, Operation] = {}
        """Operations running in the workers, by stack (with opts.overlap, across ticks)."""
        self._unreported: list[StackResult] = []
        """Results not yet returned by a tick (kept when a tick raises)."""
        self._waiting: dict[str, float] = {}
        """Stack -> since when it has had an operation to run that has not started (oldest first)."""
        self._last_change: float | None = None
        """time.monotonic() of the last tick that planned a change or a drift repair."""
        self._wakeup = threading.Event()
        self.drift: dict[str, Any] = {}
        """Drift watches by region name (drift.DriftWatch): endpoints whose objects someone else changed."""
        self._drifted: dict[str, dict[str, Any]] = {}
        """Region -> endpoint -> Drift, taken from the watches and not yet repaired."""
        self._repairs: dict[tuple[str, str], list[float]] = {}
        self._fighting: set[tuple[str, str]] = set()
        """Endpoints the watch has stopped repairing (REPAIR_LIMIT reached), reported once."""
        """(region, endpoint) -> when drift repairs of it were started (REPAIR_LIMIT per REPAIR_WINDOW)."""
        self._removals: list[tuple[float, str, str, int]] = []
        """(when, stack, region stack, endpoints) removed by this runner, for opts.deletion_window."""
        self._orphan_check: dict[str, bool] = {}
        """Region -> look for objects no stack holds (after a full reconcile there)."""
        self.full_every_for: dict[str, float] = {}
        """Region -> its own full_every (a region without a drift watch sweeps more often)."""
        self._watch_started = 0.0
        """When watch_drift started the watches (a start waits WATCH_LIST_WAIT for their first lists)."""
        self._stacks_listed: set[str] | None = None
        """_existing_stacks of this tick."""

    def close(self) -> None:
        for watch in self.drift.values():
            watch.stop()
        self.drift = {}
        for op in self._inflight.values():
            op.future.cancel()
        self._inflight = {}
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def load_outputs(self, state: StackState, start: bool = False) -> None:
        """The stack's outputs, read when first needed and again whenever the stack changed under us
        (see _changed_elsewhere); between those, ticks use what the runner's own operations returned.

        The ``endpoints`` output is reconciled with the resources the checkpoint holds: after a
        ``pulumi state move`` the outputs still name the endpoints that left and not those that
        arrived, and decisions (misplacement, the deletion bound) must see where they really are.
        ``start``: a tick reads it for the stack's start, which may judge drift against the checkpoint
        only if its last operation left it trustworthy (the stack's history is read once for that).
        """
        if state.outputs_loaded:
            return
        from pulumi import automation as auto

        ws = self._workspace()
        last: Exception | None = None
        for attempt in range(4):  # a checkpoint being rewritten by another update reads as EOF
            try:
                state.checkpoint = self._checkpoint_token(state.settings.stack)
                if state.settings.stack in self._existing_stacks(ws, fresh=attempt > 0):
                    deployment = ws.export_stack(state.settings.stack).deployment or {}
                    outputs = state_backend.stack_outputs_of(deployment)
                    if outputs is None:  # not readable from the checkpoint: ask the CLI
                        outputs = {k: v.value for k, v in ws.stack_outputs(state.settings.stack).items()}
                    state.outputs = reconcile_outputs(outputs, held_endpoints(deployment))
                    state.recorded = recorded_objects(deployment.get("resources") or [])
                    state.pending = len(deployment.get("pending_operations") or [])
                    if start and not state.history_read and not state.last_full and not state.failed:
                        state.history_read = True
                        entry = state_backend.last_operation(state.settings.stack, self.env)
                        if not trusted_checkpoint(entry):
                            state.failed = True
                            what = f"{entry.get('kind')} {entry.get('result')}" if entry else "unknown"
                            self.progress(f"{state.settings.stack}: its last operation ({what}) may have left the "
                                          "checkpoint holding what nobody declared: its full reconcile declares "
                                          "every endpoint again")
                    mismatch = state_backend.secrets_mismatch(state.settings.stack, deployment, self.env)
                    if mismatch:
                        self.progress(mismatch)
                state.outputs_loaded = True
                return
            except auto.CommandError as exc:
                last = exc
                time.sleep(0.5 * (attempt + 1))
        raise ProgramError(f"reading outputs of stack {state.settings.stack} failed: {_engine_message(str(last))}")

    def _load_all(self, states: list[StackState]) -> list[ProgramError | None]:
        """load_outputs of each stack, several at once (each read is a CLI process that loads and
        decrypts a checkpoint: on a runner's start, one per shard); the error of each, or None."""
        pending = [st for st in states if not st.outputs_loaded]

        def load(state: StackState) -> ProgramError | None:
            try:
                self.load_outputs(state, start=True)
            except ProgramError as exc:
                return exc
            return None

        if len(pending) > 1:
            from pulumi import automation as auto

            try:
                self._existing_stacks(self._workspace())  # listed once, before the readers start
            except auto.CommandError:
                pass  # each reader lists again, with its retries, and reports its own failure
            with ThreadPoolExecutor(max_workers=min(len(pending), max(2, self.opts.parallel))) as readers:
                errors = dict(zip(map(id, pending), readers.map(load, pending)))
            return [errors.get(id(st)) for st in states]
        return [load(st) for st in states]

    def _existing_stacks(self, ws: Any, fresh: bool = False) -> set[str]:
        """The backend's stack names, listed once per tick (a CLI process), not once per stack."""
        if fresh or self._stacks_listed is None:
            self._stacks_listed = {s.name for s in ws.list_stacks()}
        return self._stacks_listed

    def _checkpoint_token(self, stack: str) -> Any:
        """Changes whenever anyone writes the stack's checkpoint (file: a stat; s3: one LIST; no read)."""
        return state_backend.checkpoint_token(stack, self.env)

    def _changed_elsewhere(self, state: StackState) -> bool:
        """Whether someone else (a person's `pulumi up`, another runner, `pulumi state move`) wrote
        the stack since the runner last read or wrote it. Checked every tick on file and s3 backends."""
        if not state.outputs_loaded or state.checkpoint is None:
            return False
        return self._checkpoint_token(state.settings.stack) != state.checkpoint

    def _workspace(self) -> Any:
        return state_backend.workspace(self.env)

    def _find_guards(self) -> None:
        from pulumi import automation as auto

        try:
            existing = {s.name for s in self._workspace().list_stacks()}
        except auto.CommandError as exc:
            raise ProgramError(f"listing stacks failed: {_engine_message(str(exc))}") from exc
        guards: dict[str, StackState] = {}
        for region in self.regions.values():
            for name in stale_stacks(region, existing):
                old = self.guards.get(name)
                guards[name] = old if old is not None else StackState(settings=replace(region, stack=name, shard=-1))
        self.guards = guards
        self._guards_found = True

    def _locked_by_other(self, state: StackState) -> str | None:
        """Why the stack is locked by another live update (file and s3 backends; skip before reading a
        checkpoint that is being rewritten), or None. A lock whose process died on this host (or in
        a runner pod that is gone) is removed at once, so a killed runner costs no tick."""
        removed, remaining = state_backend.recover_dead_locks(state.settings.stack, self.env, self.progress)
        if removed:
            state.last_full = 0.0  # its pending operations are cleared by a full reconcile
            state.full_done = False
            state.failed = True  # that declares every endpoint: the dead update's state may not say what it did
            state.outputs_loaded = False
        for lock, holder, who in remaining:
            if holder == "unknown":
                return (f"stack is locked by an update of {who} (another host; its lock is never removed from "
                        f"here: if that update is dead, delete {lock})")
            return f"stack is locked by another update ({who}); skipped this tick"
        return None

    def read_table(self) -> tuple[list[dict[str, Any]], Any]:
        """Every item (complete, or StoreError) and a token that changes when the items may have."""
        if not self.opts.table_stream:
            return self.store.list_endpoints(), object()
        if self._cache is None or self._cache.store is not self.store:
            self._cache = TableCache(self.store, rescan_every=self.opts.rescan_every)
        items = self._cache.read()
        return items, (id(self._cache), self._cache.generation)

    @property
    def last_read(self) -> str:
        return self._cache.last_read if self._cache and self.opts.table_stream else "scan"

    def _memoized(self, generation: Any, key: Any, compute: Callable[[], Any]) -> Any:
        if self._memo.get("generation") != generation:
            self._memo = {"generation": generation}
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def check_regions(self) -> tuple[dict[str, str], dict[str, str]]:
        """Regions that must not be applied now: (misplaced endpoints, outputs not known), by region stack."""
        if not self._guards_found:
            self._find_guards()
        # A region whose stacks' outputs are not all known cannot be checked for misplaced endpoints.
        unknown: dict[str, str] = {}
        for guard in self.guards.values():
            locked = self._locked_by_other(guard)
            if locked:
                unknown.setdefault(guard.settings.region_stack, f"stack {guard.settings.stack}: {locked}")
                continue
            if self._changed_elsewhere(guard):
                guard.outputs_loaded = False
            try:
                self.load_outputs(guard)
            except ProgramError as exc:
                unknown.setdefault(guard.settings.region_stack, str(exc))
        guarded = {g.settings.region_stack for g in self.guards.values()}
        for state in self.states.values():
            if (state.settings.shard is not None or state.settings.region_stack in guarded) and not state.outputs_loaded:
                unknown.setdefault(state.settings.region_stack,
                                   f"the outputs of stack {state.settings.stack} are not known yet")
        misplaced = misplaced_endpoints([*self.guards.values(), *self.states.values()])
        if misplaced or unknown:
            self._guards_found = False  # look again next tick: stacks may have been moved or removed
            for state in [*self.guards.values(), *self.states.values()]:
                if state.settings.region_stack in misplaced:
                    state.outputs_loaded = False
        return misplaced, unknown

    def tick(self, *, force_full: bool = False) -> list[StackResult]:
        """One pass over all stacks. StoreError propagates before any Pulumi operation.

        With ``opts.overlap`` the tick returns without waiting for the operations it started: their
        results come with the first tick after they end, and their stacks are left out until then.
        An operation starts only when a worker is free for it, from what this tick read (a stack
        that must wait is planned again, from a fresh read, by a later tick); changes and drift
        repairs go first, and full reconciles and sweeps never take the last free worker (but during a
        runner's start while no change arrives; see _may_start). ``force_full``: every stack gets a full reconcile, in this tick
        or, when no worker is free for it, in the next ones.
        """
        if force_full:
            for state in self.states.values():
                state.last_full, state.full_done, state.forced = 0.0, False, True
        self._stacks_listed = None
        items, generation = self.read_table()
        by_name = {i.get("endpoint_name"): i for i in items if isinstance(i, Mapping)}
        self._unreported += self._harvest(block=False, by_name=by_name)
        self._report_orphans()
        drifted = self._take_drift()
        reread = {n for region, names in drifted.items() for n in names
                  if not any(op.plan.region == region and op.state.settings.owns(n) for op in self._inflight.values())}
        if reread:
            # The watch saw an object change: read those records again with consistent reads, so a
            # repair never acts on a stream that lags behind the health job's withdrawal of an Ingress.
            items, generation = self._reread(items, reread)
            by_name = {i.get("endpoint_name"): i for i in items if isinstance(i, Mapping)}
        if "status problems" not in self._memo or self._memo.get("generation") != generation:
            # reported once per table generation: the record's status is left alone, nothing else is affected
            for problem in self._memoized(generation, "status problems",
                                          lambda: [p for i in items if (p := region_status_problem(i))]):
                self.progress(f"{problem} (reported; every other record and field goes on)")
        now = time.monotonic()
        results: list[StackResult] = []
        ready: list[StackState] = []
        to_load: list[StackState] = []
        for state in self.states.values():
            if state.settings.stack in self._inflight:
                continue
            if self._quiet_stack(state, items, generation, drifted, now, force_full):
                ready.append(state)  # planned below from what is known: it has nothing to do
                continue
            state.checked = now
            locked = self._locked_by_other(state)
            if locked:
                results.append(StackResult(stack=state.settings.stack, region=state.settings.region, action="skipped",
                                           message=locked))
                continue
            if self._changed_elsewhere(state):
                self.progress(f"{state.settings.stack}: changed by another update since the last read; reading it again")
                state.outputs_loaded = False
                if not state.last_full:  # before its start's reconcile: whether that update left it trustworthy
                    state.history_read = False
            to_load.append(state)
        for state, error in zip(to_load, self._load_all(to_load)):
            if error is not None:
                results.append(StackResult(stack=state.settings.stack, region=state.settings.region, action="failed",
                                           message=str(error)))
                continue
            ready.append(state)
        misplaced, unknown = self.check_regions()
        recent = self._recent_removals(now)
        planned: list[tuple[StackState, Plan, Validated]] = []
        for state in ready:
            region_stack = state.settings.region_stack
            if region_stack in misplaced:
                results.append(StackResult(stack=state.settings.stack, region=state.settings.region, action="refused",
                                           message=misplaced[region_stack]))
                continue
            if region_stack in unknown:
                results.append(StackResult(stack=state.settings.stack, region=state.settings.region, action="skipped",
                                           message=f"region {region_stack} waits: {unknown[region_stack]}"))
                continue
            validated, desired = self._declared(state, items, generation)
            plan = plan_stack(state.settings, validated, state.outputs, full_due=force_full or not state.last_full,
                              opts=self.opts, desired=desired, recently_removed=recent.get(state.settings.stack, 0))
            plan.refresh_first = refresh_first(plan, forced=force_full or state.forced, failed=state.failed,
                                               pending=state.pending)
            judging = plan.refresh_first or new_declaration(plan, forced=force_full or state.forced,
                                                            failed=state.failed, pending=state.pending)
            if judging and state.settings.region in self.drift:
                if not self._judged_by_the_watch(state, plan, now):
                    if now - self._watch_started < WATCH_LIST_WAIT and not self.drift[state.settings.region].errors:
                        continue  # its first lists are coming: they judge this start in a moment
            if not plan.full:
                applied = (state.outputs or {}).get("endpoints") or {}
                if state.settings.region in drifted:  # with what a start judged from the watch's lists, if any
                    plan.drifted = sorted(set(plan.drifted) | set(self._drift_for(state.settings, plan, applied, now)))
                if sweep_now(plan, now, state.next_sweep):
                    plan.swept = sweep_batch(plan, applied, state.sweep_cursor, self.opts.sweep_batch)
            planned.append((state, plan, validated))
        in_flight = [(op.state.settings, replace(op.plan, refused=None)) for op in self._inflight.values()]
        bound_sharded_regions([(state.settings, plan) for state, plan, _ in planned] + in_flight, self.opts,
                              shards={name: region.shards for name, region in self.regions.items()},
                              recent={k: v for k, v in recent.items() if k in self.regions})
        work: list[tuple[StackState, Plan, Validated]] = []
        for state, plan, validated in planned:
            if plan.refused:
                res = StackResult(stack=plan.stack, region=plan.region, action="refused", message=plan.refused)
                res.status_writes = write_statuses(self.store, plan.region, status_updates(plan, res, validated, by_name), by_name)
                results.append(res)
                continue
            if not plan.needs_operation:
                self._waiting.pop(plan.stack, None)
                self._settle_drift(state.settings, plan)
                if plan.swept == [] and now >= state.next_sweep:
                    state.next_sweep = now + self._sweep_period(state)  # nothing applied here to sweep
                res = StackResult(stack=plan.stack, region=plan.region)
                res.status_writes = write_statuses(self.store, plan.region, status_updates(plan, res, validated, by_name), by_name)
                results.append(res)
                continue
            work.append((state, plan, validated))
            self._waiting.setdefault(plan.stack, now)
            if not background(plan):
                self._last_change = now
        # Changes and repairs first, the stack that has waited longest first; full reconciles and
        # sweeps after them, and never on the last free worker.
        work.sort(key=lambda w: (self._deferred(w[1], now), self._waiting[w[1].stack]))
        for state, plan, validated in work:
            if not self._may_start(plan, deferred=self._deferred(plan, now), now=now):
                continue  # planned again by a later tick, from what the table says then
            self._waiting.pop(plan.stack, None)
            self._settle_drift(state.settings, plan)
            for name in plan.drifted:  # counted when the repair starts, not each time it is planned
                self._repairs.setdefault((plan.region, name), []).append(now)
            if plan.swept:
                state.sweep_cursor = plan.swept[-1]
                state.next_sweep = now + self._sweep_period(state)
            targets = None if plan.full else targets_for(plan, validated, state.settings, state.outputs)
            self.progress(f"{plan.stack}: {describe(plan)}")
            self._inflight[plan.stack] = Operation(self._submit(state, items, plan, targets), state, plan, validated,
                                                   time.monotonic())
        self._unreported += results
        if not self.opts.overlap:
            self._unreported += self._harvest(block=True, by_name=by_name)
        out, self._unreported = self._unreported, []
        return out

    def _deferred(self, plan: Plan, now: float) -> bool:
        """Background work (a full reconcile, a sweep alone) that has not yet waited BACKGROUND_WAIT:
        it goes after changes and repairs; past that it queues with them, so endless churn cannot
        starve the backstop."""
        return background(plan) and now - self._waiting.get(plan.stack, now) < BACKGROUND_WAIT

    def _may_start(self, plan: Plan, deferred: bool | None = None, now: float | None = None) -> bool:
        """Whether a worker is free for this operation now (always, when ticks wait for operations).
        Deferred background work never takes the last free worker: it stays for changes and repairs.
        The exception is a runner's start (or --full) with no change planned within CHANGES_LATELY:
        until every stack has had that full reconcile, it may use every worker."""
        if not self.opts.overlap:
            return True
        running = len(self._inflight)
        if running >= max(1, self.opts.parallel):
            return False
        deferred = background(plan) if deferred is None else deferred
        now = time.monotonic() if now is None else now
        starting = any(not st.full_done for st in self.states.values())
        quiet = self._last_change is None or now - self._last_change >= CHANGES_LATELY
        reserve = not (starting and quiet)
        return not (deferred and reserve and self.opts.parallel >= 2 and running >= self.opts.parallel - 1)

    def _declared(self, state: StackState, items: list[dict[str, Any]], generation: Any) -> tuple[Validated, dict[str, str]]:
        namespaces = state.settings.allowed_namespaces
        everything = self._memoized(generation, namespaces, lambda: validate_all(items, allowed_namespaces=namespaces))
        # Under a rollout policy what a region declares depends on what the stack last applied too.
        outputs = state.outputs
        key = (state.settings.stack, id(outputs))
        self._memoized(generation, ("pin", key), lambda: outputs)  # its id stays its own while memoized
        validated = self._memoized(generation, ("owned", key), lambda: as_declared(
            owned(everything, state.settings), state.settings, items,
            lambda: previous_records_from_outputs(outputs or {})))
        desired = self._memoized(generation, ("desired", key), lambda: desired_for_region(validated, state.settings))
        return validated, desired

    def _quiet_stack(self, state: StackState, items: list[dict[str, Any]], generation: Any,
                     drifted: Mapping[str, set[str]], now: float, force_full: bool) -> bool:
        """A stack that was checked recently and has nothing to do by what the runner knows: its locks
        and checkpoint (an S3 LIST each) are not looked at again before ``check_every``."""
        if force_full or not state.outputs_loaded or not state.last_full or now - state.checked >= self.opts.check_every:
            return False
        if now >= state.next_sweep or any(state.settings.owns(n) for n in drifted.get(state.settings.region, ())):
            return False
        validated, desired = self._declared(state, items, generation)
        plan = plan_stack(state.settings, validated, state.outputs, full_due=False, opts=self.opts, desired=desired)
        return not plan.needs_operation

    def _sweep_period(self, state: StackState) -> float:
        """Seconds between two sweeps of a stack, so that every endpoint it holds is refreshed once per
        full_every (per region: a region without a drift watch may sweep more often)."""
        every = self.full_every_for.get(state.settings.region, self.opts.full_every)
        applied = len((state.outputs or {}).get("endpoints") or {})
        return every * min(1.0, self.opts.sweep_batch / max(1, applied))

    def _recent_removals(self, now: float) -> dict[str, int]:
        """Endpoints removed within opts.deletion_window, by stack and by region stack."""
        horizon = now - self.opts.deletion_window
        self._removals = [(t, stack, region_stack, n) for t, stack, region_stack, n in self._removals if t >= horizon]
        out: dict[str, int] = {}
        for _, stack, region_stack, n in self._removals:
            out[stack] = out.get(stack, 0) + n
            if region_stack != stack:
                out[region_stack] = out.get(region_stack, 0) + n
        return out

    def _submit(self, state: StackState, items: list[dict[str, Any]], plan: Plan, targets: list[str] | None) -> Future:
        args = (state.settings, items, plan, state.outputs, self.env, self.opts, targets)
        if self.opts.parallel <= 1:  # in this process (no worker processes): the tick waits for it
            done: Future = Future()
            done.set_result(operate(*args))
            return done
        for attempt in (1, 2):
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=max(1, self.opts.parallel), mp_context=get_context("spawn"))
            try:
                future = self._pool.submit(operate, *args)
                break
            except BrokenProcessPool:  # a worker died (killed, out of memory): a new pool, once
                self._replace_pool()
                if attempt == 2:
                    raise
        future.add_done_callback(lambda _: self._wakeup.set())  # the run loop writes its status at once
        return future

    def _replace_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def _harvest(self, *, block: bool, by_name: Mapping[str, Any] | None) -> list[StackResult]:
        """Results of the operations that ended (all of them when ``block``), in the order started.
        ``by_name``: the table as just read (None: it could not be read; no status is written)."""
        results: list[StackResult] = []
        if block and self._inflight:
            wait([op.future for op in self._inflight.values()])
        for stack, op in list(self._inflight.items()):
            if not op.future.done():
                continue
            del self._inflight[stack]
            try:
                res = op.future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
                res = StackResult(stack=op.plan.stack, region=op.plan.region, action="failed",
                                  message=f"the operation's worker failed: {type(exc).__name__}: {exc}")
                res.endpoint_errors[GENERAL] = res.message
                if isinstance(exc, BrokenProcessPool):
                    self._replace_pool()  # the next operation starts a new pool
            results.append(self._complete(op, res, by_name))
        return results

    def _complete(self, op: Operation, res: StackResult, by_name: Mapping[str, Any] | None) -> StackResult:
        state, plan, validated = op.state, op.plan, op.validated
        self.operations += res.operations
        res.changed = len(plan.touched)
        if res.outputs is not None and res.action in ("full", "targeted"):
            state.outputs = res.outputs
            state.checkpoint = self._checkpoint_token(state.settings.stack)
            if plan.removed and not res.failed:
                self._removals.append((time.monotonic(), plan.stack, state.settings.region_stack, len(plan.removed)))
        else:  # skipped (another update wrote), or failed: read the stack again next tick
            if res.outputs is not None:
                state.outputs = res.outputs
            state.outputs_loaded = False
        if res.action == "full":
            self._orphan_check[plan.region] = True
            state.last_full, state.full_done = op.started, True
            if not plan.refresh_first:
                state.forced, state.failed = False, False
            elif state.forced:  # a --full asked while a start's refresh ran: it still declares everything
                state.last_full, state.full_done = 0.0, False
            state.next_sweep = op.started + self._sweep_period(state)
            self._forget_first_lists(plan.region)
        if res.action == "failed":
            state.last_full = 0.0  # the next tick is a full reconcile: it clears what a failure left
            state.failed = True  # and declares every endpoint: the state may not say what the failure left
        if res.action in ("skipped", "failed"):
            for name, drift in plan.drift_seen.items():  # not repaired: the next tick tries again
                self._drifted.setdefault(plan.region, {}).setdefault(name, drift)
        if res.action == "skipped":
            return res
        if by_name is None:
            res.message = (res.message + "; " if res.message else "") + "status not written: the table could not be read"
            return res
        res.status_writes = write_statuses(self.store, plan.region, status_updates(plan, res, validated, by_name), by_name)
        return res

    def drain(self, timeout: float) -> list[StackResult]:
        """On shutdown: start nothing more, wait up to ``timeout`` seconds for the running operations
        (writing their statuses), then interrupt the engines still running (SIGINT: the engine
        cancels and writes its checkpoint) and collect what they return."""
        results: list[StackResult] = list(self._unreported)
        self._unreported = []
        deadline = time.monotonic() + timeout
        for phase in ("wait", "interrupted"):
            while self._inflight and time.monotonic() < deadline:
                wait([op.future for op in self._inflight.values()], timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                try:
                    current, _ = self.read_table()
                    by_name: Mapping[str, Any] | None = {i.get("endpoint_name"): i for i in current if isinstance(i, Mapping)}
                except StoreError:
                    by_name = None
                results += self._harvest(block=False, by_name=by_name)
            if not self._inflight or phase == "interrupted":
                break
            interrupted = self._interrupt_engines()
            self.progress(f"shutting down: {len(self._inflight)} operation(s) still running after {timeout:.0f}s; "
                          f"interrupted {interrupted} engine(s)")
            deadline = time.monotonic() + DRAIN_AFTER_INTERRUPT
        return results

    def _interrupt_engines(self) -> int:
        """SIGINT to the Pulumi engines the workers run (their direct children named ``pulumi``)."""
        count = 0
        for pid in list(getattr(self._pool, "_processes", None) or {}):
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for child in children:
                try:
                    if Path(f"/proc/{child}/comm").read_text().strip() == "pulumi":
                        os.kill(int(child), signal.SIGINT)
                        count += 1
                except (OSError, ValueError):
                    continue
        return count

    # ---- drift -----------------------------------------------------------------------------------

    def _take_drift(self) -> dict[str, set[str]]:
        """Region -> endpoints whose objects the watches saw changed or deleted, not yet repaired."""
        for region, watch in self.drift.items():
            for name, drift in watch.take().items():
                self._drifted.setdefault(region, {})[name] = drift
        return {region: set(names) for region, names in self._drifted.items() if names}

    def _drift_for(self, settings: StackSettings, plan: Plan, applied: Mapping[str, Any], now: float) -> list[str]:
        """The endpoints of this stack to repair now (they go into plan.drift_seen with what was seen)."""
        pending = self._drifted.get(settings.region) or {}
        out = []
        for name, drift in sorted(pending.items()):
            if (not settings.owns(name) or name not in applied or name in plan.touched
                    or (name not in plan.desired and name not in plan.kept)):  # a kept record's last declaration too
                continue
            if ours(drift, applied.get(name)):
                continue  # an object our own update removed (the endpoint no longer declares it)
            key = (settings.region, name)
            repairs = [t for t in self._repairs.get(key, []) if t > now - REPAIR_WINDOW]
            self._repairs[key] = repairs
            if len(repairs) >= REPAIR_LIMIT:
                if key not in self._fighting:
                    self._fighting.add(key)
                    self.progress(f"{settings.stack}: {name}: {drift.kind} {drift.namespace}/{drift.name} {drift.reason} "
                                  f"again; repaired {REPAIR_LIMIT} times in {REPAIR_WINDOW:.0f}s, so another writer is "
                                  "fighting the declaration: not repairing it again until then (the sweep still will)")
                continue
            self._fighting.discard(key)
            out.append(name)
            plan.drift_seen[name] = drift
            self.progress(f"{settings.stack}: {name}: {drift.kind} {drift.namespace}/{drift.name} {drift.reason}; "
                          "repairing it")
        return out

    def _judged_by_the_watch(self, state: StackState, plan: Plan, now: float) -> bool:
        """A runner's start judged from its drift watch's first lists instead of a refresh: each object
        the stack recorded (its checkpoint) against the same object as listed (drift.judge_since).
        The plan becomes the targeted repair of what drifted while no runner watched (often nothing);
        that drift is kept with the watch's, so a repair that cannot start now is planned again.
        False when the watch has not listed everything yet."""
        from .drift import judge_since

        listed = self.drift[plan.region].first_lists()
        if listed is None or state.recorded is None:
            return False
        found = judge_since(state.recorded, listed, now)
        applied = (state.outputs or {}).get("endpoints") or {}
        declared = lambda n: n in applied and (n in plan.desired or n in plan.kept)  # noqa: E731
        if plan.reason == "declaration version changed":  # every endpoint is declared again (new_declaration)
            # its touched endpoints too: without a refresh, their update would not see what was drifted
            seen = [n for n in (self._drifted.get(plan.region) or {}) if state.settings.owns(n)]
            drifted = sorted(n for n in set(found) | set(seen) if declared(n))  # and what the watch saw since
            plan.judged = not drifted
            self.progress(f"{plan.stack}: {len(state.recorded)} object(s) judged against the checkpoint from the "
                          f"drift watch's lists, {len(drifted)} endpoint(s) drifted: every endpoint is declared "
                          + ("again without a refresh" if plan.judged else f"again with a refresh ({', '.join(drifted[:5])}"
                             f"{', ...' if len(drifted) > 5 else ''} drifted)"))
            return True
        # as the watch's drift: what the stack declares (a kept invalid record's last declaration too)
        drifted = sorted(n for n in found if declared(n) and n not in plan.touched)
        plan.full, plan.refresh_first, plan.reason = False, False, ""
        plan.drifted = drifted
        plan.drift_seen = {n: found[n] for n in drifted}
        pending = self._drifted.setdefault(plan.region, {})
        for name in drifted:
            d = found[name]
            pending.setdefault(name, d)  # settled when the repair starts (_settle_drift)
            self.progress(f"{plan.stack}: {name}: {d.kind} {d.namespace}/{d.name} {d.reason} while no runner watched; "
                          "repairing it")
        self.progress(f"{plan.stack}: full reconcile from the drift watch's lists: {len(state.recorded)} object(s) "
                      f"judged against the checkpoint, {len(drifted)} endpoint(s) drifted")
        state.last_full, state.full_done, state.forced = now, True, False
        state.next_sweep = now + self._sweep_period(state)
        self._orphan_check[plan.region] = True
        self._forget_first_lists(plan.region)
        return True

    def _forget_first_lists(self, region: str) -> None:
        """Once every stack of the region has had its start's full reconcile, nothing judges from the
        watch's first lists any more: drop them (managedFields of every object)."""
        watch = self.drift.get(region)
        if watch is not None and all(st.full_done for st in self.states.values() if st.settings.region == region):
            watch.forget_first_lists()

    def _settle_drift(self, settings: StackSettings, plan: Plan) -> None:
        """This stack's pending drift is handled by its plan (repaired by it, a full reconcile, or
        nothing to repair); a repair that fails puts it back (_complete). An update without a refresh
        (Plan.judged) repairs nothing: what the watch saw since it was planned stays for a repair."""
        if plan.judged:
            return
        pending = self._drifted.get(settings.region)
        for name in [n for n in (pending or {}) if settings.owns(n)]:
            del pending[name]

    def _reread(self, items: list[dict[str, Any]], names: set[str]) -> tuple[list[dict[str, Any]], Any]:
        """The items with those records read again (consistent gets; a record gone is left out), and
        the table generation. The table cache keeps them, so later ticks never see older copies."""
        known = {i.get("endpoint_name") for i in items if isinstance(i, Mapping)}
        fresh = {name: self.store.get(name) for name in sorted(names) if name in known}
        if self._cache is not None and self.opts.table_stream:
            return self._cache.absorb(fresh), (id(self._cache), self._cache.generation)
        out = [fresh[i["endpoint_name"]] if i.get("endpoint_name") in fresh else i for i in items]
        return [i for i in out if i is not None], object()

    def _report_orphans(self) -> None:
        """Objects our updates wrote that no stack holds: an operation interrupted without checkpoints
        created them, and their record no longer declares them in this region. Reported (once per
        set), never deleted: someone decides. Looked at when a region's full reconciles are done."""
        for region, watch in self.drift.items():
            stacks = [st for st in self.states.values() if st.settings.region == region]
            if (not self._orphan_check.get(region) or not watch.ready
                    or any(op.plan.region == region for op in self._inflight.values())
                    or not all(st.outputs_loaded and st.full_done for st in stacks)):  # every shard's full done
                continue
            self._orphan_check[region] = False
            held = {n for st in stacks for n in ((st.outputs or {}).get("endpoints") or {})}
            orphans: dict[str, list[str]] = {}
            for (kind, namespace, name), endpoint in sorted(watch.objects().items()):
                if endpoint not in held:
                    orphans.setdefault(endpoint, []).append(f"{kind} {namespace}/{name}")
            for endpoint, objects in orphans.items():
                self.progress(f"{region}: {', '.join(objects)} of endpoint {endpoint} are in no stack (an interrupted "
                              "operation created them, and the record no longer declares them here): delete them by "
                              "hand, or declare the endpoint in this region again and the next full reconcile adopts them")

    def watch_drift(self) -> list[str]:
        """Start a drift watch per region (drift.DriftWatch); returns the regions that have none, and why."""
        from .drift import DriftWatch, watch_api_for

        missing = []
        for settings in self.regions.values():
            if settings.region in self.drift:
                continue
            api = watch_api_for(settings)
            if api is None:
                missing.append(settings.region)
                self.progress(f"{settings.region}: no drift watch outside the cluster for EKS cluster "
                              f"{settings.cluster_name}; the sweep repairs drift there")
                continue
            watch = DriftWatch(api, settings.allowed_namespaces, on_change=self._wakeup.set)
            watch.start()
            self.drift[settings.region] = watch
            self._watch_started = time.monotonic()
        return missing

    def watch_problems(self) -> dict[str, str]:
        """Region/stream -> why a drift watch cannot see (empty while every watch works)."""
        out = {}
        for region, watch in self.drift.items():
            for stream, error in watch.errors.items():
                out[f"{region} {stream}"] = error
            if not watch.ready:
                out.setdefault(f"{region}", "initial lists not done yet")
        return out

    def wakeup(self) -> threading.Event:
        """Set by the drift watches when they record something and when an operation ends (the run
        loop waits on it between ticks)."""
        return self._wakeup

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    def oldest_operation(self) -> float:
        """Seconds the longest-running operation has run (0 when none runs); safe from another thread."""
        now = time.monotonic()
        running = tuple(self._inflight.values())
        return max((now - op.started for op in running if not op.future.done()), default=0.0)


@dataclass
class Operation:
    """A Pulumi operation started for a stack (it runs in a worker process)."""
    future: Future
    state: StackState
    plan: Plan
    validated: Validated
    started: float


def ours(drift: Any, applied: Mapping[str, Any] | None) -> bool:
    """A deletion of an object the endpoint no longer declares: our own update removed it (the
    endpoint's canary or HPA went away, its Ingress was withdrawn, a replacement's old object)."""
    if getattr(drift, "reason", "") != "deleted":
        return False
    ref = f"{drift.kind}/{drift.name}"  # the stack's outputs name objects so (one namespace per endpoint)
    return ref not in ((applied or {}).get("objects") or {}).values()


def background(plan: Plan) -> bool:
    """A full reconcile, or a sweep alone: work that waits for changes and repairs."""
    return plan.full or not (plan.touched or plan.drifted)


def sweep_now(plan: Plan, now: float, due: float) -> bool:
    """Whether this tick's plan of a stack takes its next sweep batch (``due``: when the sweep fell due).

    A due sweep goes alone, so it never slows a change. A stack whose endpoints change every few
    seconds would then never be swept: once the sweep has been due for BACKGROUND_WAIT it joins the
    stack's next change or repair instead, as background work that waited that long queues with them."""
    return now >= due and (not plan.targeted or now - due >= BACKGROUND_WAIT)


def sweep_batch(plan: Plan, applied: Mapping[str, Any], cursor: str, batch: int) -> list[str]:
    """The next endpoints of a stack's sweep: every applied endpoint in name order after ``cursor``
    (then from the start), ``batch`` at a time, without those the plan targets anyway."""
    names = sorted(n for n in applied if n in plan.desired and n not in plan.targeted)
    ordered = [n for n in names if n > cursor] + [n for n in names if n <= cursor]
    return ordered[:batch]


def refresh_first(plan: Plan, *, forced: bool, failed: bool, pending: int = 0) -> bool:
    """Whether a full reconcile refreshes first and updates only what needs it (Plan.refresh_first).

    Only a runner's start: the first apply and a new declaration version change what every endpoint
    declares, a person's --full asks for every endpoint to be declared, and after a failure (or an
    interrupted update: ``pending`` operations in the checkpoint) the state may not say what the
    engine did before it stopped."""
    return plan.full and plan.reason == "full reconcile" and not forced and not failed and not pending


def new_declaration(plan: Plan, *, forced: bool, failed: bool, pending: int = 0) -> bool:
    """Whether a full reconcile that declares every endpoint may skip its refresh if the drift watch's
    first lists find nothing drifted (Plan.judged): a runner's start under a new declaration version,
    over a checkpoint our last update left (not after a failure or an interrupted update, whose state
    may not say what the engine did, nor a person's --full, which asks for a refresh)."""
    return (plan.full and plan.reason == "declaration version changed" and not plan.refresh_first
            and not forced and not failed and not pending)


def describe(plan: Plan) -> str:
    if plan.judged:
        return f"full up without a refresh ({plan.reason}; the drift watch's lists found nothing drifted)"
    if plan.refresh_first:
        return f"full reconcile: refresh, then update what changed or drifted ({plan.reason})"
    if plan.full:
        return f"full up --refresh ({plan.reason})"
    parts = [f"{what} {', '.join(names)}" for what, names in (("changes to", plan.touched),
                                                                ("drift repair of", plan.drifted)) if names]
    swept = [n for n in plan.swept if n not in plan.touched and n not in plan.drifted]
    if swept:
        parts.append(f"sweep of {len(swept)} endpoint(s) ({swept[0]} .. {swept[-1]})")
    return "targeted up: " + "; ".join(parts)


BACKGROUND_WAIT = 300.0
"""Seconds a full reconcile or a sweep waits behind changes before it queues with them."""
CHANGES_LATELY = 60.0
"""While stacks still wait for the full reconcile of a runner's start (or of --full): seconds after a
change or repair was planned during which one worker is kept free for the next one."""
WATCH_LIST_WAIT = 30.0
"""Seconds a runner's start waits for its drift watch's first lists (which judge it) before it
refreshes every object instead."""
REPAIR_LIMIT, REPAIR_WINDOW = 5, 600.0
"""Drift repairs of one endpoint within the window before the watch leaves it to the sweep."""
DRAIN_AFTER_INTERRUPT = 30.0
"""Seconds an interrupted engine gets to cancel and write its checkpoint on shutdown."""


def with_local_overrides(settings: StackSettings, kubeconfig: str | None, dynamodb: str | None, table: str | None) -> StackSettings:
    store = settings.store
    if dynamodb:
        store = replace(store, endpoint_url=dynamodb)
    if table:
        store = replace(store, table=table)
    return replace(settings, kubeconfig=kubeconfig or settings.kubeconfig, store=store)


__all__ = ["Runner", "RunnerOptions", "StackResult", "Plan", "plan_stack", "status_updates", "exit_code",
           "StoreError", "EXIT_OK", "EXIT_FAILED", "EXIT_CONFIG", "EXIT_STORE", "EXIT_REFUSED", "EXIT_LOCKED"]
