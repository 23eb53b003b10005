"""Registry authentication: credentials files and helpers, the stored login, ``WWW-Authenticate``
challenges and bearer tokens.

What docker, podman, skopeo and oras do: anonymous first; on a ``401`` the ``WWW-Authenticate``
challenge decides between HTTP basic and a bearer token fetched from the challenge's realm (with
basic credentials when there are any). Credentials come from the containers auth file and the docker
config (:func:`find_credentials`); :func:`save_login` stores them where podman and skopeo look first.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from ... import env
from ...errors import OCIError
from ...fsutil import atomic_write_json


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or token) for one registry, and the file they came from."""

    username: str
    password: str = field(repr=False)
    source: str = ""

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _home() -> Path:
    return Path(env.home_dir() or Path.home())


def auth_file_for_login() -> Path:
    """Where :func:`login` writes: ``REGISTRY_AUTH_FILE``, else ``$XDG_RUNTIME_DIR/containers/auth.json``,
    else ``/run/containers/<uid>/auth.json`` (podman's and skopeo's choice, in that order)."""
    if env.registry_auth_file():
        return Path(env.registry_auth_file())
    if env.xdg_runtime_dir():
        return Path(env.xdg_runtime_dir()) / "containers" / "auth.json"
    return Path(f"/run/containers/{os.getuid()}/auth.json")


def credential_files() -> list[Path]:
    """Every file searched for credentials, first match wins: the containers auth file (as
    :func:`auth_file_for_login`), ``~/.config/containers/auth.json``, then the docker config
    (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``)."""
    files = [auth_file_for_login(), _home() / ".config" / "containers" / "auth.json"]
    docker_dir = Path(env.docker_config_dir()) if env.docker_config_dir() else _home() / ".docker"
    files.append(docker_dir / "config.json")
    unique: list[Path] = []
    for path in files:
        if path not in unique:
            unique.append(path)
    return unique


def _key_host(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``: docker writes keys in several shapes."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            return key[len(prefix):].split("/", 1)[0]
    return key


_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io", "auth.docker.io"}


def _matches(key: str, host: str, repository: str | None) -> int:
    """How specifically an ``auths`` key names ``host`` (and ``repository``): 0 is no match; a key
    ``host/namespace`` (containers auth files) beats a bare ``host``."""
    if key.startswith(("https://", "http://")):
        key = _key_host(key)
    name, _, path = key.partition("/")
    hosts = _DOCKER_HUB if host in _DOCKER_HUB else {host}
    if name not in hosts:
        return 0
    if not path:
        return 1
    if repository and (repository == path or repository.startswith(path + "/")):
        return 1 + len(path)
    return 0


def _from_helper(helper: str, host: str, source: Path) -> Credentials | None:
    """``docker-credential-<helper> get`` (credsStore / credHelpers), when the helper is installed."""
    binary = shutil.which(f"docker-credential-{helper}")
    if binary is None:
        return None
    try:
        proc = subprocess.run([binary, "get"], input=host.encode(), capture_output=True, timeout=30, check=True)
        data = json.loads(proc.stdout)
        return Credentials(data["Username"], data["Secret"], f"{source} (credential helper {helper})")
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return None


def _decode_auth(entry: dict, source: Path) -> Credentials | None:
    auth = entry.get("auth") if isinstance(entry, dict) else None
    if not auth:
        return None
    try:
        user, sep, password = base64.b64decode(auth).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        raise OCIError(f"{source}: malformed 'auth' entry (expected base64 of user:password)") from None
    return Credentials(user, password, str(source)) if sep else None


def find_credentials(host: str, repository: str | None = None, files: list[Path] | None = None) -> Credentials | None:
    """The first credentials for ``host`` (``host:port`` as written in the reference) in
    :func:`credential_files`: ``auths`` entries (base64 ``user:password``), then ``credHelpers`` and
    ``credsStore`` of the same file. A malformed file is an :class:`OCIError` naming it."""
    for path in files if files is not None else credential_files():
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise OCIError(f"cannot read credentials from {path}: {exc}") from None
        if not isinstance(config, dict):
            continue
        auths = config.get("auths") if isinstance(config.get("auths"), dict) else {}
        ranked = sorted(((_matches(key, host, repository), key) for key in auths), reverse=True)
        for rank, key in ranked:
            if rank and (creds := _decode_auth(auths[key], path)):
                return creds
        helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
        if helper and (creds := _from_helper(helper, host, path)):
            return creds
    return None



def save_login(host: str, username: str, password: str) -> Path:
    """Store ``username``/``password`` for ``host`` in the containers auth file (mode 0600, written
    atomically, other entries kept); returns the file written. :func:`login` checks them first."""
    path = auth_file_for_login()
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        config = {}
    except (OSError, ValueError) as exc:
        raise OCIError(f"cannot update {path}: {exc}") from None
    auths = config.setdefault("auths", {})
    auths[host] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(path, config, indent=1, newline=True, mode=0o600)
    except OSError as exc:
        raise OCIError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# -- challenges and tokens ---------------------------------------------------------------------------

def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="https://a/token",service="reg",scope="repository:x:pull"`` -> scheme, params."""
    scheme, _, rest = header.strip().partition(" ")
    params = {key.lower(): value for key, value in re.findall(r'([A-Za-z_]+)="([^"]*)"', rest)}
    return scheme.lower(), params


# GET url with params, sending auth (only to the url's own origin) -> (status, body read with a cap)
TokenGet = Callable[[str, list, dict], "tuple[int, bytes]"]


def _hostname(host_or_url: str) -> str:
    netloc = urlsplit(host_or_url).netloc if "://" in host_or_url else host_or_url
    return (urlsplit("//" + netloc).hostname or "").lower()


def _same_operator(registry_host: str, realm: str) -> bool:
    """The token realm is run by whoever runs the registry: the same host name (any port), or Docker
    Hub's own family of hosts (its registry sends clients to auth.docker.io)."""
    a, b = _hostname(registry_host), _hostname(realm)
    return a == b or (a in _DOCKER_HUB and b in _DOCKER_HUB)


class Auth:
    """What one client knows to authenticate to one registry host: its credentials (looked up once,
    when a registry first asks), the bearer tokens it was given per scope, and whether it asked for
    basic auth (then sent with every request).

    Credentials stay with the registry they belong to: a token realm on another host gets only that
    host's own credentials (looked up for it), and a password never goes to a realm over plain
    ``http://`` unless the registry itself is reached over plain HTTP (``--plain-http``)."""

    def __init__(self, host: str, credentials: "Credentials | None | bool" = True, *, plain_http: bool = False):
        self.host = host
        self.plain_http = plain_http
        self._lookup = self._files = credentials is True  # look credentials up in the files (once per host)
        self.credentials = credentials if isinstance(credentials, Credentials) else None
        self.tokens: dict[str, str] = {}  # scope -> bearer token
        self.basic = False  # the registry asked for basic auth: send it with every request

    def creds(self, repository: str | None) -> Credentials | None:
        if self.credentials is None and self._lookup:
            self.credentials = find_credentials(self.host, repository)
            self._lookup = False
        return self.credentials

    def header(self, scope: str) -> dict[str, str]:
        # a token that may push to a repository may also pull from it
        for held in (scope, scope + ",push" if scope.endswith(":pull") else scope):
            if held in self.tokens:
                return {"Authorization": f"Bearer {self.tokens[held]}"}
        if self.basic and self.credentials is not None:
            return {"Authorization": self.credentials.basic()}
        return {}

    def _realm_creds(self, realm: str, repository: str | None, what: str) -> Credentials | None:
        """The credentials to send to token realm ``realm``, if any; refuses clear text."""
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OCIError(f"{what}: the registry names a token server {realm[:200]!r} that is not an http(s) url")
        if _same_operator(self.host, realm):
            creds = self.creds(repository)
        else:  # another host: its own credentials, never the registry's
            creds = find_credentials(parts.netloc) if self._files else None
        if creds is not None and parts.scheme == "http" and not self.plain_http:
            raise OCIError(f"{what}: the registry sends clients to a token server over plain http ({realm}); "
                           f"refusing to send the password for {parts.netloc} in clear text")
        return creds

    def answer(self, response, scope: str, repository: str | None, what: str, get: TokenGet) -> None:
        """Answer a 401's challenge (basic, or a bearer token from the realm); raise when we cannot."""
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            creds = self.creds(repository)
            if creds is None:
                raise self.unauthorized(what, None)
            self.basic = True
            return
        if scheme != "bearer" or not params.get("realm"):
            raise self.unauthorized(what, self.creds(repository))
        realm = params["realm"]
        creds = self._realm_creds(realm, repository, what)
        query = [("service", params["service"])] if params.get("service") else []
        # the challenge's scopes plus ours: the token is cached under ours, so it must grant it
        scopes = (params.get("scope") or "").split()
        query += [("scope", s) for s in scopes + ([scope] if scope and scope not in scopes else [])]
        status, data = get(realm, query, {"Authorization": creds.basic()} if creds else {})
        if status in (401, 403):
            raise self.unauthorized(what, creds, realm)
        if status != 200:
            raise OCIError(f"{what}: token server {realm} answered HTTP {status}")
        self.tokens[scope] = _token_of(data, realm, what)

    def refused(self, response, what: str, push: bool) -> OCIError:
        """The error for a second 401 in a row (a challenge answered and still refused)."""
        _, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if params.get("error") == "insufficient_scope" and self.credentials is not None:
            return OCIError(f"{what}: access denied: the credentials from {self.credentials.source} "
                            f"do not allow {'push' if push else 'pull'} here")
        return self.unauthorized(what, self.credentials)

    def unauthorized(self, what: str, creds: Credentials | None, realm: str | None = None) -> OCIError:
        host = urlsplit(realm).netloc if realm and not _same_operator(self.host, realm) else self.host
        if creds is not None:
            return OCIError(f"{what}: unauthorized: the registry refused the credentials for {host} "
                            f"from {creds.source}")
        looked = ", ".join(str(p) for p in credential_files())
        return OCIError(f"{what}: unauthorized: no credentials for {host} in {looked} "
                        f"(tvpack login {host})")


def _token_of(data: bytes, realm: str, what: str) -> str:
    """The bearer token in a token server's answer (``token`` or ``access_token``, a string of
    printable ASCII): anything else is the token server's fault, not the credentials'."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise OCIError(f"{what}: token server {realm} answered with something other than a JSON object; "
                       "it gave no token")
    token = body.get("token") or body.get("access_token")
    if not token:
        raise OCIError(f"{what}: token server {realm} gave no token")
    if not isinstance(token, str) or not token.isascii() or not token.isprintable() or " " in token:
        raise OCIError(f"{what}: token server {realm} gave a malformed token ({type(token).__name__} "
                       f"{str(token)[:40]!r}); the token server is at fault, not the credentials")
    return token
