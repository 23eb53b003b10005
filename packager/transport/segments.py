"""The pieces of a segmented download, which :func:`.engine.fetch` drives: one object as byte ranges.

- :class:`Connections`: the extra connections a run may open beyond one per file, held by the run (a fetch of
  many files) and shared by its files, so parallel files cannot each open ``Policy.connections``.
- :class:`Plan`: the ranges still to fetch, handed out in order (the lowest first, so the written bytes stay
  close behind one another), and the finished ranges: the record kept beside the part file
  (``"ranges"`` in ``<part>.json``), with which a later run fetches only what is missing.
- :class:`Assembly`: bytes written at their offsets of the part file while the whole object's sha256 is taken
  over the contiguous prefix as it completes: the range at the front of that prefix is hashed from its
  buffers as it arrives; bytes that arrived ahead of it are read back (from the page cache) once the prefix
  reaches them, on a thread of their own, while later ranges are still arriving.
- :class:`Stop`: a :class:`~.stream.Cancel` that also follows the run's own, so that one failing range
  (or Ctrl-C) stops every connection of the file at once.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from ..fsutil import WriteBehind, pwrite_all
from .stream import Cancel, Cancelled, Verifier


class StartOver(Exception):
    """The ranges cannot be continued: the object changed between ranges (``single`` False: start over), or the
    server ignores Range (``single`` True: one stream from here on). ``reason`` is said once, as a notice."""

    def __init__(self, reason: str, *, single: bool):
        super().__init__(reason)
        self.reason = reason
        self.single = single


class Connections:
    """The connections a run may open beyond one per file, shared by the run's files (taken, given back)."""

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self._used = 0
        self._mutex = threading.Lock()

    def take(self) -> bool:
        with self._mutex:
            if self._used >= self.limit:
                return False
            self._used += 1
            return True

    def give(self) -> None:
        with self._mutex:
            self._used = max(0, self._used - 1)


class Stop(Cancel):
    """Set when one range fails for good (the others stop), or when ``outer`` (the run's Ctrl-C) is."""

    def __init__(self, outer: Cancel | None):
        super().__init__()
        self.outer = outer

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self.outer is not None and self.outer.cancelled)

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + max(0.0, seconds)
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            self._event.wait(min(left, 0.1))


# -- what to fetch, what is finished -------------------------------------------------------------------

def merged(intervals) -> list[list[int]]:
    """``[[start, end), ...]`` sorted, with touching and overlapping ones joined, empty ones dropped."""
    out: list[list[int]] = []
    for start, end in sorted((int(a), int(b)) for a, b in intervals if int(b) > int(a)):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def kept_ranges(state: dict, total: int) -> list[list[int]] | None:
    """The finished ranges a part's record names (None when it names none, or names bytes the object lacks)."""
    ranges = state.get("ranges")
    if not isinstance(ranges, list):
        return None
    try:
        kept = merged(ranges)
    except (TypeError, ValueError):
        return None
    if any(start < 0 or end > total for start, end in kept):
        return None
    return kept


def prefix_of(kept: list[list[int]]) -> int:
    """How many bytes from byte 0 on are finished."""
    return kept[0][1] if kept and kept[0][0] == 0 else 0


@dataclass
class Range:
    start: int
    end: int
    pos: int  # bytes start..pos are written

    @property
    def left(self) -> int:
        return self.end - self.pos


class Plan:
    """The ranges of an object of ``total`` bytes still to fetch (``size`` each, the lowest handed out first)
    around the ``kept`` ones, and the record of what is finished."""

    def __init__(self, total: int, kept: list[list[int]], size: int):
        self.total = total
        self.finished = merged(kept)
        self.queue: list[Range] = []
        pos = 0
        for start, end in self.finished + [[total, total]]:
            while pos < start:
                step = min(size, start - pos)
                self.queue.append(Range(pos, pos + step, pos))
                pos += step
            pos = max(pos, end)
        self.active: list[Range] = []
        self._mutex = threading.Lock()

    @property
    def kept(self) -> int:
        return sum(end - start for start, end in self.finished)

    def take(self) -> Range | None:
        with self._mutex:
            if not self.queue:
                return None
            rng = self.queue.pop(0)
            self.active.append(rng)
            return rng

    def waiting(self) -> int:
        with self._mutex:
            return len(self.queue)

    def following(self, rng: Range) -> Range | None:
        """The range right after ``rng`` if nobody has taken it (a body that runs on can continue into it)."""
        with self._mutex:
            if self.queue and self.queue[0].start == rng.end:
                nxt = self.queue.pop(0)
                self.active.append(nxt)
                return nxt
            return None

    def done(self, rng: Range) -> None:
        with self._mutex:
            self.active.remove(rng)
            self.finished = merged(self.finished + [[rng.start, rng.end]])

    def record(self) -> list[list[int]]:
        """Finished ranges, and the written start of each range in progress (what a later run keeps)."""
        with self._mutex:
            return merged(self.finished + [[r.start, r.pos] for r in self.active])


# -- the part file: writes at offsets, the prefix hashed -----------------------------------------------

class FileTarget:
    """Where the object's bytes go: a file open on ``fd`` (the part file), byte ``pos`` of the object at ``pos``."""

    def __init__(self, fd: int):
        self.fd = fd
        self.behind = WriteBehind(fd)  # the connections' writes, whatever their order, flushed as they go

    def write_at(self, pos: int, view) -> None:
        pwrite_all(self.fd, view, pos)
        self.behind.wrote(len(view))

    def read_at(self, pos: int, n: int) -> bytes:
        return os.pread(self.fd, n, pos)

    def sync(self) -> None:
        os.fsync(self.fd)


class Assembly:
    """Bytes written at their offsets of ``target`` (:meth:`write`; a :class:`FileTarget`, or anything with its
    ``write_at``, ``read_at`` and ``sync``), and ``verifier`` fed the object's bytes in order: a write at the
    front of the hashed prefix is hashed from its buffer; bytes written ahead of it (and the ``kept`` ranges of an
    earlier run, which are re-hashed) are read back when the prefix reaches them."""

    READ_BACK = 4 << 20

    def __init__(self, target, verifier: Verifier, kept: list[list[int]], total: int):
        self.target, self.verifier, self.total = target, verifier, total
        self.hashed = 0  # the prefix fed to the verifier
        self.ahead: list[list[int]] = merged(kept)  # written, not yet hashed
        self.error: BaseException | None = None
        self._busy = False  # the prefix is being hashed (by a writer or the read-back thread)
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read_back, name="tvpack-hash-prefix", daemon=True)
        verifier.reset()
        self._thread.start()

    def write(self, pos: int, view: memoryview) -> None:
        """Write ``view`` at ``pos`` (raises OSError), then hash it if it is the prefix's next bytes."""
        self.target.write_at(pos, view)
        end = pos + len(view)
        with self._cond:
            if self.error is not None:
                raise self.error
            front = not self._busy and pos <= self.hashed < end and not self._ahead_of(self.hashed)
            if not front:
                self.ahead = merged(self.ahead + [[pos, end]])
                self._cond.notify_all()
                return
            self._busy = True
            skip = self.hashed - pos
        self._feed(view[skip:], end)

    def _ahead_of(self, pos: int) -> bool:
        return bool(self.ahead) and self.ahead[0][0] <= pos

    def _feed(self, view, end: int) -> None:
        error = None
        try:
            self.verifier.update(view)
        except BaseException as exc:  # noqa: BLE001 - the verifier refuses: every writer learns it
            error = exc
        self._hashed(end, error)
        if error is not None:
            raise error

    def _hashed(self, end: int, error: BaseException | None) -> None:
        """The hashing that ran outside the lock is over: every byte before ``end`` is hashed, or it failed with
        ``error`` (kept for every writer and for :meth:`finish`)."""
        with self._cond:
            self.hashed = end if error is None else self.hashed
            self.error = self.error or error
            self._busy = False
            self._cond.notify_all()

    def _read_back(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (self._busy or self.error is not None or not self._ahead_of(self.hashed)):
                    self._cond.wait()
                if self._stopped:
                    return
                start, end = self.ahead.pop(0)
                start = max(start, self.hashed)
                self._busy = True
            try:
                pos = start
                while pos < end:
                    data = self.target.read_at(pos, min(self.READ_BACK, end - pos))
                    if not data:
                        raise OSError(f"the part file ends at {pos} of {end}")
                    self.verifier.update(data)
                    pos += len(data)
                error = None
            except BaseException as exc:  # noqa: BLE001 - raised by finish
                error = exc
            self._hashed(end, error)

    def finish(self) -> None:
        """Wait until every byte of the object is hashed (raises what the hashing raised)."""
        with self._cond:
            while self.error is None and (self.hashed < self.total or self._busy):
                self._cond.wait()
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()
