"""The local nodes' model server (images/model-server/server.py), run with this Python (no
container) on a free port and exercised over HTTP: what the pods' probes, the ALB path and the
model-sync init container rely on."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "images" / "model-server" / "server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    def __init__(self, tmp_path: Path, *args: str):
        self.port = free_port()
        self.log = tmp_path / f"server-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(self.port), *args],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        self.started = time.monotonic()

    def wait_open(self, timeout: float = 10) -> float:
        """Seconds from the start until the port accepted a connection."""
        deadline = self.started + timeout
        while not port_open(self.port):
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"port {self.port} still closed: {self.log.read_text()}"
            time.sleep(0.05)
        return time.monotonic() - self.started

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start(tmp_path):
    servers: list[Server] = []

    def _start(*args: str, wait: bool = True) -> Server:
        server = Server(tmp_path, *args)
        servers.append(server)
        if wait:
            server.wait_open()
        return server

    yield _start
    for server in servers:
        server.stop()


def run(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SERVER), *args], capture_output=True, text=True, timeout=timeout)


def test_health_follows_the_unhealthy_file_and_the_admin_routes(start, tmp_path):
    flag = tmp_path / "unhealthy"
    s = start("--unhealthy-file", str(flag))
    assert s.request("GET", "/health") == (200, {"status": "ok"})
    flag.write_text("")
    assert s.request("GET", "/health") == (503, {"status": "unhealthy"})
    flag.unlink()
    assert s.request("GET", "/health") == (200, {"status": "ok"})

    assert s.request("POST", "/admin/fail")[0] == 200
    assert s.request("GET", "/health") == (503, {"status": "unhealthy"})
    assert s.request("POST", "/admin/recover")[0] == 200
    assert s.request("GET", "/health") == (200, {"status": "ok"})

    flag.write_text("")  # recover also removes the file
    status, body = s.request("POST", "/admin/recover")
    assert (status, body["status"]) == (200, "ok") and not flag.exists()
    assert s.request("GET", "/health") == (200, {"status": "ok"})


def test_every_route_answers_at_its_bare_path_and_under_the_root_path(start, tmp_path):
    s = start("--root-path", "/llama3/", "--health-path", "ping", "--unhealthy-file", str(tmp_path / "u"))
    assert s.request("GET", "/ping") == (200, {"status": "ok"})
    assert s.request("GET", "/llama3/ping") == (200, {"status": "ok"})
    assert s.request("POST", "/llama3/admin/fail")[0] == 200
    assert s.request("GET", "/ping") == (503, {"status": "unhealthy"})
    assert s.request("POST", "/admin/recover")[0] == 200
    assert s.request("GET", "/llama3/ping") == (200, {"status": "ok"})
    assert s.request("GET", "/llama3/v1/models") == (200, {"model_dir": None, "files": {}})
    assert s.request("POST", "/llama3/v1/completions", b"{}")[0] == 200
    assert s.request("GET", "/health")[0] == 404  # the health route is --health-path only
    assert s.request("GET", "/other/ping")[0] == 404
    assert s.request("GET", "/llama3x/ping")[0] == 404
    assert s.request("GET", "/v1/completions")[0] == 405


def test_the_port_opens_only_after_the_startup_delay(start):
    s = start("--startup-seconds", "2", wait=False)
    time.sleep(1)
    assert s.proc.poll() is None and not port_open(s.port)
    assert 2 <= s.wait_open() < 8
    assert s.request("GET", "/health") == (200, {"status": "ok"})
    assert "loading model" in s.log.read_text()


def test_models_and_completions_serve_the_digests_of_the_model_files(start, tmp_path):
    model = tmp_path / "models" / "llama3"
    (model / "tokenizer").mkdir(parents=True)
    files = {"config.json": b'{"layers": 2}', "weights.bin": bytes(range(256)) * 1000,
             "tokenizer/vocab.txt": b"a\nb\n"}
    for name, data in files.items():
        (model / name).write_bytes(data)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    s = start("--model-dir", str(model))
    assert s.request("GET", "/v1/models") == (200, {"model_dir": str(model), "files": digests})
    prompt = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    for path in ("/v1/completions", "/invocations"):
        status, body = s.request("POST", path, prompt)
        assert status == 200 and body["files"] == digests and body["request_bytes"] == len(prompt)


@pytest.mark.parametrize("setup, why", [(lambda d: None, "does not exist"),
                                        (lambda d: d.mkdir(parents=True), "has no files")], ids=["missing", "empty"])
def test_a_missing_or_empty_model_dir_stops_the_server_with_exit_1(tmp_path, setup, why):
    model = tmp_path / "models" / "absent"
    setup(model)
    result = run("--port", str(free_port()), "--model-dir", str(model))
    assert result.returncode == 1
    assert f"model directory {model} {why}" in result.stderr


def test_sigterm_stops_it_with_exit_0_within_a_second(start):
    s = start()
    assert s.request("GET", "/health")[0] == 200
    t = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=5) == 0
    assert time.monotonic() - t < 1
    assert not port_open(s.port)


def test_sigterm_during_the_startup_delay_exits_0(start):
    s = start("--startup-seconds", "30", wait=False)
    deadline = time.monotonic() + 5
    while "loading model" not in s.log.read_text():  # the handler is installed by then
        assert time.monotonic() < deadline and s.proc.poll() is None, s.log.read_text()
        time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=5) == 0


def test_bad_arguments_are_refused_and_help_explains_every_option():
    for args in (["--port", "http"], ["--port", "70000"], ["--startup-seconds", "-1"], ["--model"]):
        result = run(*args)
        assert result.returncode == 2 and "error:" in result.stderr, args
    result = run("--help")
    assert result.returncode == 0
    for option in ("--port", "--startup-seconds", "--root-path", "--health-path", "--unhealthy-file", "--model-dir"):
        assert option in result.stdout
