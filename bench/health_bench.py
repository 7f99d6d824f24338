"""Health job benchmark on the local environment: the steady-state tick with N endpoints in one region.

Each endpoint's Deployment and Ingress are applied straight from manifests.desired_objects (the objects
the program declares, labels included), not through the engine, so that large N stay quick to set
up. The job then ticks until it writes nothing, and the next ``--ticks`` ticks are measured:

- before: the job as it was, a complete table scan and validation every tick and the lists read
  through the kubernetes client's models (``--no-table-stream`` and ``ModelObserving`` below);
- after: the table followed through its stream (validation memoized per table generation) and the
  lists read as JSON;
- after: stream + watch cache: the same, with Deployments and Ingresses observed from the job's
  watch-backed cache (kubecache.ObjectCache, ``--watch-cache``) instead of listed every tick.

Both run against the same cluster and table, one after the other. Kubernetes requests are counted at
the API server (apiserver_request_total for deployments and ingresses, every client) and by the job;
DynamoDB requests by the job's store.

Run: nice .venv/bin/python bench/health_bench.py [--sizes 100,1000] [--ticks 10] [--out bench/HEALTH.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client  # noqa: E402

from gco_infra import localenv, manifests  # noqa: E402
from gco_infra.endpoint import validate_all  # noqa: E402
from gco_infra.health import LABEL, HealthJob, HealthReport  # noqa: E402
from gco_infra.program import settings_from_stack_file  # noqa: E402
from gco_infra.watchdog import Observed, track_of  # noqa: E402

REGION = "local-1"
NS = "gco-inference"
PLURAL = {"Deployment": ("/apis/apps/v1", "deployments"), "Ingress": ("/apis/networking.k8s.io/v1", "ingresses")}


class ModelObserving(HealthJob):
    """The job's observation before this change: the lists deserialized into the client's models."""

    def observe(self, report: HealthReport) -> dict[str, Observed]:
        seen: dict[str, Observed] = {}
        report.observed = "lists (client models)"
        for ns in self.namespaces:
            report.api_calls += 1
            for d in self.apps.list_namespaced_deployment(ns, label_selector=LABEL, _request_timeout=self.request_timeout).items:
                labels = d.metadata.labels or {}
                name = labels.get("app")
                if not name:
                    continue
                o = seen.setdefault(name, Observed())
                t = o.canary if track_of(name, d.metadata.name, labels) == "canary" else o.primary
                want = d.spec.replicas if d.spec.replicas is not None else 1
                st = d.status
                t.seen = True
                t.desired += want
                t.ready += (st.ready_replicas or 0) if st else 0
                if st is None or (st.observed_generation or 0) < (d.metadata.generation or 0) or (st.updated_replicas or 0) < want:
                    t.updated = False
            report.api_calls += 1
            for i in self.net.list_namespaced_ingress(ns, label_selector=LABEL, _request_timeout=self.request_timeout).items:
                name = (i.metadata.labels or {}).get("app")
                if name:
                    seen.setdefault(name, Observed()).ingresses.append((ns, i.metadata.name))
        return seen


def endpoint(i: int) -> dict:
    return {"endpoint_name": f"bench-{i:04d}", "desired_state": "running", "target_regions": [REGION],
            "spec": {"image": "example.com/org/server:1", "gpu_count": 0, "env": {"V": "1"}}}


def apiserver_requests(api: client.ApiClient) -> dict[tuple[str, str], int]:
    """apiserver_request_total of deployments and ingresses by (resource, verb), as the API server counts them."""
    resp = api.call_api("/metrics", "GET", _preload_content=False, auth_settings=["BearerToken"])
    counts: dict[tuple[str, str], int] = {}
    for line in resp.data.decode().splitlines():
        if line.startswith("apiserver_request_total{"):
            labels, value = line[len("apiserver_request_total{"):].rsplit("} ", 1)
            kv = {k: v.strip('"') for k, v in (p.split("=", 1) for p in labels.split(","))}
            if kv.get("resource") in ("deployments", "ingresses") and not kv.get("subresource"):
                key = (kv["resource"], kv.get("verb", ""))
                counts[key] = counts.get(key, 0) + int(float(value))
    return counts


def apply_objects(env: localenv.LocalEnv, items: list[dict]) -> None:
    """Each endpoint's Deployment and Ingress, server-side applied as the program declares them."""
    cluster = settings_from_stack_file("local").cluster
    validated = validate_all(items, allowed_namespaces=(NS,))
    api = env.kube(REGION)
    objects = [obj for ep in validated.endpoints.values()
               for obj in manifests.desired_objects(ep, REGION, cluster).values() if obj["kind"] in PLURAL]

    def apply(obj: dict) -> None:
        meta, (base, plural) = obj["metadata"], PLURAL[obj["kind"]]
        api.call_api(f"{base}/namespaces/{meta['namespace']}/{plural}/{meta['name']}",
                     "PATCH", query_params=[("fieldManager", "gco-bench"), ("force", "true")],
                     header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
                     body=obj, auth_settings=["BearerToken"], _preload_content=False)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(apply, objects))


def settled_deployments(apps: client.AppsV1Api, n: int) -> bool:
    items = apps.list_namespaced_deployment(NS, label_selector=LABEL).items
    return len(items) == n and all(d.status and (d.status.observed_generation or 0) >= d.metadata.generation
                                   and (d.status.updated_replicas or 0) >= (d.spec.replicas or 0) for d in items)


def run_job(label: str, job: HealthJob, api: client.ApiClient, ticks: int, progress: Callable[[str], None]) -> dict:
    phases: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    job.read_table = timed("table", job.read_table)  # type: ignore[method-assign]
    cache_counts = None
    job.observe = timed("kubernetes", job.observe)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    first = job.tick()
    first_seconds = time.perf_counter() - t0
    failed: list[str] = []
    if first.error is not None:  # e.g. moto not answering in time under load: reported with the row
        failed.append(first.error)
        progress(f"{label}: first tick failed: {first.error}")
    warm = 1
    while True:  # the job's own writes come back (through the stream or the next scan) once
        report = job.tick()
        warm += 1
        if report.error is not None:
            failed.append(report.error)
            progress(f"{label}: a warm-up tick failed: {report.error}")
        elif report.writes == 0:
            break
        if warm > 10:
            raise RuntimeError(f"{label}: the job still writes after {warm} ticks")
    if job.watch_cache:  # measure ticks served from the cache, once it is current
        cache = job.object_cache()
        deadline = time.monotonic() + 120
        while not cache.healthy:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: the watch cache is not current: {cache.why_not()}")
            time.sleep(0.1)
        cache_counts = (cache.lists, cache.watches, cache.events)
    seconds, dynamo, kube, own, reads, split = [], [], [], [], set(), []
    while len(seconds) < ticks:
        if len(failed) > ticks:
            raise RuntimeError(f"{label}: {len(failed)} ticks failed: {failed[-1]}")
        calls, before = job.store.calls, apiserver_requests(api)
        phases.clear()
        t0 = time.perf_counter()
        report = job.tick()
        elapsed = time.perf_counter() - t0
        after = apiserver_requests(api)
        if report.error is not None:
            failed.append(report.error)
            progress(f"{label}: a measured tick failed (not counted): {report.error}")
            continue
        assert report.writes == 0, report.writes
        seconds.append(elapsed)
        dynamo.append(job.store.calls - calls)
        kube.append({k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)})
        own.append(report.api_calls)
        reads.add(f"{report.table_read or 'scan'}; observed from {report.observed}")
        split.append({**phases, "rest": seconds[-1] - sum(phases.values())})
    row = {
        "label": label, "endpoints": report.endpoints, "first": first_seconds,
        "median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
        "dynamo": statistics.median(dynamo), "own": statistics.median(own),
        "kube": kube[len(kube) // 2], "reads": sorted(reads),
        "table": statistics.median(p.get("table", 0.0) for p in split),
        "kubernetes": statistics.median(p.get("kubernetes", 0.0) for p in split),
        "rest": statistics.median(p["rest"] for p in split), "failed": failed,
        "cache": None if cache_counts is None else tuple(
            b - a for a, b in zip(cache_counts, (job._objects.lists, job._objects.watches, job._objects.events))),
    }
    job.close()
    progress(f"{label}: first tick {first_seconds:.2f} s; steady {row['median']:.3f} s median "
             f"({row['min']:.3f}-{row['max']:.3f}) over {ticks} ticks: table {row['table']:.3f} s, Kubernetes "
             f"{row['kubernetes']:.3f} s, decisions {row['rest']:.3f} s; {row['dynamo']:g} DynamoDB, "
             f"{row['own']:g} Kubernetes requests (API server: {row['kube']}); table read {row['reads']}")
    return row


def measure(n: int, ticks: int, progress: Callable[[str], None]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="gco-health-bench-") as tmp:
        env = localenv.LocalEnv.load(Path(tmp))
        env.up(regions=(REGION,))
        try:
            items = [endpoint(i) for i in range(n)]
            setup = env.store()
            with setup._table.batch_writer() as w:
                for item in items:
                    w.put_item(Item=item)
            t0 = time.perf_counter()
            apply_objects(env, items)
            api = env.kube(REGION)
            apps = client.AppsV1Api(api)
            deadline = time.monotonic() + 600
            while not settled_deployments(apps, n):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"N={n}: the Deployments' status did not settle in 600 s")
                time.sleep(2)
            progress(f"N={n}: {n} Deployments and Ingresses applied and settled in {time.perf_counter() - t0:.0f} s")
            rows = []
            common: dict[str, Any] = {"known_regions": [REGION], "threshold": 1e9}  # no withdrawal mid-bench
            for label, job in (
                ("before: scan + models", ModelObserving(env.store(), api, REGION, (NS,), table_stream=False, **common)),
                ("after: stream + JSON", HealthJob(env.store(), api, REGION, (NS,), **common)),
                ("after: stream + watch cache", HealthJob(env.store(), api, REGION, (NS,), watch_cache=True, **common)),
            ):
                row = run_job(f"N={n} {label}", job, api, ticks, progress)
                row["n"], row["mode"] = n, label
                rows.append(row)
            return rows
        finally:
            env.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--ticks", type=int, default=10, help="steady-state ticks measured per job")
    ap.add_argument("--out", default=str(Path(__file__).with_name("HEALTH.md")))
    args = ap.parse_args()
    rows, load_start = [], os.getloadavg()
    for n in (int(x) for x in args.sizes.split(",")):
        rows += measure(n, args.ticks, lambda s: print(s, flush=True))
    command = "nice " + " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/health_bench.py", *sys.argv[1:]])
    lines = [
        f"# Health job benchmark ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores)",
        "",
        f"`{command}`",
        "",
        "One region (`local-1`), one namespace, real kube-apiserver + controllers + moto. N endpoints, each",
        "with the Deployment and Ingress the program declares (applied directly, not through the engine);",
        "no node, so no replica is ready and every endpoint's status is `creating`. The job ticks until it",
        f"writes nothing, then {args.ticks} steady-state ticks are measured (no leader election).",
        "before: scan + validate the whole table every tick, lists read into the kubernetes client's models;",
        "after: stream + JSON: the table's stream followed (validation memoized per table generation), lists",
        "read as JSON; after: stream + watch cache: the same, Deployments and Ingresses observed from the job's",
        "watch-backed cache (one LIST per kind at start, then WATCHes), no request in a steady tick.",
        "Table read, Kubernetes observation (lists, or the cache) and decisions (everything else in the tick):",
        "medians of each part. Kubernetes requests: the job's own (LIST), and at the API server for deployments",
        "and ingresses (all clients, median tick). First tick: the job's first tick (a complete scan in all;",
        "with the watch cache, it also lists, since the cache is not ready yet).",
        "",
        "| N | job | steady tick, median (min-max) | table read | Kubernetes observation | decisions | "
        "Kubernetes requests (API server) | DynamoDB requests | first tick |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        at_server = ", ".join(f"{verb} {res} {c}" for (res, verb), c in sorted(r["kube"].items())) or "0"
        lines.append(f"| {r['n']} | {r['mode']} | {r['median']:.3f} s ({r['min']:.3f}-{r['max']:.3f}) | "
                     f"{r['table']:.3f} s | {r['kubernetes']:.3f} s | {r['rest']:.3f} s | {r['own']:g} ({at_server}) | "
                     f"{r['dynamo']:g} | {r['first']:.2f} s |")
    lines += ["", "Table read and observation in the measured ticks: " + "; ".join(
        f"N={r['n']} {r['mode']}: {', '.join(r['reads'])}" for r in rows)]
    lines += ["", "The watch cache's own requests while the ticks were measured (lists, watches opened, events): "
              + "; ".join(f"N={r['n']}: {r['cache']}" for r in rows if r["cache"] is not None)]
    lines += ["", "Ticks that failed (not measured; e.g. moto not answering within its read timeout under load): "
              + ("; ".join(f"N={r['n']} {r['mode']}: {len(r['failed'])} ({r['failed'][0][:160]})"
                           for r in rows if r["failed"]) or "none")]
    lines += ["", "Load average (1, 5, 15 min) at the start of the run: "
              f"{' '.join(f'{x:.2f}' for x in load_start)}; at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
