"""`gco-infra rollout ...` and `endpoints list` against a table on moto's server, over HTTP.

The command finds the table as a person's would: the local environment's state dir (LocalEnv.save)
names the moto server and the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from urllib.parse import urlparse

import pytest
import structlog
from click.testing import CliRunner

from gco_infra import cli, rollout
from gco_infra.endpoint import config_rollout_policy, endpoint_to_item, parse_endpoint, spec_revision
from gco_infra.localenv import LocalEnv
from gco_infra.plan import EXIT_STORE
from gco_infra.store import EndpointStore, plain

NAME = "llama3"
REGIONS = ["us-east-1", "eu-west-1", "us-west-2"]
POLICY = {"waves": [["us-east-1"], ["eu-west-1", "us-west-2"]], "bake_seconds": [300, 600],
          "unready_limit_seconds": 900}


@pytest.fixture
def table(store, tmp_path, monkeypatch):
    """The test's table, as the local environment's: what `--stack local` reads and writes."""
    for name in ("GCO_TABLE", "GCO_DYNAMODB_ENDPOINT", "GCO_IN_CLUSTER", "GCO_KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GCO_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LOGNAME", "alice")  # getpass.getuser(): who steered, in the rollout's message
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no wrapped cells to assert around
    LocalEnv(dir=str(tmp_path / "state"), moto_port=urlparse(store.config.endpoint_url).port,
             table=store.config.table).save()
    yield store
    structlog.reset_defaults()  # `main` points structlog at the runner's captured stderr


def invoke(*args: str):
    return CliRunner().invoke(cli.main, ["--no-json-logs", *args], catch_exceptions=False)


def record(image: str, *, policy=POLICY, statuses=None) -> dict:
    item = {"endpoint_name": NAME, "desired_state": "running", "target_regions": REGIONS, "namespace": "gco-inference",
            "spec": {"image": image, "gpu_count": 0, "replicas": 2}}
    if policy is not None:
        item["rollout_policy"] = policy
    if statuses is not None:
        item["region_status"] = statuses
    return item


def endpoint(item: dict):
    parsed = parse_endpoint(item, allowed_namespaces=("gco-inference",))
    assert parsed.ok, parsed.errors
    return parsed.endpoint


def running(revision: str, ready: int = 2) -> dict:
    return {"state": "running", "replicas_ready": ready, "replicas_desired": 2, "revision": revision,
            "last_sync": "2024-05-01T10:00:00Z"}


def put(store: EndpointStore, item: dict, state: rollout.RolloutState | None = None) -> None:
    """The record as the platform's CLI, the health jobs and the gate would have written it."""
    store.put_desired({k: v for k, v in item.items() if k != "region_status"})
    for region, status in (item.get("region_status") or {}).items():
        assert store.write_region_status(NAME, region, status, expected=None)
    if state is not None:
        assert store.write_rollout(NAME, rollout.state_to_item(state), expected_seq=None)


def table_state(store: EndpointStore) -> rollout.RolloutState | None:
    state, problem = rollout.read_state(store.get(NAME))
    assert problem is None
    return state


@pytest.fixture
def progressing(table):
    """img:1 ran everywhere; img:2 is in its first wave: us-east-1 may run it and runs it, not yet healthy."""
    now = time.time()
    old = endpoint(record("img:1"))
    first = rollout.start(old, old.rollout_policy, None, endpoint_to_item(old)["spec"], now - 3600)
    assert first.phase == "complete"  # a first deploy: every region at once
    new = endpoint(record("img:2"))
    r_old, r_new = spec_revision(old), spec_revision(new)
    item = record("img:2", statuses={"us-east-1": running(r_new, ready=1), "eu-west-1": running(r_old),
                                     "us-west-2": running(r_old)})
    state = rollout.start(new, new.rollout_policy, first, endpoint_to_item(new)["spec"], now - 60)
    assert state.phase == "progressing" and state.regions["us-east-1"] == r_new and state.regions["eu-west-1"] == r_old
    put(table, item, state)
    return table, state, r_old, r_new


def test_status_shows_waves_phase_and_each_region(progressing):
    store, state, r_old, r_new = progressing
    result = invoke("rollout", "status", NAME)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "wave 1: us-east-1 (bake 300s); wave 2: eu-west-1, us-west-2 (bake 600s); unready limit 900s" in text
    assert "(the record's rollout_policy)" in text
    assert f"revision  {r_new}" in text and "progressing, wave 1 of 2" in text
    assert "wave 1 of 2: us-east-1" in text  # the message start() wrote
    rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in text.splitlines() if line.count("│") == 7}
    assert rows["us-east-1"] == ["1", "us-east-1", r_new, r_new, "running", "1/2"]
    assert rows["eu-west-1"] == ["2", "eu-west-1", r_old, r_old, "running", "2/2"]
    assert rows["us-west-2"] == ["2", "us-west-2", r_old, r_old, "running", "2/2"]

    as_json = invoke("rollout", "status", NAME, "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["summary"] == f"{r_new} progressing wave 1/2"
    assert report["policy"]["waves"] == [{"wave": 1, "regions": ["us-east-1"], "bake_seconds": 300},
                                         {"wave": 2, "regions": ["eu-west-1", "us-west-2"], "bake_seconds": 600}]
    assert report["rollout"]["revision"] == r_new and report["rollout"]["current"] is True
    assert (report["rollout"]["phase"], report["rollout"]["wave"], report["rollout"]["waves"]) == ("progressing", 1, 2)
    assert report["rollout"]["seq"] == state.seq and report["problem"] is None
    assert report["regions"][0] == {"region": "us-east-1", "wave": 1, "allowed": r_new, "running": r_new,
                                    "state": "running", "ready": 1, "desired": 2}


def test_pause_then_resume(progressing):
    store, state, _, r_new = progressing
    result = invoke("rollout", "pause", NAME)
    assert result.exit_code == 0, result.output
    assert "progressing -> paused: paused by alice" in result.stderr
    paused = table_state(store)
    assert (paused.phase, paused.seq, paused.message) == ("paused", state.seq + 1, "paused by alice")
    assert paused.regions == state.regions  # nothing moves while paused

    again = invoke("rollout", "pause", NAME)
    assert again.exit_code == 1
    assert f'endpoint "{NAME}": the rollout of {r_new} is paused, not progressing' in again.output
    assert table_state(store) == paused

    result = invoke("rollout", "resume", NAME)
    assert result.exit_code == 0, result.output
    resumed = table_state(store)
    assert (resumed.phase, resumed.seq, resumed.message) == ("progressing", state.seq + 2, "resumed by alice")
    assert resumed.wave_started != state.wave_started  # the wave's clocks start over


def test_abort_rolls_the_first_wave_back_and_marks_the_revision_failed(progressing):
    store, state, r_old, r_new = progressing
    result = invoke("rollout", "abort", NAME)
    assert result.exit_code == 0, result.output
    assert f"us-east-1 {r_new} -> {r_old}" in result.stderr
    item = plain(store.get(NAME))
    assert item["rollout"]["phase"] == "aborted"
    assert item["rollout"]["regions"] == {r: r_old for r in REGIONS}
    assert item["rollout"]["failed"] == [r_new]
    assert item["rollout"]["seq"] == state.seq + 1
    assert item["rollout"]["message"] == "aborted by alice: rolled back"
    assert item["rollout"]["specs"][r_old]["image"] == "img:1"  # what us-east-1 goes back to
    assert item["spec"]["image"] == "img:2"  # the record itself is not touched
    assert "aborted in wave 1 of 2" in invoke("rollout", "status", NAME).stdout
    assert invoke("rollout", "abort", NAME).exit_code == 1  # nothing left to abort


def test_approve_sets_the_current_wave(progressing):
    store, state, _, _ = progressing
    result = invoke("rollout", "approve", NAME)
    assert result.exit_code == 0, result.output
    approved = table_state(store)
    assert (approved.approved, approved.phase, approved.seq) == (0, "progressing", state.seq + 1)
    assert approved.message == "wave 1 approved by alice"
    assert "wave 1: it advances once healthy, without its bake time" in invoke("rollout", "status", NAME).stdout


def test_a_write_meanwhile_fails_the_command_and_is_kept(progressing, monkeypatch):
    store, state, _, _ = progressing
    # A health job's gate: the wave was seen healthy, written right after the command read the record.
    other = replace(state, seq=state.seq + 1, healthy_since="2024-05-01T10:05:00Z", message="wave 1 healthy")
    real_get = EndpointStore.get

    def get_then_someone_writes(self, name):
        item = real_get(self, name)
        assert store.write_rollout(name, rollout.state_to_item(other), expected_seq=state.seq)
        return item

    monkeypatch.setattr(EndpointStore, "get", get_then_someone_writes)
    result = invoke("rollout", "pause", NAME)
    monkeypatch.setattr(EndpointStore, "get", real_get)
    assert result.exit_code == 1
    assert f'endpoint "{NAME}": the rollout changed meanwhile' in result.output
    assert f"no longer seq {state.seq}" in result.output
    assert f"gco-infra rollout status {NAME}" in result.output
    assert plain(store.get(NAME))["rollout"] == plain(rollout.state_to_item(other))


def test_a_record_without_a_policy_is_a_clear_error(table):
    put(table, record("img:1", policy=None, statuses={"us-east-1": running("x")}))
    for command in (("status", NAME), ("pause", NAME), ("abort", NAME)):
        result = invoke("rollout", *command)
        assert result.exit_code == 1, result.output
        assert f'endpoint "{NAME}" has no rollout policy' in result.output
        assert "gco:rolloutPolicy in stack local" in result.output
    assert "rollout" not in table.get(NAME)


def test_unknown_endpoint_and_no_rollout_yet(table):
    result = invoke("rollout", "status", "nobody")
    assert result.exit_code == 1 and 'endpoint "nobody" does not exist' in result.output
    put(table, record("img:1"))
    result = invoke("rollout", "approve", NAME)
    assert result.exit_code == 1 and f'endpoint "{NAME}": no rollout recorded yet' in result.output
    result = invoke("rollout", "status", NAME)
    assert result.exit_code == 0, result.output
    assert "none recorded yet" in result.stdout


def test_abort_reset_replaces_an_unreadable_rollout_with_a_stopped_one(table):
    put(table, {**record("img:1"), "rollout": {"revision": "abc", "phase": "sideways"}})
    status = invoke("rollout", "status", NAME)
    assert status.exit_code == 1
    assert "rollout.phase must be one of" in status.stdout and f"rollout abort {NAME} --reset" in status.stdout
    pause = invoke("rollout", "pause", NAME)
    assert pause.exit_code == 1 and f"`gco-infra rollout abort {NAME} --reset`" in pause.output
    assert invoke("rollout", "abort", NAME).exit_code == 1  # a plain abort cannot read it either

    result = invoke("rollout", "abort", NAME, "--reset")
    assert result.exit_code == 0, result.output
    item = table.get(NAME)
    state, problem = rollout.read_state(item)
    assert problem is None and item["spec"]["image"] == "img:1"
    current = spec_revision(parse_endpoint(item).endpoint)
    # nothing moves: no region is allowed anything, the current revision is not tried again
    assert (state.revision, state.phase, dict(state.regions), state.failed) == (current, "aborted", {}, (current,))
    assert "reset by" in state.message
    again = invoke("rollout", "abort", NAME, "--reset")
    assert again.exit_code == 0 and rollout.read_state(table.get(NAME))[0].seq == state.seq + 1


def test_endpoints_list_shows_running_revisions_and_the_rollout(progressing):
    store, state, r_old, r_new = progressing
    plain_item = {**record("img:9", policy=None), "endpoint_name": "plain"}
    store.put_desired(plain_item)
    assert store.write_region_status("plain", "us-east-1", {"state": "running", "replicas_ready": 1,
                                                            "replicas_desired": 1}, expected=None)
    result = invoke("endpoints", "list")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in result.stdout.splitlines() if line.count("│") == 7}
    header = [c.strip() for c in next(line for line in result.stdout.splitlines()
                                      if line.count("┃") == 7).split("┃")[1:-1]]
    assert header == ["endpoint", "desired", "eu-west-1", "us-east-1", "us-west-2", "rollout"]
    assert rows[NAME] == [NAME, "running", f"running (2/2) @{r_old[:7]}", f"running (1/2) @{r_new[:7]}",
                          f"running (2/2) @{r_old[:7]}", f"{r_new} progressing wave 1/2"]
    assert rows["plain"] == ["plain", "running", "pending", "running (1/1)", "pending", ""]


def test_endpoints_list_without_rollouts_keeps_its_columns(table):
    put(table, record("img:1", policy=None, statuses={"us-east-1": {"state": "running", "replicas_ready": 1,
                                                                    "replicas_desired": 1}}))
    result = invoke("endpoints", "list")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if line.count("┃") == 6)
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["endpoint", "desired", "eu-west-1", "us-east-1",
                                                            "us-west-2"]
    assert "running (1/1)" in result.stdout and "@" not in result.stdout


def test_endpoints_list_json_is_plain_json_even_where_colour_is_forced(table):
    put(table, record("img:1", policy=None, statuses={"us-east-1": {"state": "running", "replicas_ready": 1,
                                                                    "replicas_desired": 1}}))
    # a terminal's colour forced on (rich's consoles would colour, and a pipe to jq would break)
    result = subprocess.run([sys.executable, "-m", "gco_infra.cli", "endpoints", "list", "--json"],
                            env=dict(os.environ, FORCE_COLOR="1"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout
    (got,) = json.loads(result.stdout)
    assert got["endpoint_name"] == NAME and got["region_status"]["us-east-1"]["state"] == "running"


def test_table_down_exits_3(table, monkeypatch, tmp_path):
    from gco_infra.localenv import free_port

    LocalEnv(dir=str(tmp_path / "state"), moto_port=free_port(), table=table.config.table).save()
    monkeypatch.setenv("GCO_DYNAMODB_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("GCO_DYNAMODB_MAX_ATTEMPTS", "1")
    result = invoke("rollout", "pause", NAME)
    assert result.exit_code == EXIT_STORE, result.output
    assert "could not be read; nothing was changed" in result.output


def test_status_table_takes_the_stack_default_policy(progressing):
    store, state, _, r_new = progressing
    item = {k: v for k, v in store.get(NAME).items() if k != "rollout_policy"}  # rolled out under a stack's policy
    policy, problems = config_rollout_policy(POLICY)
    assert not problems

    def columns(table):
        return [c.header for c in table.columns]

    assert "rollout" not in columns(cli.status_table([item]))
    with_default = cli.status_table([item], policy)
    assert columns(with_default)[-1] == "rollout"
    assert [c.plain for c in with_default.columns[-1].cells] == [f"{r_new} progressing wave 1/2"]


def test_status_shows_the_bake_time_the_gate_waits_for_the_targets_waves(table):
    put(table, {**record("img:1"), "target_regions": ["eu-west-1"]})  # only the policy's second wave
    result = invoke("rollout", "status", NAME, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["policy"]["waves"] == [{"wave": 1, "regions": ["eu-west-1"], "bake_seconds": 600}]


def test_status_table_shows_values_as_text_and_survives_any_shape():
    odd = {"endpoint_name": "[bold]x[/]", "desired_state": "running", "target_regions": ["r1", 7],
           "region_status": {"r1": {"state": "[red]boom[/]"}, "r2": "not a map"}}
    broken = {"endpoint_name": "y", "desired_state": "running", "region_status": ["not", "a", "map"]}
    table = cli.status_table([odd, broken])
    assert [c.header for c in table.columns] == ["endpoint", "desired", "r1", "r2"]
    cells = {c.header: [getattr(x, "plain", x) for x in c.cells] for c in table.columns}
    assert cells["endpoint"] == ["[bold]x[/]", "y"] and cells["r1"][0] == "[red]boom[/]"
    assert cells["r2"] == ["-", "-"]
