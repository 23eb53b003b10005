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

- segmented downloads (:class:`_Segmented`, over the pieces of :mod:`.segments`): an object of at least
  ``Policy.segment_threshold`` bytes from a source that serves ranges (``segmentable``) is fetched as ranges
  over up to ``Policy.connections`` connections, written at their offsets into the one part file, its
  sha256 taken over the contiguous prefix as it completes; the finished ranges are recorded beside the part
  (``"ranges"`` in ``<part>.json``) so that the next run fetches only the missing ones. Each range has the
  retries above; one that fails for good, or Ctrl-C, stops every connection. A server that ignores Range, or
  gives no length or validator, gets one stream (one notice says why); an object that changes between
  ranges is fetched again from the start (one notice).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import DownloadError, IntegrityError
from ..fsutil import SpaceLedger, reserve_space, share_with_group
from .segments import Assembly, Connections, FileTarget, Plan, Range, StartOver, Stop, kept_ranges, prefix_of
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
    _give_buffers,
    _take_buffers,
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
    end: int | None = None  # where the bytes stop (a range's end), when known


class Source(Protocol):
    """Something whose bytes can be opened from an offset: an http(s) url, an S3 object, a file, a blob."""

    url: str  # for messages
    # content_addressed: bool  (optional, default False) its name is its validator: no state beside the part
    # segmentable: bool  (optional, default False) ``open`` takes ``end=`` (a range): large objects come in ranges

    def open(self, offset: int, validator: str | None, timeout: tuple[float, float]) -> Body:
        """The object from byte ``offset`` (``timeout``: seconds to connect, to wait for an answer); a
        segmentable source also takes ``end=`` (the bytes ``offset``..``end`` only).

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
              cancel: Cancel | None, end: int | None = None) -> Body:
    """``source.open(...)``, given up at once (Cancelled) when the run is cancelled meanwhile.

    A request waiting for its answer holds no socket the watchdog could shut down, so the open runs
    on its own thread while this one watches ``cancel``; an open given up closes its body when it
    comes (its timeouts bound how long that takes)."""
    def opening() -> Body:
        return source.open(offset, validator, timeout) if end is None else \
            source.open(offset, validator, timeout, end=end)

    if cancel is None:
        return opening()
    done = threading.Event()
    mutex = threading.Lock()
    box: dict = {}

    def run() -> None:
        try:
            box["body"] = opening()
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
          notify: NoticeFn | None = None, ledger: SpaceLedger | None = None,
          connections: Connections | None = None) -> Result:
    """Stream ``source`` into ``part`` (continuing what is there), fsync and verify it; the disk space it needs
    is reserved in ``ledger`` (the run's, shared by its parallel transfers; None: this transfer's own). A large
    object comes in ranges over several connections, the extra ones taken from ``connections`` (the run's,
    shared by its parallel transfers; None: ``policy.connections`` for this transfer alone).

    Raises DownloadError (after retries, or at once when it cannot heal), IntegrityError (the part
    is removed), CacheError (the disk cannot take it), Cancelled (the part is kept to resume)."""
    retrier = Retrier(source.url, policy, cancel, notify)
    segmented = _Segmented(source, part, verifier, policy, retrier, on_bytes=on_bytes, on_total=on_total,
                           ledger=ledger, connections=connections)
    starts: list[int] = []  # where each body began: the first is what this call resumed from
    while True:
        retrier.check()
        kept = segmented.kept()
        offset = sum(end - start for start, end in kept[1]) if kept else prehash(part, verifier, policy.chunk_size)
        if offset == 0:
            discard_part(part)
        try:
            if kept:
                return segmented.run(*kept)
            outcome = _fetch_attempt(source, part, verifier, policy, offset, on_bytes, on_total, cancel,
                                     retrier.deadline, starts, ledger, segmented)
            if isinstance(outcome, Result):
                return outcome
            return Result(source.url, outcome, verifier.count, starts[0], retrier.attempt + 1)
        except StartOver as exc:
            segmented.start_over(exc)
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
                   ledger, segmented: "_Segmented") -> str | Result:
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
        if offset == 0 and segmented.worth(body):
            return segmented.run(body.total, [], body.validator, body)
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
            try:
                with f:
                    pipeline = Pipeline(f, verifier, on_bytes, policy.chunk_size, cancel=cancel,
                                        reservation=reservation)
                    pump(source.url, body, pipeline, policy, cancel, deadline, lambda exc: disk_error(exc, part, need))
                    try:
                        return finish(part, f, verifier)
                    except IntegrityError as exc:
                        raise explain(exc, verifier, body.content_type) from None
                    except OSError as exc:
                        raise disk_error(exc, part, need) from exc
            except OSError as exc:
                # closing the part flushes what its buffer still holds: on a full disk that fails again, and the
                # raw OSError would replace the one-line error raised inside
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


# -- in ranges, over several connections -------------------------------------------------------------

class _Segmented:
    """Whether and how one :func:`fetch` goes in ranges (see the module docstring): a fresh object whose
    first answer shows it large enough, or a part whose record names finished ranges."""

    def __init__(self, source: Source, part: Path, verifier: Verifier, policy: Policy, retrier: Retrier, *,
                 on_bytes: ProgressFn | None, on_total: TotalFn | None, ledger: SpaceLedger | None,
                 connections: Connections | None):
        self.source, self.part, self.verifier, self.policy, self.retrier = source, part, verifier, policy, retrier
        self.on_bytes, self.on_total, self.ledger = on_bytes, on_total, ledger
        self.connections = connections if connections is not None else Connections(policy.connections - 1)
        self.single = policy.connections <= 1 or not getattr(source, "segmentable", False)
        self.content_addressed = getattr(source, "content_addressed", False)

    def say(self, message: str) -> None:
        if self.retrier.notify is not None:
            self.retrier.notify(f"{self.source.url}: {message}")

    def worth(self, body: Body) -> bool:
        """Whether the object ``body`` opens (from byte 0) comes in ranges; when it is large but cannot, say why."""
        if self.single:
            return False
        large = self.policy.segment_threshold
        if body.total is None:
            if self.verifier.size is None or self.verifier.size >= large:
                self.say("the server gives no length; one connection")
                self.single = True
            return False
        if body.total < large:
            return False
        if body.validator is None and not self.content_addressed:
            self.say("the server names no version of the file (no ETag or Last-Modified); one connection")
            self.single = True
            return False
        return True

    def kept(self) -> tuple[int, list[list[int]], str | None] | None:
        """(total, finished ranges, validator) of a part an earlier run fetched in ranges, else None."""
        state = read_state(self.part)
        if "ranges" not in state:
            return None
        total = state.get("total")
        usable = not self.single and state.get("url") == self.source.url and isinstance(total, int) and total > 0 \
            and (self.verifier.size is None or total == self.verifier.size) and self.part.exists() \
            and bool(state.get("validator") or self.content_addressed)
        kept = kept_ranges(state, total) if usable else None
        if kept is None:  # one stream from another source, with one connection...: from the finished prefix
            self._one_stream(state)
            return None
        return total, kept, state.get("validator")

    def start_over(self, exc: StartOver) -> None:
        """The ranges cannot go on: one stream from the finished prefix (the server ignores Range), or, once,
        everything again (the object changed)."""
        self.say(exc.reason)
        if exc.single:
            self.single = True
            self._one_stream(read_state(self.part))
            return
        discard_part(self.part)
        self.retrier.restart(exc.reason)

    def _one_stream(self, state: dict) -> None:
        """The part as one stream continues it: its finished prefix, without the record of ranges."""
        total = state.get("total")
        prefix = prefix_of(kept_ranges(state, total) or []) if isinstance(total, int) else 0
        try:
            os.truncate(self.part, prefix)
            if prefix:
                write_state(self.part, {k: v for k, v in state.items() if k != "ranges"})
                return
        except OSError:
            pass
        discard_part(self.part)

    def run(self, total: int, kept: list[list[int]], validator: str | None, body: Body | None = None) -> Result:
        """The missing ranges of the object (``body``: the first answer, from byte 0), the part fsynced and checked."""
        plan = Plan(total, kept, max(1, self.policy.segment_size))
        need = total - plan.kept
        with reserve_space(self.part, need, self.ledger) as reservation:
            try:
                write_state(self.part, {"url": self.source.url, "validator": validator, "total": total,
                                        "ranges": plan.finished})
                fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o666)
                share_with_group(self.part, fd=fd)
            except OSError as exc:
                if body is not None:
                    body.close()
                raise disk_error(exc, self.part, need) from exc
            try:
                return self.assemble(FileTarget(fd), plan, validator, body, reservation)
            finally:
                os.close(fd)

    def assemble(self, target, plan: Plan, validator: str | None, body: Body | None = None,
                 reservation=None) -> Result:
        """The ranges of ``plan`` into ``target``, synced and checked (the part file's, or a caller's target)."""
        kept = plan.kept
        if self.on_total is not None:
            self.on_total(plan.total, kept)
        assembly = Assembly(target, self.verifier, plan.finished, plan.total)
        ranges = _Ranges(self, plan, assembly, validator, reservation)
        try:
            ranges.run(body)
            assembly.finish()
            target.sync()
        except OSError as exc:
            if self.part is None:
                raise
            raise disk_error(exc, self.part, plan.total - plan.kept) from exc
        finally:
            assembly.close()
        try:
            digest = self.verifier.check()
        except IntegrityError:
            if self.part is not None:
                discard_part(self.part)
            raise
        return Result(self.source.url, digest, plan.total, kept, self.retrier.attempt + 1)


class _Ranges:
    """The connections of one segmented fetch: each takes the lowest range nobody has, fetches it (with the
    engine's retries) and takes the next; a body that runs on past its range's end continues into the next
    one when nobody has taken it. More connections join as the run's :class:`~.segments.Connections` allow."""

    GRACE = 5.0  # seconds the connections get to stop after Ctrl-C in the waiting thread

    def __init__(self, segmented: _Segmented, plan: Plan, assembly: Assembly, validator: str | None, reservation):
        self.s, self.plan, self.assembly, self.validator, self.reservation = \
            segmented, plan, assembly, validator, reservation
        self.stop = Stop(segmented.retrier.cancel)
        self.confirmed = False  # a ranged request was answered with its range
        self.errors: list[BaseException] = []
        self._running = 0
        self._cond = threading.Condition()
        self._progress = threading.Lock()
        self._saving = threading.Lock()
        self._growing = threading.Lock()

    def run(self, body: Body | None) -> None:
        first = self.plan.take()
        if first is None:
            if body is not None:
                body.close()
            return
        if body is not None:
            body.end = self.plan.total
        self._spawn(first, body, extra=False)
        self._grow()
        try:
            with self._cond:
                while self._running:
                    self._cond.wait(0.2)
        except BaseException:  # Ctrl-C in this thread: every connection stops, the record is kept
            self.stop.cancel()
            with self._cond:
                self._cond.wait_for(lambda: not self._running, timeout=self.GRACE)
            self.save()
            raise
        self.save()
        if self.errors:
            real = [e for e in self.errors if not isinstance(e, Cancelled)]
            if self.s.retrier.cancel is not None and self.s.retrier.cancel.cancelled or not real:
                raise Cancelled()
            raise real[0]

    def _spawn(self, rng: Range, body: Body | None, extra: bool) -> None:
        with self._cond:
            self._running += 1
        threading.Thread(target=self._work, args=(rng, body, extra), name="tvpack-range", daemon=True).start()

    def _grow(self) -> None:
        """More connections while ranges wait for one (and the run allows)."""
        with self._growing:
            while not self.stop.cancelled and self._running < self.s.policy.connections and self.plan.waiting() \
                    and self.s.connections.take():
                rng = self.plan.take()
                if rng is None:
                    self.s.connections.give()
                    return
                self._spawn(rng, None, extra=True)

    def _work(self, rng: Range | None, body: Body | None, extra: bool) -> None:
        try:
            while rng is not None:
                body = self._fetch(rng, body)
                self.plan.done(rng)
                self.save()
                following = self.plan.following(rng) if body is not None else None
                if following is None:
                    body = _closed(body)
                    self._grow()
                    following = self.plan.take()
                rng = following
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            with self._cond:
                self.errors.append(exc)
            self.stop.cancel()
        finally:
            _closed(body)
            if extra:
                self.s.connections.give()
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _fetch(self, rng: Range, body: Body | None) -> Body | None:
        """``rng`` written (retried as the policy says); the body when it runs on past the range, else None."""
        s = self.s
        retrier = Retrier(s.source.url, s.policy, self.stop, s.retrier.notify)
        retrier.deadline = s.retrier.deadline
        while rng.left:
            self.stop.check()
            try:
                if body is None:
                    body = self._open(rng)
                self._read(rng, body)
            except Retryable as exc:
                body = _closed(body)
                retrier.wait(exc)
        if body is not None and (body.end or 0) > rng.end:
            return body
        return _closed(body)

    def _open(self, rng: Range) -> Body:
        s = self.s
        try:
            body = open_body(s.source, rng.pos, self.validator, timeouts(s.policy, s.retrier.deadline), self.stop,
                             end=rng.end)
        except Restart:
            raise StartOver("the server answers ranges inconsistently; one connection", single=True) from None
        try:
            if body.offset != rng.pos:
                self._refused(body)
            changed = not s.content_addressed and body.validator and self.validator \
                and body.validator != self.validator
            if changed or (body.total is not None and body.total != self.plan.total):
                raise StartOver("changed on the server while it was fetched in ranges; starting over", single=False)
        except BaseException:
            body.close()
            raise
        self.confirmed = True
        body.end = rng.end
        return body

    def _refused(self, body: Body) -> None:
        """A range answered with the object from byte 0: the server ignores Range, or the object changed."""
        if body.validator != self.validator and not self.s.content_addressed:
            raise StartOver("changed on the server while it was fetched in ranges; starting over", single=False)
        if not self.confirmed:
            raise StartOver("the server ignores Range (answers with the whole file); one connection", single=True)
        raise Retryable("a range was answered with the whole file")

    def _read(self, rng: Range, body: Body) -> None:
        """``body`` into the part until ``rng`` ends (Retryable when it ends first)."""
        s = self.s
        (buf,) = _take_buffers(1, s.policy.chunk_size)
        try:
            with Watchdog(s.source.url, s.policy, self.stop, s.retrier.deadline, body.abort) as watchdog:
                fill = filler(body.read_into, watchdog)
                view = memoryview(buf)
                try:
                    while rng.left:
                        n = fill(view[:min(len(view), rng.left)])
                        if not n:
                            break
                        self._wrote(rng, view[:n])
                except Exception:
                    watchdog.raise_if_fired()
                    raise
                watchdog.raise_if_fired()
        finally:
            _give_buffers([buf])
        if rng.left:
            raise Retryable("connection closed early")

    def _wrote(self, rng: Range, view: memoryview) -> None:
        try:
            self.assembly.write(rng.pos, view)
        except IntegrityError as exc:
            raise explain(exc, self.s.verifier, None) from None
        except OSError as exc:
            if self.s.part is None:  # a caller's target: its write errors are its own
                raise
            raise disk_error(exc, self.s.part, self.plan.total - self.plan.kept) from exc
        rng.pos += len(view)
        with self._progress:
            if self.reservation is not None:
                self.reservation.wrote(len(view))
            if self.s.on_bytes is not None:
                self.s.on_bytes(len(view))

    def save(self) -> None:
        """The record beside the part: the finished ranges (and the written start of those in progress)."""
        s = self.s
        if s.part is None:
            return
        with self._saving:
            try:
                write_state(s.part, {"url": s.source.url, "validator": self.validator, "total": self.plan.total,
                                     "ranges": self.plan.record()})
            except OSError:
                pass  # losing the record costs only a resume: the hash still decides


def _closed(body: Body | None) -> None:
    if body is not None:
        body.close()
    return None


def fetch_ranges(source: Source, target, verifier: Verifier, total: int, policy: Policy = DEFAULT_POLICY, *,
                 on_bytes: ProgressFn | None = None, cancel: Cancel | None = None, notify: NoticeFn | None = None,
                 connections: Connections | None = None) -> Result:
    """``source`` (``total`` bytes, a segmentable source) in ranges over up to ``policy.connections`` connections
    into ``target`` (its ``write_at(pos, view)`` places bytes, ``read_at(pos, n)`` gives them back for the hash,
    ``sync()`` makes them durable), ``verifier`` fed every byte in order. Nothing is kept across calls.

    Raises :class:`~.segments.StartOver` when the source does not serve ranges (said in one notice: stream it
    instead), and what :func:`fetch` raises; a write error of ``target`` is raised as it is."""
    retrier = Retrier(source.url, policy, cancel, notify)
    segmented = _Segmented(source, None, verifier, policy, retrier, on_bytes=on_bytes, on_total=None, ledger=None,
                           connections=connections)
    try:
        return segmented.assemble(target, Plan(total, [], max(1, policy.segment_size)), None)
    except StartOver as exc:
        segmented.say(exc.reason)
        raise


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
