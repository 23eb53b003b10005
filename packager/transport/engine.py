"""The one read path: any source that can open a byte range with a validator, streamed and hashed.

A :class:`Source` (an http(s) url, an S3 object, a local file, an OCI blob) knows one thing: how
to ``open(offset, validator, timeout)`` a :class:`Body` holding the object's bytes from
``offset`` on, provided the object still is the one ``validator`` (an ETag, Last-Modified or
digest from an earlier body) names; a source that cannot honour the range returns a body from
byte 0, and the engine starts over. This is how containers/image resumes any GET with one body
reader.

The engine owns everything else, once for every kind of store:

- stream and hash (:class:`~.stream.Pipeline`, :class:`~.stream.Verifier`), into a part file
  (:func:`fetch`: kept across calls and resumed, its bytes prehashed) or into a caller's
  ``write`` (:func:`stream`: resumed within the call by skipping what was fed);
- one retry policy (:class:`~.stream.Policy`): exponential backoff with jitter, Retry-After
  honoured, a notice before each retry saying what is waited for, one line when it gives up;
- stopping: :class:`~.stream.Cancel` between chunks and in backoff sleeps, the
  :class:`~.stream.Watchdog` under a blocked read (cancel, speed limit, deadline), the deadline
  (``Policy.max_time``) also bounding how long an open waits for an answer;
- bounded reads: a body longer than the verifier's size is refused as it arrives;
- the three errors a transport raises: DownloadError, IntegrityError, CacheError (disk full and
  other write failures, naming the directory and the bytes needed).

Segmented downloads (several ranged bodies written at their offsets) belong here too: a source
already opens any range, and the part file's state can record finished ranges next to it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import DownloadError, IntegrityError
from ..fsutil import SpaceLedger, reserve_space
from .stream import (
    DEFAULT_POLICY,
    Cancel,
    Cancelled,
    Pipeline,
    Policy,
    ProgressFn,
    Restart,
    Result,
    Retryable,
    TotalFn,
    Verifier,
    Watchdog,
    check_deadline,
    deadline_of,
    discard_part,
    disk_error,
    finish,
    open_part,
    prehash,
    read_state,
    write_state,
)

NoticeFn = Callable[[str], None]


def _nothing() -> None:
    return None


@dataclass
class Body:
    """An opened object, from byte ``offset`` on.

    ``read_into(view)`` fills ``view`` with what has arrived (at least one byte, 0 at the end) and
    raises :class:`~.stream.Retryable` for a failure a new attempt may heal; ``abort()`` unblocks a
    read from another thread (shut the socket down); ``close()`` releases the connection.
    """

    offset: int  # the first byte this body delivers: the offset asked for, or 0 (range ignored, object changed)
    total: int | None  # the whole object's size, when known
    validator: str | None  # names this version of the object for a later resume
    read_into: Callable[[memoryview], int]
    abort: Callable[[], None] = _nothing
    close: Callable[[], None] = _nothing
    content_type: str | None = None  # to describe an error page served in place of the object
    peek: Callable[[], bytes] = bytes  # the first bytes, to describe a body of the wrong size


class Source(Protocol):
    """Something whose bytes can be opened from an offset: an http(s) url, an S3 object, a file, a blob."""

    url: str  # for messages
    # content_addressed: bool  (optional, default False) its name is its validator: no state beside the part

    def open(self, offset: int, validator: str | None, timeout: tuple[float, float]) -> Body:
        """The object from byte ``offset`` (``timeout``: seconds to connect, to wait for an answer).

        Raises Retryable (may heal), Restart (the kept part cannot be continued), DownloadError
        (cannot heal: 404, certificate...), IntegrityError (the object is not what was expected)."""
        ...


# -- one retry policy -----------------------------------------------------------------------------

def timeouts(policy: Policy, deadline: float | None) -> tuple[float, float]:
    """(connect, read) timeouts for an open, cut down to what is left of the deadline.

    With a minimum speed, a source silent for ``speed_time`` seconds is below it whether or not it
    has answered yet: the wait for an answer ends there too (and the notice says so)."""
    connect, read = policy.connect_timeout, read_timeout(policy)
    if deadline is not None:
        left = max(0.1, deadline - time.monotonic())
        connect, read = min(connect, left), min(read, left)
    return connect, read


def read_timeout(policy: Policy) -> float:
    """Seconds a source may stay silent: the read timeout, or ``speed_time`` when a minimum speed is set."""
    return min(policy.read_timeout, policy.speed_time) if policy.speed_limit > 0 else policy.read_timeout


class Retrier:
    """Attempts of one transfer: counts them, waits between them (backoff or Retry-After, ended
    early by cancel), says what it waits for, and gives up in one line."""

    def __init__(self, url: str, policy: Policy, cancel: Cancel | None, notify: NoticeFn | None):
        self.url, self.policy, self.cancel, self.notify = url, policy, cancel, notify
        self.deadline = deadline_of(policy)
        self.attempt = 0
        self.stalls = 0
        self.restarted = False

    def check(self) -> None:
        if self.cancel is not None:
            self.cancel.check()
        check_deadline(self.url, self.policy, self.deadline)

    def restart(self, why: str) -> None:
        """The part was dropped to start over: allowed once, then DownloadError(why)."""
        if self.restarted:
            raise DownloadError(f"{self.url}: {why}")
        self.restarted = True

    def wait(self, exc: Retryable) -> None:
        """Sleep before the next attempt, or raise DownloadError when there is none."""
        if self.cancel is not None and self.cancel.cancelled:
            raise Cancelled()
        self.attempt += 1
        self.stalls += exc.stalled
        policy, reason, retry_after = self.policy, exc.reason, exc.retry_after
        stall_limit = policy.stall_retries if policy.stall_retries is not None else policy.retries
        if self.attempt > policy.retries or self.stalls > stall_limit:
            raise DownloadError(f"{self.url}: {reason} (gave up after {self.attempt} attempts)")
        if retry_after is not None and retry_after > policy.max_retry_after:
            raise DownloadError(f"{self.url}: {reason}; server asks to retry after {retry_after:.0f}s")
        delay = policy.delay(self.attempt, retry_after)
        check_deadline(self.url, policy, self.deadline, delay)
        if self.notify is not None:
            self.notify(f"{self.url}: {reason}; retrying in {delay:.0f}s "
                        f"(attempt {self.attempt + 1} of {policy.retries + 1})")
        if self.cancel is not None:
            self.cancel.sleep(delay)
        else:
            time.sleep(delay)


def open_body(source: Source, offset: int, validator: str | None, timeout: tuple[float, float],
              cancel: Cancel | None) -> Body:
    """``source.open(...)``, given up at once (Cancelled) when the run is cancelled meanwhile.

    A request waiting for its answer holds no socket the watchdog could shut down, so the open runs
    on its own thread while this one watches ``cancel``; an open given up closes its body when it
    comes (its timeouts bound how long that takes)."""
    if cancel is None:
        return source.open(offset, validator, timeout)
    done = threading.Event()
    mutex = threading.Lock()
    box: dict = {}

    def run() -> None:
        try:
            box["body"] = source.open(offset, validator, timeout)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
        with mutex:
            done.set()
            if box.get("abandoned") and "body" in box:
                box["body"].close()

    threading.Thread(target=run, name="tvpack-open", daemon=True).start()
    while not done.wait(Watchdog.POLL):
        if cancel.cancelled:
            with mutex:
                if not done.is_set():
                    box["abandoned"] = True
                    raise Cancelled()
    if "error" in box:
        raise box["error"]
    return box["body"]


# -- into a part file -------------------------------------------------------------------------------

def fetch(source: Source, part: Path, verifier: Verifier, policy: Policy = DEFAULT_POLICY, *,
          on_bytes: ProgressFn | None = None, on_total: TotalFn | None = None, cancel: Cancel | None = None,
          notify: NoticeFn | None = None, ledger: SpaceLedger | None = None) -> Result:
    """Stream ``source`` into ``part`` (continuing what is there), fsync and verify it; the disk space it needs
    is reserved in ``ledger`` (the run's, shared by its parallel transfers; None: this transfer's own).

    Raises DownloadError (after retries, or at once when it cannot heal), IntegrityError (the part
    is removed), CacheError (the disk cannot take it), Cancelled (the part is kept to resume)."""
    retrier = Retrier(source.url, policy, cancel, notify)
    starts: list[int] = []  # where each body began: the first is what this call resumed from
    while True:
        retrier.check()
        offset = prehash(part, verifier, policy.chunk_size)
        if offset == 0:
            discard_part(part)
        try:
            digest = _fetch_attempt(source, part, verifier, policy, offset, on_bytes, on_total, cancel,
                                    retrier.deadline, starts, ledger)
            return Result(source.url, digest, verifier.count, starts[0], retrier.attempt + 1)
        except Restart:
            discard_part(part)
            retrier.restart("server keeps answering ranges inconsistently")
        except IntegrityError:
            # A resumed transfer that fails verification may owe it to the old part: once more
            # from zero before blaming the source.
            discard_part(part)
            if offset == 0 or retrier.restarted:
                raise
            retrier.restarted = True
        except Retryable as exc:
            retrier.wait(exc)


def _validator_of(part: Path, url: str) -> str | None:
    state = read_state(part)
    if state.get("url") != url:
        return None
    if state.get("validator"):
        return state["validator"]
    etag = state.get("etag")  # a part written before validators were one field
    return etag if etag and not etag.startswith("W/") else state.get("last_modified")


def _fetch_attempt(source, part, verifier, policy, offset, on_bytes, on_total, cancel, deadline, starts,
                   ledger) -> str:
    body = open_body(source, offset, _validator_of(part, source.url) if offset else None, timeouts(policy, deadline),
                     cancel)
    starts.append(body.offset)
    try:
        if body.offset != offset:  # range ignored or object changed: a clean full download
            verifier.reset()
            if on_total is not None:
                on_total(body.total, -offset)  # take the bytes back
            offset = 0
        check_size(source.url, verifier, body)
        if on_total is not None:
            on_total(body.total, offset)
        need = (body.total - offset) if body.total is not None else None
        with reserve_space(part, need, ledger) as reservation:
            try:
                if not getattr(source, "content_addressed", False):  # else its name is its validator
                    write_state(part, {"url": source.url, "validator": body.validator, "total": body.total})
                f = open_part(part, "ab" if offset else "wb")
            except OSError as exc:
                raise disk_error(exc, part, need) from exc
            with f:
                pipeline = Pipeline(f, verifier, on_bytes, policy.chunk_size, cancel=cancel, reservation=reservation)
                pump(source.url, body, pipeline, policy, cancel, deadline, lambda exc: disk_error(exc, part, need))
                try:
                    return finish(part, f, verifier)
                except IntegrityError as exc:
                    raise explain(exc, verifier, body.content_type) from None
                except OSError as exc:
                    raise disk_error(exc, part, need) from exc
    finally:
        body.close()


def check_size(url: str, verifier: Verifier, body: Body) -> None:
    """Refuse a body announcing another size than the one expected, before reading it (an error
    page served in its place is described by its type and first bytes)."""
    if body.total is not None and verifier.size is not None and body.total != verifier.size:
        got = received(body.total, body.peek(), body.content_type) if body.offset == 0 else None
        raise IntegrityError(f"{url}: wrong size", expected=f"{verifier.size} bytes", got=got or f"{body.total} bytes")


def pump(url: str, body: Body, pipeline: Pipeline, policy: Policy, cancel: Cancel | None, deadline: float | None,
         write_error: Callable[[OSError], Exception]) -> None:
    """Run ``body`` through ``pipeline`` under a watchdog; raise Retryable when it ended short.

    A failed read whose cause was the watchdog becomes what the watchdog saw (Cancelled, the
    deadline's DownloadError, "too slow"); an OSError can then only be the write's: ``write_error``."""
    with Watchdog(url, policy, cancel, deadline, body.abort) as watchdog:
        try:
            pipeline.run(filler(body.read_into, watchdog))
        except IntegrityError as exc:
            raise explain(exc, pipeline.verifier, body.content_type) from None
        except OSError as exc:
            watchdog.raise_if_fired()
            error = write_error(exc)
            if error is exc:
                raise
            raise error from exc
        except Exception:
            watchdog.raise_if_fired()
            raise
        watchdog.raise_if_fired()
    if body.total is not None and pipeline.verifier.count < body.total:  # it counts from byte 0 of the object
        raise Retryable("connection closed early")


# -- into a caller's write --------------------------------------------------------------------------

class _WriteTo:
    """A ``write(data)`` callable dressed as the file a Pipeline writes to."""

    def __init__(self, write: Callable[[bytes], object]):
        self.write = write


def stream(source: Source, write: Callable[[bytes], object], verifier: Verifier, policy: Policy = DEFAULT_POLICY,
           *, on_bytes: ProgressFn | None = None, cancel: Cancel | None = None,
           notify: NoticeFn | None = None) -> Result:
    """Stream ``source`` to ``write`` (called with each chunk, in order, on a worker thread) and
    verify it. An interrupted body continues with a range from the bytes fed (skipping them when
    the source starts over); nothing is kept across calls. On any error whatever ``write``
    received must be discarded by the caller; an error raised by ``write`` is re-raised."""
    retrier = Retrier(source.url, policy, cancel, notify)
    verifier.reset()
    validator = None
    from_zero = False  # the source could not continue a range: read from byte 0 and skip what was fed
    while True:
        retrier.check()
        fed = verifier.count
        try:
            body = open_body(source, 0 if from_zero else fed, validator, timeouts(policy, retrier.deadline), cancel)
        except Restart:
            retrier.restart("server keeps answering ranges inconsistently")
            from_zero = True
            continue
        except Retryable as exc:
            retrier.wait(exc)
            continue
        try:
            validator = body.validator
            check_size(source.url, verifier, body)
            if body.offset < fed:  # the source started over: what was fed already is skipped
                body.read_into = _skipping(body.read_into, fed - body.offset)
            pipeline = Pipeline(_WriteTo(write), verifier, on_bytes, policy.chunk_size, cancel=cancel)
            pump(source.url, body, pipeline, policy, cancel, retrier.deadline, _passthrough)
            return Result(source.url, verifier.check(), verifier.count, 0, retrier.attempt + 1)
        except Retryable as exc:
            retrier.wait(exc)
        finally:
            body.close()


def _passthrough(exc: OSError) -> OSError:
    return exc


def _skipping(read: Callable[[memoryview], int], skip: int) -> Callable[[memoryview], int]:
    """``read`` with its first ``skip`` bytes dropped."""
    left = skip

    def read_into(view: memoryview) -> int:
        nonlocal left
        while left:
            k = read(view[:min(len(view), left)])
            if not k:
                return 0
            left -= k
        return read(view)
    return read_into


# -- reading a body --------------------------------------------------------------------------------

_FILL_SECONDS = 0.5
_FILL_SOON = 256 * 1024  # hand over a buffer this full when the source runs dry (stalls keep little in memory)


def filler(read: Callable[[memoryview], int], watchdog: Watchdog):
    """``fill(buffer)`` from ``read(view) -> bytes read`` (0 at the end), which returns what has arrived.

    The watchdog sees every read (a trickle, however large the buffer), and a buffer is handed on
    once the source runs dry or a slow link has filled part of it for a while, so a stall leaves
    little unwritten. A read that fails after some bytes hands those over first: they are kept."""
    deferred: list[BaseException] = []

    def fill(buf: bytearray) -> int:
        if deferred:
            raise deferred.pop()
        n = 0
        started = time.monotonic()
        with memoryview(buf) as view:
            while n < len(buf):
                want = len(buf) - n
                try:
                    k = read(view[n:])
                except Exception as exc:
                    if not n:
                        raise
                    deferred.append(exc)
                    break
                if not k:
                    break
                n += k
                watchdog.fed(k)
                if n >= _FILL_SOON and (k < want or time.monotonic() - started > _FILL_SECONDS):
                    break
        return n
    return fill


_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")


def received(count: int, head: bytes, content_type: str | None) -> str | None:
    """"1234 bytes of text/html starting '<!DOCTYPE html>...'" when what came looks like a page
    (a text type, or printable first bytes), else None: a checkpoint is binary."""
    kind = (content_type or "").split(";")[0].strip().lower()
    try:
        start = head.decode("utf-8")
        printable = bool(start) and all(c.isprintable() or c.isspace() for c in start)
    except UnicodeDecodeError:
        start, printable = head.decode("utf-8", "replace"), False
    if not (kind.startswith(_TEXT_TYPES) or printable):
        return None
    start = " ".join(start.split())[:40]
    return f"{count} bytes of {kind or 'unknown type'}" + (f" starting {start!r}" if start else "") + \
        " (an error page or login portal served instead of the file?)"


def explain(exc: IntegrityError, verifier: Verifier, content_type: str | None) -> IntegrityError:
    """The same refusal, saying what was received when it looks like an error page."""
    what = received(verifier.count, verifier.head, content_type)
    if what is None:
        return exc
    message = exc.message.rsplit(": expected ", 1)[0]
    return IntegrityError(message, expected=exc.expected, got=what, hint=exc.hint)
