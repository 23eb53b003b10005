"""The OCI distribution protocol: blobs and manifests moved to and from a registry, checked by digest.

    ref = parse_reference("oci://127.0.0.1:5000/models/resnet:v1")
    client = RegistryClient(ref.host, plain_http=True)       # TLS unless plain_http
    if client.blob_exists(ref.repository, digest) is None and not client.mount_blob(ref.repository, digest, "other"):
        client.push_blob(ref.repository, path, size=size, digest=digest, on_bytes=bar.update)
    client.put_manifest(ref.repository, ref.reference, manifest_bytes, OCI_MANIFEST)
    manifest = client.get_manifest(ref.repository, ref.reference)     # (data, media_type, digest), verified
    client.pull_blob(ref.repository, digest, dest, size=size)          # sha256 checked while streaming, resumable
    client.stream_blob(ref.repository, digest, out.write, size=size)   # the same, into a caller's sink

Authentication is :mod:`.auth`; :func:`login` checks a password against the registry and stores it
where podman and skopeo look first.

Why our own code on ``requests`` rather than oras-py: oras-py reads a monolithic blob into memory,
cannot compute a digest while uploading, ignores ``OCI-Chunk-Min-Length``, neither verifies nor
resumes pulls, raises ``ValueError`` without the registry's error code, reads only the docker config
(not the containers auth file, not ``https://host`` keys) and its login writes the docker config.
What it would contribute (a challenge parser, a base64 helper) is a few lines.

A client is not thread-safe (one ``requests.Session``): use one per thread.
Importing this module never imports torch.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple
from urllib.parse import quote, urlencode, urljoin, urlsplit

from ... import env
from ...errors import OCIError, OfflineError
from ..bodies import Pace, TooSlow, read_capped
from ..stream import Cancel
from .auth import Auth, Credentials, save_login
from .reference import MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE, MiB, _check_digest, digest_of, is_loopback
from .session import (
    ERROR_CAP,
    REDIRECTS,
    TAGS_CAP,
    TOKEN_CAP,
    Attempts,
    Retry,
    Sockets,
    netloc,
    origin,
    redirect_target,
    registry_errors,
    stderr_notice,
    take_location,
    watched_adapter,
)

USER_AGENT = "tvpack"

ProgressFn = Callable[[int], None]  # called with the number of new bytes


def login(host: str, username: str, password: str, *, plain_http: bool = False, policy: "Policy | None" = None,
          offline: bool | None = None) -> Path:
    """Check ``username``/``password`` against the registry at ``host`` (``GET /v2/`` through its
    challenge), then store them in the containers auth file (mode 0600, written atomically, other
    entries kept). Returns the file written."""
    creds = Credentials(username, password, "the password given to login")
    client = RegistryClient(host, plain_http=plain_http, credentials=creds, policy=policy, offline=offline)
    client.ping()
    return save_login(host, username, password)


@dataclass(frozen=True)
class Policy:
    """How hard the client tries (seconds, counts), HTTP fetch's model (:class:`..stream.Policy`).

    Retries of transient failures (5xx, 408, 429, resets, timeouts; never another 4xx) with
    exponential backoff, each announced by a notice; a server that does not answer within
    ``read_timeout`` (or sends a body slower than ``speed_limit`` bytes/s over ``speed_time``) is
    retried ``stall_retries`` times only: one that stalls twice will not heal by waiting longer.
    ``max_time``: seconds for everything one client does (None: no limit); blob GETs (:mod:`.blobs`, the
    transfer engine) apply ``speed_limit``/``speed_time`` and ``max_time`` to each blob, retries included.
    ``commit_timeout``: how long a registry may take to answer an upload's last request (it may copy
    the blob in storage).
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 4
    stall_retries: int = 1
    backoff: float = 0.5
    max_backoff: float = 20.0
    speed_limit: float = 1024.0
    speed_time: float = 30.0
    max_time: float | None = None
    commit_timeout: float = 300.0
    max_redirects: int = 10
    chunk_size: int = 64 * MiB  # PATCH size of a chunked upload; larger blobs than this go up in chunks
    read_size: int = 1 * MiB  # bytes per read while streaming
    # a blob of at least segment_threshold bytes comes in ranges over up to ``connections`` connections
    connections: int = 8
    segment_size: int = 16 * MiB
    segment_threshold: int = 64 * MiB

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


_Retry = Retry  # the name the blob code raises


class Manifest(NamedTuple):
    data: bytes
    media_type: str
    digest: str


class _HashingReader:
    """A file-like body for ``requests``: reads at most ``limit`` bytes of ``f``, hashing and
    reporting them; ``len()`` gives requests the Content-Length."""

    def __init__(self, f: BinaryIO, limit: int, hasher, on_bytes: ProgressFn | None):
        self.f, self.left, self.hasher, self.on_bytes = f, limit, hasher, on_bytes
        self.length = limit

    def __len__(self) -> int:
        return self.length

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        if not data:
            raise OCIError(f"blob source ended {self.left} bytes early")
        self.left -= len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        return data


class _Progress:
    """Bytes sent in this attempt, reported to ``on_bytes``; ``rewind`` reports them back (negative)
    when an attempt is abandoned and its bytes will be sent again."""

    def __init__(self, on_bytes: ProgressFn | None):
        self.on_bytes = on_bytes
        self.sent = 0

    def __call__(self, n: int) -> None:
        self.sent += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def rewind(self) -> None:
        if self.sent:
            self(-self.sent)


def _opener(source) -> Callable[[], BinaryIO]:
    if callable(source):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        import io

        data = bytes(source)
        return lambda: io.BytesIO(data)
    return lambda: open(source, "rb")


class RegistryClient:
    """The distribution API of one registry host. Repositories are passed per call.

    Every request goes through :meth:`_send`: the one place that refuses the network when offline,
    scopes ``Authorization`` to the host it belongs to, follows redirects (http(s) only, at most
    ``policy.max_redirects``) and bounds each wait by the policy's timeouts and deadline."""

    def __init__(self, host: str, *, plain_http: bool = False, credentials: Credentials | None | bool = True,
                 policy: Policy | None = None, session=None, offline: bool | None = None,
                 notify: Callable[[str], None] | None = None, cancel: Cancel | None = None):
        """``credentials``: ``True`` looks them up (:func:`find_credentials`) when a registry asks;
        ``None``/``False`` stays anonymous; a :class:`Credentials` is used as given. ``offline``
        (None: ``TVPACK_OFFLINE``) refuses every request with :class:`OfflineError`. ``notify``
        receives the notices of retries (default: stderr); ``cancel`` ends retry waits early."""
        import requests

        self.host = host
        self.plain_http = plain_http
        self.policy = policy or Policy()
        self.base = f"{'http' if plain_http else 'https'}://{host}"
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self._sockets = Sockets()
        adapter = watched_adapter(self._sockets, lambda url: self._refuse_offline(url, f"oci://{self.host}"))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.auth = Auth(host, credentials, plain_http=plain_http)
        self.offline = env.offline() if offline is None else offline
        self.notify = notify or stderr_notice
        self.cancel = cancel or Cancel()
        self.deadline = None if self.policy.max_time is None else time.monotonic() + self.policy.max_time
        self._max_body: int | None = None  # a request body this large was refused (HTTP 413): stay below it

    # -- sending: offline, credentials scoped to their host, redirects, timeouts --

    def sibling(self) -> "RegistryClient":
        """A client like this one (host, credentials, policy, offline, notices, Cancel, and the deadline: --max-time
        bounds the whole command, not each worker) with a session of its own, for another thread: a client is not
        thread-safe."""
        credentials = self.auth.credentials or (True if getattr(self.auth, "_files", False) else None)
        twin = RegistryClient(self.host, plain_http=self.plain_http, credentials=credentials, policy=self.policy,
                              offline=self.offline, notify=self.notify, cancel=self.cancel)
        twin.deadline = self.deadline
        return twin

    def _timeouts(self, what: str, read: float | None = None) -> tuple[float, float]:
        connect, read = self.policy.connect_timeout, read or self.policy.read_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise OCIError(f"{what}: not done within {self.policy.max_time:g} s (--max-time)")
            connect, read = min(connect, left), min(read, left)
        return connect, read

    def _refuse_offline(self, url: str, what: str) -> None:
        if self.offline:
            raise OfflineError(f"{what}: offline mode (TVPACK_OFFLINE=1 or --offline): not connecting to "
                               f"{netloc(url)}")

    def _answer_limit(self, timeouts: tuple[float, float], body) -> float | None:
        """Seconds a whole answer's status line and headers may take: connect + read timeout for a
        request without a body (an upload's body may take long to send: only the deadline bounds it)."""
        limit = None if body else timeouts[0] + timeouts[1]
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            limit = left if limit is None else min(limit, left)
        return limit

    def _pace(self) -> Pace:
        return Pace(self.policy.speed_limit, self.policy.speed_time, self.deadline)

    def _send(self, method: str, url: str, *, what: str, auth: dict[str, str], auth_url: str | None = None,
              body=None, headers: dict | None = None, params=None, read_timeout: float | None = None):
        """One request, its redirects followed here: ``auth`` goes only to the origin of ``auth_url``
        (default: the registry), never to another host or over a downgrade to http. Always streamed:
        a body is read by the caller, with a cap. Raises OfflineError, OCIError (one line) or _Retry."""
        import requests

        self._refuse_offline(url, what)
        owner = origin(auth_url or self.base)
        for _hop in range(self.policy.max_redirects + 1):
            timeouts = self._timeouts(what, read_timeout)
            try:
                with self._sockets.watch(self._answer_limit(timeouts, body)):
                    response = self.session.request(
                        method, url, data=body() if body else None, params=params, stream=True,
                        allow_redirects=False, headers={**(headers or {}), **(auth if origin(url) == owner else {})},
                        timeout=timeouts, hooks={"response": take_location})
            except requests.exceptions.SSLError as exc:
                raise self._connection_error(exc, what, url) from None
            except requests.exceptions.Timeout as exc:
                connect, read = timeouts
                wait = connect if isinstance(exc, requests.exceptions.ConnectTimeout) else read
                raise _Retry(f"no answer from {netloc(url)} for {wait:.3g} s", stalled=True) from None
            except requests.exceptions.ConnectionError as exc:
                if self._sockets.fired:  # the watchdog: the answer's headers did not come in time
                    limit = self._answer_limit(timeouts, body)
                    raise _Retry(f"no answer from {netloc(url)} for {limit:.3g} s", stalled=True) from None
                error = self._connection_error(exc, what, url)
                if "connection refused" in error.message or "cannot resolve" in error.message:
                    raise error from None
                raise _Retry(error.message[len(what) + 2:]) from None
            except (requests.exceptions.RequestException, ValueError) as exc:
                raise OCIError(f"{what}: cannot send a request to {url!r} ({type(exc).__name__})") from None
            if response.status_code not in REDIRECTS or response.location is None:
                return response
            response.close()
            url = redirect_target(url, response, what)
            params = None
            if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None
        raise OCIError(f"{what}: {netloc(url)} redirects in a loop (more than {self.policy.max_redirects} "
                       f"redirects, the last to {url})")

    def _token_get(self, what: str):
        """How :class:`Auth` fetches a token: a GET with our timeouts and redirect rules; ``auth`` goes
        to the realm's own origin only. Returns the status and the body, read with a cap."""
        import requests
        import urllib3

        def get(url: str, params: list, auth: dict[str, str]) -> tuple[int, bytes]:
            reply = self._send("GET", url, what=what, auth=auth, auth_url=url, params=params)
            try:
                return reply.status_code, read_capped(reply, TOKEN_CAP, "token response", error=OCIError,
                                                      pace=self._pace())
            except OCIError as exc:
                raise OCIError(f"{what}: {exc.message}") from None
            except TooSlow as exc:
                raise _Retry(exc.reason, stalled=True) from None
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise _Retry(f"the token server {netloc(url)} broke off ({type(exc).__name__})") from None
        return get

    def _authenticate(self, response, scope: str, repository: str | None, what: str) -> None:
        self.auth.answer(response, scope, repository, what, self._token_get(what))

    def _connection_error(self, exc: BaseException, what: str, url: str | None = None) -> OCIError:
        import requests

        target = url or self.base
        text = str(exc)
        if isinstance(exc, requests.exceptions.SSLError) or "CERTIFICATE_VERIFY_FAILED" in text:
            reason = "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text \
                else "TLS handshake failed"
            if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
                reason = "TLS handshake failed (the server may speak plain HTTP)"
            hint = "set REQUESTS_CA_BUNDLE to the registry's CA certificate"
            if is_loopback(self.host):
                hint += ", or use --plain-http for a registry without TLS"
            return OCIError(f"{what}: TLS error talking to {target}: {reason}", hint=hint)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return OCIError(f"{what}: connect timeout to {target}")
        if "Connection refused" in text or "NewConnectionError" in text:
            return OCIError(f"{what}: cannot connect to {target}: connection refused")
        if "Failed to resolve" in text or "Name or service not known" in text:
            return OCIError(f"{what}: cannot resolve {self.host}")
        if isinstance(exc, requests.exceptions.ReadTimeout) or "timed out" in text:
            return OCIError(f"{what}: read timeout from {target}")
        return OCIError(f"{what}: connection to {target} failed ({type(exc).__name__})")

    def _fail(self, response, what: str) -> OCIError:
        try:
            data = read_capped(response, ERROR_CAP, f"HTTP {response.status_code} error body", error=OCIError,
                               pace=self._pace())
        except OCIError as exc:
            return OCIError(f"{what}: {exc.message}")
        except Exception:  # noqa: BLE001 - an error body that breaks off still leaves the status to report
            data = b""
        codes, message = registry_errors(data)
        status = response.status_code
        detail = f": {message}" if message else ""
        if status == 400 and self.plain_http and b"HTTPS server" in data:
            return OCIError(f"{what}: the registry speaks HTTPS; drop --plain-http")
        if codes & {"NAME_UNKNOWN"}:
            return OCIError(f"{what}: repository not found{detail}")
        if codes & {"MANIFEST_UNKNOWN"}:
            return OCIError(f"{what}: tag or manifest not found{detail}")
        if codes & {"BLOB_UNKNOWN"}:
            return OCIError(f"{what}: blob not found{detail}")
        if codes & {"MANIFEST_INVALID", "UNSUPPORTED", "MANIFEST_BLOB_UNKNOWN"} or status == 415:
            return OCIError(f"{what}: the registry rejected the manifest or its media type "
                            f"({', '.join(sorted(codes)) or f'HTTP {status}'}{detail})")
        if codes & {"DIGEST_INVALID", "BLOB_UPLOAD_INVALID", "SIZE_INVALID"}:
            return OCIError(f"{what}: the registry rejected the upload ({', '.join(sorted(codes))}{detail})")
        if status == 403 or codes & {"DENIED"}:
            return OCIError(f"{what}: access denied{detail}")
        if status == 404:
            return OCIError(f"{what}: not found (HTTP 404){detail}")
        return OCIError(f"{what}: HTTP {status} {response.reason or ''}".rstrip() + detail)

    def _request(self, method: str, url: str, *, what: str, repository: str | None = None, push: bool = False,
                 ok: tuple[int, ...] = (200,), body=None, headers: dict | None = None, stream: bool = True,
                 params=None, read_timeout: float | None = None):
        """One API call: authenticated (answering at most one challenge per scope), retried on
        transient failures; returns the response (streamed: read its body with a cap, or close it)
        when its status is in ``ok``. ``body`` is a callable making a fresh request body per attempt
        (a stream cannot be sent twice)."""
        url = url if url.startswith(("http://", "https://")) else self.base + url
        # no scope for /v2/ itself: a token server may refuse one we have no business asking for
        scope = f"repository:{repository}:{'pull,push' if push else 'pull'}" if repository else ""
        attempts = Attempts(self, what)
        challenged = False
        while True:
            try:
                response = self._send(method, url, what=what, auth=self.auth.header(scope), body=body,
                                      headers=headers, params=params, read_timeout=read_timeout)
                if response.status_code == 401 and not challenged:
                    response.close()
                    challenged = True
                    self._authenticate(response, scope, repository, what)
                    continue
                if response.status_code == 401:
                    response.close()
                    raise self.auth.refused(response, what, push)
                if response.status_code in ok:
                    return response
                if response.status_code in (408, 429) or response.status_code >= 500:
                    response.close()
                    raise _Retry(f"HTTP {response.status_code}")
                raise self._fail(response, what)
            except _Retry as exc:
                attempts.wait(exc)

    def _read(self, url: str, cap: int, kind: str, *, what: str, repository: str | None = None,
              headers: dict | None = None):
        """GET a body that is parsed whole: ``(response, at most cap bytes)``, read at the policy's
        pace; a body that breaks off or trickles is fetched again (one line when it gives up)."""
        import requests
        import urllib3

        attempts = Attempts(self, what)
        while True:
            response = self._request("GET", url, what=what, repository=repository, headers=headers)
            try:
                return response, read_capped(response, cap, kind, error=OCIError, pace=self._pace())
            except OCIError as exc:
                raise OCIError(f"{what}: {exc.message}") from None
            except TooSlow as exc:
                attempts.wait(_Retry(exc.reason, stalled=True))
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                stalled = "timed out" in str(exc).lower()
                reason = f"no answer from {netloc(url)} for {self.policy.read_timeout:g} s" if stalled \
                    else f"{netloc(url)} broke off the {kind} ({type(exc).__name__})"
                attempts.wait(_Retry(reason, stalled=stalled))

    def _url(self, repository: str, kind: str, reference: str = "") -> str:
        return f"/v2/{repository}/{kind}/{quote(reference, safe=':')}" if reference else f"/v2/{repository}/{kind}/"

    def ping(self) -> None:
        """``GET /v2/``: reachable, speaks the distribution API, and accepts us (answering a challenge)."""
        self._request("GET", "/v2/", what=f"oci://{self.host}").close()

    # -- blobs --

    def blob_exists(self, repository: str, digest: str, *, for_push: bool = False) -> int | None:
        """The size of the blob if ``repository`` has it (HEAD), else None. ``for_push``: ask for
        push access right away (one token for the HEAD and the upload that may follow)."""
        _check_digest(digest)
        what = f"oci://{self.host}/{repository}@{digest}"
        response = self._request("HEAD", self._url(repository, "blobs", digest), what=what, repository=repository,
                                 ok=(200, 404), push=for_push)
        response.close()
        if response.status_code == 404:
            return None
        return int(response.headers.get("Content-Length") or 0)

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Ask the registry to link a blob it holds in ``from_repository`` into ``repository`` (no
        bytes move). False when it declines (it then opens an upload session, which we cancel)."""
        _check_digest(digest)
        what = f"oci://{self.host}/{repository}@{digest}"
        response = self._request("POST", self._url(repository, "blobs", "uploads") + "/", what=what,
                                 repository=repository, push=True, ok=(201, 202),
                                 params={"mount": digest, "from": from_repository})
        response.close()
        if response.status_code == 201:
            return True
        location = response.headers.get("Location")
        if location:
            try:  # an abandoned session would be garbage-collected anyway; cancelling is courtesy
                self._request("DELETE", urljoin(self.base + "/", location), what=what, repository=repository,
                              push=True, ok=(200, 202, 204, 404)).close()
            except OCIError:
                pass
        return False

    def ensure_blob(self, repository: str, source, *, size: int, digest: str, mount_from: tuple[str, ...] = (),
                    on_bytes: ProgressFn | None = None) -> str:
        """Make sure ``repository`` has blob ``digest``, moving as few bytes as possible: ``"exists"``
        (HEAD), ``"mounted"`` (from the first of ``mount_from`` that has it), or ``"pushed"``. An
        interrupted push re-run this way sends only the blobs that did not make it."""
        if self.blob_exists(repository, digest, for_push=True) is not None:
            return "exists"
        for other in mount_from:
            if other != repository and self.mount_blob(repository, digest, other):
                return "mounted"
        self.push_blob(repository, source, size=size, digest=digest, on_bytes=on_bytes)
        return "pushed"

    def push_blob(self, repository: str, source, *, size: int, digest: str | None = None,
                  on_bytes: ProgressFn | None = None, chunk_size: int | None = None) -> str:
        """Upload ``size`` bytes from ``source`` (a path, bytes, or an opener returning a binary file)
        and return the blob's digest. With ``digest`` given and ``size <= chunk_size``: one monolithic
        PUT; otherwise PATCH chunks (at least the registry's ``OCI-Chunk-Min-Length``), the digest
        computed while the bytes go up. Skipping blobs that exist (:meth:`blob_exists`) is the
        caller's choice. A transient failure restarts the blob in a new upload session."""
        if digest is not None:
            _check_digest(digest)
        chunk_size = chunk_size or self.policy.chunk_size
        open_source = _opener(source)
        what = f"oci://{self.host}/{repository}" + (f"@{digest}" if digest else " (blob upload)")
        attempts = Attempts(self, what)
        progress = _Progress(on_bytes)
        while True:
            try:
                return self._upload(repository, open_source, size, digest, progress, chunk_size, what)
            except _Retry as exc:
                progress.rewind()  # the bar goes back: these bytes will be sent again
                attempts.wait(exc)

    def _upload(self, repository, open_source, size, digest, progress: "_Progress", chunk_size, what) -> str:
        import requests

        start = self._request("POST", self._url(repository, "blobs", "uploads") + "/", what=what,
                              repository=repository, push=True, ok=(202,), headers={"Content-Length": "0"})
        start.close()
        location = self._location(start, what)
        min_chunk = int(start.headers.get("OCI-Chunk-Min-Length") or 0)
        chunk_size = max(min(chunk_size, self._max_body or chunk_size), min_chunk)
        octets = {"Content-Type": "application/octet-stream"}
        try:
            with open_source() as f:
                if digest is not None and size <= chunk_size:
                    def body() -> _HashingReader:  # a fresh body per attempt (retries, auth challenges)
                        f.seek(0)
                        progress.rewind()
                        return _HashingReader(f, size, None, progress)
                    response = self._request("PUT", self._with_digest(location, digest), what=what,
                                             repository=repository, push=True, ok=(201, 413), headers=octets,
                                             body=body, read_timeout=self.policy.commit_timeout)
                    response.close()
                    if response.status_code != 413:
                        return self._check_pushed(response, digest, what)
                    # refused by the registry or a proxy before it (nginx's default limit is 1 MB): the
                    # session never saw the bytes, so they go up again in smaller chunks
                    chunk_size = self._smaller_body(size, min_chunk, what)
                    f.seek(0)
                    progress.rewind()
                location, computed = self._patch_chunks(f, location, size, chunk_size, min_chunk, repository,
                                                        progress, what)
                if digest is not None and computed != digest:
                    raise OCIError(f"{what}: the source's bytes do not match the digest: expected {digest}, "
                                   f"got {computed}")
        except requests.exceptions.SSLError as exc:
            raise self._connection_error(exc, what) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _Retry(self._connection_error(exc, what).message[len(what) + 2:]) from None
        except OSError as exc:
            raise OCIError(f"{what}: cannot read the blob source: {exc.strerror or exc}") from None
        response = self._request("PUT", self._with_digest(location, computed), what=what, repository=repository,
                                 push=True, ok=(201,), headers={"Content-Length": "0"},
                                 read_timeout=self.policy.commit_timeout)
        response.close()
        return self._check_pushed(response, computed, what)

    def _patch_chunks(self, f, location: str, size: int, chunk_size: int, min_chunk: int, repository: str,
                      progress: "_Progress", what: str) -> tuple[str, str]:
        """PATCH ``size`` bytes of ``f`` in chunks to an upload session; returns the session's last
        location and the digest of the bytes sent. A chunk refused for an expired token or as too large
        is sent again (under a fresh token, in smaller chunks); other failures restart the blob."""
        hasher = hashlib.sha256()
        offset = 0
        scope = f"repository:{repository}:pull,push"
        reauthenticated = False
        while offset < size:
            n = min(chunk_size, size - offset)
            headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + n - 1}"}
            before, sent_before = hasher.copy(), progress.sent
            chunk = _HashingReader(f, n, hasher, progress)
            response = self._send("PATCH", location, what=what, auth=self.auth.header(scope),
                                  body=lambda chunk=chunk: chunk, headers=headers,
                                  read_timeout=self.policy.commit_timeout)
            if response.status_code in (202, 401, 413):
                response.close()
            if response.status_code == 401 and not reauthenticated and f.seekable():
                # a token expired during a long upload: the registry refused this chunk
                # before storing any of it, so it can be sent again under a fresh token
                reauthenticated = True
                self.auth.tokens.pop(scope, None)
                self._authenticate(response, scope, repository, what)
                hasher = before
                progress(sent_before - progress.sent)
                f.seek(offset)
                continue
            # other failures restart the whole blob: how much of a half-sent PATCH the
            # registry kept is not something every registry reports reliably
            if response.status_code == 413:  # too large for the registry or a proxy: smaller chunks
                chunk_size = self._smaller_body(n, min_chunk, what)
                hasher = before
                progress(sent_before - progress.sent)
                f.seek(offset)
                continue
            if response.status_code in (408, 429) or response.status_code >= 500:
                response.close()
                raise _Retry(f"HTTP {response.status_code} during a chunk upload")
            if response.status_code != 202:
                raise self._fail(response, what)
            location = self._location(response, what)
            offset += n
            reauthenticated = False
        return location, "sha256:" + hasher.hexdigest()

    _MIN_BODY = 256 * 1024  # smaller chunks than this are not worth trying

    def _smaller_body(self, refused: int, min_chunk: int, what: str) -> int:
        """The chunk size to try after a body of ``refused`` bytes got HTTP 413 (remembered for later blobs)."""
        smaller = refused // 2
        if smaller < max(self._MIN_BODY, min_chunk):
            limit = f"; the registry wants chunks of at least {min_chunk} bytes" if min_chunk > smaller else ""
            raise OCIError(f"{what}: the registry, or a proxy in front of it, refuses request bodies of "
                           f"{refused} bytes (HTTP 413){limit}: raise its limit (nginx: client_max_body_size 0)")
        self._max_body = smaller
        return smaller

    def _location(self, response, what: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise OCIError(f"{what}: the registry opened an upload session without a Location")
        # registries may answer with a path only: relative to the url that answered (RFC 9110)
        try:
            target = urljoin(getattr(response, "url", None) or self.base + "/", location)
            parts = urlsplit(target)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise OCIError(f"{what}: the registry opened an upload session at {location[:200]!r}, "
                           "which is not an http(s) url")
        return target

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        return location + ("&" if urlsplit(location).query else "?") + urlencode({"digest": digest})

    @staticmethod
    def _check_pushed(response, digest: str, what: str) -> str:
        stored = response.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise OCIError(f"{what}: the registry stored digest {stored}, expected {digest}")
        return digest

    def pull_blob(self, repository: str, digest: str, dest, *, size: int | None = None, part=None,
                  on_bytes: ProgressFn | None = None, cancel=None) -> int:
        """:func:`.blobs.pull_blob`: the blob into ``<dest>.part``, digest-checked, resumed, renamed."""
        from .blobs import pull_blob

        return pull_blob(self, repository, digest, dest, size=size, part=part, on_bytes=on_bytes, cancel=cancel)

    def stream_blob(self, repository: str, digest: str, write: Callable[[bytes], object], *, size: int,
                    on_bytes: ProgressFn | None = None, cancel=None) -> None:
        """:func:`.blobs.stream_blob`: the blob into ``write``, digest-checked, resumed within the call."""
        from .blobs import stream_blob

        stream_blob(self, repository, digest, write, size=size, on_bytes=on_bytes, cancel=cancel)

    def blob_ranges(self, repository: str, digest: str, target, *, size: int, observe: Callable[[bytes], object],
                    on_bytes: ProgressFn | None = None, cancel=None) -> bool:
        """:func:`.blobs.blob_ranges`: a large blob in ranges at a caller's offsets (False: stream it instead)."""
        from .blobs import blob_ranges

        return blob_ranges(self, repository, digest, target, size=size, observe=observe, on_bytes=on_bytes,
                           cancel=cancel)

    # -- manifests --

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag (or its own digest); returns its digest."""
        digest = digest_of(data)
        what = f"oci://{self.host}/{repository}:{reference}" if not reference.startswith("sha256:") \
            else f"oci://{self.host}/{repository}@{reference}"
        if reference.startswith("sha256:") and reference != digest:
            raise OCIError(f"{what}: the manifest's digest is {digest}")
        response = self._request("PUT", self._url(repository, "manifests", reference), what=what,
                                 repository=repository, push=True, ok=(201,), headers={"Content-Type": media_type},
                                 body=lambda: data)
        response.close()
        return self._check_pushed(response, digest, what)

    def get_manifest(self, repository: str, reference: str, accept: tuple[str, ...] | list[str] = MANIFEST_MEDIA_TYPES,
                     *, max_size: int = MAX_MANIFEST_SIZE) -> Manifest:
        """GET a manifest: its bytes, media type and digest, the bytes checked against the digest
        asked for (``reference`` ``sha256:...``) or announced (``Docker-Content-Digest``)."""
        at = "@" if reference.startswith("sha256:") else ":"
        what = f"oci://{self.host}/{repository}{at}{reference}"
        response, data = self._read(self._url(repository, "manifests", reference), max_size, "manifest", what=what,
                                    repository=repository, headers={"Accept": ", ".join(accept)})
        digest = digest_of(data)
        expected = reference if reference.startswith("sha256:") else response.headers.get("Docker-Content-Digest")
        if expected and expected != digest:
            raise OCIError(f"{what}: manifest refused: its bytes do not match its digest: expected {expected}, "
                           f"got {digest}")
        media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        return Manifest(data, media_type, digest)

    def tags(self, repository: str, *, max_pages: int = 100) -> list[str]:
        """The tags of ``repository`` (``GET /v2/<repository>/tags/list``, following ``Link`` pages), each
        page read with a cap; a registry that answers something else is one line naming it."""
        what = f"oci://{self.host}/{repository} (tags)"
        url, found = self._url(repository, "tags", "list"), []
        for _page in range(max_pages):
            response, data = self._read(url, TAGS_CAP, "tag list", what=what, repository=repository)
            try:
                page = json.loads(data)
                tags = page.get("tags") or []
                if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                    raise ValueError("tags is not a list of strings")
            except (ValueError, AttributeError, RecursionError) as exc:
                raise OCIError(f"{what}: {netloc(response.url or self.base)} sent a tag list that is not "
                               f"distribution's {{\"name\", \"tags\": [...]}} ({exc})") from None
            found += tags
            link = response.links.get("next", {}).get("url")
            if not link:
                return found
            url = urljoin(response.url or self.base + "/", link)
            if origin(url) != origin(self.base):
                raise OCIError(f"{what}: the registry pages its tag list to another host ({netloc(url)})")
        raise OCIError(f"{what}: the registry's tag list goes on for more than {max_pages} pages")

    def manifest_digest(self, repository: str, reference: str,
                        accept: tuple[str, ...] | list[str] = MANIFEST_MEDIA_TYPES) -> str | None:
        """HEAD a manifest: its digest if the tag or digest exists, else None (a cheap re-push check)."""
        at = "@" if reference.startswith("sha256:") else ":"
        what = f"oci://{self.host}/{repository}{at}{reference}"
        response = self._request("HEAD", self._url(repository, "manifests", reference), what=what,
                                 repository=repository, headers={"Accept": ", ".join(accept)}, ok=(200, 404))
        response.close()
        if response.status_code == 404:
            return None
        return response.headers.get("Docker-Content-Digest") or (reference if reference.startswith("sha256:") else None)
