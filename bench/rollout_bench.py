"""The overhead of a progressive rollout over its bake time, on the two local regions.

One endpoint under a two-wave policy (local-1, then local-2). The runner runs as `gco-infra run`
does (ticks every 2 s beside its operations, one worker per region stack, the table stream), and one
health job per region runs as `gco-infra health` does (the watch cache; a tick every
--health-interval seconds, sooner when the cache sees a change or a bake time ends). A stand-in for the kubelet marks every
new pod Ready at once, so the time measured is the machinery's, not a model server's start-up.

For each bake time the bench writes a new image into the record and times, from that write:
wave 1 live (the Deployment in local-1 declares the new revision), wave 1 healthy (the table says
local-1 runs it), wave 2 allowed (the health job advanced the rollout), wave 2 live, and the last
region running it (the table says local-2 runs it). The overhead is the last figure minus the bake
time; the goal is a few runner ticks at most.

Run: .venv/bin/python bench/rollout_bench.py [--bakes 10,30] [--health-intervals 15,2] [--out bench/ROLLOUT.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client  # noqa: E402

from gco_infra import localenv, rollout  # noqa: E402
from gco_infra.endpoint import parse_endpoint, spec_revision  # noqa: E402
from gco_infra.health import HealthJob  # noqa: E402
from gco_infra.manifests import REVISION_ANNOTATION  # noqa: E402
from gco_infra.program import settings_from_stack_file  # noqa: E402
from gco_infra.runner import Runner, RunnerOptions, with_local_overrides  # noqa: E402

NAMESPACE = "gco-inference"
REGIONS = ("local-1", "local-2")
INTERVAL = 2.0  # gco-infra run's default
NAME = "rollout-bench"


class Loop(threading.Thread):
    """Calls ``fn`` every ``every`` seconds until stopped."""

    def __init__(self, fn, every: float) -> None:
        super().__init__(daemon=True)
        self.fn, self.every, self.stop = fn, every, threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.fn()
            except Exception as exc:  # a bench keeps going; the error is reported with the results
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self.stop.wait(max(0.0, self.every - (time.monotonic() - started)))


class HealthLoop(Loop):
    """The health job's loop in `gco-infra health`: a tick, then job.wait for the rest of the interval."""

    def __init__(self, job: HealthJob, every: float) -> None:
        super().__init__(job.tick, every)
        self.job = job

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                report = self.job.tick()
                if report.error:
                    self.errors.append(report.error[:300])
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self.job.wait(max(0.0, self.every - (time.monotonic() - started)))


def mark_pods_ready(core: client.CoreV1Api) -> None:
    for pod in core.list_namespaced_pod(NAMESPACE, label_selector=f"app={NAME}").items:
        ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
        if not ready and not pod.metadata.deletion_timestamp:
            core.patch_namespaced_pod_status(pod.metadata.name, NAMESPACE, {"status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]}})


def record(image: str, bake: int) -> dict:
    return {"endpoint_name": NAME, "desired_state": "running", "target_regions": list(REGIONS),
            "spec": {"image": image, "gpu_count": 0},
            "rollout_policy": {"waves": [["local-1"], ["local-2"]], "bake_seconds": bake, "unready_limit_seconds": 600}}


def measure(env, apps: dict, store, runner: Runner, bake: int, image: str, timeout: float) -> dict:
    """``store`` is the runner's (its requests are counted); the bench reads through its own."""
    ops0, calls0 = runner.operations, store.calls
    writer = store
    store = env.store()
    writer.put_desired(record(image, bake))
    calls0 += 1
    t0 = time.monotonic()
    rev = spec_revision(parse_endpoint(store.get(NAME)).endpoint)
    marks: dict[str, float] = {}

    def live(region: str) -> bool:
        try:
            d = apps[region].read_namespaced_deployment(NAME, NAMESPACE)
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return (d.metadata.annotations or {}).get(REVISION_ANNOTATION) == rev

    while time.monotonic() - t0 < timeout:
        item = store.get(NAME) or {}
        statuses = item.get("region_status") or {}
        state, _ = rollout.read_state(item)
        now = time.monotonic() - t0
        checks = {
            "wave 1 live": lambda: live("local-1"),
            "wave 1 healthy": lambda: statuses.get("local-1", {}).get("revision") == rev
            and statuses["local-1"].get("state") == "running",
            "wave 2 allowed": lambda: state is not None and state.revision == rev and state.regions.get("local-2") == rev,
            "wave 2 live": lambda: live("local-2"),
            "last region running": lambda: statuses.get("local-2", {}).get("revision") == rev
            and statuses["local-2"].get("state") == "running",
            "complete": lambda: state is not None and state.revision == rev and state.phase == "complete",
        }
        for what, check in checks.items():
            if what not in marks and check():
                marks[what] = now
        if "complete" in marks and "last region running" in marks:
            break
        time.sleep(0.2)
    marks["operations"] = runner.operations - ops0
    marks["table requests"] = writer.calls - calls0
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bakes", default="10,30", help="bake times to measure, seconds (comma-separated)")
    ap.add_argument("--health-intervals", default="15,2", help="health job tick intervals (comma-separated)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here as well")
    args = ap.parse_args()
    bakes = [int(b) for b in args.bakes.split(",")]
    intervals = [float(h) for h in args.health_intervals.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gco-rollout-") as tmp:
        env = localenv.LocalEnv.load(Path(tmp))
        env.up()
        try:
            settings = [with_local_overrides(settings_from_stack_file(s), str(env.kubeconfig(r)), env.dynamodb_endpoint,
                                             env.table) for s, r in (("local", "local-1"), ("local-2", "local-2"))]
            store = env.store()
            opts = RunnerOptions(parallel=2, overlap=True, deletion_window=60.0)
            runner = Runner(settings, store, env.pulumi_env(), opts)
            apps = {r: client.AppsV1Api(env.kube(r)) for r in REGIONS}
            cores = [client.CoreV1Api(env.kube(r)) for r in REGIONS]
            loops = [Loop(runner.tick, INTERVAL), Loop(lambda: [mark_pods_ready(c) for c in cores], 0.5)]
            for loop in loops:
                loop.start()
            version = 1
            store.put_desired(record(f"example.com/org/server:{version}", bakes[0]))  # the first deploy
            for h in intervals:
                # as `gco-infra health` runs: the watch cache, and a tick sooner when it sees a change
                jobs = [HealthJob(env.store(), env.kube(r), r, (NAMESPACE,), known_regions=REGIONS, watch_cache=True)
                        for r in REGIONS]
                hloops = [HealthLoop(j, h) for j in jobs]
                for loop in hloops:
                    loop.start()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:  # the previous revision complete and running everywhere
                    item = store.get(NAME) or {}
                    state, _ = rollout.read_state(item)
                    statuses = item.get("region_status") or {}
                    if state is not None and state.phase == "complete" and all(
                            (statuses.get(r) or {}).get("revision") == state.revision
                            and (statuses.get(r) or {}).get("state") == "running" for r in REGIONS):
                        break
                    time.sleep(0.5)
                else:
                    raise SystemExit(f"the endpoint did not settle: {store.get(NAME)}")
                for bake in bakes:
                    version += 1
                    marks = measure(env, apps, store, runner, bake, f"example.com/org/server:{version}",
                                    timeout=bake + 300)
                    rows.append((h, bake, marks))
                    print(f"health every {h:g}s, bake {bake}s: {marks}", flush=True)
                for loop in hloops:
                    loop.stop.set()
                for loop in hloops:
                    loop.join(30)
                for job in jobs:
                    job.close()
                errors = [e for loop in hloops for e in loop.errors]
                if errors:
                    print("health job errors:", errors[:5])
            for loop in loops:
                loop.stop.set()
            for loop in loops:
                loop.join(120)
            runner.close()
            errors = [e for loop in loops for e in loop.errors]
            if errors:
                print("runner/marker errors:", errors[:5])
        finally:
            env.down()
    cols = ["wave 1 live", "wave 1 healthy", "wave 2 allowed", "wave 2 live", "last region running", "complete"]
    lines = [
        f"Two-wave rollout (local-1, then local-2), one endpoint; runner ticks every {INTERVAL:g} s with one worker "
        f"per region stack; pods marked Ready as soon as they exist. {platform.node()}, {time.strftime('%Y-%m-%d')}. "
        "Seconds from the table write.",
        "",
        "| health tick (s) | bake (s) | " + " | ".join(cols) + " | overhead over bake (s) | Pulumi operations | table requests |",
        "|---|---|" + "---|" * len(cols) + "---|---|---|",
    ]
    for h, bake, marks in rows:
        last = marks.get("last region running")
        cells = [f"{marks[c]:.1f}" if c in marks else "never" for c in cols]
        overhead = f"{last - bake:.1f}" if last is not None else "n/a"
        lines.append(f"| {h:g} | {bake} | " + " | ".join(cells) + f" | {overhead} | {marks['operations']} | "
                     f"{marks['table requests']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
