"""A sharded region end to end: endpoints spread over shard stacks, a change operates one shard only,
and a change of gco:shards that would move endpoints between stacks is refused."""

from __future__ import annotations

from dataclasses import replace

import boto3
import pytest
from kubernetes import client

from gco_infra.program import settings_from_stack_file, shard_of
from gco_infra.runner import Runner, RunnerOptions, with_local_overrides
from gco_infra.store import EndpointStore

from .conftest import Kube

TABLE = "gco-shard-test"
NAMESPACE = "gco-shards"
SHARDS = 3


@pytest.fixture(scope="module")
def sharded(env):
    """A region stack 'sharded' over local-1 with its own table and namespace, so it shares nothing
    with the session runner's stacks."""
    session = boto3.session.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1")
    store = EndpointStore(replace(env.store().config, table=TABLE), session=session)
    store.create_table()
    core = client.CoreV1Api(env.kube("local-1"))
    if NAMESPACE not in {n.metadata.name for n in core.list_namespace().items}:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    base = settings_from_stack_file("local")
    settings = replace(with_local_overrides(base, str(env.kubeconfig(base.region)), env.dynamodb_endpoint, TABLE),
                       stack="sharded", shards=SHARDS, allowed_namespaces=(NAMESPACE,))
    return settings, store


def runner_for(env, sharded, **opts) -> Runner:
    settings, store = sharded
    shards = opts.pop("shards", settings.shards)
    return Runner([replace(settings, shards=shards)], store, env.pulumi_env(), RunnerOptions(**opts))


def put(store, name, **spec):
    store.put_desired({"endpoint_name": name, "desired_state": "running", "target_regions": ["local-1"],
                       "namespace": NAMESPACE, "spec": {"image": "example.com/org/server:1", "gpu_count": 0, **spec}})


def test_sharded_region_applies_each_endpoint_in_its_own_shard_only(env, sharded):
    settings, store = sharded
    kube = Kube(env, "local-1")
    names = [f"sh-{i}" for i in range(12)]
    assert len({shard_of(n, SHARDS) for n in names}) == SHARDS, "pick names that cover every shard"
    for n in names:
        put(store, n)
    runner = runner_for(env, sharded)
    try:
        first = runner.tick()
        assert sorted(r.stack for r in first) == [f"sharded.shard-{k}" for k in range(SHARDS)]
        assert all(r.action == "full" for r in first), [r.summary() for r in first]
        assert runner.operations == SHARDS
        for r in first:
            k = int(r.stack.rsplit("-", 1)[1])
            mine = sorted(n for n in names if shard_of(n, SHARDS) == k)
            assert sorted(runner.states[r.stack].outputs["endpoints"]) == mine
        assert all(kube.deployment(n, NAMESPACE) is not None for n in names)
        assert all((store.get(n)["region_status"]["local-1"])["state"] == "creating" for n in names)

        versions = {n: kube.written(n, NAMESPACE) for n in names}
        ops = runner.operations
        assert all(r.action == "none" for r in runner.tick())
        assert runner.operations == ops  # nothing changed: no Pulumi operation in any shard

        put(store, "sh-4", env={"CHANGED": "yes"})
        results = {r.stack: r for r in runner.tick()}
        assert runner.operations - ops == 1
        owner = f"sharded.shard-{shard_of('sh-4', SHARDS)}"
        assert (results[owner].action, results[owner].changed, results[owner].updated) == ("targeted", 1, 1)
        assert all(r.action == "none" for s, r in results.items() if s != owner)
        after = {n: kube.written(n, NAMESPACE) for n in names}
        assert [n for n in names if after[n] != versions[n]] == ["sh-4"]
        env_vars = {e.name: e.value for e in kube.deployment("sh-4", NAMESPACE).spec.template.spec.containers[0].env}
        assert env_vars == {"CHANGED": "yes"}
    finally:
        runner.close()

    # gco:shards changed to 2: every shard stack would now hold endpoints of other shards
    resharded = runner_for(env, sharded, shards=2)
    try:
        refused = resharded.tick()
        assert {r.action for r in refused} == {"refused"} and len(refused) == 2
        assert all("pulumi state move" in r.message for r in refused), refused[0].message
        assert resharded.operations == 0
        assert {n: kube.written(n, NAMESPACE) for n in names} == after
    finally:
        resharded.close()
    # back to one stack: the region stack would apply everything the shard stacks still hold
    uids = {n: kube.deployment(n, NAMESPACE).metadata.uid for n in names}
    unsharded = runner_for(env, sharded, shards=1)
    try:
        refused = unsharded.tick()
        assert [(r.stack, r.action) for r in refused] == [("sharded", "refused")]
        assert "stack sharded.shard-2 is not part of region sharded at gco:shards=1" in refused[0].message
        assert unsharded.operations == 0

        # the documented way out: move the endpoints' resources into the region stack
        _state_move_all(env, [f"sharded.shard-{k}" for k in range(SHARDS)], "sharded")
        results = unsharded.tick()  # the same runner: it must notice the stacks changed under it
        assert [(r.stack, r.action) for r in results] == [("sharded", "full")], [r.summary() for r in results]
        assert not results[0].failed and results[0].deleted == 0 and results[0].created == 0, results[0].summary()
        assert {n: kube.deployment(n, NAMESPACE).metadata.uid for n in names} == uids  # adopted, never recreated
        assert sorted(unsharded.states["sharded"].outputs["endpoints"]) == sorted(names)
        assert all(r.action == "none" for r in unsharded.tick())
    finally:
        unsharded.close()

    # clean up through the runner: every endpoint deleted, the deletion allowed explicitly
    for n in names:
        store.set_desired_state(n, "deleted", expected="running")
    cleanup = runner_for(env, sharded, shards=1, allow_mass_delete=True)
    try:
        done = cleanup.tick()
        assert sum(r.deleted for r in done) >= len(names) * 3, [r.summary() for r in done]  # Deployment, Service, Ingress
    finally:
        cleanup.close()
    assert all(kube.deployment(n, NAMESPACE) is None for n in names)
    assert all(store.get(n)["region_status"]["local-1"]["state"] == "deleted" for n in names)


def _state_move_all(env, sources, dest):
    """`pulumi stack init` the destination, then `pulumi state move` every endpoint resource into it."""
    import json
    import os
    import subprocess

    from gco_infra.program import PROJECT_ROOT

    e = {**os.environ, **env.pulumi_env()}

    def pulumi(*args, check=True):
        proc = subprocess.run(["pulumi", *args, "--non-interactive"], cwd=PROJECT_ROOT, env=e,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 or not check, f"pulumi {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc

    pulumi("stack", "init", dest, check=False)  # may exist from an earlier run of the session
    for source in sources:
        state = json.loads(pulumi("stack", "export", "--stack", source).stdout)
        urns = [r["urn"] for r in state["deployment"].get("resources", [])
                if r["type"] == "gco:inference:Endpoint"]
        if urns:
            pulumi("state", "move", "--source", source, "--dest", dest, "--yes", *urns)
