"""The local environment itself: idempotent up, a working status, and a down that leaves nothing."""

from __future__ import annotations

from pathlib import Path

from gco_infra import localenv


def _ours(pids):
    return [p for p in pids if p and Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/cmdline").read_bytes()]


def test_up_twice_is_harmless_and_down_leaves_no_process(tmp_path):
    env = localenv.LocalEnv.load(tmp_path)
    try:
        env.up(regions=("local-1",))
        first = (env.etcd_pid, env.moto_pid, env.apiservers["local-1"].pid)
        assert all(env.status().values())
        assert env.kubeconfig("local-1").stat().st_mode & 0o077 == 0  # holds a token: owner only
        again = localenv.LocalEnv.load(tmp_path)
        again.up(regions=("local-1",))
        assert (again.etcd_pid, again.moto_pid, again.apiservers["local-1"].pid) == first
        from kubernetes import client

        names = {n.metadata.name for n in client.CoreV1Api(again.kube("local-1")).list_namespace().items}
        assert set(localenv.NAMESPACES) <= names
    finally:
        localenv.LocalEnv.load(tmp_path).down()
    assert _ours(first) == []
    assert not any(localenv.LocalEnv.load(tmp_path).status().values())
