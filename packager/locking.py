"""Inter-process file locks that say who holds them.

A :class:`FileLock` is an ``flock`` on a small file. Whoever holds it writes a :class:`Holder` into
it (pid, host, command, since when), so a process that has to wait can say what it waits for
("held by pid 4711 on build-3 since 10:02:13 (tvpack fetch resnet50)") instead of hanging
silently. Locks only avoid duplicate work in tvpack: correctness never rests on them (they can be
no-ops on NFS or Lustre).

Details that matter in shared caches:

* a lock file another user created and we cannot write is still locked (``flock`` needs only a
  read descriptor); the holder note is then simply not written;
* a new lock file in a group-shared directory is made group-writable (:func:`fsutil.share_with_group`);
* a lock file may be removed (``cache prune``) while others wait on it: after locking we check the
  path still names the locked file, else lock again, so two processes never both "hold" a lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .fsutil import share_with_group

_HOLDER_MAX = 4096  # bytes of holder note read back


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as the holder wrote it."""

    pid: int
    host: str
    command: str
    since: float  # seconds since the epoch

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {when} ({self.command})"

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "command": self.command, "since": self.since})

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["command"]), float(data["since"]))
        except (ValueError, TypeError, KeyError):
            return None


def this_command(limit: int = 120) -> str:
    """This process's command line, as a person typed it (``tvpack fetch ...``), shortened."""
    argv = list(sys.argv) or ["python"]
    prog = os.path.basename(argv[0])
    if prog in ("__main__.py", "-m", "-c") or prog.startswith("tvpack"):
        prog = "tvpack"
    text = shlex.join([prog, *argv[1:]])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_holder(holder: Holder | None) -> str:
    return f"held by {holder.describe()}" if holder else "held by another process"


class FileLock:
    """An exclusive ``flock`` on ``path`` (created on first use), with a holder note inside.

    Each acquisition opens its own descriptor, so threads of one process exclude each other too.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> tuple[int, bool]:
        """A descriptor on the lock file (created if missing) and whether it is writable."""
        flags = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o666)
        except FileExistsError:
            pass
        else:
            share_with_group(self.path, fd=fd)
            return fd, True
        try:
            return os.open(self.path, os.O_RDWR | flags), True
        except PermissionError:  # another user's lock file: a read descriptor locks just as well
            return os.open(self.path, os.O_RDONLY | flags), False

    def acquire(self, timeout: float | None = None, *, on_wait: Callable[[Holder | None], None] | None = None,
                check: Callable[[], None] | None = None) -> bool:
        """Lock, waiting up to ``timeout`` seconds (None: for ever, 0: not at all); True when held.

        ``on_wait(holder)`` is called once if the lock is busy; ``check()`` on every poll while
        waiting (it may raise, e.g. when the run is cancelled). OSError (no lock file can be made
        in a read-only directory...) propagates.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.02
        told = False
        while True:
            fd, writable = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            else:
                if self._still_named(fd):
                    self._fd = fd
                    if writable:
                        self._note(fd)
                    return True
                os.close(fd)  # removed or replaced while we waited: lock the file the path names now
                continue
            if not told:
                told = True
                if on_wait is not None:
                    on_wait(self.holder())
            if check is not None:
                check()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 1.5, 0.5)

    def try_acquire(self) -> bool:
        return self.acquire(timeout=0)

    def _still_named(self, fd: int) -> bool:
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def _note(self, fd: int) -> None:
        holder = Holder(os.getpid(), socket.gethostname() or "?", this_command(), time.time())
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.to_json().encode(), 0)
        except OSError:
            pass  # the note is only for people

    def holder(self) -> Holder | None:
        """The holder note in the lock file (None when absent, unreadable or half-written)."""
        try:
            with open(self.path, "rb") as f:
                text = f.read(_HOLDER_MAX)
        except OSError:
            return None
        return Holder.parse(text.decode("utf-8", "replace")) if text else None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # nobody holds it now; a stale note would mislead
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["FileLock", "Holder", "describe_holder", "this_command"]
