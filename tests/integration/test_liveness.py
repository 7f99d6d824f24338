"""The liveness endpoint answers from a real signal."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from gco_infra.health import HealthJob, job_is_healthy, serve_liveness
from gco_infra.localenv import free_port


def _status(port, path="/healthz"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_liveness_follows_the_signal():
    state = {"ok": False}
    port = free_port()
    server = serve_liveness(lambda: state["ok"], port)
    try:
        assert _status(port) == 503
        state["ok"] = True
        assert _status(port) == 200
        assert _status(port, "/other") == 503
    finally:
        server.shutdown()


def test_health_job_is_live_only_with_fresh_ticks():
    job = HealthJob.__new__(HealthJob)  # only the fields the check reads
    job.last_success, job.elector = None, None
    check = job_is_healthy(job, max_age=60)
    assert not check()
    job.last_success = time.time()
    assert check()
    job.last_success = time.time() - 120
    assert not check()
