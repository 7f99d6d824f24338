"""`gco-infra local env` as the README uses it: `eval "$(gco-infra local env)"` in a shell."""

from __future__ import annotations

import os
import subprocess
import sys

from gco_infra.localenv import LocalEnv, free_port


def test_local_env_prints_one_export_a_shell_evaluates_per_variable_however_long_the_values(tmp_path):
    state = tmp_path / "state"
    LocalEnv(dir=str(state), moto_port=free_port(), moto_pid=None).save()
    # a PATH far longer than a console line, and a passphrase a shell would split or expand unquoted
    long_path = ":".join(f"/opt/tool-{i}/bin" for i in range(40)) + os.pathsep + os.environ["PATH"]
    passphrase = "it's a 'phrase' with $HOME, [b]markup[/b], spaces and ; " * 5
    env = dict(os.environ, GCO_STATE_DIR=str(state), PATH=long_path, PULUMI_CONFIG_PASSPHRASE=passphrase,
               COLUMNS="80")
    printed = subprocess.run([sys.executable, "-m", "gco_infra.cli", "local", "env"], env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    lines = printed.splitlines()
    assert lines and all(line.startswith("export ") for line in lines), printed
    names = [line.split("=", 1)[0].removeprefix("export ") for line in lines]
    assert {"PATH", "PULUMI_BACKEND_URL", "PULUMI_CONFIG_PASSPHRASE", "GCO_PULUMI_PROJECT"} <= set(names), names

    shell = subprocess.run(["bash", "-c", 'eval "$1" && printf "%s\\0%s\\0%s\\0%s" "$PATH" "$PULUMI_CONFIG_PASSPHRASE" '
                            '"$GCO_PULUMI_PROJECT" "$PULUMI_BACKEND_URL"', "bash", printed],
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60, check=True)
    path, got_passphrase, project, backend = shell.stdout.split("\0")
    assert path.endswith(long_path) and path.split(os.pathsep)[0].endswith("bin"), path
    assert got_passphrase == passphrase
    assert project == str(state / "project")
    # an S3 URL with its query (? and &), as the state backend's
    env_obj = LocalEnv.load(state)
    assert backend == env_obj.pulumi_env()["PULUMI_BACKEND_URL"] and "?" in backend and "&" in backend, backend
