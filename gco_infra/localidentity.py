"""Pod credentials in the local environment, as EKS gives them: from the pod's ServiceAccount.

On EKS, amazon-eks-pod-identity-webhook mutates every new pod whose ServiceAccount carries the
annotation ``eks.amazonaws.com/role-arn``: each container not named in the pod's
``eks.amazonaws.com/skip-containers`` annotation gets ``AWS_ROLE_ARN``, ``AWS_WEB_IDENTITY_TOKEN_FILE``
and a projected ServiceAccount token (audience ``sts.amazonaws.com``), and the AWS SDK exchanges that
token for the role's credentials (AssumeRoleWithWebIdentity). This module is that webhook for the
local clusters, with one local addition: ``AWS_ENDPOINT_URL`` pointing at moto's server, whose STS
answers the exchange. It runs as its own process (``python -m gco_infra.localidentity CONFIG``),
serving HTTPS to the local apiservers; ``localenv`` starts it and registers it with each region.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
AUDIENCE_ANNOTATION = "eks.amazonaws.com/audience"
SKIP_CONTAINERS = "eks.amazonaws.com/skip-containers"
TOKEN_DIR = "/var/run/secrets/eks.amazonaws.com/serviceaccount"
TOKEN_VOLUME = "aws-iam-token"
WEBHOOK_NAME = "gco-local-pod-identity.gco.io"


def serving_pki(directory: Path, ips: list[str]) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) for the webhook's HTTPS on ``ips``; made once per environment."""
    from .localnode import local_pki

    return local_pki(directory, "identity-webhook", "gco-local-identity-webhook", ips=tuple(ips))


def patch_for(pod: dict[str, Any], role_arn: str, audience: str, extra_env: dict[str, str]) -> list[dict[str, Any]]:
    """The JSON patch that gives the pod's containers (except skipped ones) the role's web identity."""
    spec = pod.get("spec") or {}
    skip = {c.strip() for c in ((pod.get("metadata") or {}).get("annotations") or {}).get(SKIP_CONTAINERS, "").split(",")
            if c.strip()}
    env = {"AWS_ROLE_ARN": role_arn, "AWS_WEB_IDENTITY_TOKEN_FILE": f"{TOKEN_DIR}/token",
           "AWS_STS_REGIONAL_ENDPOINTS": "regional", **extra_env}
    ops: list[dict[str, Any]] = []
    changed = False
    for field in ("initContainers", "containers"):
        containers = [dict(c) for c in spec.get(field) or []]
        touched = False
        for c in containers:
            if c.get("name") in skip or any(e.get("name") == "AWS_ROLE_ARN" for e in c.get("env") or []):
                continue
            have = {e.get("name") for e in c.get("env") or []}
            c["env"] = [*(c.get("env") or []), *({"name": k, "value": v} for k, v in env.items() if k not in have)]
            c["volumeMounts"] = [*(c.get("volumeMounts") or []),
                                 {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}]
            touched = True
        if touched:
            ops.append({"op": "add", "path": f"/spec/{field}", "value": containers})
            changed = True
    if changed and not any(v.get("name") == TOKEN_VOLUME for v in spec.get("volumes") or []):
        volume = {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": audience, "expirationSeconds": 86400, "path": "token"}}]}}
        ops.append({"op": "add", "path": "/spec/volumes", "value": [*(spec.get("volumes") or []), volume]})
    return ops


class Webhook:
    """Answers AdmissionReviews for pods of one or more local regions."""

    def __init__(self, read_service_account: Callable[[str, str, str], dict[str, Any] | None],
                 extra_env: dict[str, str]):
        self.read_service_account = read_service_account
        self.extra_env = extra_env

    def review(self, region: str, body: dict[str, Any]) -> dict[str, Any]:
        request = body.get("request") or {}
        response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
        pod = request.get("object") or {}
        namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        sa = self.read_service_account(region, namespace, account)
        annotations = ((sa or {}).get("metadata") or {}).get("annotations") or {}
        role = annotations.get(ROLE_ANNOTATION)
        if role:
            ops = patch_for(pod, role, annotations.get(AUDIENCE_ANNOTATION, "sts.amazonaws.com"), self.extra_env)
            if ops:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _service_account_reader(kubeconfigs: dict[str, str]) -> Callable[[str, str, str], dict[str, Any] | None]:
    from kubernetes import client, config

    apis = {r: client.CoreV1Api(config.new_client_from_config(k)) for r, k in kubeconfigs.items()}
    cache: dict[tuple[str, str, str], tuple[float, dict[str, Any] | None]] = {}
    lock = threading.Lock()

    def read(region: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (region, namespace, name)
        with lock:
            hit = cache.get(key)
            if hit and time.monotonic() - hit[0] < 5:
                return hit[1]
        from kubernetes.client import ApiException

        try:
            sa = apis[region].api_client.sanitize_for_serialization(apis[region].read_namespaced_service_account(name, namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise  # the apiserver is away: nothing cached, the admission fails open as on EKS
            sa = None
        with lock:
            cache[key] = (time.monotonic(), sa)
        return sa

    return read


def serve(config: dict[str, Any]) -> None:
    webhook = Webhook(_service_account_reader(config["kubeconfigs"]), config["env"])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            path = urllib.parse.urlsplit(self.path).path
            region = path.rstrip("/").rsplit("/", 1)[-1]
            if not path.startswith("/mutate/") or region not in config["kubeconfigs"]:
                self.send_error(404)
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            answer = json.dumps(webhook.review(region, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/healthz":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")
            else:
                self.send_error(404)

        def log_message(self, fmt: str, *args: Any) -> None:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(config["cert"], config["key"])

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def finish_request(self, request, client_address) -> None:
            # the TLS handshake in the request's own thread, bounded: one idle connection never holds
            # up the admission of every other pod
            request.settimeout(10)
            try:
                conn = ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
            self.RequestHandlerClass(conn, client_address, self)

    Server((config["host"], config["port"]), Handler).serve_forever()


def webhook_configuration(url: str, ca_bundle: bytes) -> dict[str, Any]:
    """The MutatingWebhookConfiguration of one region; failurePolicy Ignore, as EKS registers its webhook."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "gco-local-pod-identity"},
        "webhooks": [{
            "name": WEBHOOK_NAME, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Ignore", "timeoutSeconds": 5, "reinvocationPolicy": "IfNeeded",
            "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_bundle).decode()},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                       "scope": "Namespaced"}],
        }],
    }


if __name__ == "__main__":
    serve(json.loads(Path(sys.argv[1]).read_text()))
