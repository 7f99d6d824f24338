"""Locks and checkpoint tokens on an s3:// backend, against moto's server over HTTP: the object
layout pulumi v3.274.1 writes (.pulumi/locks/organization/<project>/<stack>/<id>.json,
.pulumi/stacks/<project>/<stack>.json), the same dead-holder rules as on a file backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import boto3
import pytest

from gco_infra import state


@pytest.fixture
def bucket(moto_url):
    name = f"state-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket=name)
    port = moto_url.rsplit(":", 1)[1]
    env = {"PULUMI_BACKEND_URL": f"s3://{name}/team-a?endpoint=127.0.0.1:{port}&disableSSL=true&s3ForcePathStyle=true"
                                 "&region=us-east-1",
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    return s3, name, env


def _lock(s3, name, pid, host=None, stack="local", project="gco-infra", body=None):
    key = f"team-a/.pulumi/locks/organization/{project}/{stack}/{uuid.uuid4()}.json"
    s3.put_object(Bucket=name, Key=key, Body=body if body is not None else json.dumps(
        {"pid": pid, "username": "x", "hostname": host or os.uname().nodename, "timestamp": "2026-01-01T00:00:00Z"}))
    return key


def _keys(s3, name):
    return {o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents") or []}


def _fake_pulumi(tmp_path):
    exe = tmp_path / "bin" / "pulumi"
    exe.parent.mkdir(exist_ok=True)
    exe.symlink_to("/bin/sleep")
    return subprocess.Popen([str(exe), "60"])


def test_only_this_stacks_locks_under_the_url_prefix_are_seen(bucket):
    s3, name, env = bucket
    mine = _lock(s3, name, 1)
    _lock(s3, name, 1, stack="local-2")
    _lock(s3, name, 1, project="other-project")
    s3.put_object(Bucket=name, Key=".pulumi/locks/organization/gco-infra/local/outside-the-prefix.json", Body=b"{}")
    locks = state.backend_for(env).locks("local")
    assert [lock.where for lock in locks] == [f"s3://{name}/{mine}"]
    assert locks[0].info["pid"] == 1


def test_a_dead_holder_on_this_host_loses_its_lock_at_once(bucket):
    s3, name, env = bucket
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    key = _lock(s3, name, gone.pid)
    logged = []
    removed, remaining = state.recover_dead_locks("local", env, logged.append)
    assert removed and remaining == [] and key not in _keys(s3, name)
    assert "dead update" in logged[0] and str(gone.pid) in logged[0]


def test_a_live_holder_and_other_hosts_keep_their_locks(bucket, tmp_path):
    s3, name, env = bucket
    holder = _fake_pulumi(tmp_path)
    try:
        time.sleep(0.2)
        live = _lock(s3, name, holder.pid)
        elsewhere = _lock(s3, name, 1, host="runner-on-another-host")
        unreadable = _lock(s3, name, 0, body=b"not json")
        removed, remaining = state.recover_dead_locks("local", env, lambda m: None)
        assert not removed and {live, elsewhere, unreadable} <= _keys(s3, name)
        assert sorted(s for _, s, _ in remaining) == ["alive", "unknown", "unknown"]
        assert ("unknown", "pid 1 on runner-on-another-host") in [(s, w) for _, s, w in remaining]
    finally:
        holder.kill()
        holder.wait()


def test_a_reused_pid_is_not_the_holder(bucket):
    s3, name, env = bucket
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(s3, name, newer.pid)
        assert state.recover_dead_locks("local", env, lambda m: None)[0] is True
    finally:
        newer.kill()
        newer.wait()


def test_a_gone_sibling_pods_lock_is_dead_and_no_one_elses(bucket):
    s3, name, env = bucket
    asked = []

    def pod_gone(host):
        asked.append(host)
        return host == "gco-runner-6b7c8d9f5-gone1"

    dead = _lock(s3, name, 7, host="gco-runner-6b7c8d9f5-gone1")
    kept = _lock(s3, name, 7, host="gco-runner-6b7c8d9f5-live1")
    removed, remaining = state.recover_dead_locks("local", env, lambda m: None, pod_gone=pod_gone)
    assert removed and dead not in _keys(s3, name) and kept in _keys(s3, name)
    assert [w for _, _, w in remaining] == ["pid 7 on gco-runner-6b7c8d9f5-live1"]


def test_checkpoint_token_changes_only_when_the_checkpoint_is_written(bucket):
    s3, name, env = bucket
    base = "team-a/.pulumi/stacks/gco-infra"
    assert state.checkpoint_token("local", env) == ()
    s3.put_object(Bucket=name, Key=f"{base}/local.json", Body=b'{"version": 3, "n": 1}')
    first = state.checkpoint_token("local", env)
    assert first and first[0][0] == ".pulumi/stacks/gco-infra/local.json"
    s3.put_object(Bucket=name, Key=f"{base}/local.json.bak", Body=b"backup")
    s3.put_object(Bucket=name, Key=f"{base}/local-2.json", Body=b"another stack")
    s3.put_object(Bucket=name, Key=f"{base}/local.jsonl", Body=b"not a checkpoint")
    assert state.checkpoint_token("local", env) == first
    s3.put_object(Bucket=name, Key=f"{base}/local.json", Body=b'{"version": 3, "n": 2}')
    assert state.checkpoint_token("local", env) != first


def test_the_backend_url_is_read_as_the_engine_reads_it(bucket):
    _, name, env = bucket
    b = state.backend_for(env)
    assert (b.bucket, b.prefix) == (name, "team-a/")
    assert b.s3.meta.endpoint_url.startswith("http://127.0.0.1:")
    plain = state.S3Backend("s3://gco-state?region=eu-west-1", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert (plain.bucket, plain.prefix, plain.s3.meta.region_name) == ("gco-state", "", "eu-west-1")
    assert plain.s3.meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert state.backend_for({"PULUMI_BACKEND_URL": "https://api.pulumi.com"}) is None
