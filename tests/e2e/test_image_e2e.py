"""The image (Containerfile, built by scripts/image) as a pod runs it: uid 10001, a read-only root
filesystem with only the image's declared volumes writable (tmpfs, like emptyDirs), no capabilities,
and the Kubernetes API reached only through a mounted ServiceAccount token (GCO_IN_CLUSTER=true).
The table and the state backend are the local environment's, passed as environment variables."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from gco_infra.program import PROJECT_ROOT

from .conftest import make_runner
from .test_endpoints_e2e import put, status

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NAME = "image-e2e"


def pins() -> tuple[str, dict[str, str]]:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    return project["version"], dict(d.split("==") for d in project["dependencies"])


def tool_pin(var: str) -> str:
    """A version pinned in scripts/tools (the binaries the image carries)."""
    for line in (PROJECT_ROOT / "scripts" / "tools").read_text().splitlines():
        if line.startswith(f"{var}="):
            return line.split("=", 1)[1].removeprefix("v")
    raise AssertionError(f"{var} not in scripts/tools")


@dataclass(frozen=True)
class Image:
    ref: str
    volumes: tuple[str, ...]
    """The only paths the container may write (the image's VOLUMEs)."""

    def run(self, *args: str, env: dict[str, str] | None = None, mounts: tuple[str, ...] = (),
            network: str = "host", timeout: float = 300, entrypoint: str | None = None) -> subprocess.CompletedProcess:
        cmd = [*PODMAN, "run", "--rm", *LIMITS, "--read-only", "--read-only-tmpfs=false", "--user", "10001",
               "--cap-drop=all", "--security-opt=no-new-privileges", f"--network={network}"]
        if entrypoint:
            cmd += ["--entrypoint", entrypoint]
        for v in self.volumes:
            cmd += ["--tmpfs", f"{v}:rw,U"]  # empty, writable by the container's user, like an emptyDir
        for m in mounts:
            cmd += ["-v", m]
        for k, v in (env or {}).items():
            cmd += ["-e", f"{k}={v}"]
        return subprocess.run([*cmd, self.ref, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> Image:
    version, _ = pins()
    ref = f"localhost/gco-infra:{version}"
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/image installs it and builds the image "
                    "(scripts/test runs it before the tests)", pytrace=False)
    if subprocess.run([*PODMAN, "image", "exists", ref]).returncode != 0:
        pytest.fail(f"image {ref} is missing: build it with scripts/image (scripts/test runs it before the tests)",
                    pytrace=False)
    config = json.loads(subprocess.run([*PODMAN, "image", "inspect", "--format", "{{json .Config}}", ref],
                                       capture_output=True, text=True, check=True).stdout)
    if (config.get("Labels") or {}).get("io.gco-infra.source-digest") != source_digest():
        pytest.fail(f"image {ref} was built from other sources than this working tree: rebuild it with "
                    "scripts/image (scripts/test runs it before the tests)", pytrace=False)
    return Image(ref, tuple(sorted(config.get("Volumes") or {})))


SOURCES = ("Containerfile", "pyproject.toml", "constraints.txt", "Pulumi.yaml", "__main__.py", "gco_infra/*.py", "stacks/Pulumi.*.yaml",
           "scripts/tools")
"""What the image is made of, as scripts/image stages it (git's view of the working tree)."""


def source_digest() -> str:
    """scripts/image's source_digest, from the working tree."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *SOURCES], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    files = sorted(set(listed), key=str.encode)  # LC_ALL=C sort
    lines = "".join(f"{hashlib.sha256((PROJECT_ROOT / f).read_bytes()).hexdigest()} {f}\n"
                    for f in files if (PROJECT_ROOT / f).is_file())
    return hashlib.sha256(lines.encode()).hexdigest()


def test_version_names_every_pin_and_the_binaries_it_carries(image):
    started = time.monotonic()
    r = image.run("--version", network="none")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split("  ")[0]: line.split("  ", 1)[1].split() for line in r.stdout.splitlines()}
    version, deps = pins()
    assert lines["gco-infra"] == [version, "/app"]
    assert lines["python"][0].startswith("3.11.")
    assert lines["pulumi CLI"] == [tool_pin("PULUMI_VERSION"), "/usr/local/bin/pulumi"]
    assert lines["pulumi-resource-kubernetes"] == [tool_pin("K8S_PROVIDER_VERSION"),
                                                   "/usr/local/bin/pulumi-resource-kubernetes"]
    for dist, item in (("pulumi", "pulumi (Python SDK)"), ("pulumi-kubernetes", "pulumi-kubernetes (Python SDK)"),
                       ("pulumi-aws", "pulumi-aws (Python SDK)"), ("boto3", "boto3"), ("botocore", "botocore"),
                       ("kubernetes", "kubernetes (Python client)")):
        assert lines[item] == [deps[dist]], item
    assert image.volumes == ("/home/gco", "/tmp")
    assert time.monotonic() - started < 60


def service_account(env, name: str, into: Path) -> Path:
    """What the kubelet mounts for a pod of ServiceAccount gco-system/<name> on local-1: a bound token
    (TokenRequest) and the cluster CA."""
    into.mkdir()
    token = client.CoreV1Api(env.kube("local-1")).create_namespaced_service_account_token(
        name, "gco-system", client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=600))).status.token
    (into / "token").write_text(token)
    (into / "ca.crt").write_bytes(env.ca_file("local-1").read_bytes())
    (into / "namespace").write_text("gco-system")
    for f in into.iterdir():
        f.chmod(0o644)
    into.chmod(0o755)
    return into


def pod_env(env) -> tuple[dict[str, str], tuple[str, ...]]:
    """The environment's table and state backend as a Deployment passes them (PULUMI_*, AWS_*, GCO_*;
    the image keeps its own PATH and PULUMI_HOME), plus what Kubernetes sets in every pod."""
    values = {k: v for k, v in env.pulumi_env().items()
              if k.startswith(("PULUMI_", "AWS_", "GCO_")) and k != "PULUMI_HOME"}
    values.update(GCO_IN_CLUSTER="true", KUBERNETES_SERVICE_HOST="127.0.0.1",
                  KUBERNETES_SERVICE_PORT=str(env.apiservers["local-1"].port))
    mounts: tuple[str, ...] = ()
    backend = values.get("PULUMI_BACKEND_URL", "")
    if backend.startswith("file://"):  # a directory backend: the same path, read-write
        path = backend[len("file://"):]
        mounts = (f"{path}:{path}:rw,U",)
    return values, mounts


def exported_state(env, tmp_path: Path) -> str:
    """The `local` stack's state as the backend holds it (no secrets decrypted)."""
    project = tmp_path / "export"
    (project / "stacks").mkdir(parents=True)
    shutil.copyfile(PROJECT_ROOT / "Pulumi.yaml", project / "Pulumi.yaml")
    r = subprocess.run(["pulumi", "stack", "export", "--stack", "local"], cwd=project, capture_output=True, text=True,
                       env={**os.environ, **env.pulumi_env(), "PULUMI_FALLBACK_TO_STATE_SECRETS_MANAGER": "true"},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_runner_and_health_tick_in_cluster(image, env, kube1, tmp_path, monkeypatch):
    values, mounts = pod_env(env)
    runner_sa = service_account(env, "gco-runner", tmp_path / "runner-sa")
    put(env, NAME)
    try:
        started = time.monotonic()
        r = image.run("--json-logs", "run", "--once", "--stack", "local", env=values,
                      mounts=(f"{runner_sa}:{SA_DIR}:ro", *mounts))
        ran = time.monotonic() - started
        assert r.returncode == 0, r.stdout + r.stderr
        stacks = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{") and '"stack"' in line]
        assert [s["action"] for s in stacks if s.get("event") == "stack"] == ["full"], r.stderr
        dep = kube1.deployment(NAME)
        assert dep is not None and dep.metadata.labels["app"] == NAME
        written = status(env, NAME)
        assert written.get("state") in ("creating", "running") and written.get("last_sync") and not written.get("error")

        # The provider acts as the ServiceAccount through the token's path; no token is in the state.
        state = exported_state(env, tmp_path)
        providers = [res for res in json.loads(state)["deployment"]["resources"]
                     if res["type"] == "pulumi:providers:kubernetes"]
        assert [json.loads(p["inputs"]["kubeconfig"])["users"][0]["user"] for p in providers] == \
            [{"tokenFile": f"{SA_DIR}/token"}]
        assert (runner_sa / "token").read_text() not in state and env.admin_token not in state

        # The preview from the same image: a new record is a table change, the applied one is no change.
        put(env, f"{NAME}-next")
        pv = image.run("--json-logs", "preview", "--json", "--stack", "local", env=values,
                       mounts=(f"{runner_sa}:{SA_DIR}:ro", *mounts))
        assert pv.returncode == 0, pv.stdout + pv.stderr
        [report] = json.loads(pv.stdout)
        assert report["error"] is None, report
        assert ("create", f"Deployment/{NAME}-next", "table") in {
            (c["op"], c["resource"], c["cause"]) for c in report["changes"]}, report["changes"]
        assert not [c for c in report["changes"] if c["endpoint"] == NAME], report["changes"]
        assert kube1.deployment(f"{NAME}-next") is None  # a preview changes nothing
        put(env, f"{NAME}-next", state="deleted")  # and out of the table again: it was never applied
        store = env.store()
        assert store.purge(f"{NAME}-next", expected_updated_at=store.get(f"{NAME}-next").get("updated_at"))

        # The health job in its own pod: the gco-health ServiceAccount, leader election included.
        leases = client.CoordinationV1Api(env.kube("local-1"))
        _delete_lease(leases)  # another test's replica may still hold it
        health_sa = service_account(env, "gco-health", tmp_path / "health-sa")
        started = time.monotonic()
        h = image.run("--json-logs", "health", "--stack", "local", "--once", "--in-cluster", env=values,
                      mounts=(f"{health_sa}:{SA_DIR}:ro",))
        assert h.returncode == 0, h.stdout + h.stderr
        report = next(json.loads(line) for line in h.stderr.splitlines() if '"event": "health"' in line)
        assert report["leader"] is True and report["error"] is None and report["endpoints"] >= 1
        watched = status(env, NAME)  # no node: the pod stays Pending, which only the health job records
        assert watched.get("unready_since") and watched.get("replicas_ready") == 0, watched
        print(f"image: run --once {ran:.1f}s, health --once {time.monotonic() - started:.1f}s")
    finally:
        _delete_lease(client.CoordinationV1Api(env.kube("local-1")))
        # A host runner's full reconcile right after the pod's: the refresh uses the provider the
        # program declares (the host's kubeconfig), not the pod's token path recorded in the state.
        host = make_runner(env, stacks=("local",))
        try:
            results = host.tick(force_full=True)
        finally:
            host.close()
        assert [(res.action, res.failed, res.endpoint_errors) for res in results] == [("full", 0, {})], [res.summary() for res in results]
    assert kube1.deployment(NAME) is not None


def _delete_lease(api: client.CoordinationV1Api) -> None:
    try:
        api.delete_namespaced_lease("gco-health", "gco-system")
    except client.ApiException as exc:
        if exc.status != 404:
            raise


def test_a_worker_process_started_under_the_entry_point_does_not_run_the_command_again(image):
    """The runner's workers are spawned: each runs the entry point's file as __mp_main__ first. Unguarded,
    it would run the whole command again in every worker (a second runner binding the liveness port)."""
    code = ("import runpy, sys; sys.argv = ['gco-infra', '--version']; "
            "runpy.run_path('/opt/venv/bin/gco-infra', run_name='__mp_main__'); print('guarded')")
    r = image.run("-c", code, network="none", entrypoint="/opt/venv/bin/python")
    assert r.returncode == 0 and r.stdout.strip() == "guarded", r.stdout + r.stderr
