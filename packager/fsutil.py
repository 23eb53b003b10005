"""Small file-system helpers shared by the cache, bundles, mirrors and lockfiles.

* :func:`temp_path`: a unique hidden name beside a final path, for a file written then renamed.
* :func:`atomic_writer` (a descriptor to write, renamed into place at the end) / :func:`atomic_write_bytes` /
  :func:`atomic_write_text` / :func:`atomic_write_json`: a small file
  written to such a temp name and renamed into place, so readers see the old file or the new one,
  never a part of either; nothing is left behind on failure.
* :func:`fsync_dir`: make renames in a directory survive a crash (best effort).
* :func:`share_with_group` / :func:`make_dirs`: in a directory shared by a team (setgid or
  group-writable, ``chgrp TEAM DIR; chmod 2775 DIR``), what we create stays writable by the group
  whatever the creator's umask, as git's ``core.sharedRepository=group`` does.
* :class:`WriteBehind`: keep a large file's dirty pages bounded while it is written.
* :func:`remove_stale_temps`: clean up the temp files of a process that was killed mid-write
  (:func:`pid_alive` says whether a pid still runs).
* :func:`hash_file`: the sha256 of a file, read in large chunks.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import CacheError

NAME_STEM_MAX = 127  # bytes of a file name kept in derived names (temp, part, lock): 255 is the usual limit


def short_name(filename: str, limit: int = NAME_STEM_MAX) -> str:
    """``filename`` as it appears in names derived from it: itself, or when too long for those,
    a prefix and a hash of the whole name (unique, and still recognisable by people)."""
    raw = os.fsencode(filename)
    if len(raw) <= limit:
        return filename
    digest = hashlib.sha256(raw).hexdigest()[:16]
    prefix = raw[: limit - len(digest) - 1].decode("utf-8", "ignore")  # never half a character
    return f"{prefix}~{digest}"


def temp_path(dest, suffix: str = ".tmp") -> Path:
    """``.<name>.<pid>.<random hex><suffix>`` beside ``dest``: unique across processes and threads
    (``<name>`` shortened by :func:`short_name` so that a name near 255 bytes still fits)."""
    dest = Path(dest)
    return dest.with_name(f".{short_name(dest.name)}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def temps_of(dest, suffix: str = ".tmp") -> list[tuple[Path, int]]:
    """The :func:`temp_path` files of ``dest`` there are now, whoever writes them: ``(path, pid of the writer)``."""
    dest = Path(dest)
    prefix = f".{short_name(dest.name)}."
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    found = []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid, _, token = name[len(prefix):-len(suffix)].partition(".")
        if pid.isdigit() and len(token) == 8:
            found.append((dest.parent / name, int(pid)))
    return found


def remove_stale_temps(dest, suffix: str = ".tmp", *, min_age: float = 60.0) -> list[Path]:
    """Remove :func:`temp_path` files of ``dest`` left by a killed process (SIGKILL, OOM, power
    loss): its pid is gone here and the file has not changed for ``min_age`` seconds (a pid of
    another PID namespace may look dead; the age keeps its live file safe). Returns what went."""
    removed = []
    for path, pid in temps_of(dest, suffix):
        try:
            if not left_behind(pid, path, quiet=min_age):
                continue
            path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a process in this PID namespace (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def hash_file(path, chunk_size: int = 8 << 20) -> str:
    """sha256 of a file, read in large chunks into one buffer (hashlib releases the GIL)."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f, chunk_size=chunk_size)[0]


def hash_stream(f, size: int | None = None, *, chunk_size: int = 8 << 20) -> tuple[str, int]:
    """(sha256, bytes read) of what ``f`` reads from where it stands, up to ``size`` bytes (else to its end): of
    an open file, what its descriptor reads whatever its path names by now."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(chunk_size))
    total = 0
    while size is None or total < size:
        n = f.readinto(view[: chunk_size if size is None else min(chunk_size, size - total)])
        if not n:
            break
        digest.update(view[:n])
        total += n
    return digest.hexdigest(), total


def file_identity(st: os.stat_result) -> tuple:
    """What changes when a file is replaced (device, inode) or written to (size, mtime, ctime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def descriptor_path(f) -> str | None:
    """``/proc/self/fd/N`` of an open file: opening it opens that very file (for a memory map of exactly the
    bytes that were hashed), whatever its path names now; None where there is no /proc."""
    candidate = f"/proc/self/fd/{f.fileno()}"
    try:
        return candidate if os.path.samestat(os.stat(candidate), os.fstat(f.fileno())) else None
    except OSError:
        return None


def written_since(before: os.stat_result, after: os.stat_result) -> bool:
    """Was a file (two fstats of one descriptor) written to in between? Size or mtime changed, or its ctime did
    while its link count did not (``touch -r`` after an edit; a rename over it or an unlink changes the ctime and
    the count, but not the bytes behind the descriptor)."""
    return (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
        before.st_nlink == after.st_nlink and before.st_ctime_ns != after.st_ctime_ns)


def fsync_dir(path) -> None:
    """fsync a directory (its entries, e.g. a rename into it); errors are ignored, as some network
    filesystems refuse fsync on directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def group_shared(directory) -> bool:
    """Is ``directory`` shared by a group: setgid, or writable by its group? (False if unreadable.)"""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_ISGID | stat.S_IWGRP))


def share_with_group(path, *, fd: int | None = None, is_dir: bool = False) -> None:
    """Give ``path`` (just created by us; ``fd`` open on it if at hand) group read-write, and a
    directory also group search and setgid, when its parent directory is :func:`group_shared`.

    Only adds bits, never removes any; best effort (only the owner may chmod).
    """
    if not group_shared(os.path.dirname(os.path.abspath(path))):
        return
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode if fd is not None else os.stat(path).st_mode)
        want = mode | stat.S_IRGRP | stat.S_IWGRP | (stat.S_IXGRP | stat.S_ISGID if is_dir else 0)
        if want != mode:
            if fd is not None:
                os.fchmod(fd, want)
            else:
                os.chmod(path, want)
    except OSError:
        pass


def make_dirs(path) -> None:
    """``mkdir -p path``, each directory created shared with the group when its parent is shared.

    Raises OSError (FileExistsError when a file is in the way) for the caller to word.
    """
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if directory.is_dir():  # another process made it meanwhile
                continue
            raise
        share_with_group(directory, is_dir=True)


@contextmanager
def atomic_writer(dest, *, durable: bool = True, mode: int | None = None, suffix: str = ".tmp",
                  open_mode: int = 0o666):
    """Write ``dest`` atomically: yields the descriptor of a new temp file beside it, renamed over ``dest`` when
    the block ends normally; on any exception in the block (or in the rename) the temp file is removed.

    ``durable``: fsync the file before the rename and the directory after it. ``mode``: the file's permission bits
    (else the default for a new file, umask applied, plus group read-write in a group-shared directory). ``OSError``
    propagates for the caller to word.
    """
    dest = Path(dest)
    tmp = temp_path(dest, suffix)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, open_mode)
        try:
            if mode is None:
                share_with_group(tmp, fd=fd)
            yield fd
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(dest.parent)


def write_all(fd: int, data) -> None:
    """Write all of ``data`` (bytes or a buffer) to ``fd``, however many ``os.write`` calls that takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (bytes or a buffer) to ``fd`` at ``offset`` (``os.pwrite``: the file offset is left
    alone, so threads may write their own parts of one file)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class WriteBehind:
    """Keeps a large file's dirty pages bounded while it is written (Linux ``sync_file_range``), from one thread or
    many, in order or at any offsets.

    Left alone, the kernel lets gigabytes of dirty pages pile up (its threshold is a share of memory), then
    throttles the writer hard and leaves a long ``fsync`` at the end while the disk sat idle. After every
    ``window`` bytes written this waits for the write-out it started last time and starts the write-out of what is
    dirty now, so the disk streams alongside the network and the final fsync (which still guarantees durability)
    finds little left to do. Pages stay in the page cache. Elsewhere, or where the file system refuses the call,
    it does nothing and the fsync does it all. ``flush``: called first (a buffered file's ``flush``).
    """

    WINDOW = 32 << 20

    def __init__(self, fd: int, *, window: int = WINDOW, flush: Callable[[], object] | None = None):
        self.fd, self.window, self.flush = fd, window, flush
        self._pending = 0
        self._lock = threading.Lock()

    def wrote(self, n: int) -> None:
        with self._lock:
            self._pending += n
            if self._pending < self.window:
                return
            self._pending = 0
        call = _sync_file_range()
        if call is None:
            return
        if self.flush is not None:
            self.flush()
        call(self.fd, 0, 0, _SFR_WAIT_BEFORE)  # what the last window started (nbytes 0: to the end of the file)
        call(self.fd, 0, 0, _SFR_WRITE)  # queued, not waited for; an error here costs only speed


_SFR_WAIT_BEFORE, _SFR_WRITE = 1, 2


@functools.lru_cache(maxsize=None)
def _sync_file_range():
    """libc's ``sync_file_range`` (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def atomic_write_bytes(dest, data: bytes, *, durable: bool = True, mode: int | None = None,
                       suffix: str = ".tmp") -> Path:
    """Replace ``dest`` with ``data`` atomically (:func:`atomic_writer`: a temp file beside it + ``os.replace``;
    ``durable``, ``mode`` and ``suffix`` as there)."""
    with atomic_writer(dest, durable=durable, mode=mode, suffix=suffix) as fd:
        write_all(fd, data)
    return Path(dest)


def atomic_write_text(dest, text: str, **kwargs) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(dest, text.encode("utf-8"), **kwargs)


def atomic_write_json(dest, data, *, indent: int | None = None, sort_keys: bool = False, newline: bool = False,
                      **kwargs) -> Path:
    """:func:`atomic_write_bytes` of ``json.dumps(data, indent=..., sort_keys=...)`` (plus a final
    newline when ``newline``)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys) + ("\n" if newline else "")
    return atomic_write_text(dest, text, **kwargs)



def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 part``, ``2 parts``, ``0 checkpoint files``: a count and its noun, agreed (``many`` for irregular ones)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def human_bytes(n: int | float | None) -> str:
    """``83.7 MB``: decimal units, as du --si and the progress bars show them."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# -- disk space ------------------------------------------------------------------------------------

class SpaceReservation:
    """Bytes a running transfer (or install) will still write to one file system."""

    def __init__(self, device: int, needed: int):
        self.device = device
        self.remaining = needed

    def wrote(self, n: int) -> None:
        self.remaining = max(0, self.remaining - n)


def _existing_dir(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a directory about to be created is on its file system)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


class SpaceLedger:
    """What the transfers of one run (a fetch of many files) have yet to write, per file system: held by the run
    and passed to each transfer, so N parallel transfers cannot each count the same free bytes."""

    def __init__(self):
        self._open: list[SpaceReservation] = []
        self._mutex = threading.Lock()

    @contextmanager
    def reserve(self, part, needed: int | None):
        """See :func:`reserve_space`."""
        if not needed:
            yield None
            return
        where = _existing_dir(Path(part).parent)
        try:
            free = shutil.disk_usage(where).free
            device = os.stat(where).st_dev
        except OSError:
            yield None
            return
        with self._mutex:
            promised = sum(r.remaining for r in self._open if r.device == device)
            if free - promised < needed:
                busy = f", {human_bytes(promised)} of them promised to transfers in progress" if promised else ""
                raise CacheError(f"not enough disk space in {Path(part).parent}: need {human_bytes(needed)}, "
                                 f"{human_bytes(free)} free{busy}")
            reservation = SpaceReservation(device, needed)
            self._open.append(reservation)
        try:
            yield reservation
        finally:
            with self._mutex:
                self._open.remove(reservation)


def reserve_space(part, needed: int | None, ledger: SpaceLedger | None = None):
    """Reserve ``needed`` bytes beside ``part`` (a file about to be written) for the duration of the block,
    or raise CacheError before anything is written.

    Free space is compared with what the other reservations of ``ledger`` (the run's; None: this one alone) on
    the same file system have yet to write. Yields the :class:`SpaceReservation` (None when the size or the
    free space is unknown).
    """
    return (ledger if ledger is not None else SpaceLedger()).reserve(part, needed)


__all__ = ["adopt", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "atomic_writer", "fsync_dir",
           "group_shared", "hash_file", "human_bytes", "left_behind", "make_dirs", "pid_alive", "pwrite_all",
           "remove_stale_temps", "reserve_space", "share_with_group", "short_name", "SpaceLedger",
           "SpaceReservation", "temp_path", "temps_of", "write_all", "WriteBehind"]


def quiet_for(path: Path, now: float) -> float:
    """Seconds since ``path`` (a file; or a directory, or anything in it) changed; 0 when it cannot be read."""
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            with os.scandir(path) as entries:
                times += [entry.stat(follow_symlinks=False).st_mtime for entry in entries]
    except OSError:
        return 0.0
    return now - max(times)


# -- what a dead process left: parts, staging directories, pull temps, temp files ---------------------------

def left_behind(pid: int, path: Path, *, ours: bool = False, quiet: float = 0.0, now: float | None = None) -> bool:
    """Whether ``path``, named for process ``pid`` of this host, was left behind by it: ``pid`` no longer runs here
    (or it is this very process and ``ours``: the caller knows none of its own work still uses it) and, with
    ``quiet``, nothing in it changed for that many seconds (a pid of another PID namespace may look dead: the age
    keeps its live files safe). The one rule for every kind of leftover (see :func:`adopt`)."""
    if pid == os.getpid():
        return ours
    if pid_alive(pid):
        return False
    return quiet <= 0 or quiet_for(path, time.time() if now is None else now) > quiet


def adopt(old: Path, mine: Path) -> bool:
    """Take over what a dead process left (:func:`left_behind`): ``old`` renamed to this process's own unique name
    ``mine``, so that of two adopters exactly one wins (the other's rename fails) and nobody shares a file."""
    try:
        os.rename(old, mine)
    except OSError:
        return False
    return True
