"""The local node's addressing and configuration (no process started; the e2e tests run the node)."""

from __future__ import annotations

import ipaddress
import json
import tarfile
import io

import pytest

from gco_infra import localnode
from gco_infra.localnode import HOST_ADDRESS, Node, NodeError, archive_digest


@pytest.mark.parametrize("slot", [0, 1, 17, localnode.SLOTS - 1])
def test_each_slot_has_its_own_node_link_and_pod_range(slot):
    node = Node(region="local-1", slot=slot, dir="/x")
    host, ip = ipaddress.ip_address(node.host_ip), ipaddress.ip_address(node.ip)
    link = ipaddress.ip_network(f"{node.host_ip}/30", strict=False)
    assert ip in link and host in link and link.subnet_of(localnode.NODE_NETWORK)
    pods = ipaddress.ip_network(node.pod_cidr)
    assert not pods.overlaps(localnode.NODE_NETWORK) and ipaddress.ip_address(HOST_ADDRESS) not in pods
    others = [Node(region="r", slot=s, dir="/x") for s in range(localnode.SLOTS) if s != slot]
    assert not any(pods.overlaps(ipaddress.ip_network(o.pod_cidr)) for o in others)
    assert not any(link.overlaps(ipaddress.ip_network(f"{o.host_ip}/30", strict=False)) for o in others)
    assert len(str(node.socket)) < 100  # unix socket paths are limited to 108 bytes


def test_kubelet_accepts_no_anonymous_request_and_kube_proxy_leaves_the_kernel_alone(tmp_path, monkeypatch):
    node = Node(region="local-1", slot=3, dir=str(tmp_path / "n"))
    monkeypatch.setattr(Node, "run_dir", property(lambda self: tmp_path / "run"))
    node.write_config(pause_image="localhost/gco-infra/pause:1", apiserver="https://10.213.255.1:6443",
                      ca_data="Q0E=", kubelet_token="kt", proxy_token="pt")
    kubelet = json.loads((tmp_path / "n/kubelet.yaml").read_text())
    assert kubelet["authentication"]["anonymous"] == {"enabled": False}
    assert kubelet["authorization"] == {"mode": "Webhook"} and kubelet["readOnlyPort"] == 0
    assert kubelet["address"] == node.ip
    proxy = json.loads((tmp_path / "n/kube-proxy.yaml").read_text())
    assert proxy["mode"] == "iptables" and proxy["clusterCIDR"] == node.pod_cidr
    cni = json.loads((tmp_path / "n/cni/net.d/10-gco.conflist").read_text())
    assert cni["plugins"][0]["ipam"]["ranges"] == [[{"subnet": node.pod_cidr}]]
    toml = (tmp_path / "n/containerd.toml").read_text()
    assert "restrict_oom_score_adj = true" in toml and 'sandbox = "localhost/gco-infra/pause:1"' in toml
    for name, user in (("kubeconfig-kubelet", "system:node:local-1-node"), ("kubeconfig-proxy", "system:kube-proxy")):
        cfg = json.loads((tmp_path / "n" / name).read_text())
        assert cfg["users"][0]["name"] == user and (tmp_path / "n" / name).stat().st_mode & 0o077 == 0


def _archive(path, ref, digest):
    index = json.dumps({"schemaVersion": 2, "manifests": [{"digest": digest, "annotations": {
        "org.opencontainers.image.ref.name": ref}}]}).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("index.json")
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))


def test_archive_digest_names_the_image_or_says_it_is_not_there(tmp_path):
    _archive(tmp_path / "a.tar", "localhost/gco-infra/pause:1", "sha256:abc")
    assert archive_digest(tmp_path / "a.tar", "localhost/gco-infra/pause:1") == "sha256:abc"
    with pytest.raises(NodeError, match="holds no image localhost/other:1"):
        archive_digest(tmp_path / "a.tar", "localhost/other:1")


def test_images_listing_must_exist_and_point_at_archives(tmp_path, monkeypatch):
    monkeypatch.setenv("GCO_IMAGE_DIR", str(tmp_path))
    with pytest.raises(NodeError, match="scripts/image build"):
        localnode.images()
    (tmp_path / "images.tsv").write_text(f"localhost/gco-infra/pause:1\t{tmp_path / 'gone.tar'}\n")
    with pytest.raises(NodeError, match="gone.tar .image localhost/gco-infra/pause:1. is missing"):
        localnode.images()
    _archive(tmp_path / "p.tar", "localhost/gco-infra/pause:1", "sha256:abc")
    (tmp_path / "images.tsv").write_text(f"localhost/gco-infra/pause:1\t{tmp_path / 'p.tar'}\n")
    assert localnode.image_ref("pause") == "localhost/gco-infra/pause:1"
    with pytest.raises(NodeError, match="no model-server image"):
        localnode.image_ref("model-server")
