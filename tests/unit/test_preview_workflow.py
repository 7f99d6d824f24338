"""The pull-request preview workflow's trust model: pull-request code gets state-decrypting credentials
only for branches of this repository, behind the protected environment; forks get an uncredentialed check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "preview.yml"
ENVIRONMENT = "stack-preview"


@pytest.fixture(scope="module")
def workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as True
    doc["on"] = doc.pop(True, doc.get("on"))
    return doc


def _permissions(job: dict) -> dict:
    return job.get("permissions") or {}


def test_only_pull_request_events_never_pull_request_target(workflow):
    assert set(workflow["on"]) == {"pull_request"}
    assert workflow["permissions"] == {}, "the workflow grants nothing by default; each job asks for its own"


def test_the_credentialed_job_is_same_repository_only_and_behind_the_protected_environment(workflow):
    credentialed = {name: job for name, job in workflow["jobs"].items()
                    if _permissions(job).get("id-token") == "write"}
    assert list(credentialed) == ["preview"]
    job = credentialed["preview"]
    assert job["environment"] == ENVIRONMENT
    assert job["if"].replace(" ", "") == "github.event.pull_request.head.repo.full_name==github.repository"
    assert "pull-requests" not in _permissions(job), "the job running pull-request code cannot write to the pull request"
    assert all(step.get("with", {}).get("persist-credentials") is False
               for step in job["steps"] if str(step.get("uses", "")).startswith("actions/checkout@"))


def test_forks_get_an_uncredentialed_check(workflow):
    check = workflow["jobs"]["check"]
    assert "if" not in check, "the check runs for every pull request, forks included"
    assert _permissions(check) == {"contents": "read"}
    assert not any("configure-aws-credentials" in str(step.get("uses", "")) for step in check["steps"])


def test_the_commenting_job_runs_no_pull_request_code(workflow):
    writers = {name: job for name, job in workflow["jobs"].items() if _permissions(job).get("pull-requests") == "write"}
    assert list(writers) == ["comment"]
    job = writers["comment"]
    assert "id-token" not in _permissions(job)
    assert not any("run" in step for step in job["steps"])
    assert not any(str(step.get("uses", "")).startswith("actions/checkout@") for step in job["steps"])


def test_every_action_is_pinned_to_a_commit(workflow):
    for name, job in workflow["jobs"].items():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), f"{name}: {step['uses']} is not SHA-pinned"


def test_nothing_is_downloaded_and_run_after_the_credentials_exist(workflow):
    steps = workflow["jobs"]["preview"]["steps"]
    creds = next(i for i, step in enumerate(steps) if "configure-aws-credentials" in str(step.get("uses", "")))
    assert not [step for step in steps[creds:] if "curl" in str(step.get("run", ""))]
    assert any("plugin install resource aws" in str(step.get("run", "")) for step in steps[:creds]), \
        "EKS stacks call aws.eks.get_cluster: the AWS provider plugin must be installed"


def test_only_the_bots_own_comment_is_updated(workflow):
    script = next(step["with"]["script"] for step in workflow["jobs"]["comment"]["steps"] if "with" in step
                  and "script" in step["with"])
    assert "c.user.type === 'Bot'" in script
