"""What this installation runs: the pinned packages as installed, and the binaries the runner finds.

The Pulumi CLI and the Kubernetes provider are asked themselves (``pulumi version``; the provider's
``GetPluginInfo`` over its gRPC port), so the answer is the binary's, not a pin copied from a file.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

from .localenv import tools_bin
from .program import PROJECT_ROOT

PACKAGES = (
    ("pulumi", "pulumi (Python SDK)"),
    ("pulumi-kubernetes", "pulumi-kubernetes (Python SDK)"),
    ("pulumi-aws", "pulumi-aws (Python SDK)"),
    ("boto3", "boto3"),
    ("botocore", "botocore"),
    ("kubernetes", "kubernetes (Python client)"),
)


@dataclass(frozen=True)
class Version:
    item: str
    version: str | None
    """None when the item is missing or did not answer (then ``where`` says why)."""
    where: str = ""


def search_path() -> str:
    """Where the runner looks for the binaries: the per-machine tools first (as the local
    environment does), then PATH (the image)."""
    return os.pathsep.join([str(tools_bin()), os.environ.get("PATH", "")])


def project_version() -> str | None:
    try:
        return metadata.version("gco-infra")
    except metadata.PackageNotFoundError:  # the image runs the tree at PROJECT_ROOT, not an installed copy
        import tomllib

        try:
            with open(PROJECT_ROOT / "pyproject.toml", "rb") as f:
                return tomllib.load(f)["project"]["version"]
        except (OSError, KeyError, ValueError):
            return None


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pulumi_cli_version(binary: str, timeout: float = 20) -> str:
    proc = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PULUMI_SKIP_UPDATE_CHECK": "true"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[:200] or f"exit {proc.returncode}")
    return proc.stdout.strip().removeprefix("v")


def provider_version(binary: str, timeout: float = 20) -> str:
    """Start the provider unattached (it prints its gRPC port) and ask it for its version."""
    import grpc
    from google.protobuf import empty_pb2
    from pulumi.runtime.proto import provider_pb2_grpc

    proc = subprocess.Popen([binary], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            text=True)
    try:
        port = (proc.stdout.readline() if proc.stdout else "").strip()
        if not port.isdigit():
            raise RuntimeError(f"did not print a port (exit {proc.poll()})")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = provider_pb2_grpc.ResourceProviderStub(channel).GetPluginInfo(empty_pb2.Empty(), timeout=timeout)
        return info.version
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _binary(item: str, name: str, ask) -> Version:
    path = shutil.which(name, path=search_path())
    if path is None:
        return Version(item, None, f"not found in {search_path()}")
    try:
        return Version(item, ask(path), path)
    except (OSError, RuntimeError, subprocess.SubprocessError, ImportError) as exc:
        return Version(item, None, f"{path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a gRPC error names itself; the rest of the list still prints
        return Version(item, None, f"{path}: {type(exc).__name__}: {str(exc)[:200]}")


def versions() -> list[Version]:
    result = [Version("gco-infra", project_version(), str(PROJECT_ROOT)),
              Version("python", platform.python_version(), sys.executable)]
    for dist, item in PACKAGES[:1]:
        result.append(Version(item, package_version(dist)))
    result.append(_binary("pulumi CLI", "pulumi", pulumi_cli_version))
    for dist, item in PACKAGES[1:2]:
        result.append(Version(item, package_version(dist)))
    result.append(_binary("pulumi-resource-kubernetes", "pulumi-resource-kubernetes", provider_version))
    for dist, item in PACKAGES[2:]:
        result.append(Version(item, package_version(dist)))
    return result


def render(items: list[Version]) -> str:
    width = max(len(v.item) for v in items)
    lines = []
    for v in items:
        line = f"{v.item:<{width}}  {v.version or 'MISSING':<10}"
        lines.append(f"{line}  {v.where}".rstrip() if v.where else line.rstrip())
    return "\n".join(lines) + "\n"
