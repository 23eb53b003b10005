"""The machinery of one transfer, whatever the store: a part file, hashed while it streams.

A transfer appends to a uniquely named part file (resuming from the bytes already there), hashes
every byte as it arrives (:class:`Verifier`, pip's ``Hashes`` in small), and returns once every
byte is on disk, fsynced and verified; it never touches a final name, which is the cache's job.
Receiving, hashing and writing run on three threads over reused buffers (:class:`Pipeline`), and
write-behind keeps dirty pages bounded so the final fsync is short.

The kinds of store (:mod:`.http`, :mod:`.file`, :mod:`.s3`) feed a Pipeline; :mod:`packager.transport`
picks one by url scheme. Importing this module never imports torch or requests.

Stopping: a :class:`Cancel` shared by a run's transfers is checked between chunks and in retry
sleeps, and a :class:`Watchdog` aborts a read blocked in the kernel from another thread (when the
run is cancelled, the bytes trickle below ``Policy.speed_limit`` for ``speed_time`` seconds, or
``max_time`` has passed). Disk space is reserved per file system across the transfers of a
process (:func:`reserve_space`), so parallel transfers do not each count the same free bytes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

from ..errors import CacheError, DownloadError, IntegrityError
from ..fsutil import SpaceReservation, WriteBehind, atomic_write_json, human_bytes, share_with_group

MiB = 1 << 20
CHUNK_SIZE = 4 * MiB
USER_AGENT = "tvpack"


@dataclass(frozen=True)
class Policy:
    """How hard to try: timeouts (seconds), retries per url and the backoff between them.

    ``speed_limit`` / ``speed_time`` (curl's names): an attempt that receives fewer than
    ``speed_limit`` bytes per second over ``speed_time`` seconds is aborted and retried (a
    server trickling a byte now and then never trips the read timeout); 0 turns it off.
    ``max_time``: seconds for one file from one source, every attempt included (None: no limit).
    ``connections``, ``segment_size``, ``segment_threshold``: how a large object is split (:mod:`.segments`).
    """

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 5  # further attempts after the first one, per url
    backoff: float = 0.5  # base of the exponential backoff
    max_backoff: float = 30.0
    max_retry_after: float = 120.0  # a longer Retry-After gives up on this url instead
    chunk_size: int = CHUNK_SIZE
    speed_limit: float = 1024.0
    speed_time: float = 30.0
    max_time: float | None = None
    max_redirects: int = 10
    stall_retries: int | None = None  # retries after stalls (no answer, too slow), if fewer than ``retries``
    s3_endpoint_url: str | None = None  # for s3:// sources (--endpoint-url); None: boto3's own (AWS_ENDPOINT_URL...)
    # segmented downloads (:mod:`.segments`): an object of at least ``segment_threshold`` bytes from a source that
    # serves ranges is fetched as ranges of ``segment_size`` over up to ``connections`` connections at once
    connections: int = 8
    segment_size: int = 16 * MiB
    segment_threshold: int = 64 * MiB

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

    HEAD = 64  # first bytes kept, to say what was received when it is not what was expected

    def reset(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0
        self.head = b""

    def update(self, data) -> None:
        if len(self.head) < self.HEAD:
            self.head += bytes(data[: self.HEAD - len(self.head)])
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


class StoredObject(Protocol):
    """What a writable store needs of an object: where it goes, what it must hash to, how to read it."""

    path: str  # relative to the store's root
    size: int
    sha256: str
    source: str  # for messages: where the bytes come from
    opener: Callable[[], BinaryIO]


# -- partial files ---------------------------------------------------------------------------------

def part_state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def read_state(part: Path) -> dict:
    try:
        return json.loads(part_state_path(part).read_text())
    except (OSError, ValueError, RecursionError):
        return {}


def write_state(part: Path, state: dict) -> None:
    # not fsynced: losing it only costs the If-Range validator, and the final hash still decides
    atomic_write_json(part_state_path(part), state, durable=False)


def open_part(part: Path, mode: str):
    """Open a part file for writing ("wb" or "ab"); a new one gets group read-write in a
    group-shared directory, so another member of the group can resume it."""
    f = open(part, mode)
    share_with_group(part, fd=f.fileno())
    return f


def discard_part(part: Path) -> None:
    for path in (part, part_state_path(part)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# -- stopping: cancellation, stalls, deadlines -------------------------------------------------------

class Cancelled(Exception):
    """The run was cancelled (Ctrl-C, SIGTERM): the transfer stopped, its part file is kept."""


class Cancel:
    """A flag shared by the transfers of one run; set once, from any thread."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` that ends early (raising :class:`Cancelled`) when the run is cancelled."""
        if self._event.wait(max(0.0, seconds)):
            raise Cancelled()


@contextmanager
def cancelled_by_interrupt(cancel: Cancel):
    """Within the block, Ctrl-C (SIGINT) and a SIGTERM that raises also set ``cancel``: transfers running
    on worker threads (which a KeyboardInterrupt never reaches) stop at once, while the main thread
    unwinds as before. Outside the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        before = previous[signum]
        if before == signal.SIG_IGN:
            return
        cancel.cancel()
        if callable(before):
            before(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:  # SIGTERM with its default action: do it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield cancel
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def deadline_of(policy: Policy) -> float | None:
    """The ``time.monotonic()`` by which a transfer starting now must be done, if any."""
    return None if policy.max_time is None else time.monotonic() + policy.max_time


def check_deadline(url: str, policy: Policy, deadline: float | None, extra: float = 0.0) -> None:
    if deadline is not None and time.monotonic() + extra >= deadline:
        raise DownloadError(f"{url}: not complete within {policy.max_time:g}s (the time allowed per file)")


class Watchdog:
    """Watches one attempt from its own thread and calls ``abort()`` (which must unblock a read
    stuck in the kernel, e.g. shut the socket down) when the run is cancelled, when fewer than
    ``policy.speed_limit * policy.speed_time`` bytes arrived in the last ``speed_time`` seconds,
    or when the deadline has passed. The reader reports bytes with :meth:`fed` and, when its read
    ends, asks :meth:`raise_if_fired` whether that was the watchdog's doing."""

    POLL = 0.1

    def __init__(self, url: str, policy: Policy, cancel: Cancel | None, deadline: float | None,
                 abort: Callable[[], None]):
        self.url = url
        self.policy = policy
        self.cancel = cancel
        self.deadline = deadline
        self.abort = abort
        self.reason: str | None = None
        self._count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fed(self, n: int) -> None:
        self._count += n  # one writer (the reading thread); the watchdog only reads

    def __enter__(self) -> "Watchdog":
        if self.cancel is not None or self.deadline is not None or self.policy.speed_limit > 0:
            self._thread = threading.Thread(target=self._watch, name="tvpack-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        window_start, window_count = time.monotonic(), self._count
        limit = self.policy.speed_limit * self.policy.speed_time
        while not self._stop.wait(self.POLL):
            now = time.monotonic()
            if self.cancel is not None and self.cancel.cancelled:
                return self._fire("cancelled")
            if self.deadline is not None and now >= self.deadline:
                return self._fire("deadline")
            if self.policy.speed_limit > 0 and now - window_start >= self.policy.speed_time:
                got = self._count - window_count
                if got < limit:
                    return self._fire(f"too slow: {got} bytes in {now - window_start:.0f}s, under the minimum of "
                                      f"{self.policy.speed_limit:g} bytes/s over {self.policy.speed_time:g}s")
                window_start, window_count = now, self._count

    def _fire(self, reason: str) -> None:
        self.reason = reason
        try:
            self.abort()
        except Exception:  # noqa: BLE001 - the read may have ended on its own meanwhile
            pass

    def raise_if_fired(self) -> None:
        """If the watchdog aborted the read: Cancelled, DownloadError (deadline) or Retryable (slow)."""
        if self.reason is None:
            return
        if self.reason == "cancelled":
            raise Cancelled()
        if self.reason == "deadline":
            check_deadline(self.url, self.policy, self.deadline)
        raise Retryable(self.reason, stalled=True)


# -- the transfer ----------------------------------------------------------------------------------

class Retryable(Exception):
    """A failure another attempt may heal; ``stalled``: the source did not answer, or too slowly."""

    def __init__(self, reason: str, retry_after: float | None = None, *, stalled: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.stalled = stalled


class Restart(Exception):
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


def prehash(part: Path, verifier: Verifier, chunk_size: int) -> int:
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


class Pipeline:
    """Read into a few reusable buffers; hash and write each on its own thread, in order.

    No byte is copied in Python: the socket (or file) fills a buffer in place, and hashlib and
    the file write read it through a memoryview, both releasing the GIL. Three stages overlap:
    receive, hash, write. ``close`` drains both stages, so after any error the bytes hashed are
    exactly the bytes written (the resume invariant).
    """

    def __init__(self, f, verifier: Verifier, on_bytes: ProgressFn | None, chunk_size: int, buffers: int = 4, *,
                 cancel: Cancel | None = None, reservation: SpaceReservation | None = None):
        self.f = f
        # a file (not a caller's write): its dirty pages kept bounded
        self._behind = WriteBehind(f.fileno(), flush=f.flush) if hasattr(f, "fileno") else None
        self.verifier = verifier
        self.on_bytes = on_bytes
        self.cancel = cancel
        self.reservation = reservation
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
        if self._behind is not None:
            self._behind.wrote(len(view))
        if self.reservation is not None:
            self.reservation.wrote(len(view))
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
        """Call ``fill(buffer) -> bytes read`` until it returns 0, feeding both stages; stops
        (raising :class:`Cancelled`) between chunks once the run is cancelled."""
        try:
            while self.error is None:
                if self.cancel is not None:
                    self.cancel.check()
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


def finish(part: Path, f, verifier: Verifier) -> str:
    f.flush()
    os.fsync(f.fileno())
    try:
        return verifier.check()
    except IntegrityError:
        discard_part(part)
        raise


def disk_error(exc: OSError, part: Path, needed: int | None = None) -> CacheError:
    """The one error for a write that failed: CacheError naming the directory (and, when the disk
    is full, the bytes the transfer needed)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        discard_part(part)  # free the space again
        return disk_full(part.parent, needed)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheError(f"cannot write to {part.parent}: {exc.strerror}")
    return CacheError(f"cannot write {part}: {exc.strerror or exc}")


def disk_full(directory: Path, needed: int | None = None) -> CacheError:
    need = f" (needs {human_bytes(needed)})" if needed else ""
    return CacheError(f"disk full while writing {directory}{need}")

