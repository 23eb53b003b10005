"""The CNCF distribution registry (Debian's ``docker-registry``) on loopback, for tests and benchmarks.

    with DistributionRegistry(tmp_path) as reg:                          # plain HTTP, anonymous
        client = RegistryClient(reg.host, plain_http=True)
    with DistributionRegistry(tmp_path, users={"alice": "pw"}) as reg:   # htpasswd basic auth
    with DistributionRegistry(tmp_path, tls=True) as reg:                # self-signed, reg.ca_cert
    with TokenServer(tmp_path, users={"alice": "pw"}) as tokens, \\
            DistributionRegistry(tmp_path, token_server=tokens) as reg:  # bearer tokens (distribution's token auth)

    reg.requests()            # (method, path, status) per access-log line: count uploads
    reg.blob_path(digest)     # the blob's file in the storage dir (tests corrupt it)

Config, storage, certificates and logs all live in the given work directory; the registry runs as a
child process listening on 127.0.0.1 only. Missing software raises :class:`ServerSoftwareMissing`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from servers import ChildServer, ServerSoftwareMissing, find_binary, free_port, settled_text

__all__ = ["DistributionRegistry", "TokenServer", "self_signed_cert"]

# 127.0.0.1 - - [25/Nov/2026:16:50:00 +0000] "PUT /v2/r/blobs/uploads/x?digest=... HTTP/1.1" 201 0 "" "tvpack"
_ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" ([0-9]{3}) ([0-9]+|-) ')
_AGENT_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" ([0-9]{3}) (?:[0-9]+|-) "[^"]*" "([^"]*)"')


def self_signed_cert(workdir: Path, name: str = "registry") -> tuple[Path, Path]:
    """A P-256 key and a self-signed certificate for 127.0.0.1 (``subjectAltName=IP:127.0.0.1``), made
    with openssl; returns (certificate, key) paths in ``workdir``."""
    openssl = find_binary("openssl")
    cert, key = workdir / f"{name}.crt", workdir / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=tvpack test {name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def htpasswd_lines(users: dict[str, str]) -> str:
    """bcrypt ``htpasswd`` entries (the only hash distribution accepts), from apache2-utils."""
    htpasswd = find_binary("htpasswd")
    return "".join(subprocess.run([htpasswd, "-Bbn", user, password], check=True, capture_output=True,
                                  text=True).stdout.strip() + "\n" for user, password in users.items())


class TokenServer:
    """A docker token server on loopback (``GET /token?service=&scope=``), as Harbor or GitLab run
    beside a registry: it checks HTTP basic credentials against ``users`` (anonymous callers get
    tokens too when ``anonymous=True``) and answers ``{"token": JWT}``: ES256, signed by a
    self-signed certificate the registry trusts (``rootcertbundle``), granting what was asked
    (only pull to the users in ``pull_only``)."""

    service = "tvpack-test-registry"
    issuer = "tvpack-test-token-server"

    def __init__(self, workdir, *, users: dict[str, str] | None = None, anonymous: bool = False,
                 pull_only: tuple[str, ...] = ()):
        try:
            from cryptography.hazmat.primitives import serialization  # noqa: F401
        except ImportError:
            raise ServerSoftwareMissing("cryptography", hint="pip install cryptography") from None
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.anonymous = anonymous
        self.pull_only = set(pull_only)  # users (None: anonymous) whose tokens grant pull and nothing else
        self.cert, self.key = self_signed_cert(self.workdir, "token-signer")
        self.port = free_port()
        self.issued: list[tuple[str | None, list[str]]] = []  # (user, scopes) per token handed out
        self.lifetime = 300  # seconds until a token's "exp" (the registry allows some clock skew beyond it)
        self._server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _sign(self, claims: dict) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        # distribution finds the signing key through the x5c chain, checked against rootcertbundle
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _token(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a and (a == "pull" or user not in self.pull_only)]
            if kind and name:
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user or "", "aud": self.service, "exp": now + self.lifetime, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        return self._sign(claims)

    def start(self) -> "TokenServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: tests read owner.issued
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    try:
                        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    except ValueError:
                        user, password = "", None
                    if owner.users.get(user) != password:
                        return self._send(401, {"details": "wrong user name or password"})
                elif not owner.anonymous:
                    return self._send(401, {"details": "credentials required"})
                if url.path != "/token" or query.get("service", [""])[0] != owner.service:
                    return self._send(400, {"details": "unknown service"})
                scopes = query.get("scope", [])
                owner.issued.append((user, scopes))
                token = owner._token(user, scopes)
                self._send(200, {"token": token, "access_token": token, "expires_in": owner.lifetime})

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, name="tvpack-token-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "TokenServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _yaml(value: dict, indent: str = "") -> str:
    """Block-style YAML for nested dicts of scalars (strings JSON-quoted, which YAML reads alike)."""
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{indent}{key}:\n{_yaml(item, indent + '  ')}")
        else:
            lines.append(f"{indent}{key}: {json.dumps(item)}\n")
    return "".join(lines)


class DistributionRegistry(ChildServer):
    """``docker-registry serve CONFIG`` on 127.0.0.1:<free port>, storage and logs under ``workdir``.

    ``users``: htpasswd basic auth. ``token_server``: bearer-token auth through a :class:`TokenServer`.
    ``tls``: HTTPS with a self-signed certificate (``ca_cert`` is the file to trust).
    ``proxy``: a pull-through cache of the registry at that URL (``proxy: {remoteurl: ...}``), as a Harbor
    proxy-cache project or a site mirror is; its access log and upstream's tell who fetched what.
    """

    def __init__(self, workdir, *, users: dict[str, str] | None = None, tls: bool = False,
                 token_server: TokenServer | None = None, binary: str | None = None, proxy: str | None = None):
        self.binary = binary or find_binary("docker-registry")
        self.workdir = Path(workdir).resolve() / f"registry-{secrets.token_hex(3)}"
        self.workdir.mkdir(parents=True)
        self.storage = self.workdir / "storage"
        self.users = dict(users or {})
        self.tls = tls
        self.token_server = token_server
        self.proxy = proxy
        self.port = free_port()
        self.log = self.workdir / "registry.log"
        self.conf = self.workdir / "config.yml"
        self.ca_cert: Path | None = None
        self._key: Path | None = None
        if users:
            find_binary("htpasswd")
        if tls:
            self.ca_cert, self._key = self_signed_cert(self.workdir)
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def config(self) -> str:
        config: dict = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if self.proxy:
            config["proxy"] = {"remoteurl": self.proxy}
        if self.tls:
            config["http"]["tls"] = {"certificate": str(self.ca_cert), "key": str(self._key)}
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(htpasswd_lines(self.users))
            config["auth"] = {"htpasswd": {"realm": "tvpack-test", "path": str(htpasswd)}}
        elif self.token_server is not None:
            t = self.token_server
            config["auth"] = {"token": {"realm": t.realm, "service": t.service, "issuer": t.issuer,
                                        "rootcertbundle": str(t.cert)}}
        return _yaml(config)

    def start(self) -> "DistributionRegistry":
        if self.proc is not None:
            return self
        self.conf.write_text(self.config())
        # The registry reads REGISTRY_<SECTION>_<KEY> variables as config overrides: REGISTRY_AUTH_FILE,
        # which clients read as the containers auth file, would become an "auth: file:" section.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._launch([self.binary, "serve", str(self.conf)], self.log, env=env)
        return self

    def requests(self) -> list[tuple[str, str, int, int]]:
        """``(method, path with query, status, body bytes sent)`` for every access-log line so far
        (once the log is quiet)."""
        text = settled_text(self.log)
        return [(m.group(1), m.group(2), int(m.group(3)), int(m.group(4)) if m.group(4).isdigit() else 0)
                for m in _ACCESS_LINE.finditer(text)]

    def user_agents(self) -> list[tuple[str, str, int, str]]:
        """``(method, path, status, user agent)`` for every access-log line so far (once the log is quiet):
        a pull-through cache's requests upstream carry distribution's agent, tvpack's carry ``tvpack``."""
        text = settled_text(self.log)
        return [(m.group(1), m.group(2), int(m.group(3)), m.group(4)) for m in _AGENT_LINE.finditer(text)]

    def uploads(self, repository: str | None = None) -> list[tuple[str, str, int, int]]:
        """Requests that move blob bytes in or open an upload (POST/PATCH/PUT to ``/blobs/uploads``)."""
        prefix = f"/v2/{repository}/blobs/uploads" if repository else None
        return [r for r in self.requests() if r[0] in ("POST", "PATCH", "PUT") and "/blobs/uploads" in r[1]
                and (prefix is None or r[1].startswith(prefix))]

    def blob_path(self, digest: str) -> Path:
        """The file holding blob ``digest`` in the filesystem storage driver's layout."""
        algorithm, _, hexdigest = digest.partition(":")
        return self.storage / "docker" / "registry" / "v2" / "blobs" / algorithm / hexdigest[:2] / hexdigest / "data"



def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()

