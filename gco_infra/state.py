"""The Pulumi state seen from outside the engine: where the engine runs, which secrets provider a
new stack gets, and the backend's locks and checkpoints, on file:// and s3:// backends alike.

**Where the engine runs.** The engine writes a stack's secrets settings (``encryptedkey``) into
its ``stacks/Pulumi.<stack>.yaml`` whenever the file lacks what the state uses, and fails if it
cannot (a read-only image). So the runner and the preview run it in a private, writable copy of
the project (``project_dir``), never in the repository: the tracked stack files are never
written, and each process has its own copy (the engine writes files non-atomically). The copy
holds each stack's ``config`` without secrets settings, and the engine takes an existing stack's
secrets provider from its checkpoint (``PULUMI_FALLBACK_TO_STATE_SECRETS_MANAGER``): the data key
the state was encrypted with, decrypted through KMS, with no new key and no file to write first.
A new stack is created with the provider its stack file declares (``secretsprovider:``).

**Locks.** The backend's lock is an object ``.pulumi/locks/organization/<project>/<stack>/<id>.json``
holding the engine's pid and hostname. A killed update leaves it behind; ``recover_dead_locks``
removes it only when its holder is provably dead: a pid on this host that is gone, a zombie or
not the Pulumi CLI, or, when the runner runs in a pod, a host that was a pod of the runner's own
Deployment and no longer exists.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .plan import PROJECT
from .program import PROJECT_ROOT, _SHARD_STACK

SECRETS_KEYS = ("secretsprovider", "encryptedkey", "encryptionsalt")
"""A stack file's secrets settings: the engine's to write, so never copied into the engine's project."""
FALLBACK = "PULUMI_FALLBACK_TO_STATE_SECRETS_MANAGER"
CHECKPOINT_SUFFIXES = (".json", ".json.gz", ".json.zst")
POD_NAME, POD_NAMESPACE = "GCO_POD_NAME", "GCO_POD_NAMESPACE"
"""The runner's own pod, from the downward API: lets it tell a dead runner pod's lock from a live one."""


# ---- the engine's project directory and secrets provider -------------------------------------------------


RUN_PROGRAM = "PULUMI_RUN_PROGRAM"
KUBE_CLIENT = {"PULUMI_K8S_CLIENT_QPS": "200", "PULUMI_K8S_CLIENT_BURST": "400"}
"""The Kubernetes provider's request rate per operation. Its own default (50 per second, bursts of
120) bounded a refresh of 100 endpoints (600 GETs) to 11 s however idle the machine; at 200 the
same refresh takes 3.6 s. An operator's own values in the environment win."""


def engine_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for the engine: an existing stack keeps the secrets provider of its state, and
    a refresh uses the Kubernetes provider the program declares now (its credentials: the pod's
    ServiceAccount in a cluster, a kubeconfig on a host), not the one recorded by whoever applied last."""
    return {**KUBE_CLIENT, **env, FALLBACK: "true", RUN_PROGRAM: "true",
            "TMPDIR": engine_tmp(env.get("PULUMI_BACKEND_URL", ""))}


def engine_tmp(backend: str = "") -> str:
    """The engine's TMPDIR, inside this process's project copy: the Kubernetes provider writes a
    kubeconfig file there for every start and never removes it (cleared by ``clear_engine_tmp``)."""
    path = Path(project_dir(backend)) / "tmp"
    path.mkdir(exist_ok=True)
    return str(path)


def clear_engine_tmp() -> int:
    """Remove what earlier operations of this process left in the engines' TMPDIRs (call between
    operations: a process runs one at a time). Returns how many entries were removed."""
    removed = 0
    pid = os.getpid()
    for backend in [b for p, b in _PROJECT if p == pid] or [""]:
        for entry in Path(engine_tmp(backend)).iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def write_project(dest: Path, root: Path = PROJECT_ROOT) -> Path:
    """A copy of the project for the engine: Pulumi.yaml, and every stack file without its secrets settings."""
    (dest / "stacks").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "Pulumi.yaml", dest / "Pulumi.yaml")
    for f in sorted((root / "stacks").glob("Pulumi.*.yaml")):
        doc = yaml.safe_load(f.read_text()) or {}
        kept = {k: v for k, v in doc.items() if k not in SECRETS_KEYS} if isinstance(doc, dict) else {}
        (dest / "stacks" / f.name).write_text(yaml.safe_dump(kept, sort_keys=False) if kept else "")
    return dest


_PROJECT: dict[tuple[int, str], Path] = {}


def project_dir(backend: str = "") -> str:
    """This process's private, writable copy of the project (see the module docstring), one per state
    backend: the engine writes a stack's data key, encrypted for that backend's KMS key, into the
    copy's stack file, where the same stack of another backend must not find it."""
    key = (os.getpid(), backend)
    if key not in _PROJECT:
        path = Path(tempfile.mkdtemp(prefix="gco-infra-engine-"))
        _PROJECT[key] = write_project(path)
        atexit.register(shutil.rmtree, path, True)
    return str(_PROJECT[key])


def declared_secrets_provider(stack: str, env: Mapping[str, str] | None = None, root: Path = PROJECT_ROOT) -> str | None:
    """The ``secretsprovider`` a stack's file declares (a shard: its region's), else $GCO_SECRETS_PROVIDER."""
    match = _SHARD_STACK.match(stack)
    for name in ([match["base"]] if match else []) + [stack]:
        f = root / "stacks" / f"Pulumi.{name}.yaml"
        if f.exists():
            doc = yaml.safe_load(f.read_text()) or {}
            if isinstance(doc, dict) and doc.get("secretsprovider"):
                return str(doc["secretsprovider"])
    return (env or {}).get("GCO_SECRETS_PROVIDER") or None


def workspace_options(stack: str, env: Mapping[str, str]) -> Any:
    """LocalWorkspaceOptions for one stack: the private project, and the declared provider for a new stack."""
    from pulumi import automation as auto

    return auto.LocalWorkspaceOptions(work_dir=project_dir(env.get("PULUMI_BACKEND_URL", "")), env_vars=engine_env(env),
                                      secrets_provider=declared_secrets_provider(stack, env))


def workspace(env: Mapping[str, str]) -> Any:
    from pulumi import automation as auto

    os.environ.update(engine_env(env))
    return auto.LocalWorkspace(work_dir=project_dir(env.get("PULUMI_BACKEND_URL", "")), env_vars=engine_env(env))


def secrets_mismatch(stack: str, deployment: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """Why the state's secrets provider is not the declared one (a migration is `pulumi stack
    change-secrets-provider`, never implicit), or None."""
    declared = declared_secrets_provider(stack, env)
    providers = deployment.get("secrets_providers") or {}
    kind = providers.get("type")
    if not declared or not kind:
        return None
    url = (providers.get("state") or {}).get("url") if kind == "cloud" else kind
    if url == declared:
        return None
    return (f"{stack}: the state's secrets are encrypted by {url}, the stack file declares {declared}; "
            f"the state's provider stays in use (pulumi stack change-secrets-provider -s {stack} '{declared}')")


# ---- backends: locks and checkpoints ------------------------------------------------------------------


@dataclass(frozen=True)
class Lock:
    where: str
    """The lock's path or s3:// URL, for messages."""
    info: Mapping[str, Any] | None
    """Its JSON (pid, hostname, username, timestamp), None when unreadable."""
    key: Any = None


class FileBackend:
    def __init__(self, root: Path) -> None:
        self.root = root

    def locks(self, stack: str) -> list[Lock]:
        out = []
        for f in sorted((self.root / ".pulumi" / "locks").glob(f"**/{PROJECT}/{stack}/*.json")):
            out.append(Lock(where=str(f), info=_parse(f.read_bytes), key=f))
        return out

    def remove(self, lock: Lock) -> None:
        Path(lock.key).unlink(missing_ok=True)

    def checkpoint_token(self, stack: str) -> Any:
        base = self.root / ".pulumi" / "stacks" / PROJECT
        token = []
        for suffix in CHECKPOINT_SUFFIXES:
            f = base / f"{stack}{suffix}"
            try:
                st = f.stat()
            except OSError:
                continue
            token.append((f.name, st.st_mtime_ns, st.st_size))
        return tuple(token)

    def checkpoint(self, stack: str) -> dict[str, bytes]:
        """The stack's checkpoint files by suffix (none when the stack has never been written)."""
        base = self.root / ".pulumi" / "stacks" / PROJECT
        out = {}
        for suffix in CHECKPOINT_SUFFIXES:
            try:
                out[suffix] = (base / f"{stack}{suffix}").read_bytes()
            except FileNotFoundError:
                continue
        return out


_S3_CLIENTS: dict[tuple[str, ...], Any] = {}


class S3Backend:
    """An s3:// backend URL as the engine reads it: bucket, key prefix, endpoint, region, path style.
    Credentials, and AWS_ENDPOINT_URL_S3 when the URL names no endpoint, come from the environment."""

    def __init__(self, url: str, env: Mapping[str, str]) -> None:
        u = urllib.parse.urlsplit(url)
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query).items()}
        self.url = url
        self.bucket = u.netloc
        self.prefix = u.path.strip("/") + "/" if u.path.strip("/") else ""
        endpoint = q.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
        if endpoint and "://" not in endpoint:
            insecure = q.get("disableSSL", q.get("disable_https", "false")).lower() in ("true", "1")
            endpoint = ("http://" if insecure else "https://") + endpoint
        region = q.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        path_style = q.get("s3ForcePathStyle", q.get("use_path_style", "false")).lower() in ("true", "1")
        creds = (env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", ""), env.get("AWS_SESSION_TOKEN", ""),
                 env.get("AWS_PROFILE", ""))
        key = (endpoint, region, str(path_style), *creds)
        if key not in _S3_CLIENTS:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session(aws_access_key_id=creds[0] or None, aws_secret_access_key=creds[1] or None,
                                            aws_session_token=creds[2] or None, profile_name=creds[3] or None,
                                            region_name=region)
            _S3_CLIENTS[key] = session.client(
                "s3", endpoint_url=endpoint or None,
                config=Config(s3={"addressing_style": "path" if path_style else "auto"}, connect_timeout=5,
                              read_timeout=10, retries={"max_attempts": 3, "mode": "standard"},
                              ignore_configured_endpoint_urls=not endpoint))  # the env given, not this process's
        self.s3 = _S3_CLIENTS[key]

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            out.extend(page.get("Contents") or [])
        return out

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def locks(self, stack: str) -> list[Lock]:
        out = []
        for obj in self._list(".pulumi/locks/"):
            key = obj["Key"]
            parts = key[len(self.prefix):].split("/")
            # .pulumi/locks/<org>/<project>/<stack>/<id>.json
            if len(parts) == 6 and parts[3:5] == [PROJECT, stack] and parts[5].endswith(".json"):
                out.append(Lock(where=self._where(key), info=_parse(lambda k=key: self._read(k)), key=key))
        return out

    def _read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def remove(self, lock: Lock) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=lock.key)

    def checkpoint_token(self, stack: str) -> Any:
        """ETag and LastModified of the checkpoint object: one LIST request, no read of the checkpoint."""
        base = f".pulumi/stacks/{PROJECT}/{stack}"
        names = {base + s for s in CHECKPOINT_SUFFIXES}
        return tuple(sorted((o["Key"][len(self.prefix):], o["ETag"], o["LastModified"].isoformat(), o["Size"])
                            for o in self._list(base + ".json") if o["Key"][len(self.prefix):] in names))

    def checkpoint(self, stack: str) -> dict[str, bytes]:
        """The stack's checkpoint objects by suffix (none when the stack has never been written)."""
        base = f".pulumi/stacks/{PROJECT}/{stack}"
        suffixes = {o["Key"]: o["Key"][len(self.prefix) + len(base):] for o in self._list(base + ".json")}
        return {suffix: self._read(key) for key, suffix in suffixes.items() if suffix in CHECKPOINT_SUFFIXES}


def _parse(read: Callable[[], bytes]) -> Mapping[str, Any] | None:
    try:
        info = json.loads(read())
    except Exception:  # noqa: BLE001 - a lock removed meanwhile, or not JSON: unreadable
        return None
    return info if isinstance(info, dict) else None


def backend_for(env: Mapping[str, str]) -> FileBackend | S3Backend | None:
    """The backend of PULUMI_BACKEND_URL when it is file:// or s3://; None for any other (no lock recovery,
    no checkpoint tokens: the runner then re-reads outputs only after its own failures)."""
    url = env.get("PULUMI_BACKEND_URL", "")
    if url.startswith("file://"):
        return FileBackend(Path(url[len("file://"):].split("?", 1)[0]))
    if url.startswith("s3://"):
        return S3Backend(url, env)
    return None


# ---- who holds a lock ------------------------------------------------------------------------------------


def is_live_pulumi(pid: int) -> bool:
    """Whether pid is a running (not zombie) process of this host's Pulumi CLI."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # exited, not yet reaped
        return False
    return any(Path(arg.decode(errors="replace")).name == "pulumi" for arg in cmdline[:1])


PodGone = Callable[[str], bool]
"""Whether a host name is a pod of this runner's Deployment that no longer runs (never guesses: False
when unsure)."""


def lock_holder(lock: Lock | Path, pod_gone: PodGone | None = None) -> tuple[str, str]:
    """("alive" | "dead" | "unknown", description) of the process holding a lock.

    Dead is decided only on this host, when the pid is gone, a zombie, or not the Pulumi CLI (the pid
    was reused); or for a lock taken in a pod of this runner's Deployment that no longer exists
    (pod_gone). No clock is involved, so a stepped wall clock cannot make a live update look dead.
    Any other host cannot be checked from here: never dead.
    """
    if isinstance(lock, Path):
        lock = Lock(where=str(lock), info=_parse(lock.read_bytes), key=lock)
    info = lock.info
    if info is None:
        return "unknown", f"unreadable lock {lock.where.rsplit('/', 1)[-1]}"
    pid = int(info.get("pid") or 0) if str(info.get("pid") or "0").isdigit() else 0
    host = str(info.get("hostname") or "?")
    who = f"pid {pid} on {host}"
    if host != os.uname().nodename:
        if pod_gone is not None and pod_gone(host):
            return "dead", f"{who} (a runner pod that no longer exists)"
        return "unknown", who
    return ("alive" if pid > 0 and is_live_pulumi(pid) else "dead"), who


def recover_dead_locks(stack: str, env: Mapping[str, str], log: Callable[[str], None],
                       pod_gone: PodGone | None = None) -> tuple[bool, list[tuple[Lock, str, str]]]:
    """Remove the lock of an update whose process is provably dead (see lock_holder).

    Its pending operations stay in the checkpoint; the next full reconcile clears them and refreshes.
    Returns whether a lock was removed, and the locks that remain as (lock, holder state, who).
    """
    backend = backend_for(env)
    if backend is None:
        return False, []
    if pod_gone is None:
        pod_gone = pod_gone_from_env(env)
    removed, remaining = False, []
    for lock in backend.locks(stack):
        state, who = lock_holder(lock, pod_gone)
        if state == "dead":
            log(f"{stack}: removing the lock of a dead update ({who})")
            backend.remove(lock)
            removed = True
        else:
            remaining.append((lock, state, who))
    return removed, remaining


SECRET_SIG = ("4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270")
"""The key and value that mark a secret in a checkpoint (`pulumi stack export`)."""


class _Encrypted(Exception):
    pass


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        if value.get(SECRET_SIG[0]) == SECRET_SIG[1]:
            if not isinstance(value.get("plaintext"), str):
                raise _Encrypted()
            return _plain(json.loads(value["plaintext"]))
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def stack_outputs_of(deployment: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stack's outputs as `pulumi stack output --json --show-secrets` prints them, from its
    checkpoint exported with --show-secrets (the Automation API's export_stack): one CLI process
    fewer per stack. None when the checkpoint has no stack resource or a secret is still encrypted."""
    root = next((r for r in deployment.get("resources") or [] if isinstance(r, Mapping)
                 and r.get("type") == "pulumi:pulumi:Stack" and not r.get("parent")), None)
    if root is None:
        return None
    try:
        return _plain(dict(root.get("outputs") or {}))
    except (_Encrypted, ValueError):
        return None


def last_operation(stack: str, env: Mapping[str, str]) -> Mapping[str, Any] | None:
    """The newest entry of the stack's history (`pulumi stack history --json --page-size 1`): its
    ``kind``, ``result`` and ``resourceChanges``; None when there is none or it cannot be read."""
    for attempt in range(3):  # a backend that fails for a moment would cost a full `up --refresh`
        if attempt:
            time.sleep(attempt)
        try:
            proc = subprocess.run(["pulumi", "stack", "history", "--json", "--non-interactive", "--page-size", "1",
                                   "--page", "1", "--stack", stack], cwd=project_dir(env.get("PULUMI_BACKEND_URL", "")),
                                  env={**os.environ, **engine_env(env)}, capture_output=True, text=True, timeout=120)
            entries = json.loads(proc.stdout or "[]") if proc.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            entries = None
        if isinstance(entries, list):
            return entries[0] if entries and isinstance(entries[0], Mapping) else None
    return None


def pending_operations(stack: str, env: Mapping[str, str]) -> int | None:
    """How many pending operations the stack's checkpoint records (an interrupted update leaves them),
    read straight from the backend (`pulumi stack export` loads and decrypts the whole state: about
    1 s per 100 endpoints). None when that cannot be told here: another backend, a compressed or
    unreadable checkpoint."""
    backend = backend_for(env)
    if backend is None:
        return None
    try:
        files = backend.checkpoint(stack)
    except Exception:  # noqa: BLE001 - unreadable here: the engine's export decides
        return None
    if not files:
        return None  # not where this layout puts it (or never written): the engine's export decides
    if set(files) != {".json"}:
        return None
    raw = files[".json"]
    if raw.lstrip().startswith(b"{") and b'"checkpoint"' in raw and b'"pending_operations"' not in raw:
        return 0  # the engine leaves the key out when there are none; not parsing is most of the cost
    try:
        latest = json.loads(raw)["checkpoint"].get("latest") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    pending = latest.get("pending_operations") if isinstance(latest, Mapping) else None
    return len(pending) if isinstance(pending, list) else 0


def checkpoint_token(stack: str, env: Mapping[str, str]) -> Any:
    """Changes whenever anyone writes the stack's checkpoint (a stat or one LIST, no read); None when unknown."""
    backend = backend_for(env)
    return None if backend is None else backend.checkpoint_token(stack)


# ---- runner pods -----------------------------------------------------------------------------------------

_DEPLOYMENT_POD = re.compile(r"^(?P<family>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-[a-z0-9]{1,10}-[a-z0-9]{5}$")


def sibling_pod(own: str, host: str) -> bool:
    """Whether host is named like a pod of the same Deployment as own (<deployment>-<hash>-<suffix>)."""
    mine, theirs = _DEPLOYMENT_POD.match(own), _DEPLOYMENT_POD.match(host)
    return bool(mine and theirs and mine["family"] == theirs["family"] and host != own)


def pod_gone_from_env(env: Mapping[str, str]) -> PodGone | None:
    """When the runner knows its pod ($GCO_POD_NAME, $GCO_POD_NAMESPACE from the downward API): a lock
    host that is a sibling pod (same Deployment) and is not found in that namespace, or has
    terminated, held a dead update. Needs `get` on pods in that namespace; any other answer (an
    error, no permission) keeps the lock."""
    own, namespace = env.get(POD_NAME), env.get(POD_NAMESPACE)
    if not own or not namespace:
        return None
    cache: dict[str, bool] = {}

    def gone(host: str) -> bool:
        if not sibling_pod(own, host):
            return False
        if host not in cache:
            cache[host] = _pod_gone(namespace, host, env)
        return cache[host]

    return gone


def _pod_gone(namespace: str, name: str, env: Mapping[str, str]) -> bool:
    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            api = client.ApiClient()
        elif env.get("GCO_KUBECONFIG"):
            api = config.new_client_from_config(env["GCO_KUBECONFIG"])
        else:
            return False
        with api:
            pod = client.CoreV1Api(api).read_namespaced_pod(name, namespace, _request_timeout=5)
    except client.ApiException as exc:
        return exc.status == 404
    except Exception:  # noqa: BLE001 - unreachable, misconfigured: unsure, so not dead
        return False
    return (pod.status.phase if pod.status else None) in ("Succeeded", "Failed")
