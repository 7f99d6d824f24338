"""CPU seconds per part of the system during a phase, sampled from /proc (Linux only).

Processes are grouped by what they are (the Pulumi engine, the Kubernetes provider, this Python
process, kube-apiserver, etcd, moto's server, ...). Short-lived processes are sampled every
``every`` seconds, so a process that lives less than that may be missed; the engine and the
provider live for a whole operation.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")

GROUPS = (
    ("pulumi engine", lambda comm, cmd: comm == "pulumi"),
    ("kubernetes provider", lambda comm, cmd: comm.startswith("pulumi-resource")),
    ("other pulumi plugins", lambda comm, cmd: comm.startswith("pulumi-")),
    ("kube-apiserver", lambda comm, cmd: comm == "kube-apiserver"),
    ("etcd", lambda comm, cmd: comm == "etcd"),
    ("controllers", lambda comm, cmd: comm in ("kube-controller", "kube-scheduler", "kube-controller-manager")),
    ("moto server", lambda comm, cmd: "moto" in cmd),
)


def _group(pid: int, comm: str, cmd: str) -> str:
    if pid == os.getpid():
        return "runner (python: program + SDK)"
    for name, match in GROUPS:
        if match(comm, cmd):
            return name
    if "python" in comm:
        return "other python (workers)"
    return "other"


def _read(pid: str) -> tuple[str, str, float, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return comm, cmd, (int(fields[11]) + int(fields[12])) / _TICK, int(fields[1])  # utime + stime, ppid


class CpuSampler:
    """with CpuSampler() as s: ...; s.seconds -> {group: CPU seconds}, s.total."""

    def __init__(self, every: float = 0.2) -> None:
        self.every = every
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, first: bool = False) -> None:
        """Only this process and its descendants: other work on the machine is not counted."""
        procs = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (got := _read(entry)) is not None:
                procs[int(entry)] = got
        me = os.getpid()

        def ours(pid: int) -> bool:
            for _ in range(64):
                if pid == me:
                    return True
                if pid not in procs or pid <= 1:
                    return False
                pid = procs[pid][3]
            return False

        for pid, (comm, cmd, cpu, _) in procs.items():
            if not ours(pid):
                continue
            if first:
                self._start[pid] = cpu
            old = self._last.get(pid)
            if old is not None and cpu < old[1]:  # pid reused
                self._start[pid] = 0.0
            self._last[pid] = (_group(pid, comm, cmd), cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "CpuSampler":
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for pid, (group, cpu) in self._last.items():
            used = cpu - self._start.get(pid, 0.0)
            if used > 0.005:
                out[group] += used
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def total(self) -> float:
        return sum(self.seconds.values())
