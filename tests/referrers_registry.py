"""A registry with the OCI 1.1 referrers API, for tests: a reverse proxy on loopback in front of the real CNCF
distribution registry (Debian's 2.8 has no such API), which adds the API the way registries that have it do.

- ``PUT /v2/<name>/manifests/<ref>`` is passed on; when the manifest has a ``subject`` and the registry took it,
  the front records the manifest as a referrer of that subject and answers with ``OCI-Subject: <digest>``
  (distribution-spec 1.1: the client then needs no referrers tag).
- ``GET /v2/<name>/referrers/<digest>`` answers an image index of the recorded referrers (``artifactType``
  filter included), an empty index for a digest with none.
- Everything else is passed on as it is; ``Location`` headers naming the registry are rewritten to the front.

``forge(repository, subject, descriptor)`` lists a descriptor under a subject it does not refer to: a lying
registry, for the client's checks. ``requests`` logs (method, path, status) of what reached the front.
``before(method, path)``, when given, runs in the request's thread before a request is passed on (to hold it).

    with ReferrersFront(registry.host) as front:
        run_tvpack("sign", f"oci://{front.host}/models/small:v1", "--key", key, "--plain-http")
"""
from __future__ import annotations

import http.client
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

INDEX = "application/vnd.oci.image.index.v1+json"
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "host", "content-length"}
_MANIFEST_PUT = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_REFERRERS = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>sha256:[0-9a-f]{64})$")


class ReferrersFront:
    def __init__(self, target: str, before=None):
        self.target = target
        self.before = before
        self.referrers: dict[tuple[str, str], list[dict]] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(data)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                with front._lock:
                    front.requests.append((self.command, self.path, status))

            def _referrers(self, match) -> None:
                query = parse_qs(urlsplit(self.path).query)
                with front._lock:
                    listed = list(front.referrers.get((match["name"], match["digest"]), []))
                wanted = query.get("artifactType")
                if wanted:
                    listed = [d for d in listed if d.get("artifactType") in wanted]
                body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": listed}).encode()
                extra = [("OCI-Filters-Applied", "artifactType")] if wanted else []
                self._answer(200, [("Content-Type", INDEX), *extra], body)

            def _pass_on(self) -> None:
                body = self._body() if self.command in ("PUT", "POST", "PATCH") else b""
                if front.before is not None:
                    front.before(self.command, self.path)
                connection = http.client.HTTPConnection(front.target, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    connection.request(self.command, self.path, body=body if body or self.command != "GET" else None,
                                       headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    out = [(k, v.replace(f"http://{front.target}", f"http://{front.host}"))
                           for k, v in response.getheaders() if k.lower() not in HOP]
                finally:
                    connection.close()
                match = _MANIFEST_PUT.match(urlsplit(self.path).path)
                if self.command == "PUT" and match and response.status == 201:
                    subject = front._record(match["name"], body, dict(out))
                    if subject:
                        out.append(("OCI-Subject", subject))
                self._answer(response.status, out, data)

            def _dispatch(self) -> None:
                match = _REFERRERS.match(urlsplit(self.path).path)
                if match and self.command in ("GET", "HEAD"):
                    self._referrers(match)
                else:
                    self._pass_on()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _dispatch

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _record(self, repository: str, body: bytes, headers: dict) -> str | None:
        try:
            manifest = json.loads(body)
        except ValueError:
            return None
        subject = manifest.get("subject") if isinstance(manifest, dict) else None
        digest = next((v for k, v in headers.items() if k.lower() == "docker-content-digest"), None)
        if not isinstance(subject, dict) or not digest:
            return None
        descriptor = {"mediaType": manifest.get("mediaType"), "digest": digest, "size": len(body),
                      "artifactType": manifest.get("artifactType") or manifest.get("config", {}).get("mediaType")}
        if manifest.get("annotations"):
            descriptor["annotations"] = manifest["annotations"]
        self.forge(repository, subject["digest"], descriptor)
        return subject["digest"]

    def forge(self, repository: str, subject: str, descriptor: dict) -> None:
        with self._lock:
            listed = self.referrers.setdefault((repository, subject), [])
            listed[:] = [d for d in listed if d["digest"] != descriptor["digest"]] + [descriptor]

    def __enter__(self) -> "ReferrersFront":
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
