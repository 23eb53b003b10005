"""Blob GETs: a registry's blob as a source of the one transfer engine (:mod:`packager.transport.engine`).

    pull_blob(client, "models/resnet", digest, dest, size=size)         # into <dest>.part, then renamed
    stream_blob(client, "models/resnet", digest, out.write, size=size)  # into a caller's write
    blob_ranges(client, "models/resnet", digest, target, size=size)     # in ranges, at a caller's offsets

The engine gives blob GETs what every other transfer has: one retry policy (backoff, Retry-After), a
``Range`` resume inside the layer, the watchdog (speed limit, deadline, cancel), a notice before each
retry saying what is waited for, bytes refused as soon as there are more than the blob holds, and
the three errors of a transport: DownloadError (:class:`~packager.errors.OCIError` is one),
IntegrityError (the bytes are not the blob's), CacheError (the disk cannot take them).
:class:`~.client.RegistryClient` contributes its session and authentication only.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from ...errors import IntegrityError
from ..engine import Body, fetch, fetch_ranges, stream
from ..http import HttpSource
from ..segments import StartOver
from ..stream import Cancel, Policy, Verifier, discard_part, prehash
from .reference import _check_digest

ProgressFn = Callable[[int], None]


def notice(message: str) -> None:
    """Where blob GETs say what they wait for, unless the client was given its own ``notify``."""
    print(f"tvpack: {message}", file=sys.stderr, flush=True)


def reading_policy(policy) -> Policy:
    """The engine's policy for blob GETs of a client's policy (:class:`~.client.Policy`).

    As for every source of the engine, the wait for an answer is bounded by ``speed_time`` too: a
    registry that accepts the connection and says nothing is reported ("no answer from HOST for 30s;
    retrying") as soon as a drip would be; as for the client's own requests, a blob that stalls is
    retried ``stall_retries`` times only."""
    speed_limit, speed_time = getattr(policy, "speed_limit", 1024.0), getattr(policy, "speed_time", 30.0)
    return Policy(connect_timeout=policy.connect_timeout, read_timeout=policy.read_timeout, retries=policy.retries,
                  backoff=policy.backoff, max_backoff=policy.max_backoff, chunk_size=policy.read_size,
                  speed_limit=speed_limit, speed_time=speed_time, max_time=getattr(policy, "max_time", None),
                  max_redirects=getattr(policy, "max_redirects", 10),
                  stall_retries=getattr(policy, "stall_retries", None), connections=getattr(policy, "connections", 8),
                  segment_size=getattr(policy, "segment_size", 16 << 20),
                  segment_threshold=getattr(policy, "segment_threshold", 64 << 20))


class BlobSource(HttpSource):
    """``GET /v2/<repository>/blobs/<digest>`` with the client's session and authorization.

    Content-addressed: the digest is the validator (no ``If-Range``, no state beside the part). A 401
    is answered once per open (a token may expire during a long pull); a refusal is worded by the
    client (``blob not found``, ``access denied``); a registry that refuses connections or whose
    certificate does not verify fails at once."""

    content_addressed = True

    def __init__(self, client, repository: str, digest: str):
        super().__init__(client.base + client._url(repository, "blobs", digest), client.session, if_range=False,
                         max_redirects=getattr(client.policy, "max_redirects", 10))
        self.url = f"oci://{client.host}/{repository}@{digest}"
        self.client = client
        self.repository = repository
        self.scope = f"repository:{repository}:pull"

    def open(self, offset: int, validator: str | None, timeout: tuple[float, float], end: int | None = None) -> Body:
        challenged = False
        while True:
            # requests drops Authorization when a redirect leaves the host (blob stores behind S3 urls)
            self.headers = self.client.auth.header(self.scope)
            response = self.get(self._headers(offset, validator, end), timeout)
            if response.status_code == 401:
                response.close()
                if challenged:
                    raise self.client.auth.refused(response, self.url, False)
                challenged = True
                self.client._authenticate(response, self.scope, self.repository, self.url)
                continue
            try:
                return self._body(response, offset, end is not None)
            except BaseException:
                response.close()
                raise

    def fatal(self, exc: BaseException) -> Exception | None:
        import requests

        text = str(exc)
        if isinstance(exc, requests.exceptions.SSLError) or "Connection refused" in text or "Failed to resolve" in text:
            return self.client._connection_error(exc, self.url)
        return super().fatal(exc)

    def refuse(self, response) -> Exception:
        return self.client._fail(response, self.url)


def _refused(exc: IntegrityError, what: str, digest: str, size: int | None) -> IntegrityError:
    got = exc.got if "bytes" in exc.got else f"sha256:{exc.got}"
    expected = digest + (f" ({size} bytes)" if size is not None else "")
    return IntegrityError(f"{what}: blob refused: its bytes do not match its digest", expected=expected, got=got)


def _verifier(what: str, digest: str, size: int | None) -> Verifier:
    return Verifier(what, sha256=digest.split(":", 1)[1], size=size)


def pull_blob(client, repository: str, digest: str, dest, *, size: int | None = None, part=None,
              on_bytes: ProgressFn | None = None, cancel: Cancel | None = None) -> int:
    """Stream blob ``digest`` into ``part`` (default ``<dest>.part``), sha256-checked as it arrives,
    then rename it to ``dest``; returns the size. A part left by an interrupted pull is continued
    with ``Range``. Bytes that do not match the digest (or ``size``) are refused (IntegrityError):
    the part is removed and ``dest`` never appears. After retries run out the part is kept for a
    later call to resume. ``on_bytes`` is first called with the bytes already in the part."""
    _check_digest(digest)
    dest = Path(dest)
    part = Path(part) if part is not None else dest.with_name(dest.name + ".part")
    source = BlobSource(client, repository, digest)
    verifier = _verifier(source.url, digest, size)
    policy = reading_policy(client.policy)
    if size is not None and _size_of(part) == size and prehash(part, verifier, policy.chunk_size) == size:
        try:  # finished earlier but not renamed (interrupted right at the end)
            verifier.check()
            os.replace(part, dest)
            if on_bytes is not None:
                on_bytes(size)
            return size
        except IntegrityError:
            discard_part(part)
    progress = _Reported(on_bytes)
    try:
        result = fetch(source, part, verifier, policy, on_bytes=progress, on_total=progress.present,
                       cancel=cancel or getattr(client, "cancel", None), notify=getattr(client, "notify", None) or notice)
    except IntegrityError as exc:
        raise _refused(exc, source.url, digest, size) from None
    os.replace(part, dest)
    return result.size


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _Reported:
    """``on_bytes`` of a pull, told by the engine's ``on_total`` how many bytes each attempt starts
    with (what the part already holds, or a negative count taken back), so each byte counts once."""

    def __init__(self, on_bytes: ProgressFn | None):
        self.on_bytes = on_bytes
        self.reported = 0

    def __call__(self, n: int) -> None:
        self.reported += n
        if self.on_bytes is not None and n:
            self.on_bytes(n)

    def present(self, total: int | None, have: int) -> None:
        self(have if have < 0 else have - self.reported)


def stream_blob(client, repository: str, digest: str, write: Callable[[bytes], object], *, size: int,
                on_bytes: ProgressFn | None = None, cancel: Cancel | None = None) -> None:
    """Stream blob ``digest`` of ``size`` bytes to ``write``, called with each chunk in order on a
    worker thread. Returns when all bytes matched the digest; otherwise raises (IntegrityError for
    bytes that are not the blob's), and whatever ``write`` received must be discarded by the caller.
    An interrupted transfer continues with ``Range`` from the bytes received; nothing is kept across
    calls (for that, :func:`pull_blob` and its part file). An error raised by ``write`` is re-raised."""
    _check_digest(digest)
    source = BlobSource(client, repository, digest)
    try:
        stream(source, write, _verifier(source.url, digest, size), reading_policy(client.policy),
               on_bytes=on_bytes, cancel=cancel or getattr(client, "cancel", None),
               notify=getattr(client, "notify", None) or notice)
    except IntegrityError as exc:
        raise _refused(exc, source.url, digest, size) from None


class _Observed(Verifier):
    """A blob's verifier that also hands each byte, in order, to ``observe`` (a caller's checks of what it holds)."""

    def __init__(self, what: str, digest: str, size: int, observe: Callable[[bytes], object]):
        super().__init__(what, sha256=digest.split(":", 1)[1], size=size)
        self.observe = observe

    def update(self, data) -> None:
        super().update(data)
        self.observe(data)


def blob_ranges(client, repository: str, digest: str, target, *, size: int, observe: Callable[[bytes], object],
                on_bytes: ProgressFn | None = None, cancel: Cancel | None = None) -> bool:
    """Blob ``digest`` of ``size`` bytes in ranges over several connections (the client policy's ``connections``)
    into ``target`` (``write_at(pos, view)``, ``read_at(pos, n)``, ``sync()``: see
    :func:`~packager.transport.engine.fetch_ranges`), ``observe`` called with every byte in order once its
    place is known to hold it. False, with nothing fetched, when the blob is smaller than the policy's
    ``segment_threshold``; False after one notice when the registry does not serve ranges (the caller streams
    the blob instead, from a fresh start). Bytes that do not match the digest are refused (IntegrityError)."""
    _check_digest(digest)
    policy = reading_policy(client.policy)
    if policy.connections <= 1 or size < policy.segment_threshold:
        return False
    source = BlobSource(client, repository, digest)
    try:
        fetch_ranges(source, target, _Observed(source.url, digest, size, observe), size, policy, on_bytes=on_bytes,
                     cancel=cancel or getattr(client, "cancel", None), notify=getattr(client, "notify", None) or notice)
    except StartOver:
        return False
    except IntegrityError as exc:
        raise _refused(exc, source.url, digest, size) from None
    return True
