"""Runner benchmark on the local environment: N endpoints in one region.

For each N: first full apply, a no-change tick, a one-endpoint change until the live Deployment
shows it, the full reconcile of a runner's start (without a drift watch: refresh, then update what
drifted; with one: judged from its first lists), the one of --full (every endpoint declared
again, up --refresh) and the one of a new declaration version (every endpoint declared again; with
the drift watch's lists finding nothing drifted, without a refresh). Records seconds, Pulumi operations and DynamoDB calls
per tick. Run: .venv/bin/python bench/runner_bench.py [--sizes 100,500,1000] [--shards 1,10]
[--out bench/RESULTS.md]

The tick right after the first apply re-reads the statuses the apply wrote; the no-change tick is
the one after it (steady state: nothing written since the last tick).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client  # noqa: E402

from gco_infra import localenv  # noqa: E402
from gco_infra import state as state_backend  # noqa: E402
from bench.cpu import CpuSampler  # noqa: E402
from gco_infra.program import settings_from_stack_file  # noqa: E402
from gco_infra.runner import Runner, RunnerOptions, with_local_overrides  # noqa: E402


def endpoint(i: int, env_value: str = "1") -> dict:
    return {"endpoint_name": f"bench-{i:04d}", "desired_state": "running", "target_regions": ["local-1"],
            "spec": {"image": "example.com/org/server:1", "gpu_count": 0, "env": {"V": env_value}}}


START = "full reconcile (a runner's start without a watch: refresh)"
WATCHED = "full reconcile (a runner's start with the drift watch)"
DECLARE_ALL = "full reconcile (--full: up --refresh)"
NEW_VERSION = "full reconcile (a new declaration version, the drift watch's lists: up without a refresh)"


def older_declaration(ws, stack: str) -> None:
    """Make the stack's state say an older program declared it (its declarationVersion output), as
    after an upgrade of the runner: its next start declares every endpoint again."""
    from pulumi import automation as auto

    dep = ws.export_stack(stack)
    root = next(r for r in dep.deployment["resources"] if r["type"] == "pulumi:pulumi:Stack")
    root["outputs"]["declarationVersion"] = "an older one"
    ws.import_stack(stack, auto.Deployment(version=dep.version, deployment=dep.deployment))


def apiserver_requests(api: client.ApiClient) -> dict[str, int]:
    """apiserver_request_total by verb, as the API server counts them (its /metrics)."""
    resp = api.call_api("/metrics", "GET", _preload_content=False, auth_settings=["BearerToken"])
    verbs: dict[str, int] = {}
    for line in resp.data.decode().splitlines():
        if line.startswith("apiserver_request_total{"):
            labels, value = line[len("apiserver_request_total{"):].rsplit("} ", 1)
            verb = dict(kv.split("=", 1) for kv in labels.split(",")).get("verb", '""').strip('"')
            verbs[verb] = verbs.get(verb, 0) + int(float(value))
    return verbs


def settle(api: client.ApiClient, quiet: int = 25, every: float = 5.0, limit: float = 300.0) -> float:
    """Wait until the cluster's controllers are done with what an apply started (fewer than ``quiet``
    writes per ``every`` seconds at the API server), so that a restart is measured in a settled
    cluster, as a runner restarts in production; returns the seconds waited."""
    t0 = time.perf_counter()
    writes = lambda: sum(c for v, c in apiserver_requests(api).items() if v in ("POST", "PUT", "PATCH", "DELETE"))  # noqa: E731
    last = writes()
    while time.perf_counter() - t0 < limit:
        time.sleep(every)
        now = writes()
        if now - last < quiet:
            break
        last = now
    return time.perf_counter() - t0


def measure(n: int, progress, shards: int = 1, table_stream: bool = True, parallel: int = 1,
            checkpoints: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="gco-bench-") as tmp:
        env = localenv.LocalEnv.load(Path(tmp))
        env.up(regions=("local-1",))
        try:
            store = env.store()
            with store._table.batch_writer() as w:
                for i in range(n):
                    w.put_item(Item=endpoint(i))
            s = settings_from_stack_file("local")
            s = with_local_overrides(s, str(env.kubeconfig("local-1")), env.dynamodb_endpoint, env.table)
            s = replace(s, shards=shards)

            def new_runner() -> Runner:  # the same settings for the first runner and each restart
                return Runner([s], store, env.pulumi_env(),
                              RunnerOptions(full_every=10**9, rescan_every=10**9, table_stream=table_stream,
                                            parallel=parallel, checkpoints=checkpoints))

            runner = new_runner()
            apps = client.AppsV1Api(env.kube("local-1"))
            row: dict = {"n": n}

            api = env.kube("local-1")

            def tick(label: str, **kw):
                ops, calls, reqs0 = runner.operations, store.calls, apiserver_requests(api)
                t0 = time.perf_counter()
                with CpuSampler() as cpu:
                    results = runner.tick(**kw)
                reqs1 = apiserver_requests(api)
                row.setdefault("cpu", {})[label] = cpu.seconds
                row.setdefault("requests", {})[label] = {v: reqs1.get(v, 0) - reqs0.get(v, 0) - (v == "GET")
                                                          for v in reqs1 if reqs1.get(v, 0) - reqs0.get(v, 0) - (v == "GET")}
                actions = ",".join(sorted({r.action for r in results}))
                row[label] = (time.perf_counter() - t0, runner.operations - ops, store.calls - calls, actions)
                progress(f"N={n} shards={shards} {label}: {row[label][0]:.2f}s, {row[label][1]} op(s), "
                         f"{row[label][2]} DynamoDB request(s), actions {actions}, table read: {runner.last_read}; "
                         f"API requests {row['requests'][label]}; CPU-s " +
                         ", ".join(f"{k} {v:.1f}" for k, v in row["cpu"][label].items()))
                for res in results:
                    if res.action in ("failed", "refused"):
                        raise RuntimeError(res.summary())

            tick("first full apply")
            tick("tick after apply")
            tick("no-change tick")
            target = f"bench-{n // 2:04d}"
            store.put_desired(endpoint(n // 2, "2"))
            t0 = time.perf_counter()
            tick("one-endpoint change")
            env_now = {e.name: e.value for e in apps.read_namespaced_deployment(target, "gco-inference").spec.template.spec.containers[0].env}
            assert env_now == {"V": "2"}, env_now
            live = time.perf_counter() - t0
            row["one-endpoint change"] = (live,) + row["one-endpoint change"][1:]
            runner.close()
            progress(f"N={n}: the cluster settled {settle(api):.0f}s after the apply (its controllers create the pods)")
            # A runner's start: it refreshes every object, then updates what changed or drifted (nothing here).
            runner = new_runner()
            tick(START)
            runner.close()
            def watched_start(label: str) -> Runner:
                """A new runner's start with the drift watch (`gco-infra run`): its first lists judge it."""
                runner = new_runner()
                ops, calls, reqs0 = runner.operations, store.calls, apiserver_requests(api)
                t0 = time.perf_counter()
                with CpuSampler() as cpu:
                    runner.watch_drift()
                    while not all(st.full_done for st in runner.states.values()):
                        for res in runner.tick():
                            if res.action in ("failed", "refused"):
                                raise RuntimeError(res.summary())
                        time.sleep(0.1)
                reqs1 = apiserver_requests(api)
                row["cpu"][label] = cpu.seconds
                row["requests"][label] = {v: reqs1.get(v, 0) - reqs0.get(v, 0) for v in reqs1 if reqs1.get(v, 0) - reqs0.get(v, 0)}
                row[label] = (time.perf_counter() - t0, runner.operations - ops, store.calls - calls, "judged")
                progress(f"N={n} shards={shards} {label}: {row[label][0]:.2f}s, {row[label][1]} op(s); "
                         f"API requests {row['requests'][label]}; CPU-s "
                         + ", ".join(f"{k} {v:.1f}" for k, v in row["cpu"][label].items()))
                return runner

            runner = watched_start(WATCHED)
            # --full: every endpoint declared again (up --refresh), as after a failure.
            tick(DECLARE_ALL, force_full=True)
            runner.close()
            # An upgrade that declares differently: every endpoint declared again; the watch's lists
            # found nothing drifted, so without a refresh. (The objects are left as they are here: the
            # state only says an older program declared them, so this and --full update nothing.)
            ws = state_backend.workspace(env.pulumi_env())
            for st in runner.states.values():
                older_declaration(ws, st.settings.stack)
            watched_start(NEW_VERSION).close()
            return row
        finally:
            env.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,500,1000")
    ap.add_argument("--shards", default="1",
                    help="comma-separated gco:shards values to measure each N with (e.g. 1,10); 'auto' is "
                         "one shard per 100 endpoints")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--checkpoints", choices=("on", "off"), default="off",
                    help="on: the engine's intermediate checkpoints; off (the runner's default): the state is "
                         "written once per operation (PULUMI_SKIP_CHECKPOINTS=true).")
    ap.add_argument("--parallel", default="2", help="comma-separated: stacks operated at once (worker processes)")
    ap.add_argument("--table-read", default="stream",
                    help="comma-separated: stream (follow the table's stream between scans), scan (scan every tick)")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for shards in args.shards.split(","):
            for mode in args.table_read.split(","):
                for par in (int(x) for x in args.parallel.split(",")):
                    k = max(1, n // 100) if shards == "auto" else int(shards)
                    row = measure(n, lambda s: print(mode, s, flush=True), shards=k, table_stream=mode == "stream",
                                  parallel=par, checkpoints=args.checkpoints == "on")
                    row["n"] = f"{n}, {k} shard{'s' if k > 1 else ''}, {mode}, parallel {par}"
                    rows.append(row)
    labels = ["first full apply", "tick after apply", "no-change tick", "one-endpoint change", START, WATCHED, DECLARE_ALL,
              NEW_VERSION]
    lines = [
        f"# Runner benchmark ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores)",
        "",
        "One region (stack `local`), real engine + provider + kube-apiserver + moto (S3 state, KMS secrets).",
        "Each cell: seconds / Pulumi operations / DynamoDB requests / Kubernetes requests (counted by the API",
        "server, controllers included). 'one-endpoint change' is until the live Deployment shows the change.",
        f"Checkpoints {args.checkpoints}. Table read: stream = follow the table's stream between scans, "
        "scan = scan it every tick.",
        "",
        "| N | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for row in rows:
        lines.append(f"| {row['n']} | " + " | ".join(
            f"{row[k][0]:.2f} s / {row[k][1]} / {row[k][2]} / {sum(row['requests'][k].values())}" for k in labels) + " |")
    parts = sorted({g for row in rows for k in labels for g in row["cpu"][k]},
                   key=lambda g: -sum(row["cpu"][k].get(g, 0) for row in rows for k in labels))
    lines += ["", "CPU seconds by part of the system (sampled from /proc):", "",
              "| N, phase | total | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
    for row in rows:
        for k in ("first full apply", START, WATCHED, DECLARE_ALL, NEW_VERSION, "one-endpoint change"):
            cpu = row["cpu"][k]
            lines.append(f"| {row['n']}, {k} | {sum(cpu.values()):.1f} | "
                         + " | ".join(f"{cpu.get(g, 0):.1f}" for g in parts) + " |")
    lines += ["", "Kubernetes requests by verb:", ""]
    for row in rows:
        for k in ("first full apply", START, WATCHED, DECLARE_ALL, NEW_VERSION):
            lines.append(f"- {row['n']}, {k}: " + ", ".join(f"{v} {c}" for v, c in sorted(row["requests"][k].items())))
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
