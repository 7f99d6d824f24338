"""Latency under churn, drift repair through the watch, and CPU per hour, on the local environment.

N endpoints in one region (one shard stack per 100 endpoints). The runner runs as `gco-infra run`
does (ticks beside operations, the worker processes, the drift watch, the table stream) while:
- a writer changes a random endpoint every --every seconds for --minutes minutes; latency is from
  the table write to the live Deployment carrying the change (seen by a watch of Deployments);
- every --drift-every seconds a random endpoint's Service is deleted by hand; repair time is until
  a new Service exists;
- every shard's periodic full reconcile falls inside the window (--full-every), so the figures show
  whether full reconciles hold changes back.
Then, with nothing changing, the idle loop is measured for --idle seconds and one full reconcile
of every shard is forced, to compute CPU seconds per hour at the default settings.

Run: .venv/bin/python bench/churn_bench.py [--n 1000] [--minutes 10] [--out bench/CHURN.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client, watch  # noqa: E402

from bench.cpu import CpuSampler  # noqa: E402
from bench.runner_bench import apiserver_requests, endpoint  # noqa: E402
from gco_infra import localenv  # noqa: E402
from gco_infra.program import settings_from_stack_file  # noqa: E402
from gco_infra.runner import Runner, RunnerOptions, with_local_overrides  # noqa: E402

NAMESPACE = "gco-inference"
DEFAULT_FULL_EVERY = 21600.0  # `gco-infra run` with --watch
DEFAULT_INTERVAL = 2.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class LiveDeployments:
    """Watches Deployments; records when each (endpoint, value of env V) was first live."""

    def __init__(self, api: client.ApiClient) -> None:
        self.apps = client.AppsV1Api(api)
        self.seen: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rv = self.apps.list_namespaced_deployment(NAMESPACE).metadata.resource_version
        while not self.stop.is_set():
            try:
                for ev in watch.Watch().stream(self.apps.list_namespaced_deployment, NAMESPACE, resource_version=rv,
                                               timeout_seconds=30):
                    obj = ev["object"]
                    rv = obj.metadata.resource_version
                    env = {e.name: e.value for e in (obj.spec.template.spec.containers[0].env or [])}
                    with self.lock:
                        self.seen.setdefault((obj.metadata.name, env.get("V", "")), time.monotonic())
                    if self.stop.is_set():
                        return
            except client.ApiException as exc:
                if exc.status == 410:
                    rv = self.apps.list_namespaced_deployment(NAMESPACE).metadata.resource_version

    def when(self, name: str, value: str) -> float | None:
        with self.lock:
            return self.seen.get((name, value))


class NewServices:
    """Watches Services; records when each (name, uid) was first seen."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.seen: dict[tuple[str, str], float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rv = self.core.list_namespaced_service(NAMESPACE).metadata.resource_version
        while not self.stop.is_set():
            try:
                for ev in watch.Watch().stream(self.core.list_namespaced_service, NAMESPACE, resource_version=rv,
                                               timeout_seconds=30):
                    obj = ev["object"]
                    rv = obj.metadata.resource_version
                    self.seen.setdefault((obj.metadata.name, obj.metadata.uid), time.monotonic())
                    if self.stop.is_set():
                        return
            except client.ApiException as exc:
                if exc.status == 410:
                    rv = self.core.list_namespaced_service(NAMESPACE).metadata.resource_version

    def replaced(self, name: str, old_uid: str, after: float) -> float | None:
        """When a Service of that name other than ``old_uid`` was first seen after ``after``."""
        return min((t for (n, uid), t in list(self.seen.items()) if n == name and uid != old_uid and t >= after),
                   default=None)


def run_loop(runner: Runner, stop: threading.Event, ticks: list[float], errors: list[str]) -> None:
    """What `gco-infra run` does between its ticks."""
    while not stop.is_set():
        started = time.monotonic()
        for res in runner.tick():
            if res.action in ("failed", "refused"):
                errors.append(res.summary())
                print("failed or refused:", res.summary(), res.endpoint_errors, flush=True)
        ticks.append(time.monotonic() - started)
        runner.wakeup().wait(max(0.0, DEFAULT_INTERVAL - (time.monotonic() - started)))
        runner.wakeup().clear()


def settle(runner: Runner) -> float:
    started = time.monotonic()
    while True:
        results = runner.tick()
        bad = [r.summary() for r in results if r.action in ("failed", "refused")]
        if bad:
            raise RuntimeError(bad)
        if not runner.busy and all(r.action == "none" for r in results):
            return time.monotonic() - started
        runner.wakeup().wait(1.0)
        runner.wakeup().clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between record changes")
    ap.add_argument("--drift-every", type=float, default=30.0, help="seconds between hand deletions of a Service")
    ap.add_argument("--full-every", type=float, default=1800.0,
                    help="the runner's --full-every during the churn window: sweeps of every shard fall "
                         "inside it (the default, 21600, would put none there)")
    ap.add_argument("--idle", type=float, default=120.0, help="seconds of the idle loop measured for CPU per hour")
    ap.add_argument("--quiet-drifts", type=int, default=5,
                    help="after the idle window, with nothing else changing: Services deleted by hand one at a time "
                         "(15 s apart), each timed until its new Service exists")
    ap.add_argument("--parallel", type=int, default=max(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(Path(__file__).with_name("CHURN.md")))
    ap.add_argument("--log", default=None, help="write the runner's progress messages here")
    args = ap.parse_args()
    say = lambda s: print(s, flush=True)  # noqa: E731
    shards = max(1, args.n // 100)
    rng = random.Random(14)
    with tempfile.TemporaryDirectory(prefix="gco-churn-") as tmp:
        env = localenv.LocalEnv.load(Path(tmp))
        env.up(regions=("local-1",))
        try:
            store, writer = env.store(), env.store()
            with writer._table.batch_writer() as w:
                for i in range(args.n):
                    w.put_item(Item=endpoint(i))
            s = settings_from_stack_file("local")
            s = replace(with_local_overrides(s, str(env.kubeconfig("local-1")), env.dynamodb_endpoint, env.table),
                        shards=shards)
            # The first convergence at the defaults; the churn window's --full-every is set after it.
            opts = RunnerOptions(overlap=True, parallel=args.parallel, full_every=DEFAULT_FULL_EVERY)
            log = open(args.log, "w") if args.log else None  # noqa: SIM115 - closed with the process
            runner = Runner([s], store, env.pulumi_env(), opts, progress=lambda m: log and print(
                f"{time.strftime('%H:%M:%S')} {m}", file=log, flush=True))
            api = env.kube("local-1")
            assert runner.watch_drift() == []
            with CpuSampler() as cpu:
                first = settle(runner)
            say(f"first convergence: {first:.1f}s, {runner.operations} operations, CPU-s {cpu.total:.0f}")
            watch_obj = runner.drift["local-1"]
            live, services = LiveDeployments(api), NewServices(api)
            live.thread.start()
            services.thread.start()
            time.sleep(2)
            runner.opts = replace(runner.opts, full_every=args.full_every)
            for st in runner.states.values():  # the sweeps start spread over the window
                st.next_sweep = time.monotonic() + runner._sweep_period(st) * rng.random()

            stop, ticks, errors = threading.Event(), [], []
            ops0, calls0, reqs0, lists0 = runner.operations, store.calls, apiserver_requests(api), watch_obj.lists
            loop = threading.Thread(target=run_loop, args=(runner, stop, ticks, errors), daemon=True)
            writes: list[tuple[str, str, float]] = []
            drifts: list[tuple[str, str, float]] = []
            core = client.CoreV1Api(api)
            window = args.minutes * 60
            with CpuSampler() as churn_cpu:
                loop.start()
                started = time.monotonic()
                next_write, next_drift, k = started, started + args.drift_every / 2, 0
                while time.monotonic() - started < window:
                    now = time.monotonic()
                    if now >= next_write:
                        k += 1
                        i = rng.randrange(args.n)
                        writer.put_desired(endpoint(i, f"w{k}"))
                        writes.append((f"bench-{i:04d}", f"w{k}", time.monotonic()))
                        next_write += args.every
                    if now >= next_drift:
                        name = f"bench-{rng.randrange(args.n):04d}"
                        try:
                            uid = core.read_namespaced_service(name, NAMESPACE).metadata.uid
                            core.delete_namespaced_service(name, NAMESPACE)
                            drifts.append((name, uid, time.monotonic()))
                            next_drift += args.drift_every
                        except client.ApiException as exc:  # not there (being repaired): another one
                            if exc.status != 404:
                                raise
                    time.sleep(0.05)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and any(live.when(n, v) is None for n, v, _ in writes[-5:]):
                    time.sleep(0.5)
            churn_ops, churn_calls = runner.operations - ops0, store.calls - calls0
            reqs1 = apiserver_requests(api)
            churn_reqs = sum(reqs1.values()) - sum(reqs0.values())
            last_value = {}
            for n, v, t in writes:
                last_value[n] = v
            latencies, superseded, missing = [], 0, 0
            for n, v, t in writes:
                seen = live.when(n, v)
                if seen is None:
                    if last_value[n] != v:
                        superseded += 1
                    else:
                        missing += 1
                    continue
                latencies.append(seen - t)
            repairs = []
            for name, uid, t in drifts:
                deadline = time.monotonic() + 60
                while (seen := services.replaced(name, uid, t)) is None and time.monotonic() < deadline:
                    time.sleep(0.5)
                repairs.append(seen - t if seen is not None else float("inf"))
            say(f"churn: {len(writes)} writes, latency p50 {percentile(latencies, 50):.2f}s p95 "
                f"{percentile(latencies, 95):.2f}s p99 {percentile(latencies, 99):.2f}s max {max(latencies):.2f}s; "
                f"{missing} never live, {superseded} superseded; drift repairs {[round(r, 1) for r in repairs]}")

            stop.set()
            loop.join(timeout=600)
            if args.idle > 0:
                stop.clear()
                loop = threading.Thread(target=run_loop, args=(runner, stop, ticks, errors), daemon=True)
                loop.start()
                # Idle at the default settings (no sweep falls in the window), then the machine without the
                # runner's loop (the cluster and moto alone): the difference is what the runner costs.
                runner.opts = replace(runner.opts, full_every=DEFAULT_FULL_EVERY)
                for st in runner.states.values():
                    st.next_sweep = time.monotonic() + 10**6
                while runner.busy:
                    time.sleep(0.5)
                time.sleep(10)
                ops_i, calls_i, reqs_i = runner.operations, store.calls, sum(apiserver_requests(api).values())
                with CpuSampler() as idle_cpu:
                    time.sleep(args.idle)
                idle_ops, idle_calls = runner.operations - ops_i, store.calls - calls_i
                idle_reqs = sum(apiserver_requests(api).values()) - reqs_i - 1
                quiet_repairs = []
                for _ in range(args.quiet_drifts):  # drift repair when nothing else is going on
                    name = f"bench-{rng.randrange(args.n):04d}"
                    uid = core.read_namespaced_service(name, NAMESPACE).metadata.uid
                    core.delete_namespaced_service(name, NAMESPACE)
                    t0 = time.monotonic()
                    while (seen := services.replaced(name, uid, t0)) is None and time.monotonic() - t0 < 60:
                        time.sleep(0.05)
                    quiet_repairs.append(seen - t0 if seen is not None else float("inf"))
                    while runner.busy:
                        time.sleep(0.5)
                    time.sleep(15)
                say(f"quiet drift repairs: {[round(r, 2) for r in quiet_repairs]}")
                stop.set()
                loop.join(timeout=600)
                settle(runner)
                reqs_b = sum(apiserver_requests(api).values())
                with CpuSampler() as base_cpu:
                    time.sleep(args.idle)
                base_reqs = sum(apiserver_requests(api).values()) - reqs_b - 1
                # The backstop: one sweep (sweep_batch endpoints refreshed in a targeted update) of one stack.
                sweeping = next(iter(runner.states.values()))
                sweeping.next_sweep = 0.0
                with CpuSampler() as sweep_cpu:
                    t0 = time.monotonic()
                    settle(runner)
                    sweep_seconds = time.monotonic() - t0
                # A full reconcile of every shard (a runner's first tick, after a failure, --full).
                with CpuSampler() as full_cpu:
                    t0 = time.monotonic()
                    runner.tick(force_full=True)
                    settle(runner)
                    full_seconds = time.monotonic() - t0
            live.stop.set()
            services.stop.set()
            runner.close()
        finally:
            env.down()

    hour = 3600.0
    batch = RunnerOptions().sweep_batch
    churn_hours = window / hour
    lines = [
        f"# Churn benchmark ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores)",
        "",
        f"`bench/churn_bench.py --n {args.n} --minutes {args.minutes:g} --every {args.every:g} --drift-every "
        f"{args.drift_every:g} --full-every {args.full_every:g}`: one region, {shards} shard stacks, the runner as "
        f"`gco-infra run` runs it (interval {DEFAULT_INTERVAL:g} s, {args.parallel} workers, drift watch, table stream).",
        "",
        "| N | first convergence | record change → live Deployment (p50 / p95 / p99 / max) | changes | hand-deleted Service → new one (median / max) | Pulumi operations | DynamoDB requests | Kubernetes requests | runner ticks (p50 / max) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.n} | {first:.1f} s | {percentile(latencies, 50):.2f} / {percentile(latencies, 95):.2f} / "
        f"{percentile(latencies, 99):.2f} / {max(latencies):.2f} s | {len(writes)} ({missing} never live, "
        f"{superseded} superseded) | {statistics.median(repairs):.1f} / {max(repairs):.1f} s ({len(repairs)}) | "
        f"{churn_ops} | {churn_calls} | {churn_reqs} | {statistics.median(ticks):.2f} / {max(ticks):.2f} s |",
        "",
        f"Drift watch: {watch_obj.lists - lists0} list calls during the window (steady state watches only); "
        f"{len(errors)} failed or refused results.",
        "",
        f"CPU during the churn window: {churn_cpu.total:.0f} CPU-s in {window:.0f} s "
        f"({churn_cpu.total / churn_hours:.0f} CPU-s per hour at this rate of change), by part: "
        + ", ".join(f"{k} {v:.0f}" for k, v in churn_cpu.seconds.items()) + ".",
        "",
    ]
    if args.idle > 0:
        sweeps_per_hour = args.n / batch * hour / DEFAULT_FULL_EVERY
        idle_share = max(0.0, idle_cpu.total - base_cpu.total) * hour / args.idle
        per_hour = idle_share + sweep_cpu.total * sweeps_per_hour
        lines += [
            "## CPU per hour at the default settings (nothing changing)",
            "",
            f"The runner's loop for {args.idle:g} s with nothing to do, against the same machine without it (the local "
            "cluster and moto idle on their own); the backstop's sweeps at the default --full-every "
            f"({DEFAULT_FULL_EVERY:g} s: every endpoint refreshed once, {batch} per targeted update).",
            "",
            "| N | machine with the loop | without it | the loop's share | one sweep | sweeps per hour | runner CPU-s per hour | full reconcile of every shard |",
            "|---|---|---|---|---|---|---|---|",
            f"| {args.n} | {idle_cpu.total * hour / args.idle:.0f} CPU-s/h ({idle_ops} operations, "
            f"{idle_calls * hour / args.idle:.0f} DynamoDB and {idle_reqs * hour / args.idle:.0f} Kubernetes requests per hour) "
            f"| {base_cpu.total * hour / args.idle:.0f} CPU-s/h ({base_reqs * hour / args.idle:.0f} Kubernetes requests per hour) "
            f"| {idle_share:.0f} CPU-s/h | {sweep_seconds:.1f} s, {sweep_cpu.total:.1f} CPU-s | {sweeps_per_hour:.1f} "
            f"| **{per_hour:.0f}** | {full_seconds:.0f} s, {full_cpu.total:.0f} CPU-s |",
            "",
            (f"Drift repair with nothing else changing (a Service deleted by hand → the new one, {len(quiet_repairs)} "
             f"one at a time): median {statistics.median(quiet_repairs):.2f} s, max {max(quiet_repairs):.2f} s."
             if quiet_repairs else ""),
            "",
            "Loop by part: " + ", ".join(f"{k} {v * hour / args.idle:.0f}" for k, v in idle_cpu.seconds.items())
            + "; without it: " + ", ".join(f"{k} {v * hour / args.idle:.0f}" for k, v in base_cpu.seconds.items())
            + " (CPU-s per hour). Full reconcile by part: "
            + ", ".join(f"{k} {v:.0f}" for k, v in full_cpu.seconds.items()) + " (CPU-s).",
        ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
