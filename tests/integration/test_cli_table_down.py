"""The command line when the local environment's DynamoDB is down: fail closed, exit 3, say where.

The local environment's state dir is real (LocalEnv.save); its DynamoDB port has nothing behind it.
"""

from __future__ import annotations

import signal

import pytest
import structlog
from click.testing import CliRunner

from gco_infra import cli
from gco_infra.localenv import LocalEnv, free_port
from gco_infra.plan import EXIT_STORE


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No AWS credentials, no real table: nothing here can leave 127.0.0.1."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "GCO_KUBECONFIG", "GCO_TABLE", "GCO_TABLE_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # A table elsewhere that is down too, so a command that ignored the local environment would
    # also fail, but name this address rather than the local environment's.
    monkeypatch.setenv("GCO_DYNAMODB_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GCO_DYNAMODB_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("GCO_DYNAMODB_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("GCO_DYNAMODB_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("GCO_STATE_DIR", str(tmp_path / "state"))
    sigterm = signal.getsignal(signal.SIGTERM)  # `run` installs its own
    yield tmp_path / "state"
    signal.signal(signal.SIGTERM, sigterm)
    structlog.reset_defaults()  # `main` points structlog at the runner's captured stderr


def started_env(state_dir) -> str:
    """A local environment that was started here and whose DynamoDB no longer answers."""
    env = LocalEnv(dir=str(state_dir), moto_port=free_port(), moto_pid=None)
    env.save()
    return env.dynamodb_endpoint


def invoke(*args: str):
    return CliRunner().invoke(cli.main, ["--no-json-logs", *args], catch_exceptions=False)


def test_endpoints_list_with_local_dynamodb_down_exits_3_naming_it(isolated):
    url = started_env(isolated)
    result = invoke("endpoints", "list")
    assert result.exit_code == EXIT_STORE, result.output
    assert "could not be read" in result.output and url in result.output
    assert "not running" not in result.output


def test_endpoints_set_state_with_local_dynamodb_down_exits_3(isolated):
    url = started_env(isolated)
    result = invoke("endpoints", "set-state", "a", "stopped")
    assert result.exit_code == EXIT_STORE, result.output
    assert "could not be read" in result.output and url in result.output


def test_run_once_with_local_dynamodb_down_exits_3_naming_it(isolated):
    url = started_env(isolated)
    result = invoke("run", "--once")
    assert result.exit_code == EXIT_STORE, result.output
    assert "could not be read" in result.output and url in result.output
    assert "not running" not in result.output


def test_run_once_without_a_local_environment_says_it_is_not_running(isolated):
    result = invoke("run", "--once")  # no state dir: never started here
    assert result.exit_code == 1, result.output
    assert "the local environment is not running" in result.output
