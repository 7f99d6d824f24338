"""The local environment: a control plane per region, and moto's server for DynamoDB, the S3 state
backend and the KMS key that encrypts the state's secrets (or a file backend: ``--state file``).

Everything listens on 127.0.0.1. One etcd serves every region; each region ("local-1", "local-2")
has its own etcd prefix, kube-apiserver, kube-controller-manager and kube-scheduler, so
multi-region behaviour is real and the cluster behaves like an EKS control plane: the
deployment, replica-set, HPA, garbage-collector, endpoint and namespace controllers run, the
ServiceAccount admission plugin is on. There is no node, so pods stay Pending, exactly like a GPU
endpoint waiting for capacity. As in production, stacks live in an S3 bucket and their secrets are
encrypted with a KMS key (alias ``alias/gco-infra-state``, as the stack files declare), both
served by the same moto server as the table. State (ports, pids, kubeconfigs, tokens) lives in a
state dir; ``up`` is idempotent and ``down`` leaves no process behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .localnode import HOST_ADDRESS, Node, NodeError, write_private
from .store import DEFAULT_TABLE, EndpointStore, StoreConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REGIONS = ("local-1", "local-2")
STACK_FOR_REGION = {"local-1": "local", "local-2": "local-2"}
NAMESPACES = ("gco-inference", "gco-inference-team-b")
SYSTEM_NAMESPACE = "gco-system"
INFERENCE_SERVICE_ACCOUNT = "gco-service-account"
"""The inference pods' ServiceAccount, as on the platform's clusters (created in each namespace)."""
CONTROLLERS = (
    "serviceaccount-token-controller", "serviceaccount-controller", "garbage-collector-controller", "deployment-controller",
    "replicaset-controller", "horizontal-pod-autoscaler-controller", "endpoints-controller",
    "endpointslice-controller", "endpointslice-mirroring-controller", "namespace-controller",
    "pod-garbage-collector-controller", "disruption-controller", "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
)
"""What EKS runs that matters to endpoints (no cloud or volume-attach controllers)."""
NODE_CONTROLLERS = ("node-lifecycle-controller", "persistentvolume-binder-controller")
"""With a node: its not-ready taint lifted and NotReady noticed; the model volume's claims bound."""
HPA_SYNC_SECONDS = 5
"""The HPA controller's period (15 s on EKS): shorter here so tests see it act sooner."""
STATE_BACKENDS = ("s3", "file")
STATE_BUCKET = "gco-infra-state"
KMS_ALIAS = "alias/gco-infra-state"
"""The alias production's stack files name in their secretsprovider; local stacks declare it too."""
LOCAL_AWS_REGION = "us-east-1"


_SAVE_LOCK = threading.Lock()


class LocalEnvError(RuntimeError):
    pass


def state_dir() -> Path:
    return Path(os.environ.get("GCO_STATE_DIR") or PROJECT_ROOT / ".state" / "local")


def tools_bin() -> Path:
    return Path(os.environ.get("GCO_TOOLS_DIR") or Path.home() / ".cache" / "gco-infra" / "tools") / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int | None, marker: str) -> bool:
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def _wait(check: Callable[[], bool], what: str, timeout: float, proc_pid: int | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc_pid is not None and _exited(proc_pid):
            break
        time.sleep(0.25)
    tail = ""
    if log and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise LocalEnvError(f"{what} did not become ready within {timeout:.0f}s{tail}")


def _exited(pid: int) -> bool:
    """True once our child has exited (reaping it, so it does not linger as a zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:  # not our child: fall back to /proc
        return not Path(f"/proc/{pid}").exists()


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    # not the caller's TMPDIR: a runner in this process points it at the engine's scratch dir, which
    # it empties between operations (the webhook's Kubernetes client keeps its CA file in TMPDIR)
    env = {k: v for k, v in (env or os.environ).items() if k != "TMPDIR"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    return proc.pid


def start_moto(port: int, log: Path, host: str = "127.0.0.1") -> int:
    """moto's standalone server on host:port; returns its pid once it answers."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise LocalEnvError(f"moto_server not found next to {sys.executable}; run scripts/setup")
    pid = _spawn([str(exe), "-H", host, "-p", str(port)], log)
    _wait(lambda: _http_ok(f"http://{host}:{port}/moto-api/"), "moto server", 30, pid, log)
    return pid


def _http_ok(url: str, token: str | None = None, ctx: ssl.SSLContext | None = None) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _healthz(port: int) -> bool:
    """/healthz of a controller manager or scheduler (self-signed serving certificate, anonymous)."""
    if not port:
        return False
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return _http_ok(f"https://127.0.0.1:{port}/healthz", ctx=ctx)


def stop_pid(pid: int | None, marker: str, timeout: float = 15) -> None:
    if not _alive(pid, marker):
        return
    assert pid is not None
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid, marker):
        time.sleep(0.1)
    if _alive(pid, marker):
        os.killpg(pid, signal.SIGKILL)
        time.sleep(0.2)


@dataclass
class ApiServer:
    """One region's control plane: kube-apiserver, kube-controller-manager and kube-scheduler."""

    region: str
    port: int
    pid: int | None = None
    controller_manager_port: int = 0
    controller_manager_pid: int | None = None
    scheduler_port: int = 0
    scheduler_pid: int | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


@dataclass
class LocalEnv:
    """What runs, where; persisted as state.json in the state dir."""

    dir: str
    etcd_port: int = 0
    etcd_peer_port: int = 0
    etcd_pid: int | None = None
    moto_port: int = 0
    moto_pid: int | None = None
    admin_token: str = ""
    apiservers: dict[str, ApiServer] = field(default_factory=dict)
    table: str = DEFAULT_TABLE
    backend: str = field(default_factory=lambda: os.environ.get("GCO_LOCAL_BACKEND") or "s3")
    """Where stacks live: "s3" (moto's S3, as in production) or "file"; secrets use moto's KMS either way."""
    node: bool = field(default_factory=lambda: os.environ.get("GCO_LOCAL_NODE", "").lower() in ("1", "true"))
    """Whether each region has a node (kubelet + containerd) that runs pods for real."""
    host: str = "127.0.0.1"
    """Where the apiservers and moto listen: loopback, or HOST_ADDRESS when pods must reach them."""
    nodes: dict[str, Node] = field(default_factory=dict)
    identity_port: int = 0
    identity_pid: int | None = None
    """The pod-identity webhook (localidentity): pods get credentials from their ServiceAccount's role."""

    # ---- persistence ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path | None = None) -> "LocalEnv":
        d = directory or state_dir()
        f = d / "state.json"
        if not f.exists():
            return cls(dir=str(d))
        raw = json.loads(f.read_text())
        raw["apiservers"] = {k: ApiServer(**v) for k, v in raw.get("apiservers", {}).items()}
        raw["nodes"] = {k: Node(**v) for k, v in raw.get("nodes", {}).items()}
        raw["dir"] = str(d)
        return cls(**raw)

    def save(self) -> None:
        with _SAVE_LOCK:  # nodes start in threads
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.path / "state.json.tmp"
            tmp.write_text(json.dumps(asdict(self), indent=2))
            tmp.replace(self.path / "state.json")

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def dynamodb_endpoint(self) -> str:
        return f"http://{self.host}:{self.moto_port}"

    def kubeconfig(self, region: str) -> Path:
        return self.path / f"kubeconfig-{region}"

    @property
    def aws_endpoint(self) -> str:
        """moto's server: DynamoDB, S3 and KMS on one port."""
        return f"http://{self.host}:{self.moto_port}"

    @property
    def backend_url(self) -> str:
        if self.backend == "s3":
            return (f"s3://{STATE_BUCKET}?endpoint={self.host}:{self.moto_port}&disableSSL=true&s3ForcePathStyle=true"
                    f"&region={LOCAL_AWS_REGION}")
        return f"file://{self.path / 'backend'}"

    @property
    def secrets_provider(self) -> str:
        return f"awskms://{KMS_ALIAS}?region={LOCAL_AWS_REGION}"

    def _aws(self, service: str):
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.aws_endpoint, region_name=LOCAL_AWS_REGION,
                            aws_access_key_id="local", aws_secret_access_key="local",
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}))

    def _ensure_state_backend(self, *, empty: bool, progress: Callable[[str], None]) -> None:
        """The state bucket and the KMS key with its alias, in moto (idempotent); an emptied bucket
        (or file backend) when the clusters are new, as their stacks would describe the old ones."""
        kms = self._aws("kms")
        aliases = {a["AliasName"] for a in kms.list_aliases()["Aliases"]}
        if KMS_ALIAS not in aliases:
            progress(f"creating the state's KMS key {KMS_ALIAS} (moto)")
            key = kms.create_key(Description="gco-infra local state secrets")["KeyMetadata"]["KeyId"]
            kms.create_alias(AliasName=KMS_ALIAS, TargetKeyId=key)
        if self.backend != "s3":
            if empty:
                shutil.rmtree(self.path / "backend", ignore_errors=True)
            (self.path / "backend").mkdir(exist_ok=True)
            return
        s3 = self._aws("s3")
        if STATE_BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            progress(f"creating the state bucket s3://{STATE_BUCKET} (moto)")
            s3.create_bucket(Bucket=STATE_BUCKET)
        elif empty:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=STATE_BUCKET):
                keys = [{"Key": o["Key"]} for o in page.get("Contents") or []]
                if keys:
                    s3.delete_objects(Bucket=STATE_BUCKET, Delete={"Objects": keys})

    def _state_backend_ok(self) -> bool:
        try:
            kms = self._aws("kms")
            if KMS_ALIAS not in {a["AliasName"] for a in kms.list_aliases()["Aliases"]}:
                return False
            if self.backend == "s3":
                self._aws("s3").head_bucket(Bucket=STATE_BUCKET)
            return self.backend == "s3" or (self.path / "backend").is_dir()
        except Exception:  # noqa: BLE001 - anything but a clean answer is "down"
            return False

    def store(self) -> EndpointStore:
        import boto3

        session = boto3.session.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1")
        return EndpointStore(StoreConfig(table=self.table, region="us-east-1", endpoint_url=self.dynamodb_endpoint),
                             session=session)

    @property
    def pulumi_project(self) -> Path:
        """A copy of the project for a person's `pulumi -C` (see write_pulumi_project)."""
        return self.path / "project"

    def write_pulumi_project(self) -> None:
        """The project as the runner gives it to the engine (state.write_project: stack config without
        secrets settings), plus the program, for a person's `pulumi` commands: the engine writes a
        stack's encryptedkey (new with every local KMS key) here, never into the tracked stacks/."""
        from .state import write_project

        write_project(self.pulumi_project)
        for name in ("__main__.py", ".venv", "gco_infra"):
            link = self.pulumi_project / name
            if not link.is_symlink() and (PROJECT_ROOT / name).exists():
                link.symlink_to(PROJECT_ROOT / name)

    def pulumi_env(self) -> dict[str, str]:
        """Environment for the Pulumi CLI and Automation API against this environment."""
        return {
            "PATH": f"{tools_bin()}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PULUMI_BACKEND_URL": self.backend_url,
            # An existing stack keeps its state's secrets provider (state.py); new stacks get the
            # one their stack file declares, else this one. The passphrase only opens stacks made
            # before the state moved to KMS.
            "PULUMI_FALLBACK_TO_STATE_SECRETS_MANAGER": "true",
            "GCO_SECRETS_PROVIDER": self.secrets_provider,
            "PULUMI_CONFIG_PASSPHRASE": os.environ.get("PULUMI_CONFIG_PASSPHRASE", ""),
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            "PULUMI_HOME": str(self.path / "pulumi-home"),
            "GCO_DYNAMODB_ENDPOINT": self.dynamodb_endpoint,
            "GCO_TABLE": self.table,
            "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_REGION": LOCAL_AWS_REGION,
            "AWS_ENDPOINT_URL_S3": self.aws_endpoint, "AWS_ENDPOINT_URL_KMS": self.aws_endpoint,
            # the provider's request rate, when set here (state.KUBE_CLIENT otherwise)
            **{k: v for k, v in os.environ.items() if k.startswith("PULUMI_K8S_CLIENT_")},
        }

    # ---- status ----------------------------------------------------------------------------------------
    def status(self) -> dict[str, bool]:
        result = {
            "etcd": _alive(self.etcd_pid, "etcd") and _http_ok(f"http://127.0.0.1:{self.etcd_port}/health"),
            "dynamodb": _alive(self.moto_pid, "moto_server") and _http_ok(f"{self.dynamodb_endpoint}/moto-api/"),
        }
        result[f"state ({self.backend} + kms)"] = result["dynamodb"] and self._state_backend_ok()
        for region, api in self.apiservers.items():
            result[f"apiserver {region}"] = _alive(api.pid, "kube-apiserver") and self.ca_file(region).exists() and _http_ok(
                f"{api.url}/readyz", self.admin_token, ssl.create_default_context(cafile=str(self.ca_file(region))))
            result[f"controller-manager {region}"] = _alive(api.controller_manager_pid, "kube-controller-manager") and \
                _healthz(api.controller_manager_port)
            result[f"scheduler {region}"] = _alive(api.scheduler_pid, "kube-scheduler") and _healthz(api.scheduler_port)
            node = self.nodes.get(region)
            if node and f"pod identity" not in result:
                result["pod identity"] = _alive(self.identity_pid, "gco_infra.localidentity")
            if node:
                result[f"node {node.name}"] = self._node_running(node) and self.node_ready(node)
        return result

    # ---- up / down ---------------------------------------------------------------------------------------
    def up(self, regions: Iterable[str] = REGIONS, progress: Callable[[str], None] = lambda s: None,
           backend: str | None = None, node: bool | None = None) -> None:
        """Start what is not running. ``backend`` ("s3" or "file") changes where stacks live only while
        the environment is down (the running clusters' stacks are where they are); so does ``node``
        (a node per region: the apiservers and moto must then listen where pods reach them)."""
        regions = tuple(regions)
        if node is not None and node != self.node:
            if _alive(self.etcd_pid, "etcd"):
                raise LocalEnvError(f"the local environment runs {'with' if self.node else 'without'} nodes; "
                                    f"`gco-infra local down` first to start it {'with' if node else 'without'} nodes")
            self.node = node
        if self.node:
            from . import localnode

            problems = localnode.missing_prerequisites(tools_bin())
            if problems:
                raise LocalEnvError("cannot start a node: " + "; ".join(problems))
            try:
                localnode.images()
                localnode.ensure_host_address()
            except NodeError as exc:
                raise LocalEnvError(str(exc)) from exc
        if not _alive(self.etcd_pid, "etcd"):
            host = HOST_ADDRESS if self.node else "127.0.0.1"
            if host != self.host:  # the apiservers' serving certificates name the old address
                for certs in self.path.glob("certs-*"):
                    shutil.rmtree(certs, ignore_errors=True)
                if _alive(self.moto_pid, "moto_server"):
                    stop_pid(self.moto_pid, "moto_server")
            self.host = host
        if backend and backend != self.backend:
            if backend not in STATE_BACKENDS:
                raise LocalEnvError(f"backend must be one of {', '.join(STATE_BACKENDS)}, got {backend!r}")
            if _alive(self.etcd_pid, "etcd"):
                raise LocalEnvError(f"the local environment runs with --backend {self.backend}; "
                                    f"`gco-infra local down` first to switch to --backend {backend}")
            self.backend = backend
        binaries = {b: tools_bin() / b for b in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")}
        missing = [b for b, p in binaries.items() if not p.exists()]
        if missing:
            raise LocalEnvError(f"{', '.join(missing)} not built; run scripts/tools build (or scripts/setup)")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "pulumi-home").mkdir(exist_ok=True)
        if not self.admin_token:
            self.admin_token = secrets.token_hex(24)
        self._credentials()

        fresh = False
        if self.backend == "s3" and not _alive(self.moto_pid, "moto_server") and _alive(self.etcd_pid, "etcd"):
            # moto restarts empty: with the stacks gone, the clusters must start empty too
            progress("moto is not running (the S3 state is gone with it): restarting the control plane empty")
            stop_pid(self.etcd_pid, "etcd")
        if _alive(self.etcd_pid, "etcd"):
            progress(f"etcd already running on 127.0.0.1:{self.etcd_port}")
        else:
            self.etcd_port, self.etcd_peer_port = free_port(), free_port()
            progress(f"starting etcd on 127.0.0.1:{self.etcd_port}")
            data = self.path / "etcd-data"
            shutil.rmtree(data, ignore_errors=True)
            self.etcd_pid = _spawn([
                str(binaries["etcd"]), "--name", "gco-local", "--data-dir", str(data), "--unsafe-no-fsync",
                "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer_port}",
                "--initial-cluster", f"gco-local=http://127.0.0.1:{self.etcd_peer_port}",
                "--log-level", "warn",
            ], self.path / "etcd.log")
            _wait(lambda: _http_ok(f"http://127.0.0.1:{self.etcd_port}/health"), "etcd", 60, self.etcd_pid, self.path / "etcd.log")
            for api in self.apiservers.values():  # a new etcd means a new control plane
                self._stop_region(api)
            self.apiservers = {}  # and an empty cluster: stack state would describe the old one
            fresh = True
        self.save()

        if _alive(self.moto_pid, "moto_server"):
            progress(f"DynamoDB (moto) already running on {self.host}:{self.moto_port}")
        else:
            self.moto_port = free_port()
            progress(f"starting DynamoDB (moto server) on {self.host}:{self.moto_port}")
            self.moto_pid = start_moto(self.moto_port, self.path / "moto.log", self.host)
        self.save()
        self.store().create_table()
        self._ensure_state_backend(empty=fresh, progress=progress)
        if fresh:
            shutil.rmtree(self.pulumi_project, ignore_errors=True)  # its keys belonged to the old state
        self.write_pulumi_project()

        restarted = set()
        for region in regions:
            api = self.apiservers.get(region)
            if api and _alive(api.pid, "kube-apiserver"):
                progress(f"kube-apiserver {region} already running on {api.url}")
            else:
                if api:  # its controllers would keep talking to a port nobody serves
                    self._stop_region(api)
                api = self._start_apiserver(region, binaries["kube-apiserver"], progress)
                restarted.add(region)
            self._start_controllers(api, binaries, progress)
        self.save()
        for region in regions:
            self._wait_for_controllers(self.apiservers[region])
            self._ensure_platform_objects(region)
        if self.node:
            self._start_identity_webhook(regions, progress, restart=bool(restarted))
            self._start_nodes(regions, progress, restarted)

    def _start_apiserver(self, region: str, binary: Path, progress: Callable[[str], None]) -> ApiServer:
        api = ApiServer(region=region, port=free_port(), host=self.host)
        progress(f"starting kube-apiserver {region} on {api.url}")
        log = self.path / f"apiserver-{region}.log"
        node_args: list[str] = []
        if self.node:
            # pods reach it through the kubernetes Service (kube-proxy -> the advertised address), and it
            # reaches kubelets at their InternalIP with its own client certificate
            from .localnode import kubelet_client_pki

            _, crt, key = kubelet_client_pki(self.path)
            node_args = ["--endpoint-reconciler-type", "lease", "--kubelet-preferred-address-types", "InternalIP",
                         "--kubelet-client-certificate", str(crt), "--kubelet-client-key", str(key)]
        else:
            node_args = ["--endpoint-reconciler-type", "none"]
        api.pid = _spawn([
            str(binary),
            "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}", "--etcd-prefix", f"/registry-{region}",
            "--bind-address", self.host, "--advertise-address", self.host, "--secure-port", str(api.port),
            "--cert-dir", str(self.path / f"certs-{region}"),
            "--service-cluster-ip-range", "10.96.0.0/16",
            "--service-account-issuer", f"https://kubernetes.default.svc/{region}",
            "--service-account-key-file", str(self.path / "sa.pub"),
            "--service-account-signing-key-file", str(self.path / "sa.key"),
            "--token-auth-file", str(self.path / "tokens.csv"),
            "--authorization-mode", "Node,RBAC",
            *node_args,
            "--enable-priority-and-fairness=false",
            "--v", "0",
        ], log)
        self.apiservers[region] = api
        self.save()
        ca = self.ca_file(region)
        _wait(lambda: ca.exists() and _http_ok(f"{api.url}/readyz", self.admin_token,
                                               ssl.create_default_context(cafile=str(ca))),
              f"kube-apiserver {region}", 120, api.pid, log)
        self._write_kubeconfig(api)
        for component in ("kube-controller-manager", "kube-scheduler"):
            self._write_kubeconfig(api, user=f"system:{component}", token=self._component_token(component),
                                   path=self._component_kubeconfig(region, component))
        return api

    def _start_controllers(self, api: ApiServer, binaries: dict[str, Path], progress: Callable[[str], None]) -> None:
        """kube-controller-manager and kube-scheduler of one region, each as its own system identity."""
        region = api.region
        if _alive(api.controller_manager_pid, "kube-controller-manager"):
            progress(f"kube-controller-manager {region} already running")
        else:
            progress(f"starting kube-controller-manager {region} ({len(CONTROLLERS)} controllers)")
            api.controller_manager_port, api.controller_manager_pid = self._start_component(
                api, binaries, "kube-controller-manager", "controller-manager", [
                    "--service-account-private-key-file", str(self.path / "sa.key"),
                    "--root-ca-file", str(self.ca_file(region)),
                    "--use-service-account-credentials",
                    "--controllers", ",".join(CONTROLLERS + (NODE_CONTROLLERS if self.node else ())),
                    "--horizontal-pod-autoscaler-sync-period", f"{HPA_SYNC_SECONDS}s",
                ])
        if _alive(api.scheduler_pid, "kube-scheduler"):
            progress(f"kube-scheduler {region} already running")
        else:
            progress(f"starting kube-scheduler {region}")
            api.scheduler_port, api.scheduler_pid = self._start_component(api, binaries, "kube-scheduler", "scheduler", [])
        self.save()

    def _start_component(self, api: ApiServer, binaries: dict[str, Path], component: str, short: str,
                         extra: list[str]) -> tuple[int, int]:
        """(port, pid) of a control-plane component serving /healthz on loopback as its own user."""
        port, kubeconfig = free_port(), self._component_kubeconfig(api.region, component)
        pid = _spawn([
            str(binaries[component]),
            "--kubeconfig", str(kubeconfig),
            "--authentication-kubeconfig", str(kubeconfig), "--authorization-kubeconfig", str(kubeconfig),
            "--bind-address", "127.0.0.1", "--secure-port", str(port),
            "--cert-dir", str(self.path / f"certs-{api.region}-{short}"),
            *extra,
            "--leader-elect=false",
            "--v", "0",
        ], self.path / f"{short}-{api.region}.log")
        return port, pid

    def _wait_for_controllers(self, api: ApiServer) -> None:
        region = api.region
        _wait(lambda: _healthz(api.controller_manager_port), f"kube-controller-manager {region}", 120,
              api.controller_manager_pid, self.path / f"controller-manager-{region}.log")
        _wait(lambda: _healthz(api.scheduler_port), f"kube-scheduler {region}", 120,
              api.scheduler_pid, self.path / f"scheduler-{region}.log")

    @staticmethod
    def _stop_region(api: ApiServer) -> None:
        stop_pid(api.scheduler_pid, "kube-scheduler")
        stop_pid(api.controller_manager_pid, "kube-controller-manager")
        stop_pid(api.pid, "kube-apiserver")
        api.pid = api.controller_manager_pid = api.scheduler_pid = None

    def _component_kubeconfig(self, region: str, component: str) -> Path:
        return self.path / f"kubeconfig-{region}-{component}"

    def _component_token(self, component: str) -> str:
        return hashlib.sha256(f"{self.admin_token}/{component}".encode()).hexdigest()[:48]

    def _credentials(self) -> None:
        key, pub = self.path / "sa.key", self.path / "sa.pub"
        if not key.exists():
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            write_private(key, k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
            pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
        tokens = self.path / "tokens.csv"
        # The controller manager and scheduler authenticate as their own system users, whose
        # rights are the apiserver's bootstrap roles, as on a real control plane.
        lines = [f'{self.admin_token},gco-admin,gco-admin,"system:masters"']
        lines += [f"{self._component_token(c)},system:{c},system:{c}"
                  for c in ("kube-controller-manager", "kube-scheduler", "kube-proxy")]
        # each node's kubelet as system:node:<name> (the Node authorizer's identity), as on EKS
        lines += [f'{self._component_token(f"node:{r}-node")},system:node:{r}-node,system:node:{r}-node,"system:nodes"'
                  for r in REGIONS]
        write_private(tokens, "\n".join(lines) + "\n")

    def _write_kubeconfig(self, api: ApiServer, user: str = "gco-admin", token: str | None = None,
                          path: Path | None = None) -> None:
        name = f"gco-{api.region}"
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": name,
            # The apiserver's generated certificate bundle ends with its own CA: verify against it.
            "clusters": [{"name": name, "cluster": {"server": api.url, "certificate-authority-data": base64.b64encode(
                self.ca_file(api.region).read_bytes()).decode()}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": user}}],
            "users": [{"name": user, "user": {"token": token or self.admin_token}}],
        }
        path = path or self.kubeconfig(api.region)
        write_private(path, json.dumps(cfg, indent=2))

    def ca_file(self, region: str) -> Path:
        return self.path / f"certs-{region}" / "apiserver.crt"

    def kube(self, region: str):
        """A kubernetes.client ApiClient for one local region."""
        from kubernetes import config

        return config.new_client_from_config(str(self.kubeconfig(region)))

    def _ensure_platform_objects(self, region: str) -> None:
        """What the platform's clusters have before any endpoint: the inference namespaces with the
        inference ServiceAccount, and gco-system with the runner's and health job's identities and
        least-privilege rights (system.identities: the platform stack's own definitions, without the
        Deployments, which need an image)."""
        api = self.kube(region)
        for ns in NAMESPACES:
            apply_object(api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            apply_object(api, {"apiVersion": "v1", "kind": "ServiceAccount",
                               "metadata": {"name": INFERENCE_SERVICE_ACCOUNT, "namespace": ns},
                               "automountServiceAccountToken": False})
        for obj in platform_rbac(NAMESPACES):
            apply_object(api, obj)

    # ---- pod credentials -----------------------------------------------------------------------------------
    def _start_identity_webhook(self, regions: Iterable[str], progress: Callable[[str], None], *,
                                restart: bool = False) -> None:
        """Pods get AWS credentials as on EKS: from the IAM role their ServiceAccount names (localidentity).
        The roles exist in moto; the inference pods' account gets the model-sync role, the runner's
        and health job's accounts their own."""
        from . import localidentity, system

        if restart:  # its clients talk to the apiservers it started with
            stop_pid(self.identity_pid, "gco_infra.localidentity")
        if not _alive(self.identity_pid, "gco_infra.localidentity"):
            ca, crt, key = localidentity.serving_pki(self.path, ["127.0.0.1"])
            self.identity_port = free_port()
            # on loopback only: the apiservers call it, pods have no business with it
            config = {"host": "127.0.0.1", "port": self.identity_port, "cert": str(crt), "key": str(key),
                      "kubeconfigs": {r: str(self.kubeconfig(r)) for r in self.apiservers},
                      # moto serves every AWS API here; the Go SDK's web-identity exchange (Pulumi's KMS
                      # secrets provider) follows only the STS-specific variable, not AWS_ENDPOINT_URL
                      "env": {"AWS_ENDPOINT_URL": self.aws_endpoint,
                              **{f"AWS_ENDPOINT_URL_{svc}": self.aws_endpoint for svc in ("STS", "KMS", "S3", "DYNAMODB")},
                              "AWS_REGION": LOCAL_AWS_REGION, "AWS_DEFAULT_REGION": LOCAL_AWS_REGION}}
            (self.path / "identity-webhook.json").write_text(json.dumps(config, indent=2))
            progress(f"starting the pod-identity webhook on 127.0.0.1:{self.identity_port}")
            self.identity_pid = _spawn([sys.executable, "-m", "gco_infra.localidentity",
                                        str(self.path / "identity-webhook.json")], self.path / "identity-webhook.log")
            self.save()
            ctx = ssl.create_default_context(cafile=str(ca))
            _wait(lambda: _http_ok(f"https://127.0.0.1:{self.identity_port}/healthz", ctx=ctx),
                  "pod-identity webhook", 30, self.identity_pid, self.path / "identity-webhook.log")
        ca_bundle = (self.path / "identity-webhook-ca.crt").read_bytes()
        iam = self._aws("iam")
        roles = {"model-sync": "gco-model-sync", "runner": system.RUNNER, "health": system.HEALTH}
        arns = {}
        for purpose, role in roles.items():
            try:
                arns[purpose] = iam.get_role(RoleName=role)["Role"]["Arn"]
            except iam.exceptions.NoSuchEntityException:
                arns[purpose] = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({
                    "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
                                                            "Principal": {"Federated": "local"}}]}))["Role"]["Arn"]
        for region in regions:
            api = self.kube(region)
            apply_object(api, localidentity.webhook_configuration(
                f"https://127.0.0.1:{self.identity_port}/mutate/{region}", ca_bundle))
            accounts = [(ns, INFERENCE_SERVICE_ACCOUNT, arns["model-sync"]) for ns in NAMESPACES]
            accounts += [(SYSTEM_NAMESPACE, system.RUNNER, arns["runner"]), (SYSTEM_NAMESPACE, system.HEALTH, arns["health"])]
            from kubernetes import client

            core = client.CoreV1Api(api)
            for ns, name, arn in accounts:
                core.patch_namespaced_service_account(
                    name, ns, {"metadata": {"annotations": {localidentity.ROLE_ANNOTATION: arn}}})

    # ---- nodes -----------------------------------------------------------------------------------------
    def node_dir(self, region: str) -> Path:
        return self.path / f"node-{region}"

    def _node_running(self, node: Node) -> bool:
        return all(_alive(pid, node.marker(c)) for pid, c in (
            (node.containerd_pid, "containerd"), (node.kubelet_pid, "kubelet"), (node.proxy_pid, "kube-proxy")))

    def _start_nodes(self, regions: Iterable[str], progress: Callable[[str], None], restarted: set[str]) -> None:
        from . import localnode

        images = localnode.images()
        started = []
        for region in regions:
            node = self.nodes.get(region)
            if node and region not in restarted and self._node_running(node):
                progress(f"node {node.name} already running")
                node.import_images(images, progress)  # images built since it started
                continue
            if node:  # partly running, or its apiserver is new: start it again from a clean slate
                self._stop_node(node, self.apiservers.get(region), progress)
                del self.nodes[region]
                self.save()
            node = Node(region=region, slot=localnode.claim_slot(), dir=str(self.node_dir(region)))
            self.nodes[region] = node
            started.append(node)
        self.save()
        if started:
            localnode.save_kernel_settings()  # the kubelet changes some; the last node's stop gives them back
        # the nodes start side by side (importing the images is most of a node's start)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
            futures = {node.name: pool.submit(self._start_node, node, images, progress) for node in started}
        for name, future in futures.items():
            try:
                future.result()
            except (NodeError, OSError, subprocess.SubprocessError) as exc:
                raise LocalEnvError(f"node {name}: {exc}") from exc
        self.save()
        for region in regions:
            self._wait_for_node(self.nodes[region])
            self._ensure_model_volume(self.nodes[region])

    def _start_node(self, node: Node, images: dict[str, Path], progress: Callable[[str], None]) -> None:
        from .localnode import image_ref

        api = self.apiservers[node.region]
        progress(f"starting node {node.name}: network namespace {node.netns}, node IP {node.ip}, pods {node.pod_cidr}")
        node.create_network()
        ca = base64.b64encode(self.ca_file(node.region).read_bytes()).decode()
        node.write_config(pause_image=image_ref("pause"), apiserver=api.url, ca_data=ca,
                          kubelet_token=self._component_token(f"node:{node.name}"),
                          proxy_token=self._component_token("kube-proxy"))
        shutil.copy(self.path / "kubelet-client-ca.crt", node.path / "kubelet-client-ca.crt")
        (node.path / "cni" / "ipam").mkdir(parents=True, exist_ok=True)
        for lease in (node.path / "cni" / "ipam").rglob("*"):  # addresses of pods a forced stop left
            if lease.is_file():
                lease.unlink()
        env = {**os.environ, "PATH": f"{tools_bin()}{os.pathsep}{os.environ.get('PATH', '')}"}  # the shim
        node.containerd_pid = _spawn(node.nsenter(str(tools_bin() / "containerd"), "--config",
                                                  str(node.path / "containerd.toml"), "--log-level", "warn"),
                                     self.path / f"containerd-{node.region}.log", env)
        self.save()
        _wait(lambda: node.socket.exists() and node.ctr("version", check=False, timeout=10).returncode == 0,
              f"containerd of {node.name}", 60, node.containerd_pid, self.path / f"containerd-{node.region}.log")
        node.import_images(images, progress)
        progress(f"starting kubelet and kube-proxy of {node.name}")
        node.kubelet_pid = _spawn(node.nsenter(
            str(tools_bin() / "kubelet"), "--config", str(node.path / "kubelet.yaml"),
            "--kubeconfig", str(node.path / "kubeconfig-kubelet"), "--root-dir", str(node.path / "kubelet"),
            "--cert-dir", str(node.path / "kubelet-pki"), "--hostname-override", node.name, "--node-ip", node.ip,
            "--node-labels", f"topology.kubernetes.io/region={node.region},gco.io/local-node=true",
            "--v", "1"), self.path / f"kubelet-{node.region}.log", env)
        node.proxy_pid = _spawn(node.nsenter(str(tools_bin() / "kube-proxy"), "--config",
                                             str(node.path / "kube-proxy.yaml"), "--v", "1"),
                                self.path / f"kube-proxy-{node.region}.log", env)
        self.save()

    def node_ready(self, node: Node) -> bool:
        """The node is Ready and schedulable (the node-lifecycle controller lifted its not-ready taint)."""
        from kubernetes import client

        try:
            obj = client.CoreV1Api(self.kube(node.region)).read_node(node.name)
        except Exception:  # noqa: BLE001 - not registered yet, or the apiserver is away
            return False
        ready = any(c.type == "Ready" and c.status == "True" for c in obj.status.conditions or [])
        return ready and not any(t.key.startswith("node.kubernetes.io/") for t in obj.spec.taints or [])

    def _wait_for_node(self, node: Node) -> None:
        _wait(lambda: self.node_ready(node), f"node {node.name} (kubelet)", 120, node.kubelet_pid,
              self.path / f"kubelet-{node.region}.log")

    def _ensure_model_volume(self, node: Node) -> None:
        """The shared model volume of each inference namespace (EFS on EKS): a claim named as the
        cluster settings' model_volume_claim, bound to a directory of the node (hostPath)."""
        from .manifests import ClusterSettings

        claim = ClusterSettings().model_volume_claim
        api = self.kube(node.region)
        for ns in NAMESPACES:
            directory = node.path / "models" / ns
            directory.mkdir(parents=True, exist_ok=True)
            pv = f"gco-models-{ns}"
            apply_object(api, {
                "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany"],
                         "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                         "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                         "claimRef": {"namespace": ns, "name": claim}}})
            apply_object(api, {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": ns},
                "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                         "resources": {"requests": {"storage": "100Gi"}}}})

    def _stop_node(self, node: Node, api: ApiServer | None, progress: Callable[[str], None]) -> None:
        """Stop a node and leave nothing behind: pods (their network namespaces), processes, mounts,
        the node's network namespace and veth, cgroups."""
        progress(f"stopping node {node.name}")
        if _alive(node.kubelet_pid, node.marker("kubelet")) and _alive(node.containerd_pid, node.marker("containerd")):
            self._drain(node, api)
        stop_pid(node.kubelet_pid, node.marker("kubelet"))
        stop_pid(node.proxy_pid, node.marker("kube-proxy"))
        pod_netns: set[str] = set()
        ids: set[str] = set()
        if _alive(node.containerd_pid, node.marker("containerd")):
            pod_netns = node.pod_netns()
            ids = set(node.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split())
            node.kill_containers()
        stop_pid(node.containerd_pid, node.marker("containerd"))
        ids |= node.kill_with_runc()  # what a dead containerd's shims still run
        for pid in node.shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.unmount_all()
        node.delete_network(pod_netns)
        node.remove_cgroups(ids)
        shutil.rmtree(node.run_dir, ignore_errors=True)
        node.containerd_pid = node.kubelet_pid = node.proxy_pid = None

    def _drain(self, node: Node, api: ApiServer | None) -> None:
        """Delete the node's pods through the apiserver while its kubelet runs: the kubelet stops their
        sandboxes (CNI DEL, network namespace removed), which a killed container never gets."""
        if not api or not _alive(api.pid, "kube-apiserver"):
            return
        from kubernetes import client

        core = client.CoreV1Api(self.kube(node.region))
        try:
            pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node.name}").items
            for pod in pods:
                # a 1 s grace, not a forced delete: the kubelet kills a force-deleted pod with the grace
                # period of its spec (the runner's is 120 s)
                core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=1)
        except Exception:  # noqa: BLE001 - the forced path below still removes everything
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not node.running_tasks():
                return
            time.sleep(0.5)

    def down(self, progress: Callable[[str], None] = lambda s: None, *, wipe: bool = False) -> None:
        if self.nodes and os.geteuid() != 0:
            raise LocalEnvError("this environment has nodes: stop it as root (they own network namespaces, "
                                "mounts and cgroups)")
        for region, node in list(self.nodes.items()):
            api = self.apiservers.get(region)
            if api:  # no new pods while the node's are stopped and removed
                stop_pid(api.scheduler_pid, "kube-scheduler")
                stop_pid(api.controller_manager_pid, "kube-controller-manager")
            self._stop_node(node, api, progress)
            del self.nodes[region]
            self.save()
        stop_pid(self.identity_pid, "gco_infra.localidentity")
        self.identity_pid = None
        self.save()
        if self.apiservers:
            progress(f"stopping the control planes of {', '.join(self.apiservers)}")
            # side by side: an apiserver takes up to its stop timeout to give up on its shutdown
            # housekeeping (it deletes its lease through its own, already closed, listener)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=len(self.apiservers)) as pool:
                list(pool.map(self._stop_region, self.apiservers.values()))
        progress("stopping etcd")
        stop_pid(self.etcd_pid, "etcd")
        progress("stopping DynamoDB (moto server)")
        stop_pid(self.moto_pid, "moto_server")
        self.etcd_pid = self.moto_pid = None
        if self.host == HOST_ADDRESS:
            from .localnode import release_host

            release_host()
        if wipe:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.save()


_PLURALS = {"Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "Role": "roles",
            "RoleBinding": "rolebindings", "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
            "PersistentVolume": "persistentvolumes", "PersistentVolumeClaim": "persistentvolumeclaims",
            "MutatingWebhookConfiguration": "mutatingwebhookconfigurations"}


def apply_object(api, obj: dict) -> None:
    """Server-side apply of one object (kinds in _PLURALS or system.PLURALS) as field manager gco-local."""
    from . import system

    group, _, version = obj["apiVersion"].rpartition("/")
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    meta = obj["metadata"]
    ns = f"/namespaces/{meta['namespace']}" if meta.get("namespace") else ""
    plural = system.PLURALS.get(obj["kind"]) or _PLURALS[obj["kind"]]
    api.call_api(f"{base}{ns}/{plural}/{meta['name']}", "PATCH",
                 query_params=[("fieldManager", "gco-local"), ("force", "true")],
                 header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
                 body=obj, auth_settings=["BearerToken"], _return_http_data_only=True, _preload_content=False)


def platform_rbac(namespaces: Iterable[str]) -> list[dict]:
    """gco-system, the runner's and health job's ServiceAccounts and every Role and RoleBinding, from
    the definitions the platform stack applies to EKS (system.py), for these inference namespaces."""
    from . import system

    return system.identities(namespaces)
