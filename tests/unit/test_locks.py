"""Lock recovery on the file backend: only a provably dead holder on this host loses its lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from gco_infra.runner import _recover_file_backend, lock_holder


def _lock(tmp_path, pid, host=None, age=0.0):
    d = tmp_path / "backend" / ".pulumi" / "locks" / "organization" / "gco-infra" / "local"
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{pid}.json"
    f.write_text(json.dumps({"pid": pid, "username": "x", "hostname": host or os.uname().nodename,
                             "timestamp": "2026-01-01T00:00:00Z"}))
    if age:
        t = time.time() - age
        os.utime(f, (t, t))
    return f


def _env(tmp_path):
    return {"PULUMI_BACKEND_URL": f"file://{tmp_path / 'backend'}"}


def _fake_pulumi(tmp_path):
    """A long-running process whose program is named pulumi, as the engine's is."""
    exe = tmp_path / "bin" / "pulumi"
    exe.parent.mkdir(exist_ok=True)
    exe.symlink_to("/bin/sleep")
    return subprocess.Popen([str(exe), "60"])


def test_a_live_holder_keeps_its_lock_however_old(tmp_path):
    holder = _fake_pulumi(tmp_path)
    try:
        time.sleep(0.2)
        lock = _lock(tmp_path, holder.pid, age=10 * 86400)
        assert lock_holder(lock)[0] == "alive"
        _recover_file_backend("local", _env(tmp_path), lambda m: None)
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holder_loses_its_lock_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = _lock(tmp_path, gone.pid)  # taken a moment ago: no stale timeout applies
    logged = []
    _recover_file_backend("local", _env(tmp_path), logged.append)
    assert not lock.exists()
    assert "dead update" in logged[0] and str(gone.pid) in logged[0]


def test_a_zombie_holder_is_dead(tmp_path):
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.5)  # exited, not reaped
    try:
        assert lock_holder(_lock(tmp_path, zombie.pid))[0] == "dead"
    finally:
        zombie.wait()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _lock(tmp_path, newer.pid)  # the pid now belongs to something that is not the engine
        assert lock_holder(lock)[0] == "dead"
    finally:
        newer.kill()
        newer.wait()


def test_a_lock_from_another_host_is_never_removed(tmp_path):
    lock = _lock(tmp_path, 1, host="runner-on-another-host", age=10 * 86400)
    assert lock_holder(lock) == ("unknown", "pid 1 on runner-on-another-host")
    _recover_file_backend("local", _env(tmp_path), lambda m: None)
    assert lock.exists()
