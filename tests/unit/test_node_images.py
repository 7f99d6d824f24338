"""The node images' pins (images/, built by scripts/image) stay in step with the project's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pins(path: Path) -> dict[str, str]:
    """name (normalized) -> version of every `name==version` line."""
    result = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            result[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return result


def test_the_aws_cli_image_shares_the_project_pins_of_its_dependencies():
    """The packages the AWS CLI shares with the project (PyYAML, urllib3, jmespath, ...) carry
    constraints.txt's versions, so the init container runs what the tests ran."""
    aws, project = pins(ROOT / "images/aws-cli/requirements.txt"), pins(ROOT / "constraints.txt")
    assert "awscli" in aws
    shared = {name: (aws[name], project[name]) for name in aws.keys() & project.keys()}
    assert shared, "no package in common: the comparison would prove nothing"
    assert {name: v for name, v in shared.items() if v[0] != v[1]} == {}


def test_local_stacks_name_the_aws_cli_image_scripts_image_builds():
    import yaml

    tag = pins(ROOT / "images/aws-cli/requirements.txt")["awscli"]
    for stack in ("local", "local-2"):
        config = yaml.safe_load((ROOT / f"stacks/Pulumi.{stack}.yaml").read_text())["config"]
        assert config["gco:modelSyncImage"] == f"localhost/gco-infra/aws-cli:{tag}", stack
