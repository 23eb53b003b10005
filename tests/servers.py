"""Real servers on loopback for the mirror tests: nginx over a directory, and moto's S3 API.

Each is started by the test as its own child (nginx) or thread (moto) and stopped at teardown.
When the server software is missing, the test is skipped on a developer machine and fails in CI
(``CI=true``), where ``.ci/run`` installs both.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not installed")
    pytest.skip(f"{what} not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen | None, log: Path | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text() if log is not None and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {detail[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on 127.0.0.1:{port} within {timeout}s")


class Nginx:
    """``nginx -c CONF -g 'daemon off;'`` serving ``root`` on 127.0.0.1, everything in ``workdir``."""

    def __init__(self, root: Path, workdir: Path):
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if binary is None:
            _missing("nginx")
        self.binary = binary
        self.root = Path(root)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_log = self.workdir / "access.log"
        self.error_log = self.workdir / "error.log"
        self.conf = self.workdir / "nginx.conf"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def config(self) -> str:
        w = self.workdir
        # As root the workers would run as "nobody" and could not read pytest's 0700 temp dirs.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""{user}worker_processes 1;
pid {w}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 64; }}
http {{
    types {{ application/json json; text/plain sha256; }}
    default_type application/octet-stream;
    access_log {self.access_log};
    client_body_temp_path {w}/client_body_temp;
    proxy_temp_path {w}/proxy_temp;
    fastcgi_temp_path {w}/fastcgi_temp;
    uwsgi_temp_path {w}/uwsgi_temp;
    scgi_temp_path {w}/scgi_temp;
    sendfile on;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location / {{ autoindex on; }}
    }}
}}
"""

    def start(self) -> "Nginx":
        self.conf.write_text(self.config())
        stderr = open(self.workdir / "stderr.log", "wb")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf), "-p", str(self.workdir),
                                      "-e", str(self.error_log), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=stderr)
        stderr.close()
        try:
            _wait_for_port(self.port, self.proc, self.workdir / "stderr.log")
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finishes the log lines
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def requests(self) -> list[tuple[str, str, int, int]]:
        """``(method, path, status, bytes sent)`` for every line of the access log."""
        out = []
        for line in self.access_log.read_text().splitlines() if self.access_log.exists() else []:
            # 127.0.0.1 - - [date] "GET /path HTTP/1.1" 200 1234 "-" "agent"
            try:
                request = line.split('"')[1]
                status, sent = line.split('"')[2].split()[:2]
                method, path = request.split()[:2]
                out.append((method, path, int(status), int(sent)))
            except (IndexError, ValueError):
                continue
        return out

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MotoS3:
    """moto's S3 HTTP API in a thread on 127.0.0.1 (``moto.server.ThreadedMotoServer``)."""

    def __init__(self):
        try:
            import boto3  # noqa: F401
            from moto.server import ThreadedMotoServer
        except ImportError:
            _missing("moto[server] and boto3")
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.endpoint = ""

    def start(self) -> "MotoS3":
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        _wait_for_port(port, None, None)
        return self

    def stop(self) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        """The environment a client needs: endpoint and dummy credentials, no user AWS config."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")
