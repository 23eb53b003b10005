"""Network errors that cannot heal fail at once, naming their cause; trickles and endless
transfers are cut off. Through the real CLI against loopback servers: a TLS server with a
self-signed certificate (openssl), a redirect loop, a dead proxy, an error page served with 200,
the fault-injecting mirror trickling bytes."""
from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from servers import free_port

from packager.formats.lockfile import dump_lockfile
from packager.testing.server import MirrorServer
from tests.conftest import need_binary, run_tvpack, synth_refs


class _Counting(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.connections = 0
        self.requests = 0
        self.mutex = threading.Lock()

    def get_request(self):
        request = super().get_request()
        with self.mutex:
            self.connections += 1
        return request

    def handle_error(self, request, client_address):
        pass  # a refused TLS handshake, a client hanging up: expected here


class _Served:
    """A tiny loopback server running ``handler`` for the duration of a ``with``."""

    def __init__(self, handler, tls_context=None):
        self.server = _Counting(handler)
        if tls_context is not None:
            # the handshake on first read, so that each connection is counted before it fails
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True,
                                                         do_handshake_on_connect=False)
        self.port = self.server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _fetch(lock, mirror, *extra, **env):
    return run_tvpack("fetch", "--lock", lock, "--mirror", mirror, "--no-upstream", "-q", *extra,
                      env={k: str(v) for k, v in env.items()})


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tvpack: ")]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("tvpack: error: "), proc.stderr
    return lines[0]


def test_an_untrusted_certificate_fails_at_once_and_says_how_to_trust_it(tmp_path):
    openssl = need_binary("openssl")
    import subprocess

    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", tmp_path / "key.pem",
                    "-out", tmp_path / "cert.pem"], check=True, capture_output=True)
    refs = synth_refs(tmp_path / "files", count=1, size=50_000)
    data = (tmp_path / "files" / "models" / "synth" / refs[0].filename).read_bytes()
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")

    class Files(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with _Served(Files, context) as served:
        url = f"https://127.0.0.1:{served.port}"
        proc = _fetch(lock, url, TORCH_HOME=tmp_path / "home")
        line = _one_error_line(proc)
        assert "certificate verify failed: self-signed certificate" in line
        assert "set REQUESTS_CA_BUNDLE to your CA bundle" in line
        assert served.server.connections == 1  # not retried: no retry can heal it
        assert "retrying in" not in proc.stderr and "gave up after" not in line
        # and the advice works
        proc = _fetch(lock, url, TORCH_HOME=tmp_path / "home", REQUESTS_CA_BUNDLE=tmp_path / "cert.pem")
        assert proc.returncode == 0, proc.stderr


def test_a_redirect_loop_is_one_short_chain_not_retried(tmp_path):
    lock = dump_lockfile(synth_refs(tmp_path / "files", count=1, size=1000), tmp_path / "tvpack.lock")
    hits = []

    class Loop(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with _Served(Loop) as served:
        proc = _fetch(lock, f"http://127.0.0.1:{served.port}", TORCH_HOME=tmp_path / "home")
    line = _one_error_line(proc)
    assert "redirect loop (more than 10 redirects" in line
    assert len(hits) == 11  # one chain: the first request and ten redirects followed


def test_a_dead_proxy_is_named_as_the_proxy(mirror_server, tmp_path):
    lock = dump_lockfile(synth_refs(mirror_server.root, count=1, size=1000), tmp_path / "tvpack.lock")
    proxy = f"http://127.0.0.1:{free_port()}"
    proc = _fetch(lock, mirror_server.url, TORCH_HOME=tmp_path / "home", HTTP_PROXY=proxy, http_proxy=proxy,
                  NO_PROXY="", no_proxy="")
    line = _one_error_line(proc)
    assert f"the proxy {proxy} refused the connection" in line and "HTTP_PROXY" in line
    assert "gave up after" not in line and "retrying in" not in proc.stderr  # a dead proxy is not retried
    mirror_server.settle()
    assert mirror_server.requests() == []


def _serve_page(page: bytes, content_type: str):
    class Page(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    return _Served(Page)


PORTAL = b"<!DOCTYPE html>\n<html><head><title>Sign in to the proxy</title></head><body>...</body></html>\n"


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_an_error_page_served_with_200_is_described(tmp_path, content_type):
    lock = dump_lockfile(synth_refs(tmp_path / "files", count=1, size=1000), tmp_path / "tvpack.lock")
    with _serve_page(PORTAL, content_type) as served:
        proc = _fetch(lock, f"http://127.0.0.1:{served.port}", TORCH_HOME=tmp_path / "home")
    line = _one_error_line(proc)
    kind = content_type.split(";")[0]
    assert "wrong size: expected 1000 bytes" in line
    assert f"got {len(PORTAL)} bytes of {kind} starting '<!DOCTYPE html> <html><head>" in line, line
    assert not list((tmp_path / "home" / "hub" / "checkpoints").glob("*.pth*"))


def test_an_error_page_of_the_pinned_size_fails_the_hash_and_is_described(tmp_path):
    from packager.registry import WeightsRef

    page = (b"<html><body>502 Bad Gateway</body></html>\n" * 30)[:1000]
    (real,) = synth_refs(tmp_path / "files", count=1, size=1000)
    ref = WeightsRef(**{**real.__dict__, "size_hint": len(page)})
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    with _serve_page(page, "text/html") as served:
        proc = _fetch(lock, f"http://127.0.0.1:{served.port}", TORCH_HOME=tmp_path / "home")
    line = _one_error_line(proc)
    assert "sha256 mismatch" in line or "prefix mismatch" in line
    assert f"got {len(page)} bytes of text/html starting '<html><body>502 Bad Gateway" in line, line


def test_a_trickling_server_is_cut_off_by_the_minimum_speed_and_the_time_limit(tmp_path):
    lock = dump_lockfile(synth_refs(tmp_path / "m", count=1, size=200_000), tmp_path / "tvpack.lock")
    with MirrorServer(tmp_path / "m") as server:
        server.add_fault("slow", rate=200)  # ~200 bytes a second: never silent long enough for a read timeout
        proc = _fetch(lock, server.url, "--speed-limit", "2000", "--speed-time", "1", "--retries", "1",
                      TORCH_HOME=tmp_path / "home")
        notices = [line for line in proc.stderr.splitlines() if "; retrying in " in line]
        assert len(notices) == 1 and "too slow" in notices[0] and "(attempt 2 of 2)" in notices[0], proc.stderr
        line = _one_error_line(proc.__class__(proc.args, proc.returncode, proc.stdout,
                                              proc.stderr.replace(notices[0] + "\n", "")))
        assert "too slow" in line and "under the minimum of 2000 bytes/s over 1s" in line
        assert "gave up after 2 attempts" in line
        proc = _fetch(lock, server.url, "--speed-limit", "0", "--max-time", "1.5", TORCH_HOME=tmp_path / "home")
        line = _one_error_line(proc)
        assert "not complete within 1.5s" in line
        # what was received is kept, to resume from
        parts = list((tmp_path / "home" / "hub" / "checkpoints").glob("*.tvpack-part"))
        assert parts and parts[0].stat().st_size > 0


@pytest.mark.parametrize("spec", ["127.0.0.1:8765", "mirror.internal:8080/torch", "localhost:80"])
def test_a_mirror_without_a_scheme_is_a_usage_error_suggesting_http(tmp_path, spec, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lock = dump_lockfile(synth_refs(tmp_path / "m", count=1, size=1000), tmp_path / "tvpack.lock")
    proc = run_tvpack("fetch", "--lock", lock, "--mirror", spec, "--no-upstream", cwd=tmp_path,
                      env={"TORCH_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2
    assert f"did you mean http://{spec} ?" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_tvpack("fetch", "--lock", lock, "--mirror", tmp_path / "no-such-dir", "--no-upstream",
                      env={"TORCH_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    # an existing directory of that name is still a directory mirror
    (tmp_path / spec).mkdir(parents=True)
    proc = run_tvpack("fetch", "--lock", lock, "--mirror", spec, "--no-upstream", "-q", cwd=tmp_path,
                      env={"TORCH_HOME": str(tmp_path / "home")})
    assert proc.returncode == 1 and "no such file" in proc.stderr


def test_an_s3_mirror_that_never_answers_says_so_and_gives_up_at_the_time_limit(tmp_path):
    """S3 reads follow the fetch model: the read timeout, a notice naming what is waited for, --max-time."""
    pytest.importorskip("boto3")
    lock = dump_lockfile(synth_refs(tmp_path / "m", count=1, size=10_000), tmp_path / "tvpack.lock")
    asked = threading.Event()
    release = threading.Event()

    class Silent(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.set()
            release.wait()  # accepted, never answered

        def log_message(self, *args):
            pass

    with _Served(Silent) as server:
        try:
            proc = run_tvpack("fetch", "--lock", lock, "--mirror", "s3://bucket/mirror",
                              "--no-upstream", "-q", "--read-timeout", "1", "--retries", "100", "--max-time", "15", timeout=120,
                              env={"TORCH_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}",
                                   "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"})
        finally:
            release.set()
    assert asked.is_set() and proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tvpack: ")]
    assert f"no answer from 127.0.0.1:{server.port} for 1s; retrying in" in lines[0], proc.stderr
    assert lines[-1].startswith("tvpack: error: ") and "not complete within 15s" in lines[-1], proc.stderr


def test_an_s3_endpoint_that_answers_forever_costs_a_bounded_read_and_one_line(tmp_path):
    """botocore reads an error answer whole before anything of ours sees it: a hostile endpoint sending XML
    forever is cut off at the answer limit (8 MiB), with one line, instead of filling memory."""
    pytest.importorskip("boto3")
    lock = dump_lockfile(synth_refs(tmp_path / "m", count=1, size=10_000), tmp_path / "tvpack.lock")
    sent = []
    safety = 512 * 1024 * 1024  # the server stops here whatever happens: uncapped, the client reads all of it

    class Endless(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.end_headers()  # no length: the answer ends when the connection does
            chunk = b"<Error><Code>InternalError</Code>" + b"<Message>" + b"x" * 65_000 + b"</Message>"
            total = 0
            try:
                self.wfile.write(b'<?xml version="1.0" encoding="UTF-8"?>')
                while total < safety:
                    self.wfile.write(chunk)
                    total += len(chunk)
            except OSError:
                pass  # the client hung up
            sent.append(total)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    with _Served(Endless) as server:
        proc = run_tvpack("fetch", "--lock", lock, "--mirror", "s3://bucket/mirror", "--no-upstream", "-q",
                          "--retries", "0", timeout=300,
                          env={"TORCH_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}",
                               "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"})
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc)
    assert f"the S3 endpoint 127.0.0.1:{server.port} answered more than 8 MiB" in line, proc.stderr
    assert sent and max(sent) < safety, sent


def test_an_s3_mirror_without_credentials_falls_through_to_the_next_mirror(tmp_path):
    """Issue 19's first bug: reading an s3:// mirror without credentials is a DownloadError like any
    unreachable mirror, so the directory mirror after it is tried."""
    pytest.importorskip("boto3")
    refs = synth_refs(tmp_path / "m", count=1, size=10_000)
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
    nowhere = str(tmp_path / "nowhere")
    proc = run_tvpack("fetch", "--lock", lock, "--mirror", "s3://bucket/mirror", "--mirror", tmp_path / "m",
                      "--no-upstream", "-q",
                      env={"TORCH_HOME": str(tmp_path / "home"), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                           "AWS_SESSION_TOKEN": "", "AWS_SHARED_CREDENTIALS_FILE": nowhere,
                           "AWS_CONFIG_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true",
                           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_DEFAULT_REGION": "us-east-1"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "home" / "hub" / "checkpoints" / refs[0].filename).is_file()


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x.pth", "http://[::1"])
def test_a_redirect_to_an_unusable_location_fails_at_once_in_one_line(tmp_path, location):
    lock = dump_lockfile(synth_refs(tmp_path / "m", count=1, size=1000), tmp_path / "tvpack.lock")

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.requests += 1
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    with _Served(Redirect) as server:
        proc = _fetch(lock, f"http://127.0.0.1:{server.port}", TORCH_HOME=tmp_path / "home")
        line = _one_error_line(proc)
        assert "redirected to an unsupported or malformed location" in line, line
        assert server.server.requests == 1  # not retried
