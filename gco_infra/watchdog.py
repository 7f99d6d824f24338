"""The watchdog's decisions, pure: what a region's status becomes, which Ingresses leave the shared
ALB, and whether a deleted record may be purged, from a table item and what the cluster shows.

The health job (health.py) reads the cluster and the table, and writes what these decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from .endpoint import (STATUS_NUMBERS, Endpoint, Validated, record_name, status_entry_problem, status_number)

TRACK_LABEL = "gco.io/track"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _parse_iso(text: Any) -> float | None:
    if not isinstance(text, str) or not text or len(text) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else type(value).__name__ if isinstance(value, (Mapping, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- what the cluster shows ------------------------------------------------------------------------------------


@dataclass
class Track:
    """The Deployments of one track (primary or canary) of an endpoint in this cluster."""

    seen: bool = False
    ready: int = 0
    desired: int = 0
    updated: bool = True
    revision: str | None = None
    """The revision its Deployment declares (endpoints rolled out under a policy)."""


@dataclass
class Observed:
    primary: Track = field(default_factory=Track)
    canary: Track = field(default_factory=Track)
    """The canary never carries the endpoint: the primary Ingress routes to the primary Service only."""
    ingresses: list[tuple[str, str]] = field(default_factory=list)
    """(namespace, name) of Ingresses that exist for the endpoint (the primary's and the canary's)."""

    @property
    def seen(self) -> bool:
        """Any of the endpoint's objects exists here."""
        return self.primary.seen or self.canary.seen or bool(self.ingresses)


def track_of(app: str, deployment: str, labels: Mapping[str, str]) -> str:
    """primary or canary, from the track label; by name for Deployments without it (adopted ones)."""
    track = labels.get(TRACK_LABEL)
    if track in ("primary", "canary"):
        return track
    return "canary" if deployment == f"{app}-canary" else "primary"


# ---- what the table says ---------------------------------------------------------------------------------------


# The stored entry's rules are the record module's (the runner writes the same entries).
entry_problem = status_entry_problem
_number = status_number


def stored_entry(item: Mapping[str, Any], region: str) -> tuple[Mapping[str, Any] | None, str | None]:
    """(the stored status of ``region`` exactly as read, or None when absent; why it is unusable, or None)."""
    statuses = item.get("region_status")
    if statuses is None:
        return None, None
    if not isinstance(statuses, Mapping):
        return None, f"region_status must be a map, got {_show(statuses)}"
    if region not in statuses:
        return None, None
    entry = statuses[region]
    problem = entry_problem(entry)
    if problem is not None:
        return None, f"region_status.{region}{'' if problem.startswith('.') else ' '}{problem}"
    return entry, None


@dataclass(frozen=True)
class Record:
    """What the health job reads from one table item. ``endpoint`` is None when the record is invalid:
    then only what can be read leniently is known, enough to keep watching what runs."""

    name: str
    targets: tuple[str, ...]
    namespace: str | None
    item: Mapping[str, Any]
    endpoint: Endpoint | None = None

    @property
    def valid(self) -> bool:
        return self.endpoint is not None


def _lenient_regions(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple, set, frozenset)):
        return ()
    return tuple(sorted({r for r in value if isinstance(r, str)}))


def read_records(items: Iterable[Any], validated: Validated) -> tuple[list[Record], dict[str, str]]:
    """Every item as a Record, valid or not; items without a usable name as problems."""
    records: list[Record] = []
    problems: dict[str, str] = {}
    for item in items:
        name = item.get("endpoint_name") if isinstance(item, Mapping) else None
        if not isinstance(name, str) or not name:
            problems[record_name(item)] = f'endpoint "{record_name(item)}": endpoint_name is not a name, so the record cannot be watched'
            continue
        ep = validated.endpoints.get(name)
        if ep is not None:
            records.append(Record(name, ep.target_regions, ep.namespace, item, ep))
        else:
            namespace = item.get("namespace")
            records.append(Record(name, _lenient_regions(item.get("target_regions")),
                                  namespace if isinstance(namespace, str) else None, item))
    return records, problems


# ---- decisions (pure) ------------------------------------------------------------------------------------------


COMPARED = ("state", "replicas_ready", "replicas_desired", "canary_ready", "canary_desired", "ingress", "unready_since",
            "revision")
"""A status is written only when one of these changes (not for last_sync or message alone)."""


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any] | None = None
    """The new region status to write, or None when nothing changed."""
    delete: tuple[tuple[str, str], ...] = ()
    """Ingresses to delete once ``status`` (if any) is written."""
    event: str | None = None
    """withdrawn or readmitted."""


def decide(stored: Mapping[str, Any] | None, obs: Observed, *, desired_state: str | None, now: float,
           threshold: float, keep_state: bool = False) -> Decision:
    """This region's next status for one endpoint, and the Ingresses to take off the shared ALB.

    ``stored`` has passed :func:`entry_problem`. ``desired_state`` is None for an invalid record:
    its last applied declaration keeps running and is watched as it is. Readiness is the primary's:
    a live canary cannot carry a dead primary. A runner's ``error`` state (and its message) stays
    until the runner clears it; the replica counts and the watchdog's fields are still kept current.
    ``keep_state``: the record no longer asks to run here (its objects are being removed): only the
    watchdog acts and the counts are kept current; the state stays the runner's.
    """
    old = dict(stored or {})
    state = old.get("state")
    if state in (None, "pending", "error") and not obs.seen and desired_state != "stopped":
        return Decision()  # not applied here yet (or failed): the runner owns that status
    new = dict(old)
    primary, canary = obs.primary, obs.canary
    new["replicas_ready"], new["replicas_desired"] = primary.ready, primary.desired
    if primary.revision:
        new["revision"] = primary.revision
    else:
        new.pop("revision", None)
    if canary.seen:
        new["canary_ready"], new["canary_desired"] = canary.ready, canary.desired
    else:
        new.pop("canary_ready", None)
        new.pop("canary_desired", None)
    delete: tuple[tuple[str, str], ...] = ()
    event = None
    if desired_state == "stopped":
        new["state"] = "stopped"
        new.pop("unready_since", None)
        delete = tuple(obs.ingresses)  # stopped endpoints never keep an Ingress
    else:
        if primary.desired > 0 and primary.ready >= primary.desired and primary.updated:
            new["state"] = "running"
        elif state in ("running", "updating"):
            new["state"] = "updating"
        else:
            new["state"] = "creating"
        if primary.ready == 0 and primary.desired > 0:
            since = min(_parse_iso(old.get("unready_since")) or now, now)  # a timer in the future never fires
            new["unready_since"] = _iso(since)
            if old.get("ingress") != "withdrawn" and now - since >= threshold:
                new["ingress"] = "withdrawn"
                new["message"] = f"no ready replica for {int(now - since)}s: Ingress withdrawn from the shared ALB"
                delete, event = tuple(obs.ingresses), "withdrawn"
            elif old.get("ingress") == "withdrawn":
                delete = tuple(obs.ingresses)  # someone re-created it while still dead
        else:
            new.pop("unready_since", None)
            if old.get("ingress") == "withdrawn" and primary.ready > 0:
                new["ingress"] = "active"
                new["message"] = "ready again: Ingress re-admitted on the next runner tick"
                event = "readmitted"
    if state == "error" or (keep_state and state is not None):
        new["state"] = state
    if all(new.get(k) == old.get(k) for k in COMPARED):
        return Decision(None, delete)
    new["last_sync"] = _iso(now)
    return Decision(new, delete, event)


def _shows_objects(entry: Mapping[str, Any]) -> bool:
    return entry.get("ingress") is not None or any(_number(entry.get(k)) for k in STATUS_NUMBERS)


def purge_blocker(record: Record, *, region: str, known_regions: Iterable[str], objects_here: bool) -> str | None:
    """Why a ``deleted`` record may not be purged yet; None when it may.

    Purged only when every target region is one the platform knows and there reports ``deleted``
    or never applied it (no status, or only pending/error with no sign of objects), and none of its
    objects is left in this cluster. A typo region or one not yet set up keeps the record.
    """
    if objects_here:
        return f"its objects still exist in {region}"
    known = set(known_regions)
    for r in record.targets:
        if r not in known:
            return f"target region {r} is not a known region"
        entry, problem = stored_entry(record.item, r)
        if problem is not None:
            return problem
        if entry is None:
            continue
        state = entry.get("state")
        if state == "deleted" or (state in ("pending", "error") and not _shows_objects(entry)):
            continue
        return f"{r} reports {state!r}, not deleted"
    return None
