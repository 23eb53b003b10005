"""Progress and notices: what a long call tells the person waiting for it, through one object.

A :class:`Reporter` carries both: ``notice(message)`` (one line: a lock another process holds, a retry, a
mirror skipped) and ``progress(total, desc)`` (a byte counter with ``update``, ``reset`` and ``close``). The
library is silent unless given one (:data:`SILENT`, the default everywhere); the CLI builds a
:class:`TqdmReporter` (bars and notices on stderr) once per command and passes it down, inside the
:class:`packager.config.Config` or as ``reporter=``. A caller of the Python API can pass its own object
with the same two methods (a GUI, a log, a test's recorder: :class:`Recorder`).
"""
from __future__ import annotations

import sys
import threading
from typing import Protocol, runtime_checkable

__all__ = ["Progress", "Reporter", "SILENT", "Recorder", "Silent", "TqdmReporter", "reporter_for"]


@runtime_checkable
class Progress(Protocol):
    """A byte counter for one task. Safe to call from several threads."""

    def update(self, n: int) -> None: ...

    def reset(self, total: int | None = None) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Reporter(Protocol):
    """Where a library call reports what it does. ``progress`` with ``transient=False`` leaves the finished
    bar on screen (a command's total); transient ones (one file of many) disappear when closed."""

    def notice(self, message: str) -> None: ...

    def progress(self, total: int | None, desc: str, *, transient: bool = True) -> Progress: ...


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class Silent:
    """Says nothing: the library's default."""

    def notice(self, message: str) -> None:
        pass

    def progress(self, total: int | None, desc: str, *, transient: bool = True) -> Progress:
        return _NoProgress()


SILENT = Silent()


class _Counted:
    def __init__(self, recorder: "Recorder", desc: str, total: int | None):
        self.recorder, self.desc, self.total, self.done = recorder, desc, total, 0

    def update(self, n: int) -> None:
        with self.recorder._mutex:
            self.done += n

    def reset(self, total: int | None = None) -> None:
        with self.recorder._mutex:
            self.total, self.done = total, 0

    def close(self) -> None:
        pass


class Recorder:
    """Keeps what it is told: ``notices`` (the lines) and ``bars`` (each progress's desc, total and bytes done)."""

    def __init__(self):
        self.notices: list[str] = []
        self.bars: list[_Counted] = []
        self._mutex = threading.Lock()

    def notice(self, message: str) -> None:
        with self._mutex:
            self.notices.append(message)

    def progress(self, total: int | None, desc: str, *, transient: bool = True) -> Progress:
        bar = _Counted(self, desc, total)
        with self._mutex:
            self.bars.append(bar)
        return bar


class _Bar:
    """One tqdm bar in a row of its own; the row goes back to the reporter when the bar closes."""

    def __init__(self, owner: "TqdmReporter", bar, row: int):
        self.owner, self.bar, self.row = owner, bar, row

    def update(self, n: int) -> None:
        with self.owner._mutex:
            self.bar.update(n)

    def reset(self, total: int | None = None) -> None:
        with self.owner._mutex:
            self.bar.reset(total=total)

    def close(self) -> None:
        with self.owner._mutex:
            if self.row in self.owner._rows:
                self.bar.close()
                self.owner._rows.discard(self.row)


class TqdmReporter:
    """The CLI's: tqdm bars on stderr (when ``bars``: a terminal and no ``--quiet``), stacked in the lowest free
    rows (a fetch's total on top, one row per running transfer below); notices as ``tvpack: ...`` lines on
    stderr, written above the bars so they do not tear them."""

    def __init__(self, bars: bool = True, stream=None):
        self.bars = bars
        self.stream = stream
        self._rows: set[int] = set()
        self._mutex = threading.RLock()

    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def notice(self, message: str) -> None:
        line = f"tvpack: {message}"
        with self._mutex:
            if self._rows:
                from tqdm import tqdm

                tqdm.write(line, file=self._out())
            else:
                print(line, file=self._out(), flush=True)

    def progress(self, total: int | None, desc: str, *, transient: bool = True) -> Progress:
        if not self.bars:
            return _NoProgress()
        from tqdm import tqdm

        with self._mutex:
            row = min(set(range(len(self._rows) + 1)) - self._rows)
            self._rows.add(row)
            bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc=desc[-40:],
                       position=row, leave=not transient, dynamic_ncols=True, file=self._out())
        return _Bar(self, bar, row)


def reporter_for(reporter: Reporter | None = None, progress: bool = False) -> Reporter:
    """The reporter a call uses: the one given, else (``progress=True``, the older keyword) bars on stderr,
    else :data:`SILENT`."""
    if reporter is not None:
        return reporter
    return TqdmReporter() if progress else SILENT
