"""A real node per local region: containerd + runc, CNI (bridge + host-local), kubelet and kube-proxy.

Each node lives in its own network namespace ``gco-n<slot>``, joined to the host by a veth pair,
so its kubelet (port 10250 on the node's IP), kube-proxy (iptables rules of its own) and pod network
never meet another node's, and the apiserver reaches the kubelet at the node's InternalIP as on EKS.
Pod IPs are routable from the host (like the VPC CNI's): the host routes each node's pod range to
the node. The node's processes share the host's mount namespace (``nsenter --net``), so volumes the
kubelet mounts are the ones containerd gives to containers.

Addresses (slot n, 0..63): host side of the veth 10.213.254.<4n+1>/30, node 10.213.254.<4n+2>, pods
10.213.<n>.0/24. Host services that pods use (the apiservers, moto) listen on HOST_ADDRESS, a /32 on
the host's loopback, reachable from every node through its default route.

Nothing runs without root: the node needs network namespaces, mounts and cgroups. Images come from
OCI archives built here (scripts/image, listed in images.tsv): no registry is reachable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HOST_ADDRESS = "10.213.255.1"
NODE_NETWORK = ipaddress.ip_network("10.213.254.0/24")
SLOTS = 64
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
RUNC = Path("/usr/sbin/runc")
NODE_BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2", "kubelet", "kube-proxy")
KUBELET_PORT = 10250
DEBIAN_PACKAGES = "runc containernetworking-plugins iptables util-linux iproute2"


class NodeError(RuntimeError):
    pass


def write_private(path: Path, data: bytes | str) -> None:
    """Write a key, token or kubeconfig readable by its owner only, from the first byte."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, 0o600)


KERNEL_SETTINGS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "vm/panic_on_oom",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
"""Host-wide sysctls the kubelet sets to its own expectations at start (protectKernelDefaults off)."""
SAVED_KERNEL_SETTINGS = Path("/run/gco-infra-kernel-settings.json")


def save_kernel_settings() -> None:
    """Record the host's values before the first node's kubelet changes them (restore_kernel_settings)."""
    if SAVED_KERNEL_SETTINGS.exists():
        return
    values = {}
    for key in KERNEL_SETTINGS:
        try:
            values[key] = (Path("/proc/sys") / key).read_text().strip()
        except OSError:
            pass
    SAVED_KERNEL_SETTINGS.write_text(json.dumps(values))


def restore_kernel_settings() -> None:
    if not SAVED_KERNEL_SETTINGS.exists():
        return
    for key, value in json.loads(SAVED_KERNEL_SETTINGS.read_text()).items():
        try:
            (Path("/proc/sys") / key).write_text(value)
        except OSError:
            pass
    SAVED_KERNEL_SETTINGS.unlink(missing_ok=True)


def local_pki(directory: Path, stem: str, common_name: str, *, organization: str | None = None,
              ips: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) files ``<stem>-ca.crt``, ``<stem>.crt``, ``<stem>.key`` in ``directory``:
    a CA of its own and one certificate it signs, for a client (no ``ips``) or a server on ``ips``;
    made once per environment."""
    ca_crt, crt, key = directory / f"{stem}-ca.crt", directory / f"{stem}.crt", directory / f"{stem}.key"
    if ca_crt.exists() and crt.exists() and key.exists():
        return ca_crt, crt, key
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=365)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gco-local-{stem}-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    subject = ([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)] if organization else []) \
        + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    leaf = (x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(ca_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if ips else ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False))
    if ips:
        leaf = leaf.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]),
                                  critical=False)
    ca_crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    crt.write_bytes(leaf.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    write_private(key, leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return ca_crt, crt, key


def kubelet_client_pki(directory: Path) -> tuple[Path, Path, Path]:
    """The apiserver's client certificate for kubelets (system:masters), and the CA kubelets trust for it."""
    return local_pki(directory, "kubelet-client", "kube-apiserver-kubelet-client", organization="system:masters")


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def image_dir() -> Path:
    return Path(os.environ.get("GCO_IMAGE_DIR") or Path.home() / ".cache" / "gco-infra" / "image")


def images() -> dict[str, Path]:
    """Image reference -> OCI archive, as scripts/image listed them in images.tsv."""
    listing = image_dir() / "images.tsv"
    if not listing.exists():
        raise NodeError(f"{listing} does not exist: build the images first (scripts/image build)")
    result: dict[str, Path] = {}
    for line in listing.read_text().splitlines():
        if line.strip():
            ref, _, archive = line.partition("\t")
            if not Path(archive).exists():
                raise NodeError(f"{archive} (image {ref}) is missing: run scripts/image build")
            result[ref] = Path(archive)
    return result


def image_ref(kind: str) -> str:
    """The reference of one of the built images: "pause", "model-server", "aws-cli" or "gco-infra"."""
    pattern = re.compile(rf"^localhost/(gco-infra/)?{re.escape(kind)}:")
    for ref in images():
        if pattern.match(ref):
            return ref
    raise NodeError(f"no {kind} image in {image_dir() / 'images.tsv'}: run scripts/image build")


def archive_digest(archive: Path, ref: str) -> str:
    """The manifest digest of ``ref`` in an OCI archive (its index.json)."""
    import tarfile

    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        index = json.load(member) if member else {}
    for m in index.get("manifests", []):
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") in (ref, ref.rsplit(":", 1)[-1]):
            return m["digest"]
    raise NodeError(f"{archive} holds no image {ref} (index.json)")


def missing_prerequisites(tools_bin: Path) -> list[str]:
    """What this machine lacks to run a node, each with how to get it."""
    problems = []
    if os.geteuid() != 0:
        problems.append("a node needs root (network namespaces, mounts, cgroups)")
    missing = [b for b in NODE_BINARIES if not (tools_bin / b).exists()]
    if missing:
        problems.append(f"{', '.join(missing)} not built: scripts/tools build kube containerd")
    debian = [str(p) for p in (RUNC, *(CNI_BIN_DIR / p for p in CNI_PLUGINS)) if not p.exists()]
    debian += [c for c in ("iptables", "nsenter", "ip") if not shutil.which(c)]
    if debian:
        problems.append(f"{', '.join(debian)} missing: apt-get install {DEBIAN_PACKAGES}")
    return problems


def _links() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)", _run("ip", "-o", "link", "show").stdout, re.M)}


def claim_slot() -> int:
    """The lowest slot no node of any local environment on this machine uses, claimed by creating its
    run dir (atomic: two environments starting at once never share a slot)."""
    used = {int(m.group(1)) for name in _links() if (m := re.fullmatch(r"gco-n(\d+)", name))}
    used |= {int(m.group(1)) for p in Path("/run/netns").glob("gco-n*") if (m := re.fullmatch(r"gco-n(\d+)", p.name))}
    for slot in range(SLOTS):
        if slot in used:
            continue
        try:
            os.mkdir(f"/run/gco-n{slot}", 0o700)
        except FileExistsError:
            continue
        return slot
    raise NodeError(f"all {SLOTS} node slots are in use (ip link show | grep gco-n; ls -d /run/gco-n*)")


def ensure_host_address() -> None:
    if f" {HOST_ADDRESS}/32 " not in _run("ip", "-o", "addr", "show", "dev", "lo").stdout:
        _run("ip", "addr", "add", f"{HOST_ADDRESS}/32", "dev", "lo")


def _listening(address: str) -> bool:
    """Whether any process listens on ``address`` (TCP, /proc/net/tcp)."""
    want = "".join(f"{int(b):02X}" for b in reversed(address.split(".")))
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1].split(":")[0] == want and cols[3] == "0A":
            return True
    return False


def release_host() -> None:
    """Once no node of any environment is left and nothing listens on HOST_ADDRESS: drop the address,
    containerd's empty k8s.io cgroups, and give the host back the kernel settings the kubelets changed."""
    if any(re.fullmatch(r"gco-n\d+", n) for n in _links()) or _listening(HOST_ADDRESS):
        return
    _run("ip", "addr", "del", f"{HOST_ADDRESS}/32", "dev", "lo", check=False)
    for parent in Path("/sys/fs/cgroup").glob("*/k8s.io"):
        try:
            parent.rmdir()
        except OSError:
            pass
    restore_kernel_settings()


def leftovers(nodes: list["Node"], containers: set[str] = frozenset(), pod_netns: set[str] = frozenset()) -> list[str]:
    """What stopped nodes left on the machine: processes, mounts, network namespaces (the nodes' and
    their pods'), links, routes, run dirs, the containers' cgroups and processes."""
    found = [f"pod network namespace {p}" for p in sorted(pod_netns) if Path(p).exists()]
    found += [f"cgroup {d}" for cid in sorted(containers) for d in Path("/sys/fs/cgroup").glob(f"*/k8s.io/{cid}")]
    mounts = Path("/proc/self/mounts").read_text()
    links = _links()
    for node in nodes:
        found += [f"mount {line.split()[1]}" for line in mounts.splitlines()
                  if (line.split()[1] + "/").startswith((node.dir + "/", f"{node.run_dir}/"))]
        if Path(f"/run/netns/{node.netns}").exists():
            found.append(f"network namespace {node.netns}")
        if node.netns in links:
            found.append(f"link {node.netns}")
        if node.pod_cidr in _run("ip", "route", "show").stdout:
            found.append(f"route {node.pod_cidr}")
        if node.run_dir.exists():
            found.append(f"dir {node.run_dir}")
        found += [f"shim pid {p}" for p in node.shim_pids()]
        for pid in (node.containerd_pid, node.kubelet_pid, node.proxy_pid):
            if pid and Path(f"/proc/{pid}").exists() and b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower():
                found.append(f"process {pid}")
    return found


@dataclass
class Node:
    """One region's node; persisted in the environment's state.json."""

    region: str
    slot: int
    dir: str
    containerd_pid: int | None = None
    kubelet_pid: int | None = None
    proxy_pid: int | None = None

    # ---- names and addresses -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.region}-node"

    @property
    def netns(self) -> str:
        return f"gco-n{self.slot}"

    @property
    def host_ip(self) -> str:
        return str(NODE_NETWORK.network_address + 4 * self.slot + 1)

    @property
    def ip(self) -> str:
        return str(NODE_NETWORK.network_address + 4 * self.slot + 2)

    @property
    def pod_cidr(self) -> str:
        return f"10.213.{self.slot}.0/24"

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def marker(self, component: str) -> str:
        """What identifies this node's process in its command line (its own config file), never a
        system containerd or kubelet that reused a recorded pid."""
        return str(self.path / {"containerd": "containerd.toml", "kubelet": "kubelet.yaml",
                                "kube-proxy": "kube-proxy.yaml"}[component])

    @property
    def run_dir(self) -> Path:
        """Short paths for sockets (unix socket paths are limited to 108 bytes)."""
        return Path(f"/run/gco-n{self.slot}")

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    def nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    # ---- network -------------------------------------------------------------------------------------
    def create_network(self) -> None:
        """The node's network namespace, its veth to the host, its default route, the host's route to its pods."""
        ns, host_if = self.netns, self.netns
        if not Path(f"/run/netns/{ns}").exists():
            _run("ip", "netns", "add", ns)
        if host_if not in _links():
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", host_if)
            _run("ip", "link", "set", host_if, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip}/30", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", self.host_ip)
            _run("ip", "route", "replace", self.pod_cidr, "via", self.ip)
        # forwarding between the pods' bridge and eth0, inside the node only
        _run(*self.nsenter("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"))

    def delete_network(self, pod_netns: set[str]) -> None:
        for path in sorted(pod_netns):
            if os.path.ismount(path):
                _run("umount", path, check=False)
            Path(path).unlink(missing_ok=True)
        _run("ip", "netns", "delete", self.netns, check=False)  # takes eth0, its peer and the routes with it
        if self.netns in _links():
            _run("ip", "link", "delete", self.netns, check=False)

    # ---- configuration files ----------------------------------------------------------------------------
    def write_config(self, *, pause_image: str, apiserver: str, ca_data: str, kubelet_token: str,
                     proxy_token: str, cluster_dns: str | None = None) -> None:
        for d in ("cni/net.d", "cni/ipam", "kubelet", "pod-logs", "containerd"):
            (self.path / d).mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.path / "containerd.toml").write_text(f'''\
version = 4
root = "{self.path / 'containerd'}"
state = "{self.run_dir / 'state'}"
imports = []

[plugins."io.containerd.server.v1.grpc"]
  address = "{self.socket}"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.path / 'containerd-opt'}"
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause_image}"

[plugins."io.containerd.cri.v1.runtime"]
  # root here lacks CAP_SYS_RESOURCE: runc could not set the kubelet's negative oom_score_adj
  restrict_oom_score_adj = true
  # pods' network namespaces under the node's state dir (not /run/netns), removed with it
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{RUNC}"
        Root = "{self.run_dir / 'runc'}"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{self.path / 'cni/net.d'}"
''')
        (self.path / "cni/net.d/10-gco.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "gco-pods",
            "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": self.pod_cidr}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.path / "cni/ipam")},
            }],
        }, indent=2))
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # this machine: cgroup v1 (hybrid), no systemd, swap on
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False,
            # pods' cgroups under containerd's own parent: two nodes on one host never share a QoS tree
            "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
            "containerRuntimeEndpoint": f"unix://{self.socket}", "imageServiceEndpoint": f"unix://{self.socket}",
            "address": self.ip, "port": KUBELET_PORT, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            # the apiserver authenticates with its kubelet client certificate; everyone else is asked
            # about at the apiserver (webhook), as on EKS
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.path / "kubelet-client-ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "podLogsDir": str(self.path / "pod-logs"),
            "resolvConf": "/etc/resolv.conf", "clusterDomain": "cluster.local",
            **({"clusterDNS": [cluster_dns]} if cluster_dns else {}),
            "maxPods": 60,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "5s",
        }
        (self.path / "kubelet.yaml").write_text(json.dumps(kubelet, indent=2))
        proxy = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clusterCIDR": self.pod_cidr, "hostnameOverride": self.name,
            "clientConnection": {"kubeconfig": str(self.path / "kubeconfig-proxy")},
            # the node's namespace has its own conntrack table; leave the kernel's sizes alone
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256",
        }
        (self.path / "kube-proxy.yaml").write_text(json.dumps(proxy, indent=2))
        for user, token, file in ((f"system:node:{self.name}", kubelet_token, "kubeconfig-kubelet"),
                                  ("system:kube-proxy", proxy_token, "kubeconfig-proxy")):
            cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "node",
                   "clusters": [{"name": "local", "cluster": {"server": apiserver, "certificate-authority-data": ca_data}}],
                   "contexts": [{"name": "node", "context": {"cluster": "local", "user": user}}],
                   "users": [{"name": user, "user": {"token": token}}]}
            write_private(self.path / file, json.dumps(cfg, indent=2))

    # ---- processes --------------------------------------------------------------------------------------
    def ctr(self, *argv: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        from .localenv import tools_bin

        return _run(str(tools_bin() / "ctr"), "--address", str(self.socket), "-n", "k8s.io", *argv,
                    timeout=timeout, check=check)

    def image_digests(self) -> dict[str, str]:
        """Image reference -> manifest digest, as this node's containerd has them."""
        lines = self.ctr("images", "ls").stdout.splitlines()[1:]
        return {cols[0]: cols[2] for cols in (line.split() for line in lines) if len(cols) >= 3}

    def import_images(self, wanted: dict[str, Path], progress: Callable[[str], None]) -> None:
        """Import what the node lacks, or has under the same reference with other contents (a
        rebuilt image keeps its tag)."""
        present = self.image_digests()
        for ref, archive in wanted.items():
            digest = archive_digest(archive, ref)
            if present.get(ref) == digest:
                continue
            progress(f"importing {ref} into {self.name}")
            self.ctr("images", "import", "--local", str(archive), timeout=600)
            if self.image_digests().get(ref) != digest:
                raise NodeError(f"{archive} imported into {self.name}, but containerd does not list {ref} at {digest}")

    def running_tasks(self) -> list[str]:
        """Containers (and sandboxes) still running; stopped ones stay listed until removed."""
        proc = self.ctr("tasks", "ls", check=False, timeout=30)
        return [cols[0] for cols in (line.split() for line in proc.stdout.splitlines()[1:])
                if len(cols) >= 3 and cols[2] == "RUNNING"]

    def pod_netns(self) -> set[str]:
        """The network namespaces (bind-mount paths) of this node's pod sandboxes, from containerd's records."""
        result = set()
        proc = self.ctr("containers", "ls", "-q", check=False, timeout=30)
        for cid in proc.stdout.split() if proc.returncode == 0 else []:
            info = self.ctr("containers", "info", cid, check=False, timeout=30)
            for m in re.finditer(r'"path":\s*"([^"]*/netns/cni-[0-9a-f-]+)"', info.stdout):
                result.add(m.group(1))
        return result

    def kill_containers(self) -> None:
        proc = self.ctr("tasks", "ls", "-q", check=False, timeout=30)
        for tid in proc.stdout.split() if proc.returncode == 0 else []:
            self.ctr("tasks", "kill", "-s", "KILL", tid, check=False, timeout=30)
        deadline = time.monotonic() + 15
        for tid in proc.stdout.split() if proc.returncode == 0 else []:
            while time.monotonic() < deadline and self.ctr("tasks", "delete", tid, check=False, timeout=30).returncode != 0:
                if self.ctr("tasks", "ls", "-q", check=False, timeout=30).stdout.split().count(tid) == 0:
                    break
                time.sleep(0.3)
        proc = self.ctr("containers", "ls", "-q", check=False, timeout=30)
        for cid in proc.stdout.split() if proc.returncode == 0 else []:
            self.ctr("containers", "rm", cid, check=False, timeout=30)

    def kill_with_runc(self) -> set[str]:
        """Kill and delete every container runc knows for this node (containerd may be gone; its shims
        would otherwise leave the containers running); returns their ids."""
        root = self.run_dir / "runc" / "k8s.io"
        if not root.is_dir():
            return set()
        ids = set(_run(str(RUNC), "--root", str(root), "list", "-q", check=False).stdout.split())
        for cid in ids:
            _run(str(RUNC), "--root", str(root), "kill", cid, "KILL", check=False)
        for cid in ids:
            _run(str(RUNC), "--root", str(root), "delete", "--force", cid, check=False)
        return ids

    def shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes serving this node's containerd (they outlive it)."""
        pids = []
        needle = f"-address {self.socket}".encode()
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                if b"containerd-shim" in cmd and needle in cmd:
                    pids.append(int(p.name))
        return pids

    def unmount_all(self) -> None:
        """Every mount under the node's dirs, deepest first (kubelet bind-mounts its root dir onto itself)."""
        roots = (str(self.path) + "/", str(self.run_dir) + "/")
        for _ in range(3):
            mounts = []
            for line in Path("/proc/self/mounts").read_text().splitlines():
                target = line.split()[1].replace("\\040", " ")
                if (target + "/").startswith(roots) or target in (str(self.path), str(self.run_dir)):
                    mounts.append(target)
            if not mounts:
                return
            for target in sorted(set(mounts), key=len, reverse=True):
                if _run("umount", target, check=False).returncode != 0:
                    _run("umount", "-l", target, check=False)

    def remove_cgroups(self, ids: set[str]) -> None:
        for controller in Path("/sys/fs/cgroup").iterdir():
            parent = controller / "k8s.io"
            for cid in ids:
                d = parent / cid
                if d.is_dir():
                    for sub in sorted(d.rglob("*"), key=lambda x: len(str(x)), reverse=True):
                        if sub.is_dir():
                            try:
                                sub.rmdir()
                            except OSError:
                                pass
                    try:
                        d.rmdir()
                    except OSError:
                        pass
