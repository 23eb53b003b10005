"""Real servers on loopback for tests and benchmarks: nginx over a directory, and moto's S3 API.

    with Nginx(root, workdir) as nginx:          # nginx as a child, its config and logs in workdir
        url = nginx.url + "/models/x-1234abcd.pth"
        nginx.requests()                         # (method, path, status, bytes sent) per access-log line

    with MotoS3() as s3:                         # moto in a thread (MotoS3(in_process=False): a child)
        s3.client().create_bucket(Bucket="b")
        os.environ.update(s3.env())              # endpoint and dummy credentials for other clients

Everything listens on 127.0.0.1 only. When the software is missing, the constructors raise
:class:`ServerSoftwareMissing` (``.what`` names it); callers decide what that means: the test suite
skips on a developer machine and fails in CI, a benchmark exits with the message. A server that
does not come up raises :class:`ServerError` with the tail of its log.

The Python mirror with Range support and fault injection is :mod:`packager.testing.server` (shipped: `make demo`
and the docs use it); these harnesses are for tests and benchmarks only.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from packager.errors import TvpackError

__all__ = ["MotoS3", "Nginx", "ServerError", "ServerSoftwareMissing", "find_binary", "free_port",
           "wait_for_port"]


class ServerError(TvpackError):
    """A loopback server could not be started."""


class ServerSoftwareMissing(ServerError):
    """The program or Python package a server needs is not installed."""

    def __init__(self, what: str, *, hint: str | None = None):
        super().__init__(f"{what} is not installed", hint=hint)
        self.what = what


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, *, proc: subprocess.Popen | None = None, log: Path | None = None,
                  timeout: float = 10.0) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; raise :class:`ServerError` if ``proc``
    exits first (with the tail of ``log``) or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"server exited with status {proc.returncode} before listening on port {port}"
                              f"{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ServerError(f"server did not listen on 127.0.0.1:{port} within {timeout:g}s"
                                  f"{_tail(log)}") from None
            time.sleep(0.05)


def _tail(log: Path | None, limit: int = 2000) -> str:
    if log is None or not Path(log).exists():
        return ""
    text = Path(log).read_text(errors="replace").strip()
    return f": {text[-limit:]}" if text else ""


def settled_text(log: Path, *, quiet: float = 0.05, timeout: float = 2.0) -> str:
    """The text of a server's log once it has stopped growing for ``quiet`` seconds (at most
    ``timeout``): a server writes a request's access-log line after the response went out, so a
    client can finish before the line is there."""
    log = Path(log)
    deadline = time.monotonic() + timeout
    size = -1
    while True:
        now = log.stat().st_size if log.exists() else 0
        if now == size or time.monotonic() > deadline:
            return log.read_text(errors="replace") if log.exists() else ""
        size = now
        time.sleep(quiet)


def find_binary(name: str) -> str:
    """The path of program ``name`` (``PATH``, then /usr/sbin); raise :class:`ServerSoftwareMissing`."""
    path = shutil.which(name)
    if path is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        path = f"/usr/sbin/{name}"
    if path is None:
        raise ServerSoftwareMissing(name)
    return path


class ChildServer:
    """A server run as a child process on 127.0.0.1: :meth:`_launch` starts it and waits for its
    port (stopping it again if it never comes up); :meth:`stop` ends it with ``stop_signal``."""

    stop_signal = signal.SIGTERM
    port: int
    proc: subprocess.Popen | None = None

    def _launch(self, argv: list[str], log: Path, *, stdout_to_log: bool = True, env: dict | None = None) -> None:
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out if stdout_to_log else subprocess.DEVNULL, stderr=out, env=env)
        try:
            wait_for_port(self.port, proc=self.proc, log=log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Nginx(ChildServer):
    """``nginx -g 'daemon off;'`` serving ``root`` on 127.0.0.1; config, pid, logs and temp paths
    all inside ``workdir``. ``start()`` (or ``with``) runs it; ``stop()`` shuts it down gracefully."""

    stop_signal = signal.SIGQUIT  # graceful: nginx finishes its log lines


    def __init__(self, root, workdir, *, binary: str | None = None, proxy_to: str | None = None,
                 max_body: str | None = None, limit_rate: str | None = None, workers: int = 1):
        """``proxy_to``: a reverse proxy to that url (as in front of a registry) instead of serving ``root``;
        ``max_body``: nginx's ``client_max_body_size`` (its default is 1m), e.g. ``"1m"`` or ``"0"`` (no limit);
        ``limit_rate``: a cap on each connection's response rate (``"40m"``), as CDNs and proxies shape each flow;
        ``workers``: nginx's ``worker_processes``."""
        self.binary = binary or find_binary("nginx")
        self.proxy_to = proxy_to
        self.max_body = max_body
        self.limit_rate = limit_rate
        self.workers = workers
        self.root = Path(root).resolve()
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_log = self.workdir / "access.log"
        self.error_log = self.workdir / "error.log"
        self.stderr_log = self.workdir / "stderr.log"
        self.conf = self.workdir / "nginx.conf"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        w = self.workdir
        # As root the workers would run as "nobody" and could not read 0700 temp dirs (pytest's).
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""{user}worker_processes {self.workers};
pid {w}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 256; }}
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
    tcp_nopush on;
    {f"client_max_body_size {self.max_body};" if self.max_body is not None else ""}
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        {f"limit_rate {self.limit_rate};" if self.limit_rate is not None else ""}
        location / {{ {self._location()} }}
    }}
}}
"""

    def _location(self) -> str:
        if self.proxy_to is None:
            return "autoindex on;"
        # nginx applies limit_rate to a proxied answer only when it buffers it (in memory: no temp files)
        buffering = "proxy_buffering on; proxy_max_temp_file_size 0;" if self.limit_rate else "proxy_buffering off;"
        return (f"proxy_pass {self.proxy_to}; proxy_set_header Host $http_host; proxy_request_buffering off; "
                f"{buffering} proxy_http_version 1.1;")

    def start(self) -> "Nginx":
        if self.proc is not None:
            return self
        self.conf.write_text(self.config())
        self._launch([self.binary, "-c", str(self.conf), "-p", str(self.workdir), "-e", str(self.error_log),
                      "-g", "daemon off;"], self.stderr_log, stdout_to_log=False)
        return self

    def requests(self) -> list[tuple[str, str, int, int]]:
        """``(method, path, status, bytes sent)`` for every line of the access log (once it is quiet)."""
        out = []
        lines = settled_text(self.access_log).splitlines()
        for line in lines:
            # 127.0.0.1 - - [date] "GET /path HTTP/1.1" 200 1234 "-" "agent"
            try:
                parts = line.split('"')
                method, path = parts[1].split()[:2]
                status, sent = parts[2].split()[:2]
                out.append((method, path, int(status), int(sent)))
            except (IndexError, ValueError):
                continue
        return out



class MotoS3:
    """moto's S3 HTTP API on 127.0.0.1: in a thread of this process (``moto.server.ThreadedMotoServer``),
    or with ``in_process=False`` as a child ``python -m moto.server`` (benchmarks: the server then
    does not share this interpreter's GIL with the client being measured)."""

    def __init__(self, *, in_process: bool = True):
        hint = "pip install 'moto[server]' boto3"
        if importlib.util.find_spec("boto3") is None:
            raise ServerSoftwareMissing("boto3", hint=hint)
        try:
            found = importlib.util.find_spec("moto.server") is not None
        except ImportError:
            found = False
        if not found:
            raise ServerSoftwareMissing("moto[server]", hint=hint)
        self.in_process = in_process
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._proc: subprocess.Popen | None = None
        self._workdir: Path | None = None

    def start(self) -> "MotoS3":
        if self._server is not None or self._proc is not None:
            return self
        if self.in_process:
            try:
                from moto.server import ThreadedMotoServer
            except ImportError as exc:  # moto without its [server] extra (flask...)
                raise ServerSoftwareMissing("moto[server]", hint=str(exc)) from None
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            try:
                wait_for_port(self.port)
            except BaseException:
                self.stop()
                raise
        else:
            import tempfile

            self._workdir = Path(tempfile.mkdtemp(prefix="tvpack-moto-"))
            log = self._workdir / "moto.log"
            with open(log, "wb") as out:
                self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                               "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_for_port(self.port, proc=self._proc, log=log, timeout=30)
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

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
        """A boto3 S3 client for this server (dummy credentials)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def __enter__(self) -> "MotoS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
