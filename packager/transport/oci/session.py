"""How the registry client sends: what may be retried and how long it waits, where credentials may go,
which redirects it follows, how big a parsed body may be. Pure helpers; :class:`.client.RegistryClient`
is the one caller."""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
import weakref
from typing import Callable
from urllib.parse import urljoin, urlsplit

from ...errors import OCIError
from .reference import MiB


class Retry(Exception):
    """A failure another attempt may heal; ``stalled``: the server did not answer, or too slowly."""

    def __init__(self, reason: str, *, stalled: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.stalled = stalled


# caps on what is parsed whole (containerd's limits for manifests; tokens and errors are small JSON)
TOKEN_CAP = 64 * 1024
ERROR_CAP = 64 * 1024
TAGS_CAP = 4 * MiB
REDIRECTS = (301, 302, 303, 307, 308)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``: what credentials are scoped to."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def netloc(url: str) -> str:
    return urlsplit(url).netloc or url


def take_location(response, **_kwargs):
    """A response hook: a redirect's Location moves to ``response.location`` before requests reads it
    (it would raise ValueError on a malformed one even with allow_redirects=False); we follow it."""
    response.location = response.headers.pop("Location", None) if response.status_code in REDIRECTS else None
    return response


def stderr_notice(message: str) -> None:
    print(f"tvpack: {message}", file=sys.stderr, flush=True)

def registry_errors(data: bytes) -> tuple[set[str], str]:
    """The error codes and first message of a distribution error body (``{"errors": [...]}``)."""
    try:
        errors = json.loads(data).get("errors") or []
    except (ValueError, AttributeError, RecursionError):
        return set(), ""
    if not isinstance(errors, list):
        return set(), ""
    codes = {str(e.get("code", "")) for e in errors if isinstance(e, dict)}
    messages = [str(e.get("message", "")) for e in errors if isinstance(e, dict) and e.get("message")]
    return codes, messages[0][:300] if messages else ""


class Attempts:
    """The attempts of one operation: counts them, announces each retry (a notice naming what is
    waited for), waits between them (ended early by the client's :class:`Cancel`), and gives up in
    one line when the retries, the stall retries or the client's ``max_time`` run out."""

    def __init__(self, client, what: str):
        self.client, self.what = client, what  # a RegistryClient: its policy, deadline, notify and cancel
        self.count = 0
        self.stalls = 0

    def wait(self, exc: Retry) -> None:
        client, policy = self.client, self.client.policy
        self.count += 1
        self.stalls += exc.stalled
        if self.count > policy.retries or self.stalls > policy.stall_retries:
            raise OCIError(f"{self.what}: {exc.reason} (gave up after {self.count} attempts)") from None
        delay = policy.delay(self.count)
        if client.deadline is not None and time.monotonic() + delay >= client.deadline:
            raise OCIError(f"{self.what}: {exc.reason}; gave up: not done within {policy.max_time:g} s "
                           "(--max-time)") from None
        client.notify(f"{self.what}: {exc.reason}; retrying")
        client.cancel.sleep(delay)


def redirect_target(url: str, response, what: str) -> str:
    """Where a redirect points: an absolute http(s) url, or a one-line OCIError naming the Location."""
    location = response.location
    where = f"{netloc(url)} answered HTTP {response.status_code} with"
    try:
        target = urljoin(url, location)
        parts = urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise OCIError(f"{what}: {where} a malformed Location {location[:200]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        scheme = f"a {parts.scheme}:// " if parts.scheme else "a malformed "
        raise OCIError(f"{what}: {where} {scheme}Location {location[:200]!r}; only http(s) redirects "
                       "are followed") from None
    return target


class Sockets:
    """The sockets of one client's connections, so that a watchdog thread can shut them down: a server
    that drips its status line and headers a byte at a time never trips a per-read timeout, and
    ``requests`` has no deadline for a whole answer. A client has one request in flight at a time."""

    def __init__(self):
        self._sockets: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self.fired = False

    def add(self, sock) -> None:
        with self._lock:
            self._sockets.add(sock)

    def shutdown(self) -> None:
        self.fired = True
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @contextlib.contextmanager
    def watch(self, seconds: float | None):
        """Shut the connections down if the block (sending a request, receiving the answer's
        headers) takes longer than ``seconds``; ``fired`` then says so."""
        self.fired = False
        if seconds is None:
            yield
            return
        timer = threading.Timer(max(seconds, 0.0), self.shutdown)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()


def watched_adapter(sockets: Sockets, before_send: Callable[[str], None]):
    """A ``requests`` adapter whose connections report their sockets to ``sockets`` when they connect;
    ``before_send(url)`` is called first for every request on the session (the client refuses there
    when offline: blob GETs of the transfer engine share the session, so they pass there too)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Plain(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            sockets.add(self.sock)

    class Secure(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            sockets.add(self.sock)

    pools = {"http": type("Pool", (HTTPConnectionPool,), {"ConnectionCls": Plain}),
             "https": type("SecurePool", (HTTPSConnectionPool,), {"ConnectionCls": Secure})}

    class Adapter(HTTPAdapter):
        def send(self, request, *args, **kwargs):
            before_send(request.url)
            return super().send(request, *args, **kwargs)

        def init_poolmanager(self, *args, **kwargs) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

    return Adapter()
