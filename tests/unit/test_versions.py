"""`gco-infra --version`: one line per pinned item, the binaries as found, exit 1 when one is missing."""

from __future__ import annotations

import tomllib

from click.testing import CliRunner

from gco_infra.cli import main
from gco_infra.program import PROJECT_ROOT
from gco_infra.versions import Version, render


def test_render_one_aligned_line_per_item():
    text = render([Version("gco-infra", "0.1.0", "/app"), Version("pulumi CLI", None, "not found in /x"),
                   Version("boto3", "1.44.8")])
    assert text.splitlines() == ["gco-infra   0.1.0       /app",
                                 "pulumi CLI  MISSING     not found in /x",
                                 "boto3       1.44.8"]


def test_version_lists_the_pins_and_fails_without_the_binaries(monkeypatch, tmp_path):
    monkeypatch.setenv("GCO_TOOLS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 1, result.output
    lines = {line.split("  ")[0]: line.split("  ", 1)[1].split() for line in result.output.splitlines()}
    assert lines["pulumi CLI"][0] == "MISSING" and lines["pulumi-resource-kubernetes"][0] == "MISSING"
    pins = dict(d.split("==") for d in tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    for dist, item in (("pulumi", "pulumi (Python SDK)"), ("pulumi-kubernetes", "pulumi-kubernetes (Python SDK)"),
                       ("pulumi-aws", "pulumi-aws (Python SDK)"), ("boto3", "boto3"),
                       ("kubernetes", "kubernetes (Python client)")):
        assert lines[item][0] == pins[dist]
