"""One transfer: stream a url into a partial file, hashing as the bytes arrive.

``transfer(url, part, verifier)`` appends to ``part`` (resuming from the bytes already there) and
returns once every byte is on disk, fsynced and verified; it never touches a final name, which is
the cache's job. Retries (exponential backoff with full jitter, ``Retry-After`` honoured) cover
connection errors, read timeouts, truncated bodies, 408/429 and 5xx; any other 4xx fails at once.

A resumed transfer asks for ``Range: bytes=<have>-`` with ``If-Range`` (a strong ETag, else
Last-Modified) and accepts a 206 only when its ``Content-Range`` starts where the part ends; a 200
means the server ignored the range or the file changed, so the part restarts from zero. The
validators of a part live beside it in ``<part>.json``.

Sources: ``http(s)://``, ``file://`` and plain paths (a directory mirror), ``s3://`` via
:mod:`packager.s3` when present. Proxies and CA bundles come from the environment (requests).
Importing this module never imports torch.
"""
from __future__ import annotations

import email.utils
import errno
import hashlib
import http.client
import json
import os
import queue
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

from .errors import CacheError, DownloadError, IntegrityError
from .fsutil import atomic_write_json

MiB = 1 << 20
CHUNK_SIZE = 4 * MiB
USER_AGENT = "tvpack"


@dataclass(frozen=True)
class Policy:
    """How hard to try: timeouts (seconds), retries per url and the backoff between them."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 5  # further attempts after the first one, per url
    backoff: float = 0.5  # base of the exponential backoff
    max_backoff: float = 30.0
    max_retry_after: float = 120.0  # a longer Retry-After gives up on this url instead
    chunk_size: int = CHUNK_SIZE

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based retry count)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return random.uniform(0, min(self.max_backoff, self.backoff * (2 ** (attempt - 1))))


DEFAULT_POLICY = Policy()


class Verifier:
    """sha256 and size of a stream, checked against what the caller expects (pip's Hashes, small).

    ``hash_prefix`` is the hex a checkpoint name promises (``-<hex>.`` / ``_<hex>.``); ``sha256`` a
    full pinned hash; ``size`` an exact byte count. ``update`` refuses bytes beyond ``size`` at once
    (a server sending a file too large is caught before it fills the disk).
    """

    def __init__(self, what: str, *, hash_prefix: str | None = None, sha256: str | None = None,
                 size: int | None = None):
        self.what = what
        self.hash_prefix = hash_prefix.lower() if hash_prefix else None
        self.sha256 = sha256.lower() if sha256 else None
        self.size = size
        self.reset()

    def reset(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def update(self, data) -> None:
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise IntegrityError(f"{self.what}: too large", expected=f"{self.size} bytes",
                                 got=f"more than {self.size} bytes")
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def check(self) -> str:
        """The sha256 of everything seen, or IntegrityError naming expected and got."""
        digest = self.hexdigest()
        if self.size is not None and self.count != self.size:
            raise IntegrityError(f"{self.what}: wrong size", expected=f"{self.size} bytes", got=f"{self.count} bytes")
        if self.sha256 is not None and digest != self.sha256:
            raise IntegrityError(f"{self.what}: sha256 mismatch", expected=self.sha256, got=digest)
        if self.hash_prefix is not None and not digest.startswith(self.hash_prefix):
            raise IntegrityError(f"{self.what}: sha256 prefix mismatch", expected=self.hash_prefix,
                                 got=digest[: len(self.hash_prefix)])
        return digest


# -- partial files ---------------------------------------------------------------------------------

def part_state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_state(part: Path) -> dict:
    try:
        return json.loads(part_state_path(part).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(part: Path, state: dict) -> None:
    # not fsynced: losing it only costs the If-Range validator, and the final hash still decides
    atomic_write_json(part_state_path(part), state, durable=False)


def discard_part(part: Path) -> None:
    for path in (part, part_state_path(part)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# -- the transfer ----------------------------------------------------------------------------------

class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Restart(Exception):
    """The part cannot be continued (server changed the file, bad Content-Range): start over."""


@dataclass
class Result:
    url: str
    sha256: str
    size: int
    resumed_from: int  # bytes already in the part when the (first) request was made
    attempts: int


ProgressFn = Callable[[int], None]  # called with the number of new bytes
TotalFn = Callable[[int | None, int], None]  # (total size or None, bytes already present)


def transfer(url: str, part: Path, verifier: Verifier, *, policy: Policy = DEFAULT_POLICY,
             session=None, on_bytes: ProgressFn | None = None, on_total: TotalFn | None = None) -> Result:
    """Fetch ``url`` into ``part`` (appending to what is there), fsync and verify it.

    Raises DownloadError (after retries, or at once for a 4xx), IntegrityError (bytes wrong: the
    part is removed), CacheError (the disk cannot take it). On DownloadError the part is kept so
    that a later call resumes it.
    """
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return _transfer_http(url, part, verifier, policy, session, on_bytes, on_total)
    if parsed.scheme == "s3":
        return _transfer_s3(url, part, verifier, policy, on_bytes, on_total)
    if parsed.scheme in ("file", ""):
        source = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
        return _transfer_file(url, source, part, verifier, policy, on_bytes, on_total)
    raise DownloadError(f"{url}: unsupported url scheme {parsed.scheme!r}")


def _prehash(part: Path, verifier: Verifier, chunk_size: int) -> int:
    """Hash the bytes already in ``part`` (a resume); returns how many there are."""
    verifier.reset()
    try:
        with open(part, "rb") as f:
            while True:
                data = f.read(chunk_size)
                if not data:
                    break
                verifier.update(data)
    except FileNotFoundError:
        return 0
    except IntegrityError:  # the part is already longer than the file can be
        discard_part(part)
        verifier.reset()
        return 0
    return verifier.count


_pool: dict[int, list[bytearray]] = {}
_pool_mutex = threading.Lock()


def _take_buffers(n: int, size: int) -> list[bytearray]:
    """Buffers for one transfer, reused across transfers (allocating and zeroing 16 MiB per file
    costs more than a small file's transfer)."""
    with _pool_mutex:
        free = _pool.setdefault(size, [])
        taken = [free.pop() for _ in range(min(n, len(free)))]
    return taken + [bytearray(size) for _ in range(n - len(taken))]


_POOL_KEEP = 16  # buffers kept per size: enough for four transfers at once


def _give_buffers(buffers: list[bytearray]) -> None:
    with _pool_mutex:
        free = _pool.setdefault(len(buffers[0]), [])
        free.extend(buffers[: max(0, _POOL_KEEP - len(free))])


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


class _WriteBehind:
    """Keep a large download's dirty pages bounded (Linux ``sync_file_range``).

    Left alone, the kernel lets a gigabyte of dirty pages pile up, then throttles the writer hard
    and leaves a long ``fsync`` at the end. Starting write-back of each finished window and
    waiting for the window before it keeps the disk streaming alongside the network, so the
    final fsync (which still guarantees durability) finds almost nothing left to do. Pages stay
    in the page cache. A no-op where the call is unavailable.
    """

    WINDOW = 32 * 1024 * 1024

    def __init__(self, f):
        self.f = f
        self.pos = self.started = self.waited = f.tell()

    def wrote(self, n: int) -> None:
        self.pos += n
        if _sync_file_range is None or self.pos - self.started < self.WINDOW:
            return
        self.f.flush()
        fd = self.f.fileno()
        if self.started > self.waited:
            _sync_file_range(fd, self.waited, self.started - self.waited,
                             _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
            self.waited = self.started
        _sync_file_range(fd, self.started, self.pos - self.started, _SFR_WRITE)
        self.started = self.pos


class _Pipeline:
    """Read into a few reusable buffers; hash and write each on its own thread, in order.

    No byte is copied in Python: the socket (or file) fills a buffer in place, and hashlib and
    the file write read it through a memoryview, both releasing the GIL. Three stages overlap:
    receive, hash, write. ``close`` drains both stages, so after any error the bytes hashed are
    exactly the bytes written (the resume invariant).
    """

    def __init__(self, f, verifier: Verifier, on_bytes: ProgressFn | None, chunk_size: int, buffers: int = 4):
        self.f = f
        self._behind = _WriteBehind(f)
        self.verifier = verifier
        self.on_bytes = on_bytes
        self.error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        self._buffers = _take_buffers(buffers, chunk_size)
        for buf in self._buffers:
            self._free.put(buf)
        self._pending: dict[int, int] = {}
        self._mutex = threading.Lock()
        self._hash_q: queue.Queue = queue.Queue()
        self._write_q: queue.Queue = queue.Queue()
        self._threads = [
            threading.Thread(target=self._stage, args=(self._hash_q, self._hash), name="tvpack-hash", daemon=True),
            threading.Thread(target=self._stage, args=(self._write_q, self._write), name="tvpack-write", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _hash(self, view) -> None:
        self.verifier.update(view)

    def _write(self, view) -> None:
        self.f.write(view)
        self._behind.wrote(len(view))
        if self.on_bytes is not None:
            self.on_bytes(len(view))

    def _stage(self, q: queue.Queue, work) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            buf, n = item
            try:
                if self.error is None:
                    with memoryview(buf) as view, view[:n] as part:
                        work(part)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = exc
            finally:
                with self._mutex:
                    self._pending[id(buf)] -= 1
                    done = self._pending[id(buf)] == 0
                if done:
                    self._free.put(buf)

    def run(self, fill: Callable[[bytearray], int]) -> None:
        """Call ``fill(buffer) -> bytes read`` until it returns 0, feeding both stages."""
        try:
            while self.error is None:
                buf = self._free.get()
                n = fill(buf)
                if not n:
                    self._free.put(buf)
                    break
                with self._mutex:
                    self._pending[id(buf)] = 2
                self._hash_q.put((buf, n))
                self._write_q.put((buf, n))
        finally:
            self.close()

    def close(self) -> None:
        for q in (self._hash_q, self._write_q):
            q.put(None)
        for thread in self._threads:
            thread.join()
        if self._buffers:
            _give_buffers(self._buffers)
            self._buffers = []
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _http_filler(response, chunk_size: int):
    """``fill(buffer) -> n`` reading the body straight into ``buffer`` (no intermediate bytes).

    Uses http.client's ``readinto`` under urllib3 when available (it enforces Content-Length and
    de-chunks); otherwise urllib3's ``read``, copied in.
    """
    fp = getattr(response.raw, "_fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if fp is not None and hasattr(fp, "readinto") and encoding in ("", "identity"):
        def fill(buf: bytearray) -> int:
            return fp.readinto(buf)
        return fill
    read = response.raw.read

    def fill_copy(buf: bytearray) -> int:
        data = read(len(buf), decode_content=False)
        buf[: len(data)] = data
        return len(data)
    return fill_copy


def _chunks_filler(chunks):
    """``fill(buffer) -> n`` over an iterator of byte strings (an S3 body)."""
    pending = memoryview(b"")

    def fill(buf: bytearray) -> int:
        nonlocal pending
        n = 0
        while n < len(buf):
            if not len(pending):
                data = next(chunks, b"")
                if not data:
                    break
                pending = memoryview(data)
            k = min(len(pending), len(buf) - n)
            buf[n:n + k] = pending[:k]
            pending = pending[k:]
            n += k
        return n

    return fill


def _finish(part: Path, f, verifier: Verifier) -> str:
    f.flush()
    os.fsync(f.fileno())
    try:
        return verifier.check()
    except IntegrityError:
        discard_part(part)
        raise


def _disk_error(exc: OSError, part: Path) -> CacheError:
    if exc.errno == errno.ENOSPC:
        discard_part(part)  # free the space again
        return CacheError(f"disk full while writing {part.parent}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheError(f"cannot write to {part.parent}: {exc.strerror}")
    return CacheError(f"cannot write {part}: {exc.strerror or exc}")


def _check_space(part: Path, needed: int | None) -> None:
    if not needed:
        return
    try:
        free = shutil.disk_usage(part.parent).free
    except OSError:
        return
    if free < needed:
        raise CacheError(f"not enough disk space in {part.parent}: need {needed} bytes, {free} free")


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    # "bytes 100-199/200" or "bytes 100-199/*"
    if not value or not value.startswith("bytes "):
        return None
    try:
        span, total = value[6:].split("/", 1)
        start, end = (int(x) for x in span.split("-", 1))
        return start, end, None if total.strip() == "*" else int(total)
    except ValueError:
        return None


_session_local = threading.local()


def default_session():
    """One requests.Session per thread (connection reuse; sessions are not thread-safe)."""
    session = getattr(_session_local, "session", None)
    if session is None:
        import requests

        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
        _session_local.session = session
    return session


def _transfer_http(url, part, verifier, policy, session, on_bytes, on_total) -> Result:
    import requests
    import urllib3

    session = session or default_session()
    transient = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                 ConnectionError, TimeoutError)
    attempt = 0
    first_offset = None
    restarted = False
    while True:
        offset = _prehash(part, verifier, policy.chunk_size)
        if offset == 0:
            discard_part(part)
        if first_offset is None:
            first_offset = offset
        try:
            result = _http_attempt(url, part, verifier, policy, session, offset, on_bytes, on_total)
            return Result(url, result, verifier.count, first_offset, attempt + 1)
        except _Restart:
            discard_part(part)
            if restarted:
                raise DownloadError(f"{url}: server keeps answering ranges inconsistently") from None
            restarted = True
            continue
        except IntegrityError:
            # A resumed transfer that fails verification may owe it to the old part: once more
            # from zero before blaming the source.
            discard_part(part)
            if offset > 0 and not restarted:
                restarted = True
                continue
            raise
        except _Retryable as exc:
            reason, retry_after = exc.reason, exc.retry_after
        except transient as exc:
            reason, retry_after = _describe(exc), None
        attempt += 1
        if attempt > policy.retries:
            raise DownloadError(f"{url}: {reason} (gave up after {attempt} attempts)")
        if retry_after is not None and retry_after > policy.max_retry_after:
            raise DownloadError(f"{url}: {reason}; server asks to retry after {retry_after:.0f}s")
        time.sleep(policy.delay(attempt, retry_after))


def _describe(exc: BaseException) -> str:
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, requests.exceptions.ConnectionError):
        inner = exc.args[0] if exc.args else exc
        text = str(inner)
        if "timed out" in text.lower() or "Read timed out" in text:
            return "read timeout"
        if "Connection refused" in text or "NewConnectionError" in text:
            return "connection refused"
        reason = getattr(inner, "reason", None)  # urllib3's MaxRetryError wraps the real cause
        if type(reason).__name__ == "NameResolutionError" or "Failed to resolve" in text:
            host = getattr(getattr(reason, "conn", None), "host", None) or "the host"
            return f"cannot resolve {host} (no DNS or no network?)"
        if isinstance(reason, OSError) and reason.strerror:
            return f"connection error: {reason.strerror}"
        return f"connection error ({type(reason or inner).__name__})"
    name = type(exc).__name__
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if "Timeout" in name:
        return "read timeout"
    if "IncompleteRead" in str(exc) or "ProtocolError" in name:
        return "connection closed early"
    return f"{name}: {exc}"


def _http_attempt(url, part, verifier, policy, session, offset, on_bytes, on_total) -> str:
    state = _read_state(part) if offset else {}
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("url") == url:
            etag = state.get("etag")
            if etag and not etag.startswith("W/"):
                headers["If-Range"] = etag
            elif state.get("last_modified"):
                headers["If-Range"] = state["last_modified"]
    timeout = (policy.connect_timeout, policy.read_timeout)
    response = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    try:
        status = response.status_code
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"HTTP {status}", _parse_retry_after(response.headers.get("Retry-After")))
        if status == 416 and offset:
            raise _Restart()
        if status >= 400:
            raise DownloadError(f"{url}: HTTP {status} {response.reason or ''}".rstrip())
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206 and offset:
            content_range = _parse_content_range(response.headers.get("Content-Range"))
            if content_range is None or content_range[0] != offset:
                raise _Restart()
            total = content_range[2]
            mode = "ab"
        elif status == 200:
            if offset:  # range ignored or file changed upstream: a clean full download
                verifier.reset()
                if on_total is not None:
                    on_total(length, -offset)  # tell the progress bar to take the bytes back
                offset = 0
            total = length
            mode = "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status}")
        if total is not None and verifier.size is not None and total != verifier.size:
            raise IntegrityError(f"{url}: wrong size", expected=f"{verifier.size} bytes", got=f"{total} bytes")
        if on_total is not None:
            on_total(total, offset)
        _check_space(part, (total - offset) if total is not None else None)
        try:
            _write_state(part, {
                "url": url,
                "etag": response.headers.get("ETag"),
                "last_modified": response.headers.get("Last-Modified"),
                "total": total,
            })
            f = open(part, mode)
        except OSError as exc:
            raise _disk_error(exc, part) from exc
        with f:
            pipeline = _Pipeline(f, verifier, on_bytes, policy.chunk_size)
            try:
                pipeline.run(_http_filler(response, policy.chunk_size))
            except http.client.IncompleteRead:
                raise _Retryable("connection closed early") from None
            except OSError as exc:
                if isinstance(exc, (ConnectionError, TimeoutError)) or exc.errno is None:
                    raise
                raise _disk_error(exc, part) from exc
            if total is not None and verifier.count < total:
                raise _Retryable("connection closed early")
            try:
                return _finish(part, f, verifier)
            except OSError as exc:
                raise _disk_error(exc, part) from exc
    finally:
        response.close()


def _transfer_file(url, source: Path, part, verifier, policy, on_bytes, on_total) -> Result:
    try:
        src = open(source, "rb")
    except FileNotFoundError:
        raise DownloadError(f"{url}: no such file") from None
    except OSError as exc:
        raise DownloadError(f"{url}: cannot read: {exc.strerror or exc}") from None
    with src:
        total = os.fstat(src.fileno()).st_size
        if verifier.size is not None and total != verifier.size:
            raise IntegrityError(f"{url}: wrong size", expected=f"{verifier.size} bytes", got=f"{total} bytes")
        offset = _prehash(part, verifier, policy.chunk_size)
        if offset > total:
            discard_part(part)
            offset = 0
            verifier.reset()
        first = offset
        if on_total is not None:
            on_total(total, offset)
        _check_space(part, total - offset)
        try:
            _write_state(part, {"url": url, "total": total})
            f = open(part, "ab" if offset else "wb")
        except OSError as exc:
            raise _disk_error(exc, part) from exc
        with f:
            src.seek(offset)
            try:
                _Pipeline(f, verifier, on_bytes, policy.chunk_size).run(src.readinto)
            except OSError as exc:
                raise _disk_error(exc, part) from exc
            try:
                digest = _finish(part, f, verifier)
            except IntegrityError:
                if first:  # perhaps the old part: once more from zero
                    discard_part(part)
                    return _transfer_file(url, source, part, verifier, policy, on_bytes, on_total)
                raise
            except OSError as exc:
                raise _disk_error(exc, part) from exc
    return Result(url, digest, verifier.count, first, 1)


def _transfer_s3(url, part, verifier, policy, on_bytes, on_total) -> Result:
    try:
        from . import s3
    except ImportError:
        raise DownloadError(f"{url}: s3:// mirrors need the s3 extra (pip install 'tvpack[s3]')") from None
    offset = _prehash(part, verifier, policy.chunk_size)
    state = _read_state(part) if offset else {}
    etag = state.get("etag") if state.get("url") == url else None
    if offset and not etag:  # nothing to prove the object is unchanged: start over
        discard_part(part)
        verifier.reset()
        offset = 0
    try:
        chunks, total, etag = s3.open_stream(url, offset=offset, etag=etag, chunk_size=policy.chunk_size)
    except DownloadError:
        if not offset:
            raise
        discard_part(part)  # the object changed (or the range failed): once more from zero
        verifier.reset()
        offset = 0
        chunks, total, etag = s3.open_stream(url, chunk_size=policy.chunk_size)
    if verifier.size is not None and total != verifier.size:
        raise IntegrityError(f"{url}: wrong size", expected=f"{verifier.size} bytes", got=f"{total} bytes")
    if on_total is not None:
        on_total(total, offset)
    _check_space(part, total - offset)
    try:
        _write_state(part, {"url": url, "etag": etag, "total": total})
        f = open(part, "ab" if offset else "wb")
    except OSError as exc:
        raise _disk_error(exc, part) from exc
    with f:
        try:
            _Pipeline(f, verifier, on_bytes, policy.chunk_size).run(_chunks_filler(iter(chunks)))
        except OSError as exc:
            raise _disk_error(exc, part) from exc
        try:
            digest = _finish(part, f, verifier)
        except OSError as exc:
            raise _disk_error(exc, part) from exc
    return Result(url, digest, verifier.count, offset, 1)
