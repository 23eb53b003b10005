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


_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


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


# GET url with params and headers -> response (a connection failure already worded as OCIError)
TokenGet = Callable[[str, list, dict], object]


class Auth:
    """What one client knows to authenticate to one registry host: its credentials (looked up once,
    when a registry first asks), the bearer tokens it was given per scope, and whether it asked for
    basic auth (then sent with every request)."""

    def __init__(self, host: str, credentials: "Credentials | None | bool" = True):
        self.host = host
        self._lookup = credentials is True
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

    def answer(self, response, scope: str, repository: str | None, what: str, get: TokenGet) -> None:
        """Answer a 401's challenge (basic, or a bearer token from the realm); raise when we cannot."""
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        creds = self.creds(repository)
        if scheme == "basic":
            if creds is None:
                raise self.unauthorized(what, None)
            self.basic = True
            return
        if scheme != "bearer" or not params.get("realm"):
            raise self.unauthorized(what, creds)
        query = [("service", params["service"])] if params.get("service") else []
        # the challenge's scopes plus ours: the token is cached under ours, so it must grant it
        scopes = (params.get("scope") or "").split()
        query += [("scope", s) for s in scopes + ([scope] if scope and scope not in scopes else [])]
        headers = {"Authorization": creds.basic()} if creds else {}
        reply = get(params["realm"], query, headers)
        if reply.status_code in (401, 403):
            raise self.unauthorized(what, creds)
        if reply.status_code != 200:
            raise OCIError(f"{what}: token server {params['realm']} answered HTTP {reply.status_code}")
        try:
            body = reply.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise OCIError(f"{what}: token server {params['realm']} gave no token")
        self.tokens[scope] = token

    def refused(self, response, what: str, push: bool) -> OCIError:
        """The error for a second 401 in a row (a challenge answered and still refused)."""
        _, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if params.get("error") == "insufficient_scope" and self.credentials is not None:
            return OCIError(f"{what}: access denied: the credentials from {self.credentials.source} "
                            f"do not allow {'push' if push else 'pull'} here")
        return self.unauthorized(what, self.credentials)

    def unauthorized(self, what: str, creds: Credentials | None) -> OCIError:
        if creds is not None:
            return OCIError(f"{what}: unauthorized: the registry refused the credentials for {self.host} "
                            f"from {creds.source}")
        looked = ", ".join(str(p) for p in credential_files())
        return OCIError(f"{what}: unauthorized: no credentials for {self.host} in {looked} "
                        f"(tvpack login {self.host})")
