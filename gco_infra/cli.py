"""gco-infra: a thin command-line front over the program, the runner and the local environment."""

from __future__ import annotations

import getpass
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import click
import structlog
import yaml
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from . import localenv, rollout
from .endpoint import (DEFAULT_NAMESPACE, DESIRED_STATES, Endpoint, RolloutPolicy, endpoint_to_item, parse_endpoint,
                       spec_revision)
from .program import (PROJECT_ROOT, ProgramError, StackSettings, in_cluster, rollout_policy_disagreement,
                      settings_from_stack_file)
from .store import EndpointStore, StoreConfig, StoreError
from .store import utcnow as store_now

console = Console(stderr=True)
out = Console()


def _configure_logging(json_logs: bool | None) -> None:
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    processors: list[Any] = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    processors.append(structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(processors=processors, logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


log = structlog.get_logger("gco-infra")


def _print_versions(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .versions import render, versions

    found = versions()
    click.echo(render(found), nl=False)
    ctx.exit(0 if all(v.version for v in found) else 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--json-logs/--no-json-logs", default=None, help="Structured JSON logs (default: when stderr is not a terminal).")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
              help="Print gco-infra's, Python's, the Pulumi CLI's and the Kubernetes provider's versions and the "
                   "pinned packages', one per line, then exit (1 when a binary is missing).")
def main(json_logs: bool | None) -> None:
    """GPU inference endpoints across regions, declared from a DynamoDB table and applied with Pulumi.

    \b
    Quick start on this machine (no cloud needed):
      gco-infra demo            start the local environment, load examples, apply both local regions
    """
    _configure_logging(json_logs)


# ---- local environment ------------------------------------------------------------------------------------


@main.group()
def local() -> None:
    """The local environment: etcd, two kube-apiservers (regions local-1, local-2), DynamoDB, S3 state and KMS (moto).

    Everything listens on 127.0.0.1; state lives in .state/local (or $GCO_STATE_DIR).
    """


@local.command("up")
@click.option("--backend", type=click.Choice(localenv.STATE_BACKENDS), default=None,
              help="Where stacks live: s3 (moto's S3, as in production; the default) or file. Secrets use "
                   "moto's KMS either way. Switching needs `local down` first.")
@click.option("--node/--no-node", "node", default=None,
              help="Give each region a node (kubelet, containerd, kube-proxy in its own network namespace) "
                   "that runs pods for real; needs root and the images of scripts/image. Default: as the "
                   "environment was started ($GCO_LOCAL_NODE=1 for a new one). Switching needs `local down` first.")
def local_up(backend: str | None = None, node: bool | None = None) -> None:
    """Start (or keep) the local environment; running twice is harmless."""
    env = localenv.LocalEnv.load()
    try:
        env.up(progress=lambda s: console.print(f"[cyan]local[/] {s}"), backend=backend, node=node)
    except localenv.LocalEnvError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_status(env)


@local.command("down")
@click.option("--wipe", is_flag=True, help="Also delete the state dir (kubeconfigs, stack state, logs).")
def local_down(wipe: bool) -> None:
    """Stop every process of the local environment."""
    env = localenv.LocalEnv.load()
    env.down(progress=lambda s: console.print(f"[cyan]local[/] {s}"), wipe=wipe)


@local.command("status")
def local_status() -> None:
    """Show what runs and whether it answers; exit 1 if anything is down."""
    env = localenv.LocalEnv.load()
    if not _print_status(env):
        sys.exit(1)


@local.command("env")
def local_env() -> None:
    """Print `export` lines to use `pulumi` and the stacks against the local environment.

    The state is in moto's S3 and its secrets are encrypted by moto's KMS, as in production. Run
    `pulumi` in $GCO_PULUMI_PROJECT (the project, with stack files the engine may write to), not in
    the repository: the engine writes each stack's KMS data key into the stack file it reads.

    \b
      eval "$(gco-infra local env)"; pulumi -C "$GCO_PULUMI_PROJECT" preview -s local

    `preview` and `up` also need the pulumi-language-python plugin on PATH (see the README).
    """
    env = localenv.LocalEnv.load()
    import shlex

    values = env.pulumi_env()
    values["GCO_KUBECONFIG"] = str(env.kubeconfig("local-1"))
    values["GCO_PULUMI_PROJECT"] = str(env.pulumi_project)
    for k, v in values.items():
        click.echo(f"export {k}={shlex.quote(v)}")  # for a shell's eval: never wrapped at a console's width


def _print_status(env: localenv.LocalEnv) -> bool:
    table = Table("component", "state", "address")
    status = env.status()
    addresses = {"etcd": f"127.0.0.1:{env.etcd_port}", "dynamodb": env.dynamodb_endpoint}
    addresses.update({f"apiserver {r}": a.url for r, a in env.apiservers.items()})
    addresses.update({f"node {n.name}": f"{n.ip}, pods {n.pod_cidr}" for n in env.nodes.values()})
    for name, ok in status.items():
        table.add_row(name, "[green]up[/]" if ok else "[red]down[/]", addresses.get(name, ""))
    console.print(table)
    return all(status.values()) and bool(env.apiservers)


def _local_store() -> EndpointStore:
    """The local environment's table once it was started here, whether or not it answers now (a
    table that does not answer fails the command; it never sends it to another table); else the
    table of $GCO_TABLE / $GCO_DYNAMODB_ENDPOINT / AWS."""
    env = localenv.LocalEnv.load()
    if env.moto_port:
        return env.store()
    return EndpointStore(StoreConfig.from_env())


def _stack_settings(stack: str) -> StackSettings:
    try:
        return settings_from_stack_file(stack)
    except ProgramError as exc:
        raise click.ClickException(str(exc)) from exc


def _stack_store(settings: StackSettings) -> EndpointStore:
    """The stack's table; for a local stack (a kubeconfig, no EKS cluster, not in a pod) the local
    environment's once it was started here, as `run` and `health` use it."""
    if settings.kubeconfig and not settings.cluster_name and not in_cluster():
        env = localenv.LocalEnv.load()
        if env.moto_port:
            return env.store()
    return EndpointStore(settings.store)


class TableUnreadable(click.ClickException):
    """The table could not be read completely: exit 3, as `run --once` does (nothing was changed)."""

    exit_code = 3  # runner.EXIT_STORE (runner is imported lazily here)

    def __init__(self, exc: StoreError, consequence: str = "") -> None:
        super().__init__(f"the table could not be read{'; ' + consequence if consequence else ''}: {exc}")


# ---- endpoints (writes the platform's item shape) ----------------------------------------------------------


@main.group()
def endpoints() -> None:
    """Put desired endpoints into the table, as the platform's CLI does.

    Uses the local environment's DynamoDB once `gco-infra local up` has started it here (until
    `local down --wipe`), else $GCO_TABLE / $GCO_DYNAMODB_ENDPOINT / AWS. Exit 3 when the table
    cannot be read.
    """


@endpoints.command("apply")
@click.option("-f", "--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="YAML file with a list of endpoint records (or {endpoints: [...]}).")
@click.option("--namespaces", default="gco-inference,gco-inference-team-b", show_default=True,
              help="Namespaces accepted while validating before the write.")
def endpoints_apply(path: Path, namespaces: str) -> None:
    """Validate and write every endpoint in FILE; nothing is written if any record is invalid."""
    data = yaml.safe_load(path.read_text()) or []
    records = data.get("endpoints", []) if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise click.ClickException(f"{path}: expected a list of endpoint records")
    allowed = tuple(n.strip() for n in namespaces.split(",") if n.strip())
    parsed, errors = [], []
    for rec in records:
        r = parse_endpoint(rec, allowed_namespaces=allowed)
        errors.extend(r.errors)
        if r.endpoint:
            parsed.append(r.endpoint)
    if errors:
        raise click.ClickException("invalid records, nothing written:\n  " + "\n  ".join(errors))
    store = _local_store()
    try:
        for ep in parsed:
            store.put_desired(endpoint_to_item(ep))
            console.print(f"applied [bold]{ep.name}[/] ({ep.desired_state}, regions {', '.join(ep.target_regions)})")
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc


@endpoints.command("set-state")
@click.argument("name")
@click.argument("state", type=click.Choice(DESIRED_STATES))
def endpoints_set_state(name: str, state: str) -> None:
    """Set NAME's desired_state (conditional on the value just read)."""
    store = _local_store()
    item = _read_record(store, name)
    try:
        if not store.set_desired_state(name, state, expected=item.get("desired_state")):
            raise click.ClickException(f'endpoint "{name}" changed while updating; try again')
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"{name}: desired_state {item.get('desired_state')} -> {state}")


@endpoints.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the raw items as JSON.")
@click.option("--stack", default=None,
              help="Read this stack's table (stacks/Pulumi.<stack>.yaml) and show the rollouts of records without a "
                   "rollout_policy under its gco:rolloutPolicy too. Default: the local environment's table, and "
                   "rollouts only of records with a policy of their own.")
def endpoints_list(as_json: bool, stack: str | None) -> None:
    """Show endpoints and their per-region status.

    A region's cell ends with the revision its Deployment runs (@ and its first 7 characters) where
    the health job reports one; the rollout column appears when any record is rolled out under a
    policy (`gco-infra rollout status NAME` for the details).
    """
    default = None
    if stack is None:
        store = _local_store()
    else:
        settings = _stack_settings(stack)
        store, default = _stack_store(settings), settings.rollout_policy
    try:
        items = store.list_endpoints()
    except StoreError as exc:
        raise TableUnreadable(exc) from exc
    if as_json:
        from .store import plain

        click.echo(json.dumps(plain(items), indent=2))  # for jq and scripts: no colour, no reformatting
        return
    out.print(status_table(items, default))


PHASE_COLOURS = {"progressing": "cyan", "paused": "yellow", "complete": "green", "failed": "red", "aborted": "red"}


def rollout_cell(item: dict[str, Any], default: RolloutPolicy | None = None) -> str:
    """The rollout column of ``status_table``: empty for a record that is not rolled out under a policy."""
    namespace = item.get("namespace")
    # Only the spec's revision and the policy matter here: validate against the record's own namespace.
    parsed = parse_endpoint(item, allowed_namespaces=(namespace if isinstance(namespace, str) else DEFAULT_NAMESPACE,))
    if parsed.endpoint is None or not parsed.ok:
        has_rollout = item.get("rollout_policy") is not None or item.get(rollout.ATTRIBUTE) is not None
        return "[red]invalid record[/]" if has_rollout else ""
    ep = parsed.endpoint
    policy = rollout.policy_for(ep, default)
    if policy is None:
        return ""
    state, problem = rollout.read_state(item)
    if problem is not None:
        return "[red]rollout unreadable[/]"
    current = state is not None and state.revision == spec_revision(ep)  # else: "<revision> pending"
    colour = PHASE_COLOURS.get(state.phase, "white") if current else "white"
    return f"[{colour}]{rollout.describe(ep, policy, state)}[/]"


def status_table(items: list[dict[str, Any]], default_policy: RolloutPolicy | None = None) -> Table:
    """Endpoints x regions. ``default_policy``: the stack's gco:rolloutPolicy, for records without one.

    Any attribute may hold anything (other writers): values are shown as text, never as markup, and a
    value of the wrong shape is shown as missing.
    """
    def regions_of(item: Mapping[str, Any]) -> list[str]:
        value = item.get("target_regions")
        return [r for r in value if isinstance(r, str)] if isinstance(value, (list, tuple, set)) else []

    def statuses_of(item: Mapping[str, Any]) -> Mapping[str, Any]:
        value = item.get("region_status")
        return value if isinstance(value, Mapping) else {}

    regions = sorted({r for i in items for r in regions_of(i)} |
                     {r for i in items for r in statuses_of(i) if isinstance(r, str)})
    ordered = sorted(items, key=lambda i: str(i.get("endpoint_name")))
    rollouts = [rollout_cell(item, default_policy) for item in ordered]
    show_rollouts = any(rollouts)
    table = Table("endpoint", "desired", *regions, *(["rollout"] if show_rollouts else []), title="endpoints x regions")
    for item, rollout_text in zip(ordered, rollouts):
        rs = statuses_of(item)
        cells = []
        for r in regions:
            s = rs.get(r) if isinstance(rs.get(r), Mapping) else {}
            state = s.get("state", "-" if r not in regions_of(item) else "pending")
            extra = f" ({s.get('replicas_ready', 0)}/{s.get('replicas_desired', 0)})" if s.get("replicas_desired") is not None else ""
            if isinstance(s.get("revision"), str) and s["revision"]:
                extra += f" @{s['revision'][:7]}"
            if s.get("ingress") == "withdrawn":
                extra += " ingress withdrawn"
            colour = {"running": "green", "error": "red", "stopped": "yellow"}.get(str(state), "white")
            cells.append(Text.assemble((str(state), colour), extra))
        table.add_row(Text(str(item.get("endpoint_name"))), Text(str(item.get("desired_state"))), *cells,
                      *([Text.from_markup(rollout_text)] if show_rollouts else []))
    return table


# ---- rollouts (gco_infra/rollout.py; the table's `rollout` attribute) -----------------------------------------

STACK_HELP = ("Stack whose settings apply (stacks/Pulumi.<stack>.yaml): its table, its allowed namespaces and its "
              "default rollout policy (gco:rolloutPolicy) for records without a rollout_policy.")


@main.group("rollout")
def rollout_group() -> None:
    """Progressive rollouts: where an endpoint's spec change stands, region by region, and a person's say.

    Under a rollout policy (the record's rollout_policy, else the stack's gco:rolloutPolicy) a
    change of spec reaches the regions wave by wave: the health jobs let the next wave take it once
    every region of the current one has been healthy for its bake time, and roll every region that
    took it back when one stays unready or loses its Ingress.

    Each command reads the record with a consistent read and writes the `rollout` attribute only if
    nobody (a health job, another person) wrote it since; if someone did, nothing is written and the
    command exits 1: look again with `status`. Exit 3 when the table cannot be read.
    """


def _who() -> str:
    """Who steers, for the rollout's message; a process without a user name still gets to steer."""
    try:
        return getpass.getuser() or "someone"
    except (OSError, KeyError, ImportError):
        return "someone"


def _read_record(store: EndpointStore, name: str) -> dict[str, Any]:
    try:
        item = store.get(name)
    except StoreError as exc:
        raise TableUnreadable(exc, "nothing was changed") from exc
    if item is None:
        raise click.ClickException(f'endpoint "{name}" does not exist (table {store.config.table})')
    return item


def _rolled_out(name: str, item: dict[str, Any], settings: StackSettings) -> tuple[Endpoint, RolloutPolicy, str]:
    """The record, its policy and where the policy comes from; a record that is not rolled out is an error."""
    parsed = parse_endpoint(item, allowed_namespaces=settings.allowed_namespaces)
    if parsed.endpoint is None or not parsed.ok:
        raise click.ClickException(f'endpoint "{name}" is invalid for stack {settings.stack} (its regions keep what '
                                   "they run):\n  " + "\n  ".join(parsed.errors))
    ep = parsed.endpoint
    policy = rollout.policy_for(ep, settings.rollout_policy)
    if policy is None:
        raise click.ClickException(f'endpoint "{name}" has no rollout policy (no rollout_policy in the record, no '
                                   f"gco:rolloutPolicy in stack {settings.stack}): its spec changes reach every "
                                   "region at once, there is no rollout to show or steer")
    source = "the record's rollout_policy" if ep.rollout_policy is not None else \
        f"stack {settings.stack}'s gco:rolloutPolicy"
    return ep, policy, source


def _unreadable(name: str, problem: str) -> str:
    return (f'endpoint "{name}": {problem}; its regions keep what they run. `gco-infra rollout abort {name} '
            "--reset` removes the attribute and starts the current revision over")


def rollout_report(ep: Endpoint, policy: RolloutPolicy, source: str, state: rollout.RolloutState | None,
                   problem: str | None) -> dict[str, Any]:
    """What `rollout status` shows, as plain values (its --json): waves numbered from 1."""
    waves = rollout.waves_for(policy, ep.target_regions)
    bakes = rollout.bakes_for(policy, ep.target_regions)  # what the gate waits, wave by wave
    current = spec_revision(ep)
    regions = []
    for number, wave in enumerate(waves, 1):
        for region in wave:
            status = ep.status_in(region)
            regions.append({"region": region, "wave": number,
                            "allowed": state.regions.get(region) if state is not None else None,
                            "running": status.revision, "state": status.state or "pending",
                            "ready": status.replicas_ready, "desired": status.replicas_desired})
    report: dict[str, Any] = {
        "endpoint": ep.name, "spec_revision": current,
        "summary": "" if problem else rollout.describe(ep, policy, state),
        "policy": {"source": source, "unready_limit_seconds": policy.unready_limit_seconds, "urgent": policy.urgent,
                   "waves": [{"wave": i, "regions": list(w), "bake_seconds": bakes[i - 1]}
                             for i, w in enumerate(waves, 1)]},
        "rollout": None, "problem": problem, "regions": regions,
    }
    if state is not None:
        report["rollout"] = {
            "revision": state.revision, "current": state.revision == current, "phase": state.phase,
            "wave": state.wave + 1 if state.wave < len(waves) else None, "waves": len(waves),
            "message": state.message, "failed": list(state.failed),
            "approved_wave": state.approved + 1 if state.approved >= 0 else None,
            "wave_started": state.wave_started, "healthy_since": state.healthy_since,
            "updated_at": state.updated_at, "seq": state.seq,
        }
    return report


def render_rollout(report: dict[str, Any]) -> Group:
    """`rollout status` for a person; every value from the table is shown as text, never as markup."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    policy = report["policy"]
    waves = "; ".join(f"wave {w['wave']}: {', '.join(w['regions'])} (bake {w['bake_seconds']}s)" for w in policy["waves"])
    facts.add_row("endpoint", Text(f"{report['endpoint']}, spec revision {report['spec_revision']}"))
    facts.add_row("policy", Text(f"{waves}; unready limit {policy['unready_limit_seconds']}s"
                                 f"{'; urgent: every change to every region at once' if policy['urgent'] else ''}"
                                 f" ({policy['source']})"))
    state = report["rollout"]
    if report["problem"]:
        facts.add_row("rollout", Text(f"unreadable: {report['problem']}", style="red"))
        facts.add_row("", Text(f"its regions keep what they run; `gco-infra rollout abort {report['endpoint']} "
                               "--reset` removes it and the health job starts the current revision over"))
    elif state is None:
        facts.add_row("rollout", Text(f"none recorded yet: revision {report['spec_revision']} is pending (the "
                                      "health job records its rollout on its next tick)"))
    else:
        revision = state["revision"]
        if not state["current"]:
            revision += (f" (the record's spec is now {report['spec_revision']}: the health job starts its rollout "
                         "on its next tick)")
        facts.add_row("revision", Text(revision))
        moving = state["phase"] in ("progressing", "paused")
        where = "" if state["wave"] is None or state["phase"] == "complete" else \
            f"{',' if moving else ' in'} wave {state['wave']} of {state['waves']}"
        facts.add_row("phase", Text(state["phase"] + where, style=PHASE_COLOURS.get(state["phase"], "")))
        if moving and state["approved_wave"] is not None and state["approved_wave"] == state["wave"]:
            facts.add_row("approved", Text(f"wave {state['approved_wave']}: it advances once healthy, without its "
                                           "bake time"))
        facts.add_row("message", Text(state["message"] or "-"))
        facts.add_row("failed", Text(", ".join(state["failed"]) or "-"))
        facts.add_row("updated", Text(f"{state['updated_at'] or '-'} (seq {state['seq']})"))
    regions = Table("wave", "region", "allowed", "running", "state", "ready/desired", title="target regions")
    for r in report["regions"]:
        ready = f"{r['ready'] or 0}/{r['desired']}" if r["desired"] is not None else "-"
        regions.add_row(str(r["wave"]), Text(r["region"]), Text(r["allowed"] or "-"), Text(r["running"] or "-"),
                        Text(r["state"]), ready)
    legend = Text("allowed: the revision the rollout lets the region run (- : none recorded; the region keeps what "
                  "it runs, unless nothing runs there or it is in the first wave of a change not recorded yet); "
                  "running: the revision its Deployment runs, as its health job last reported", style="dim")
    return Group(facts, regions, legend)


@rollout_group.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="The same as JSON (waves numbered from 1, as in the text).")
@click.option("--stack", default="local", show_default=True, envvar="GCO_STACK", help=STACK_HELP)
def rollout_status(name: str, as_json: bool, stack: str) -> None:
    """Where NAME's rollout stands, region by region.

    Shows the policy's waves with their bake time, the rollout's revision, phase, wave, message and
    failed revisions, and per target region: its wave, the revision the rollout lets it run (allowed;
    - : none recorded), the revision its Deployment runs (running, as its health job last reported),
    its state and ready/desired replicas. Exit 1 when the rollout attribute cannot be read.
    """
    settings = _stack_settings(stack)
    item = _read_record(_stack_store(settings), name)
    ep, policy, source = _rolled_out(name, item, settings)
    state, problem = rollout.read_state(item)
    report = rollout_report(ep, policy, source, state, problem)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        out.print(render_rollout(report))
    if problem:
        sys.exit(1)


def _steer(name: str, stack: str, move: Callable[[rollout.RolloutState, float, str], rollout.RolloutState]) -> None:
    """Read, check, apply ``move`` and write back only if the rollout is still the one read."""
    settings = _stack_settings(stack)
    store = _stack_store(settings)
    item = _read_record(store, name)
    _rolled_out(name, item, settings)
    state, problem = rollout.read_state(item)
    if problem is not None:
        raise click.ClickException(_unreadable(name, problem))
    if state is None:
        raise click.ClickException(f'endpoint "{name}": no rollout recorded yet (the health job records one on its '
                                   "next tick after a spec change); nothing to steer")
    try:
        new = move(state, time.time(), _who())
    except rollout.SteerError as exc:
        raise click.ClickException(f'endpoint "{name}": {exc}') from exc
    try:
        written = store.write_rollout(name, rollout.state_to_item(new), expected_seq=state.seq)
    except StoreError as exc:
        raise click.ClickException(f'endpoint "{name}": {exc}; the rollout may or may not have changed: look again '
                                   f"with `gco-infra rollout status {name}`") from exc
    if not written:
        raise click.ClickException(f'endpoint "{name}": the rollout changed meanwhile (it is no longer seq '
                                   f"{state.seq}, as read: a health job or someone else wrote it, or the endpoint is "
                                   f"gone); nothing was written. Look again with `gco-infra rollout status {name}`")
    moved = [f"{r} {state.regions.get(r, '-')} -> {rev}" for r, rev in sorted(new.regions.items())
             if state.regions.get(r) != rev]
    console.print(f'endpoint "{name}": rollout of {new.revision}: {state.phase} -> {new.phase}: {new.message}'
                  + (f" ({'; '.join(moved)})" if moved else ""), markup=False, highlight=False)


@rollout_group.command("pause")
@click.argument("name")
@click.option("--stack", default="local", show_default=True, envvar="GCO_STACK", help=STACK_HELP)
def rollout_pause(name: str, stack: str) -> None:
    """Hold NAME's progressing rollout where it is until `resume`.

    No further wave takes the revision, and the gate neither advances nor rolls back: every region
    keeps the revision it may run now.
    """
    _steer(name, stack, rollout.pause)


@rollout_group.command("resume")
@click.argument("name")
@click.option("--stack", default="local", show_default=True, envvar="GCO_STACK", help=STACK_HELP)
def rollout_resume(name: str, stack: str) -> None:
    """Let NAME's paused rollout go on.

    The paused wave starts over: its unready limit and bake time count from now.
    """
    _steer(name, stack, rollout.resume)


@rollout_group.command("abort")
@click.argument("name")
@click.option("--reset", is_flag=True,
              help="Instead, replace the rollout attribute, whatever it holds (the way out of one that cannot be "
                   "read), with a stopped rollout of the record's current revision: nothing moves, every region "
                   "keeps what it runs, and the next change of the record's spec starts a new rollout. (A record "
                   "that is not valid has the attribute removed.)")
@click.option("--stack", default="local", show_default=True, envvar="GCO_STACK", help=STACK_HELP)
def rollout_abort(name: str, reset: bool, stack: str) -> None:
    """Stop NAME's rollout and roll it back, as a failed gate would.

    Every region that took the revision goes back to the revision it ran before (a region whose
    earlier revision is not known keeps it; the message says which), and the revision is marked
    failed: it is not tried again until the record's spec changes.
    """
    if not reset:
        _steer(name, stack, rollout.abort)
        return
    settings = _stack_settings(stack)
    store = _stack_store(settings)
    item = _read_record(store, name)
    if item.get(rollout.ATTRIBUTE) is None:
        console.print(f'endpoint "{name}": no rollout recorded; nothing to reset', markup=False, highlight=False)
        return
    parsed = parse_endpoint(item, allowed_namespaces=settings.allowed_namespaces)
    try:
        if parsed.endpoint is None:
            done = store.clear_rollout(name)
            what = "rollout removed (the record is not valid)"
        else:
            current = spec_revision(parsed.endpoint)
            old, _ = rollout.read_state(item)
            reset_state = rollout.RolloutState(
                revision=current, phase="aborted", failed=(current,), seq=(old.seq if old else 0) + 1,
                specs=dict(old.specs) if old else {}, updated_at=store_now(),
                message=f"reset by {_who()}: every region keeps what it runs until the spec changes")
            done = store.write_rollout(name, rollout.state_to_item(reset_state), expected_seq=None, force=True)
            what = f"rollout of {current} reset: every region keeps what it runs until the record's spec changes"
    except StoreError as exc:
        raise click.ClickException(f'endpoint "{name}": {exc}; look again with `gco-infra rollout status {name}`') from exc
    if not done:
        raise click.ClickException(f'endpoint "{name}" no longer exists (table {store.config.table})')
    console.print(f'endpoint "{name}": {what}', markup=False, highlight=False)


@rollout_group.command("approve")
@click.argument("name")
@click.option("--stack", default="local", show_default=True, envvar="GCO_STACK", help=STACK_HELP)
def rollout_approve(name: str, stack: str) -> None:
    """Let NAME's current wave skip its bake time.

    The wave advances as soon as every region of it is healthy on the revision. A wave that is not
    healthy is not pushed on: the gate still waits for every region of it, and still rolls back
    when one stays unready. A paused rollout stays paused until `resume`.
    """
    _steer(name, stack, rollout.approve)


# ---- runner ------------------------------------------------------------------------------------------------------


def _stacks_for(names: tuple[str, ...]) -> list[str]:
    if names:
        return list(names)
    return ["local", "local-2"]


def build_runner(stacks: list[str], opts: Any, progress):
    from .runner import Runner, with_local_overrides

    settings = [settings_from_stack_file(s) for s in stacks]
    # In a pod (GCO_IN_CLUSTER=true) even a kubeconfig-path stack uses the pod's ServiceAccount and the
    # table and state backend of its environment variables, never a local environment's.
    is_local = all(s.kubeconfig and not s.cluster_name for s in settings) and not in_cluster()
    if is_local:
        env_obj = localenv.LocalEnv.load()
        if not env_obj.moto_port:  # never started here; once started, a table that is down fails the tick (exit 3)
            raise click.ClickException("the local environment is not running: run `gco-infra local up` first")
        settings = [with_local_overrides(s, str(env_obj.kubeconfig(s.region)), env_obj.dynamodb_endpoint, env_obj.table)
                    for s in settings]
        env = env_obj.pulumi_env()
        store = env_obj.store()
    else:
        env = {k: v for k, v in os.environ.items() if k.startswith(("PULUMI_", "AWS_", "GCO_", "PATH", "HOME"))}
        store = EndpointStore(settings[0].store)
    return Runner(settings, store, env, opts, progress=progress)


OPERATION_LIMIT = 3600.0
"""Seconds after which a running Pulumi operation makes the runner's liveness probe fail."""
DELETION_WINDOW = 60.0
"""Seconds over which `run`'s removals count together against the deletion bound (its ticks are 2 s
apart; one 15 s tick of the old interval was judged on its own)."""
SHUTDOWN_WAIT = 80.0
"""On SIGTERM, seconds the running operations get to end before their engines are interrupted
(then 30 s more to write their checkpoints): inside the runner pod's 120 s grace period."""


@main.command("run")
@click.option("--once", is_flag=True, help="One tick, then exit with a meaningful code (0 ok, 1 failed, 3 table unreadable, 4 refused: mass deletion or misplaced shard endpoints, 75 locked or waiting for another runner).")
@click.option("--stack", "stacks", multiple=True,
              help="Region stack to drive, as named by stacks/Pulumi.<stack>.yaml (repeatable). A region with "
                   "gco:shards=K is applied as its K shard stacks <stack>.shard-0 .. <stack>.shard-K-1. "
                   "Default: the local stacks.")
@click.option("--interval", type=float, default=2.0, show_default=True, envvar="GCO_RUN_INTERVAL",
              help="Seconds between ticks. A tick with nothing to do costs two DynamoDB requests (the stream) "
                   "and no Pulumi operation.")
@click.option("--full-every", type=float, default=None, envvar="GCO_FULL_EVERY",
              help="Every endpoint's objects are refreshed, and drift repaired, at least once in this many "
                   "seconds: the backstop for drift the watch did not see. Done as sweeps of a few endpoints "
                   "in targeted updates, never one long full update. Default: 21600 with --watch, 600 without.")
@click.option("--watch/--no-watch", "watch", default=True, show_default=True, envvar="GCO_WATCH",
              help="Watch the objects the stacks own; when someone else changes or deletes one, refresh and "
                   "update just that endpoint at once (not available for an EKS stack run outside its cluster).")
@click.option("--checkpoints/--no-checkpoints", default=False, show_default=True, envvar="GCO_CHECKPOINTS",
              help="Write the state after every step of an operation (the engine's default). Without, it is "
                   "written once at the end (several times faster on S3); after a killed runner, the next one "
                   "removes the dead lock and runs a full reconcile that re-declares and refreshes everything.")
@click.option("--full", is_flag=True, help="On the first tick, declare every endpoint again (a full `up --refresh`) "
                                          "instead of judging the objects against the checkpoint.")
@click.option("--allow-mass-delete", is_flag=True, help="Allow a tick to remove more endpoints than the deletion bound.")
@click.option("--max-delete-fraction", type=float, default=0.10, show_default=True, help="Deletion bound, as a fraction of a region's endpoints (all shards together).")
@click.option("--max-delete-min", type=int, default=2, show_default=True, help="Deletion bound floor (endpoints).")
@click.option("--parallel", type=int, default=None,
              help="Stacks operated at once (one worker process each, up to about 400 MiB while it operates). "
                   "Default: the CPUs this process may use (affinity and cgroup quota), at least 2, at most the "
                   "number of stacks. With 2 or more, full reconciles never take the last free worker.")
@click.option("--table-stream/--no-table-stream", default=True, show_default=True, envvar="GCO_TABLE_STREAM",
              help="When the table has a DynamoDB stream (any view type), re-read only the items written since "
                   "the last tick instead of scanning the whole table; without a stream every tick scans.")
@click.option("--rescan-every", type=float, default=300.0, show_default=True, envvar="GCO_RESCAN_EVERY",
              help="Seconds between complete scans of the table even while following its stream.")
@click.option("--liveness-port", type=int, default=None,
              help="Serve /healthz here: 200 while ticks complete and no Pulumi operation has run for an hour.")
@click.option("--metrics-port", type=int, default=None, envvar="GCO_METRICS_PORT",
              help="Serve Prometheus metrics on /metrics here: ticks by outcome, Pulumi operations, failures and "
                   "last success time per stack, operation durations. Off by default.")
def run(once: bool, stacks: tuple[str, ...], interval: float, full_every: float | None, watch: bool, checkpoints: bool,
        full: bool, allow_mass_delete: bool, max_delete_fraction: float, max_delete_min: int, parallel: int | None,
        table_stream: bool, rescan_every: float, liveness_port: int | None, metrics_port: int | None) -> None:
    """Apply the regional stacks from the table: nothing when nothing changed, a targeted update of the
    endpoints that changed or drifted; on the first tick a full reconcile that judges every object
    against the checkpoint (from the drift watch's lists, or a refresh) and updates what drifted; a
    full `up --refresh` after a failure and with --full.
    Operations run in worker processes beside the ticks; see the README's "The runner"."""
    from .plan import EXIT_CONFIG, EXIT_STORE, RunnerOptions, exit_code

    watch = watch and not once
    full_every_given = full_every
    if full_every is None:
        full_every = 21600.0 if watch else 600.0
    opts = RunnerOptions(full_every=full_every, allow_mass_delete=allow_mass_delete, parallel=parallel or 1,
                         max_delete_fraction=max_delete_fraction, max_delete_min=max_delete_min,
                         table_stream=table_stream, rescan_every=rescan_every, checkpoints=checkpoints,
                         overlap=not once, deletion_window=0.0 if once else DELETION_WINDOW)
    try:
        runner = build_runner(_stacks_for(stacks), opts, progress=lambda s: log.info("progress", msg=s))
        if (disagreement := rollout_policy_disagreement()) is not None:
            log.warning("rollout policy", problem=disagreement)
    except ProgramError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(EXIT_CONFIG)
    if parallel is None:
        runner.opts = opts = replace(opts, parallel=max(1, min(max(2, available_cpus()), len(runner.states))))
    if watch:
        for region in runner.watch_drift():
            if full_every_given is None:  # the default: without a watch, the sweep is the only repair
                runner.full_every_for[region] = 600.0
            log.warning("no drift watch", region=region,
                        full_every=runner.full_every_for.get(region, full_every))
    stop = {"now": False}

    def terminate(*_: Any) -> None:
        stop.update(now=True)
        runner.wakeup().set()

    signal.signal(signal.SIGTERM, terminate)
    last_tick = {"at": time.time()}
    if liveness_port:
        from .health import serve_liveness

        # A tick that hangs (a stuck engine, an unreachable table without timeouts) fails the probe.
        # Ticks never wait for operations (they run beside them), so the probe fails when ticks stop or
        # when one operation has run for an hour (a stuck engine).
        serve_liveness(lambda: time.time() - last_tick["at"] < max(3 * interval, 300)
                       and runner.oldest_operation() < OPERATION_LIMIT, liveness_port)
    metrics = None
    if metrics_port:
        from .metrics import RunnerMetrics

        metrics = RunnerMetrics()
        metrics.serve(metrics_port)
    first = True
    code = 0
    watch_problems: dict[str, str] = {}
    try:
        while True:
            started = time.monotonic()
            code = 0  # each tick's own outcome
            try:
                results = runner.tick(force_full=full and first)
            except StoreError as exc:
                log.error("tick stopped before any change: the table could not be read", error=str(exc))
                code = EXIT_STORE
                results = []
            except ProgramError as exc:
                log.error("tick failed", error=str(exc))
                code = EXIT_CONFIG
                results = []
            eventful = [r for r in results if r.action != "none" or r.status_writes or once]
            for r in eventful:
                log.info("stack", summary=r.summary(), stack=r.stack, action=r.action, changed=r.changed,
                         created=r.created, updated=r.updated, deleted=r.deleted, failed=r.failed,
                         seconds=round(r.seconds, 2), errors=r.endpoint_errors or None)
            if results:
                code = exit_code(results)
            if eventful:
                log.info("tick", table_read=runner.last_read, seconds=round(time.monotonic() - started, 2),
                         operations=sum(r.operations for r in results))
            problems = runner.watch_problems()
            if problems != watch_problems:
                log.warning("drift watch", problems=problems or None)
                watch_problems = problems
            if metrics is not None:
                from .metrics import OUTCOMES

                metrics.observe(results, time.monotonic() - started, OUTCOMES.get(code, "failed"),
                                table_read=runner.last_read if results else "")
            last_tick["at"] = time.time()
            first = False
            if once or stop["now"]:
                break
            # Drift seen by a watch and an operation that ended wake the loop before the interval.
            runner.wakeup().wait(max(0.0, interval - (time.monotonic() - started)))
            runner.wakeup().clear()
            if stop["now"]:
                break
        if stop["now"] and runner.busy:
            log.info("shutting down: waiting for the running operations", running=len(runner._inflight))
            for r in runner.drain(SHUTDOWN_WAIT):
                log.info("stack", summary=r.summary(), stack=r.stack, action=r.action, errors=r.endpoint_errors or None)
    finally:
        runner.close()
    sys.exit(code if once else 0)


def available_cpus() -> int:
    """CPUs this process may use: its affinity, and its cgroup's CPU quota (a container's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


# ---- previews --------------------------------------------------------------------------------------------------------


@main.command("preview")
@click.option("--stack", "stacks", multiple=True, help="Stack to preview (repeatable). Default: the local stacks.")
@click.option("--markdown", is_flag=True, help="Markdown for a pull-request comment (summarised to fit one comment).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable changes per stack.")
@click.option("--refresh", is_flag=True, help="Refresh each stack against its cluster first (shows drift too).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the report here instead of stdout.")
def preview(stacks: tuple[str, ...], markdown: bool, as_json: bool, refresh: bool, output: Path | None) -> None:
    """What applying the stacks would do to the running endpoints, per region, changing nothing.

    Each change says whether the endpoint's table record changed since the last apply ("table") or
    the declaration changed for the same record ("code", i.e. the checked-out revision).
    Needs read access only: the state backend, the table and the clusters.
    """
    from rich.markdown import Markdown

    from .preview import preview_stack, render_json, render_markdown

    names = _stacks_for(stacks)
    try:
        from .plan import RunnerOptions

        runner = build_runner(names, RunnerOptions(), progress=lambda s: None)
    except ProgramError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        items = runner.store.list_endpoints()
    except StoreError as exc:
        raise TableUnreadable(exc, "no preview without a complete read") from exc
    from .preview import StackPreview

    try:
        for state in runner.states.values():
            runner.load_outputs(state)
        misplaced, unknown = runner.check_regions()
    except ProgramError as exc:
        raise click.ClickException(str(exc)) from exc
    blocked = {**unknown, **misplaced}
    previews = []
    for state in runner.states.values():
        if state.settings.region_stack in blocked:  # `run` would not apply it either
            previews.append(StackPreview(stack=state.settings.stack, region=state.settings.region,
                                         error=blocked[state.settings.region_stack]))
            continue
        console.print(f"[cyan]preview[/] {state.settings.stack} ({state.settings.region})")
        previews.append(preview_stack(state.settings, items, runner.env, refresh=refresh))
    text = render_json(previews) if as_json else render_markdown(previews)
    if output:
        output.write_text(text)
    elif as_json or markdown:
        click.echo(text, nl=False)
    else:
        out.print(Markdown(text))
    sys.exit(1 if any(p.error for p in previews) else 0)


# ---- health job -----------------------------------------------------------------------------------------------------


def known_regions(root: Path = PROJECT_ROOT) -> list[str]:
    """The platform's region list: the regions of every stack file."""
    regions = []
    for f in sorted((root / "stacks").glob("Pulumi.*.yaml")):
        try:
            regions.append(settings_from_stack_file(f.name[len("Pulumi."):-len(".yaml")]).region)
        except ProgramError:
            continue
    return regions


@main.command("health")
@click.option("--stack", required=True, help="The regional stack whose cluster this job watches (region, namespaces, table).")
@click.option("--once", is_flag=True, help="One tick, then exit (0 ok, 1 error, 75 not the leader).")
@click.option("--interval", type=float, default=15.0, show_default=True,
              help="Seconds between ticks. While any endpoint is under a rollout policy, a tick comes sooner (at "
                   "most one per 2 s) when the watch cache sees a Deployment or Ingress change, or when a rollout's "
                   "bake time or unready limit ends.")
@click.option("--threshold", type=float, default=300.0, show_default=True, envvar="GCO_UNREADY_THRESHOLD",
              help="Seconds with zero ready replicas before the endpoint's Ingress is withdrawn from the shared ALB.")
@click.option("--lease-namespace", default="gco-system", show_default=True, help="Namespace of the leader-election Lease.")
@click.option("--lease-seconds", type=int, default=30, show_default=True, help="Lease duration.")
@click.option("--renew-deadline", type=float, default=20.0, show_default=True, help="Stop acting this long after the last renewal (< lease).")
@click.option("--no-leader-election", is_flag=True, help="Act without a Lease (only when exactly one replica runs).")
@click.option("--in-cluster", is_flag=True, help="Use the pod's service account instead of a kubeconfig.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="Kubeconfig (default: the local environment's).")
@click.option("--liveness-port", type=int, default=None, help="Serve /healthz here: 200 while ticks succeed.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds before any one Kubernetes API call gives up (the Lease's included).")
@click.option("--table-stream/--no-table-stream", default=True, show_default=True, envvar="GCO_TABLE_STREAM",
              help="When the table has a DynamoDB stream (any view type), re-read only the items written since "
                   "the last tick instead of scanning the whole table; without a stream every tick scans.")
@click.option("--rescan-every", type=float, default=300.0, show_default=True, envvar="GCO_RESCAN_EVERY",
              help="Seconds between complete scans of the table even while following its stream.")
@click.option("--watch-cache/--no-watch-cache", default=True, show_default=True, envvar="GCO_HEALTH_WATCH_CACHE",
              help="Observe Deployments and Ingresses from a watch-backed cache (one LIST per kind and namespace "
                   "at start, then WATCHes) instead of listing them every tick; a tick lists them itself while "
                   "the cache is not ready or a stream is failing. --once always lists.")
def health(stack: str, once: bool, interval: float, threshold: float, lease_namespace: str, lease_seconds: int,
           renew_deadline: float, no_leader_election: bool, in_cluster: bool, kubeconfig: str | None,
           liveness_port: int | None, request_timeout: float, table_stream: bool, rescan_every: float,
           watch_cache: bool) -> None:
    """Readiness, the Ingress watchdog, promotion and purge for one regional cluster, written to the table."""
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    from .health import HealthJob, LeaseElector, job_is_healthy, serve_liveness

    try:
        settings = settings_from_stack_file(stack)
    except ProgramError as exc:
        raise click.ClickException(str(exc)) from exc
    if (disagreement := rollout_policy_disagreement()) is not None:
        log.warning("rollout policy", problem=disagreement)
    store = EndpointStore(settings.store)
    if in_cluster:
        kconfig.load_incluster_config()
        api = kclient.ApiClient()
    else:
        env = localenv.LocalEnv.load()
        path = kubeconfig or settings.kubeconfig
        if settings.kubeconfig and not kubeconfig and env.apiservers:
            path = str(env.kubeconfig(settings.region))
            store = env.store()
        if not path:
            raise click.ClickException(f"stack {stack}: no kubeconfig; pass --kubeconfig or --in-cluster")
        api = kconfig.new_client_from_config(path)
    elector = None if no_leader_election else LeaseElector(api, lease_namespace, lease_seconds=lease_seconds,
                                                            renew_deadline=renew_deadline, request_timeout=request_timeout)
    job = HealthJob(store, api, settings.region, settings.allowed_namespaces, threshold=threshold,
                    known_regions=known_regions(), elector=elector, request_timeout=request_timeout,
                    table_stream=table_stream, rescan_every=rescan_every, watch_cache=watch_cache and not once,
                    rollout_policy=settings.rollout_policy)
    if liveness_port:
        serve_liveness(job_is_healthy(job, max_age=max(3 * interval, 60)), liveness_port)
    try:
        while True:
            started = time.monotonic()
            report = job.tick()
            log.info("health", region=settings.region, leader=report.leader, endpoints=report.endpoints,
                     writes=report.writes, withdrawn=report.withdrawn or None, readmitted=report.readmitted or None,
                     promoted=report.promoted or None, purged=report.purged or None, invalid=report.invalid or None,
                     rollouts=report.rollouts or None,
                     problems=report.problems or None, api_calls=report.api_calls, observed=report.observed or None,
                     table_read=report.table_read or None, error=report.error)
            if once:
                sys.exit(1 if report.error else 0 if report.leader else 75)
            job.wait(max(0.0, interval - (time.monotonic() - started)))
    finally:
        job.close()


# ---- the demo: the README's first command ------------------------------------------------------------------


@main.command("demo")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=PROJECT_ROOT / "examples" / "endpoints.yaml", show_default=True)
def demo(path: Path) -> None:
    """Start the local environment, load example endpoints, apply both local regions once, show the result."""
    from .plan import RunnerOptions, exit_code

    ctx = click.get_current_context()
    ctx.invoke(local_up)
    ctx.invoke(endpoints_apply, path=path, namespaces="gco-inference,gco-inference-team-b")
    runner = build_runner(["local", "local-2"], RunnerOptions(), progress=lambda s: console.print(f"[cyan]run[/] {s}"))
    try:
        results = runner.tick(force_full=True)
    finally:
        runner.close()
    for r in results:
        console.print(r.summary())
    env = localenv.LocalEnv.load()
    out.print(status_table(env.store().list_endpoints()))
    out.print(objects_table(env))
    sys.exit(exit_code(results))


def objects_table(env: localenv.LocalEnv) -> Table:
    from kubernetes import client

    table = Table("region", "kind", "namespace", "name", "detail", title="Kubernetes objects (label gco.io/type=inference)")
    selector = "gco.io/type=inference"
    for region in env.apiservers:
        api = env.kube(region)
        apps, core, net, auto = client.AppsV1Api(api), client.CoreV1Api(api), client.NetworkingV1Api(api), client.AutoscalingV2Api(api)
        for d in apps.list_deployment_for_all_namespaces(label_selector=selector).items:
            c = d.spec.template.spec.containers[0]
            table.add_row(region, "Deployment", d.metadata.namespace, d.metadata.name, f"replicas={d.spec.replicas} image={c.image}")
        for s in core.list_service_for_all_namespaces(label_selector=selector).items:
            table.add_row(region, "Service", s.metadata.namespace, s.metadata.name, f"port 80 -> {s.spec.ports[0].target_port}")
        for i in net.list_ingress_for_all_namespaces(label_selector=selector).items:
            table.add_row(region, "Ingress", i.metadata.namespace, i.metadata.name, i.spec.rules[0].http.paths[0].path)
        for h in auto.list_horizontal_pod_autoscaler_for_all_namespaces(label_selector=selector).items:
            table.add_row(region, "HPA", h.metadata.namespace, h.metadata.name, f"{h.spec.min_replicas}..{h.spec.max_replicas}")
    return table


if __name__ == "__main__":
    main()
