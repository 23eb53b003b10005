"""A registry that lies on purpose: just enough of the distribution API, on 127.0.0.1, with behaviours a test
switches on (an upload Location on another server, a token realm over plain http, ``{"token": 12345}``,
endless token / error / manifest bodies, one byte every 2 s, accept-and-never-answer, redirect loops,
``file://`` / ``ftp://`` redirects, malformed Locations).

    with HostileRegistry() as reg, HostileRegistry() as other:
        reg.upload_location = other.url + "/elsewhere/upload"
        reg.route("GET", r"/v2/r/manifests/.*", endless(content_type=OCI_MANIFEST))
        ...
        assert other.seen("PATCH")[0].headers.get("Authorization") is None

Bounded: it listens on loopback only, answers at most ``max_requests`` requests, sends at most ``limit``
bytes per endless body, and stops by itself after ``lifetime`` seconds (a drip or a silent answer ends
then too). Every request is recorded (:attr:`requests`) with the headers it carried.
"""
from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

Action = Callable[["_Handler"], None]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # with the query
    headers: dict[str, str]


# -- behaviours ---------------------------------------------------------------------------------------

def reply(status: int, body: bytes | dict | list = b"", *, headers: dict | None = None,
          content_type: str = "application/json") -> Action:
    """A plain answer (a dict or list is sent as JSON)."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body

    def act(h: "_Handler") -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
    return act


def endless(status: int = 200, *, content_type: str = "application/json", prefix: bytes = b'{"token": "',
            announce: int | None = None) -> Action:
    """A body that never ends (until the client hangs up, ``limit`` bytes, or the server stops):
    close-delimited, no Content-Length unless ``announce`` gives one that is a lie."""

    def act(h: "_Handler") -> None:
        h.close_connection = True
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        if announce is not None:
            h.send_header("Content-Length", str(announce))
        h.send_header("Connection", "close")
        h.end_headers()
        if h.command == "HEAD":
            return
        block = b"A" * 65536
        h.wfile.write(prefix)
        sent = len(prefix)
        while sent < h.registry.limit and not h.registry.stopping.is_set():
            h.wfile.write(block)
            sent += len(block)
    return act


def drip(body: bytes, *, every: float = 2.0, status: int = 200, content_type: str = "application/json") -> Action:
    """``body`` (announced in full by Content-Length), one byte every ``every`` seconds."""

    def act(h: "_Handler") -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            h.wfile.write(body[i:i + 1])
            h.wfile.flush()
            if h.registry.stopping.wait(every):
                return
    return act


def drip_headers(*, every: float = 2.0) -> Action:
    """The status line and headers, one byte every ``every`` seconds (a per-read timeout never trips)."""

    def act(h: "_Handler") -> None:
        h.close_connection = True
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        for i in range(len(head)):
            h.wfile.write(head[i:i + 1])
            h.wfile.flush()
            if h.registry.stopping.wait(every):
                return
    return act


def silent() -> Action:
    """Accept the request, then never answer (until the server stops)."""

    def act(h: "_Handler") -> None:
        h.close_connection = True
        h.registry.stopping.wait()
    return act


def redirect(location: str, status: int = 302) -> Action:
    """A redirect to ``location``, sent verbatim (a loop, a file:// url, a malformed one)."""
    return reply(status, b"", headers={"Location": location})


# -- the server -----------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    @property
    def registry(self) -> "HostileRegistry":
        return self.server.registry

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
            data = b""
            while (size := int(self.rfile.readline().strip() or b"0", 16)):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        registry = self.registry
        body = self._body() if self.command in ("PUT", "PATCH", "POST") else b""
        with registry.lock:
            registry.requests.append(Seen(self.command, self.path, dict(self.headers.items())))
            over = len(registry.requests) > registry.max_requests
        if over:
            threading.Thread(target=registry.stop, daemon=True).start()
            return reply(503, {"errors": [{"code": "UNAVAILABLE", "message": "too many requests"}]})(self)
        path = urlsplit(self.path).path
        for method, pattern, action in list(registry.routes):
            if method in (self.command, "*") and re.fullmatch(pattern, path):
                return action(self)
        return registry.default(self, path, body)

    do_GET = do_HEAD = do_PUT = do_PATCH = do_POST = do_DELETE = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: "HostileRegistry"

    def handle_error(self, request, client_address) -> None:  # a client hanging up mid-body is the point
        pass


class HostileRegistry:
    """See the module docstring. Set behaviours before or between requests: :meth:`route`,
    :attr:`challenge`, :attr:`token_body`, :attr:`upload_location`."""

    def __init__(self, *, lifetime: float = 60.0, max_requests: int = 200, limit: int = 64 << 20, tls=None):
        """``tls``: ``(certificate, key)`` files to speak HTTPS with (a client trusts the certificate)."""
        self.lifetime, self.max_requests, self.limit = lifetime, max_requests, limit
        self.requests: list[Seen] = []
        self.routes: list[tuple[str, str, Action]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.challenge: str | None = None  # WWW-Authenticate for /v2/ requests without Authorization
        self.token_body: bytes | dict = {"token": "t0k3n"}
        self.upload_location: str | None = None  # where POST .../blobs/uploads/ sends the upload
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.registry = self
        if tls is not None:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*map(str, tls))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._stopped = False
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def route(self, method: str, pattern: str, action: Action) -> None:
        """Answer ``method`` (or ``"*"``) on paths matching ``pattern`` (a full regex match) with ``action``."""
        self.routes.insert(0, (method, pattern, action))

    def seen(self, method: str | None = None, pattern: str = ".*") -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and re.fullmatch(pattern, urlsplit(r.path).path)]

    def start(self) -> "HostileRegistry":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self.stopping.set()
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "HostileRegistry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # the distribution API, just enough of it
    def default(self, h: _Handler, path: str, body: bytes) -> None:
        if path == "/token":
            token = self.token_body
            return reply(200, token if isinstance(token, (dict, list)) else token)(h)
        if self.challenge and path.startswith("/v2/") and "Authorization" not in h.headers:
            return reply(401, {"errors": [{"code": "UNAUTHORIZED"}]}, headers={"WWW-Authenticate": self.challenge})(h)
        if path == "/v2/":
            return reply(200, {})(h)
        if m := re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", path):
            return self._manifest(h, m.group(2), body)
        if m := re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64})", path):
            if m.group(2) in self.blobs:
                data = self.blobs[m.group(2)]
                return reply(200, data, content_type="application/octet-stream",
                             headers={"Docker-Content-Digest": m.group(2)})(h)
            return reply(404, {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]})(h)
        if h.command == "POST" and re.fullmatch(r"/v2/(.+)/blobs/uploads/", path):
            location = self.upload_location or f"{path}{uuid.uuid4().hex}"
            return reply(202, b"", headers={"Location": location, "Content-Length": "0"})(h)
        return self._upload(h, body)

    def _manifest(self, h: _Handler, reference: str, body: bytes) -> None:
        import hashlib

        if h.command == "PUT":
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            self.manifests[reference] = self.manifests[digest] = (body, h.headers.get("Content-Type", ""))
            return reply(201, b"", headers={"Docker-Content-Digest": digest})(h)
        if reference not in self.manifests:
            return reply(404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})(h)
        data, media_type = self.manifests[reference]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return reply(200, data, content_type=media_type, headers={"Docker-Content-Digest": digest})(h)

    def _upload(self, h: _Handler, body: bytes) -> None:
        """PATCH and PUT on any upload location (this server's own or one another server names)."""
        if h.command == "PATCH":
            self.blobs.setdefault("pending:" + urlsplit(h.path).path, b"")
            key = "pending:" + urlsplit(h.path).path
            self.blobs[key] += body
            return reply(202, b"", headers={"Location": urlsplit(h.path).path})(h)
        if h.command == "PUT":
            digest = (parse_qs(urlsplit(h.path).query).get("digest") or [""])[0]
            data = self.blobs.pop("pending:" + urlsplit(h.path).path, b"") + body
            self.blobs[digest] = data
            return reply(201, b"", headers={"Docker-Content-Digest": digest})(h)
        if h.command == "DELETE":
            return reply(204)(h)
        return reply(404, {"errors": [{"code": "NAME_UNKNOWN", "message": "unknown"}]})(h)
