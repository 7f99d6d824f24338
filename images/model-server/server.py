"""A stand-in inference server for the local environment's nodes (Python standard library only).

It behaves like the servers an endpoint runs where the platform can see it: the port opens only
after the simulated model loading (--startup-seconds, as vLLM's does once the weights are loaded),
a model directory that is missing or empty stops it with exit 1 (as a real server that cannot load
its model), every route answers at its bare path (the kubelet's probes) and under --root-path (the
ALB forwards the path unchanged), and the health route can be made to fail from inside the pod
(the --unhealthy-file) or over HTTP (POST /admin/fail, /admin/recover). SIGTERM or SIGINT stops it
with exit 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}Z model-server: {message}", flush=True)


def url_path(value: str) -> str:
    """An argparse type: a path that starts with '/' and does not end with one ('' stays '')."""
    value = value.strip()
    if not value or value == "/":
        return ""
    if "?" in value or "#" in value or " " in value:
        raise argparse.ArgumentTypeError(f"not a URL path: {value!r}")
    return "/" + value.strip("/")


def port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {port}")
    return port


def seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= s < 86400:
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more (less than a day), got {value}")
    return s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="server.py",
        description="Test model server: health, admin, models and completion routes over HTTP.",
        epilog="Routes: GET <health-path>; POST /admin/fail, /admin/recover; GET /v1/models; "
               "POST /v1/completions, /invocations. Each is also served under --root-path. "
               "SIGTERM or SIGINT: stop serving and exit 0.")
    p.add_argument("--port", type=port_number, default=8000,
                   help="TCP port to listen on, on 0.0.0.0 (default: %(default)s)")
    p.add_argument("--startup-seconds", type=seconds, default=0.0, metavar="S",
                   help="simulated model loading: the port opens only S seconds after start (default: 0)")
    p.add_argument("--root-path", type=url_path, default="", metavar="P",
                   help="serve every route also under this prefix, e.g. /llama3 for /llama3/health "
                        "(default: none)")
    p.add_argument("--health-path", type=url_path, default="/health", metavar="H",
                   help="the health route: 200 {\"status\":\"ok\"}, or 503 {\"status\":\"unhealthy\"} after "
                        "POST /admin/fail or while the unhealthy file exists (default: %(default)s)")
    p.add_argument("--unhealthy-file", default="/tmp/unhealthy", metavar="FILE",
                   help="while this file exists the health route answers 503; POST /admin/recover "
                        "removes it (default: %(default)s)")
    p.add_argument("--model-dir", metavar="D",
                   help="read every regular file under D at startup (after the startup delay) and serve "
                        "their SHA-256 digests; exit 1 when D is missing or has no files")
    return p


def model_digests(model_dir: str) -> dict[str, str]:
    """SHA-256 of every regular file under model_dir, by '/'-separated relative path.

    Raises SystemExit(1) with a message naming the directory when there is nothing to load.
    """
    root = Path(model_dir)
    if not root.is_dir():
        fail(f"model directory {model_dir} does not exist or is not a directory")
    digests: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_file() or path.is_symlink():
                continue
            h = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digests[path.relative_to(root).as_posix()] = h.hexdigest()
    if not digests:
        fail(f"model directory {model_dir} has no files")
    return digests


def fail(message: str) -> None:
    print(f"model-server: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


class State:
    def __init__(self, args: argparse.Namespace, files: dict[str, str]):
        self.args = args
        self.files = files
        self.failed = threading.Event()

    def healthy(self) -> bool:
        return not self.failed.is_set() and not os.path.exists(self.args.unhealthy_file)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gco-model-server"
    state: State  # set on the subclass made for each server

    def route(self) -> str:
        """The request's path without the root path (a path outside it is returned as it is)."""
        path = urlsplit(self.path).path or "/"
        root = self.state.args.root_path
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root):] or "/"
        return path

    def send_json(self, status: int, body: object) -> None:
        data = json.dumps(body, sort_keys=True).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def dispatch(self, method: str) -> None:
        args = self.state.args
        route = self.route()
        body = self.read_body() if method == "POST" else b""
        routes = {
            args.health_path: ("GET", self.health),
            "/admin/fail": ("POST", self.admin_fail),
            "/admin/recover": ("POST", self.admin_recover),
            "/v1/models": ("GET", self.models),
            "/v1/completions": ("POST", self.complete),
            "/invocations": ("POST", self.complete),
        }
        if route not in routes:
            self.send_json(404, {"error": "not found", "path": urlsplit(self.path).path})
            return
        allowed, handler = routes[route]
        if method != allowed:
            self.send_json(405, {"error": f"method not allowed, use {allowed}", "path": route})
            return
        handler(body)

    def health(self, _body: bytes) -> None:
        if self.state.healthy():
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(503, {"status": "unhealthy"})

    def admin_fail(self, _body: bytes) -> None:
        self.state.failed.set()
        log("health set to failing (POST /admin/fail)")
        self.send_json(200, {"status": "unhealthy"})

    def admin_recover(self, _body: bytes) -> None:
        self.state.failed.clear()
        result: dict[str, object] = {}
        try:
            os.remove(self.state.args.unhealthy_file)
            result["removed"] = self.state.args.unhealthy_file
        except FileNotFoundError:
            pass
        except OSError as e:
            result["error"] = f"cannot remove {self.state.args.unhealthy_file}: {e.strerror}"
        log("health recovered (POST /admin/recover)")
        self.send_json(200, {"status": "ok" if self.state.healthy() else "unhealthy", **result})

    def models(self, _body: bytes) -> None:
        self.send_json(200, {"model_dir": self.state.args.model_dir, "files": self.state.files})

    def complete(self, body: bytes) -> None:
        self.send_json(200, {
            "object": "text_completion",
            "model_dir": self.state.args.model_dir,
            "files": self.state.files,
            "request_bytes": len(body),
            "choices": [{"index": 0, "text": f"echo of {len(body)} bytes", "finish_reason": "stop"}],
        })

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        log(f"{self.address_string()} {format % args}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stopping = threading.Event()
    server: ThreadingHTTPServer | None = None

    def stop(signum: int, _frame: object) -> None:
        log(f"{signal.Signals(signum).name}: stopping")
        stopping.set()
        if server is not None:
            # shutdown() waits for serve_forever, which runs in this (the main) thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    log(f"starting (pid {os.getpid()}): port {args.port}, root path {args.root_path or '(none)'}, "
        f"health path {args.health_path}, unhealthy file {args.unhealthy_file}, "
        f"model dir {args.model_dir or '(none)'}")
    deadline = time.monotonic() + args.startup_seconds
    while (left := deadline - time.monotonic()) > 0:
        log(f"loading model: {left:.1f}s left, port {args.port} not open yet")
        if stopping.wait(min(1.0, left)):
            return 0
    files = model_digests(args.model_dir) if args.model_dir else {}
    if files:
        log(f"loaded {len(files)} files from {args.model_dir}")
    if stopping.is_set():
        return 0

    handler = type("BoundHandler", (Handler,), {"state": State(args, files)})
    try:
        server = ThreadingHTTPServer(("0.0.0.0", args.port), handler)
    except OSError as e:
        fail(f"cannot listen on 0.0.0.0:{args.port}: {e.strerror}")
    server.daemon_threads = True
    if stopping.is_set():  # a signal that came while the socket was being opened
        return 0
    log(f"serving on 0.0.0.0:{args.port}")
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
