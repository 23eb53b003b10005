"""The checkpoint cache: fetch under locks, place atomically, remember what was verified.

Files land at ``<hub>/checkpoints/<basename(url)>``, the torch.hub layout, so torchvision finds them
and never downloads. Correctness never rests on the locks (they can be silent no-ops on NFS or
Lustre): every transfer writes its own uniquely named part file in the same directory, which is
fsynced and verified before ``os.replace`` gives it the final name. The per-file lock
(``<hub>/tvpack/locks/<file>.lock``) only stops N threads or processes from doing the same transfer
N times; its holder writes who it is into it, so a waiting fetch can say what it waits for.

A part file is named ``<file>.<host>.<pid>.<token>.tvpack-part`` (a very long ``<file>`` is
shortened to a prefix and a hash of the whole, so every name stays under the file system's limit);
one whose owner is gone (killed, interrupted) is taken over by the next fetch and resumed with a
Range request. ``cache prune`` never removes a part whose file lock someone holds, whatever their
pid namespace.

The verification index ``<hub>/tvpack/index.json`` records (sha256, size, mtime_ns, ctime_ns, inode)
of each file hashed, so unchanged files are never hashed twice (``file_sha256``): ctime and inode
are what a user cannot set back (``touch -r``, an edit that restores the mtime). Bundle manifests
installed under ``<hub>/tvpack/manifests/`` tell ``cache ls`` which weights a file belongs to.

A cache that is read-only to us (a read-only mount, another user's directory) serves every file
that is present and verified without writing anything; only what must be written fails, in one
line. In a group-shared cache (``chgrp TEAM DIR; chmod 2775 DIR``) everything created is left
usable by the whole group (:mod:`packager.fsutil`).
"""
from __future__ import annotations

import contextvars
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat as stat_module
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import env
from .errors import CacheError, DownloadError, IntegrityError, OfflineError, TvpackError, UsageError
from .formats.checkpoint import deep_check
from .formats.lockfile import dump_lockfile, read_lockfile, select_locked
from .fsutil import atomic_write_json, fsync_dir, hash_file, make_dirs, pid_alive, short_name
from .home import hub_dir as _hub_dir
from .locking import FileLock, describe_holder
from .registry import WeightsRef, hash_prefix_from_filename
from .snapshot import get_catalog, resolve
from .transport import DEFAULT_POLICY, Cancel, Cancelled, Policy, Verifier, discard_part, part_state_path, transfer
from .transport.urls import candidate_urls, normalize_mirror

INDEX_VERSION = 1
PART_SUFFIX = ".tvpack-part"
STALE_FOREIGN_PART = 3600.0  # seconds before another host's part file counts as abandoned
TORCH_HUB_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # torch.hub's own temp files
_PART_NAME = re.compile(
    r"^(?P<file>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)" + re.escape(PART_SUFFIX) + "$"
)
# fsutil.temp_path names: .<file>.<pid>.<hex8><suffix> (bundle install, atomic writes)
_TEMP_NAME = re.compile(r"^\.(?P<file>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})(?:\.tvpack-install|\.tmp)$")
_DEAD_TEMP_AGE = 60.0
_HOST = (re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host")[:40]
# A part name is <stem>.<host:40>.<pid:10>.<token:8>.tvpack-part (at most 200 bytes), its state
# file adds ".json" and an atomic write of that a ".<pid>.<hex8>.tmp" decoration: all under 255.
_STEM_MAX = 200 - (1 + 40 + 1 + 10 + 1 + 8 + len(PART_SUFFIX))


def _stem(filename: str) -> str:
    """``filename`` as it appears in part and lock names (shortened when too long for them)."""
    return short_name(filename, _STEM_MAX)


# -- places ----------------------------------------------------------------------------------------

def tvpack_dir(hub: Path) -> Path:
    return hub / "tvpack"


def index_path(hub: Path) -> Path:
    return tvpack_dir(hub) / "index.json"


def locks_dir(hub: Path) -> Path:
    return tvpack_dir(hub) / "locks"


def manifests_dir(hub: Path) -> Path:
    return tvpack_dir(hub) / "manifests"


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _unwritable(path: Path, why: str | None = None) -> CacheError:
    """One line saying the cache cannot be written here, and why."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if _read_only(probe):
        why = "it is on a read-only file system"
    elif why is None:
        why = f"permission denied for user {_user()}"
    return CacheError(f"cannot write to the cache at {path}: {why} (files already cached and verified can still "
                      "be used; to fetch more, use a writable TORCH_HOME or --torch-home)")


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _makedirs(path: Path) -> None:
    try:
        make_dirs(path)
    except FileExistsError:
        raise CacheError(f"cannot create directory {path}: a file is in the way") from None
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _unwritable(path) from None
        raise CacheError(f"cannot create directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _unwritable(path)


def _lock(hub: Path, name: str) -> FileLock:
    """A per-name inter-process lock (also excludes threads: each acquisition opens its own descriptor)."""
    return FileLock(locks_dir(hub) / f"{_stem(name)}.lock")


LOCK_WAIT = 900.0  # seconds to wait for another fetch of the same file before going ahead anyway
INDEX_LOCK_WAIT = 10.0  # the index is only a shortcut: skip an update rather than wait long
_lock_timeout: contextvars.ContextVar[float | None] = contextvars.ContextVar("tvpack_lock_timeout", default=None)


@contextmanager
def lock_timeout(seconds: float | None):
    """Within the block, a fetch waiting for another process's lock on a file gives up after
    ``seconds`` with a :class:`CacheError` naming the holder (None: ``TVPACK_LOCK_TIMEOUT``, else
    wait up to ``LOCK_WAIT`` and then go ahead without the lock). For callers that reach the cache
    through other layers (``bundle``, ``mirror``)."""
    token = _lock_timeout.set(seconds)
    try:
        yield
    finally:
        _lock_timeout.reset(token)


def _resolve_lock_timeout(explicit: float | None) -> float | None:
    if explicit is not None:
        return explicit
    scoped = _lock_timeout.get()
    return scoped if scoped is not None else env.lock_timeout()


@contextmanager
def _fetch_lock(hub: Path, name: str, run: "_Run"):
    """Hold the file's lock. While waiting, say once who holds it.

    With a lock timeout (``--lock-timeout``), giving up is a CacheError naming the holder.
    Without one, after ``LOCK_WAIT`` seconds go ahead without the lock: a lock that is never
    released (a soft lock left by a killed process on a filesystem without flock, a hung holder)
    must not hang every later fetch; going ahead only risks duplicate work, never a wrong file.
    """
    lock = _lock(hub, name)
    seen: list = []

    def waiting(holder) -> None:
        seen.append(holder)
        run.notify(f"waiting for {name}: {describe_holder(holder)}")

    timeout = run.lock_timeout if run.lock_timeout is not None else LOCK_WAIT
    try:
        got = lock.acquire(timeout=timeout, on_wait=waiting, check=run.cancel.check)
    except OSError as exc:
        raise CacheError(f"cannot lock {lock.path}: {exc.strerror or exc}") from None
    if not got:
        if run.lock_timeout is not None:
            holder = lock.holder() or (seen[0] if seen else None)
            raise CacheError(f"gave up after {run.lock_timeout:g}s waiting for the lock on {name}: "
                             f"{describe_holder(holder)} (--lock-timeout / TVPACK_LOCK_TIMEOUT)")
        run.notify(f"still waiting for {name} after {timeout:.0f}s; going ahead without the lock")
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


# -- the verification index ------------------------------------------------------------------------

_index_mutex = threading.Lock()


def _hub_of(path: Path) -> Path | None:
    """The hub directory of a checkpoint path, or None for a file outside any ``checkpoints/``."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _load_index(hub: Path) -> dict:
    try:
        data = json.loads(index_path(hub).read_text())
    except (OSError, ValueError, RecursionError):  # damaged or hostile: trust nothing, re-hash
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items() if isinstance(entry, dict)}  # damaged entries: forgotten


def _update_index(hub: Path, changes: dict[str, dict | None]) -> None:
    """Apply ``{filename: entry or None (drop)}``; best effort (the index is only a shortcut): a
    cache we cannot write, or an index lock held for long, skips the update."""
    try:
        probe = tvpack_dir(hub)
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            return  # a read-only cache: nothing to try (and no lock to take)
        make_dirs(locks_dir(hub))
        lock = _lock(hub, "index.json")
        with _index_mutex:
            if not lock.acquire(timeout=INDEX_LOCK_WAIT):
                return
            try:
                files = _load_index(hub)
                for name, entry in changes.items():
                    if entry is None:
                        files.pop(name, None)
                    else:
                        files[name] = entry
                # ".index.json.<pid>.<hex>.tmp": a leftover is found by prune (".index.*.tmp").
                # Not fsynced: the index is only a shortcut.
                atomic_write_json(index_path(hub), {"version": INDEX_VERSION, "files": files}, indent=1,
                                  sort_keys=True, durable=False)
            finally:
                lock.release()
    except OSError:
        pass


_KEY_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode")


def _key_of(st: os.stat_result) -> dict:
    # ctime and inode cannot be set back by a user: touch -r, or an in-place edit that restores
    # the mtime, still changes them, so such a file is hashed again.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _fresh(entry: dict | None, st: os.stat_result) -> bool:
    """Does an index entry describe the file as it is now? (Entries of older versions, without
    ctime and inode, never do: they are hashed once more.)"""
    if not isinstance(entry, dict):
        return False
    key = _key_of(st)
    return all(entry.get(name) == key[name] for name in _KEY_FIELDS)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def index_entry(path) -> dict | None:
    """What the index knows about ``path``, if the file is unchanged since it was hashed."""
    path = Path(path)
    hub = _hub_of(path)
    st = _stat(path)
    if hub is None or st is None:
        return None
    entry = _load_index(hub).get(path.name)
    return entry if _fresh(entry, st) else None


def record_verified(path, sha256: str, **extra) -> None:
    """Record that ``path`` (as it is now) hashes to ``sha256``; ``extra`` (weights, url) kept."""
    path = Path(path)
    hub = _hub_of(path)
    st = _stat(path)
    if hub is None or st is None:
        return
    old = _load_index(hub).get(path.name) or {}
    entry = {k: v for k, v in old.items() if k in ("weights", "url")}
    entry.update({k: v for k, v in extra.items() if v is not None})
    entry.update({"sha256": sha256, **_key_of(st), "checked_at": int(time.time())})
    if _fresh(old, st) and all(old.get(k) == v for k, v in entry.items() if k != "checked_at"):
        return  # nothing new to say: no write (a read-only or busy cache stays untouched)
    _update_index(hub, {path.name: entry})


def file_sha256(path) -> str:
    """sha256 of ``path``: from the index when unchanged, else hashed now and recorded."""
    entry = index_entry(path)
    if entry and entry.get("sha256"):
        return entry["sha256"]
    digest = hash_file(path)
    record_verified(path, digest)
    return digest


# -- what a file should be -------------------------------------------------------------------------

def _exact_size(ref: WeightsRef) -> int | None:
    # A pinned ref (lockfile, manifest) carries the exact size; the registry's is a rounded MB.
    return ref.size_hint if ref.sha256 else None


def _problem(ref: WeightsRef, sha256: str, size: int) -> str | None:
    """Why a file with this hash and size is not ``ref``'s, or None when it is."""
    exact = _exact_size(ref)
    if exact is not None and size != exact:
        return f"size {size}, expected {exact}"
    if ref.sha256 and sha256 != ref.sha256.lower():
        return f"sha256 {sha256}, pinned {ref.sha256}"
    prefix = ref.hash_prefix
    if prefix and not sha256.startswith(prefix):
        return f"sha256 starts {sha256[:len(prefix)]}, name promises {prefix}"
    return None


# -- fetching --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchResult:
    """What happened to one weights: ``status`` is cached, downloaded, missing, would-download,
    corrupt (dry-run/offline: present but wrong) or failed (``error`` says why)."""

    ref: WeightsRef
    path: Path
    status: str
    size: int | None = None
    sha256: str | None = None
    source: str | None = None
    resumed_from: int = 0
    error: str | None = None
    received: int = 0  # bytes that came over the wire in this run (a resume counts only what was missing)

    def to_dict(self) -> dict:
        return {
            "weights": self.ref.name, "url": self.ref.url, "path": str(self.path), "status": self.status,
            "size": self.size, "sha256": self.sha256, "source": self.source,
            "resumed_from": self.resumed_from, "received": self.received, "error": self.error,
        }


_released_parts: set[str] = set()  # part files this process gave up on (resumable by itself)
_released_mutex = threading.Lock()


def _part_abandoned(part: Path, match: re.Match) -> bool:
    if match["host"] != _HOST:
        try:
            return time.time() - part.stat().st_mtime > STALE_FOREIGN_PART
        except OSError:
            return False
    pid = int(match["pid"])
    if pid == os.getpid():
        with _released_mutex:
            return str(part) in _released_parts
    return not pid_alive(pid)


def _parts_of(ckpt: Path, filename: str) -> list[Path]:
    out = []
    try:
        names = os.listdir(ckpt)
    except OSError:
        return out
    stem = _stem(filename)
    for name in names:
        match = _PART_NAME.match(name)
        if match and match["file"] == stem:
            out.append(ckpt / name)
    return out


def _claim_part(ckpt: Path, filename: str, notify: Callable[[str], None] = lambda message: None) -> Path:
    """A part file for this process: an abandoned one taken over (to resume), else a new name.

    Taking over is an ``os.replace`` to our own unique name, so two claimants never share a file.
    A part we could not write (another user's, not shared with the group) is left alone.
    """
    mine = ckpt / f"{_stem(filename)}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{PART_SUFFIX}"
    candidates = []
    for part in _parts_of(ckpt, filename):
        match = _PART_NAME.match(part.name)
        try:
            size = part.stat().st_size
        except OSError:
            continue
        if _part_abandoned(part, match):
            candidates.append((size, part))
    for _size, part in sorted(candidates, reverse=True):
        if not os.access(part, os.R_OK | os.W_OK):
            notify(f"ignoring {part.name}: a partial download left by another user that you cannot write "
                   "(starting afresh; 'tvpack cache prune' by its owner removes it)")
            continue
        try:
            os.replace(part, mine)
        except OSError:
            continue
        with _released_mutex:
            _released_parts.discard(str(part))
        try:
            os.replace(part_state_path(part), part_state_path(mine))
        except OSError:
            pass
        return mine
    return mine


def _release_part(part: Path) -> None:
    if part.exists():
        with _released_mutex:
            _released_parts.add(str(part))


class _Bars:
    """tqdm bars on stderr: one total and one per running transfer (only when asked for)."""

    def __init__(self, enabled: bool, total_bytes: int | None, jobs: int):
        self.enabled = enabled
        self._slots = list(range(1, jobs + 1))
        self._used: set[int] = set()
        self._mutex = threading.Lock()
        self.total = None
        if enabled:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.total = tqdm(total=total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024,
                              desc="total", position=0, dynamic_ncols=True)

    def open(self, desc: str):
        if not self.enabled:
            return None
        with self._mutex:
            if not self._slots:  # never expected: one bar per job
                self._slots.append(max(self._used, default=0) + 1)
            slot = self._slots.pop(0)
            self._used.add(slot)
        bar = self._tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc=desc[-40:],
                         position=slot, leave=False, dynamic_ncols=True)
        bar._tvpack_slot = slot
        return bar

    def close(self, bar) -> None:
        if bar is None:
            return
        bar.close()
        with self._mutex:
            self._used.discard(bar._tvpack_slot)
            self._slots.append(bar._tvpack_slot)
            self._slots.sort()

    def finish(self) -> None:
        if self.total is not None:
            self.total.close()

    def write(self, line: str) -> None:
        """A line on stderr that does not tear the bars."""
        if self.enabled:
            self._tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def _check_present(path: Path, ref: WeightsRef) -> tuple[str, str | None, int | None]:
    """(state, sha256, size) of the file at the final name: absent, ok, corrupt or pin-mismatch
    (a good copy of what its name promises, but not the bytes a lockfile pins)."""
    st = _stat(path)
    if st is None:
        return "absent", None, None
    size = st.st_size
    exact = _exact_size(ref)
    if exact is not None and size != exact and not ref.hash_prefix:
        return "corrupt", None, size  # nothing else to learn from hashing it
    sha = file_sha256(path)
    if _problem(ref, sha, size) is None:
        return "ok", sha, size
    if ref.sha256 and ref.hash_prefix and sha.startswith(ref.hash_prefix):
        return "pin-mismatch", sha, size
    return "corrupt", sha, size


class _Run:
    """What the transfers of one fetch share: the cancel flag, the lock timeout, the stderr
    notices, and the cache directories, made (once) only when something has to be written."""

    def __init__(self, hub: Path, bars: "_Bars", lock_timeout: float | None):
        self.hub = hub
        self.bars = bars
        self.lock_timeout = lock_timeout
        self.cancel = Cancel()
        self._prepared = False
        self._mutex = threading.Lock()

    def notify(self, message: str) -> None:
        self.bars.write(f"tvpack: {message}")

    def prepare(self) -> None:
        with self._mutex:
            if not self._prepared:
                for path in (self.hub / "checkpoints", locks_dir(self.hub)):
                    _makedirs(path)
                self._prepared = True


def _fetch_one(ref: WeightsRef, hub: Path, *, mirrors, upstream: bool, policy: Policy, run: _Run) -> FetchResult:
    ckpt = hub / "checkpoints"
    final = ckpt / ref.filename
    state, sha, size = _check_present(final, ref)
    if state == "ok":
        return FetchResult(ref, final, "cached", size, sha)
    if state == "pin-mismatch":
        raise IntegrityError(f"{final} does not match the lockfile", expected=ref.sha256, got=sha,
                             hint="remove it with 'tvpack cache rm' or update the lockfile")
    run.prepare()  # from here on we write: a read-only cache fails here, in one line
    with _fetch_lock(hub, ref.filename, run):
        state, sha, size = _check_present(final, ref)  # someone may have fetched it meanwhile
        if state == "ok":
            return FetchResult(ref, final, "cached", size, sha)
        if state == "pin-mismatch":
            raise IntegrityError(f"{final} does not match the lockfile", expected=ref.sha256, got=sha,
                                 hint="remove it with 'tvpack cache rm' or update the lockfile")
        urls = candidate_urls(ref.url, mirrors, upstream=upstream)
        if not urls:
            raise DownloadError(f"{ref.name}: no mirror given and upstream disabled (--no-upstream)")
        part = _claim_part(ckpt, ref.filename, run.notify)
        errors: list[str] = []
        integrity: IntegrityError | None = None
        bar = run.bars.open(ref.filename)
        received = [0]
        try:
            for url in urls:
                verifier = Verifier(url, hash_prefix=ref.hash_prefix, sha256=ref.sha256, size=_exact_size(ref))
                on_bytes, on_total = _progress_callbacks(bar, run.bars.total, received)
                try:
                    result = transfer(url, part, verifier, policy=policy, on_bytes=on_bytes, on_total=on_total,
                                      cancel=run.cancel, notify=run.notify)
                except IntegrityError as exc:
                    integrity = integrity or exc
                    errors.append(exc.format())
                    continue
                except DownloadError as exc:
                    errors.append(exc.format())
                    continue
                try:
                    os.replace(part, final)
                except OSError as exc:
                    raise CacheError(f"cannot place {final}: {exc.strerror or exc}") from None
                discard_part(part)
                record_verified(final, result.sha256, weights=ref.name, url=ref.url)
                return FetchResult(ref, final, "downloaded", result.size, result.sha256, url, result.resumed_from,
                                   received=received[0])
        finally:
            run.bars.close(bar)
            _release_part(part)
        if integrity is not None and len(urls) == 1:
            raise integrity
        raise DownloadError(f"{ref.name}: every source failed: " + "; ".join(errors))


def _progress_callbacks(bar, total_bar, received: list[int]):
    def on_bytes(n: int) -> None:
        received[0] += n
        if bar is not None:
            bar.update(n)
            total_bar.update(n)

    if bar is None:
        return on_bytes, None

    def on_total(total: int | None, offset: int) -> None:
        if offset < 0:  # a restart: take back the bytes counted for the old part
            bar.reset(total=total)
            total_bar.update(offset)
            return
        bar.reset(total=total)
        bar.update(offset)
        total_bar.update(offset)

    return on_bytes, on_total


def _select(selectors, refs, all_weights, registry, lock, with_backbones) -> list[WeightsRef]:
    if refs is not None:
        return list(refs)
    if lock is not None:
        return select_locked(read_lockfile(lock), selectors)
    return resolve(selectors, registry=registry, all_weights=all_weights, with_backbones=with_backbones)


def _dedupe(refs: Sequence[WeightsRef]) -> list[WeightsRef]:
    """One transfer per file name (two weights can share a file)."""
    seen: dict[str, WeightsRef] = {}
    for ref in refs:
        seen.setdefault(ref.filename, ref)
    return list(seen.values())


CANCEL_GRACE = 2.0  # seconds the workers get to stop (parts kept, locks released) after Ctrl-C / SIGTERM


def _in_parallel(work, items: list, jobs: int, cancel: Cancel) -> list:
    """``[work(item) for item in items]`` on ``jobs`` threads, in order.

    Ctrl-C or SIGTERM (an exception in the waiting main thread) cancels the run: transfers stop
    between chunks or have their blocked read aborted, and get ``CANCEL_GRACE`` seconds to keep
    their part files and release their locks; then the exception goes on. The threads are daemons
    so that one stuck in a connect cannot hold the process (a ThreadPoolExecutor would wait for it).
    """
    results: list = [None] * len(items)
    next_index = iter(range(len(items)))
    mutex = threading.Lock()
    finished = threading.Condition()
    running = [jobs]

    def worker() -> None:
        try:
            while not cancel.cancelled:
                with mutex:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    results[i] = work(items[i])
                except Cancelled:
                    return
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    results[i] = _Crashed(exc)
        finally:
            with finished:
                running[0] -= 1
                finished.notify_all()

    for n in range(jobs):
        threading.Thread(target=worker, name=f"tvpack-fetch-{n}", daemon=True).start()
    # Waiting on a condition, not Thread.join: a join interrupted by Ctrl-C marks a live thread
    # as finished (CPython 3.11), and the grace period would then not wait for it.
    try:
        with finished:
            while running[0]:
                finished.wait(0.2)
    except BaseException:
        cancel.cancel()
        with finished:
            finished.wait_for(lambda: not running[0], timeout=CANCEL_GRACE)
        raise
    for result in results:
        if isinstance(result, _Crashed):
            raise result.exc
    return results


@dataclass(frozen=True)
class _Crashed:
    exc: BaseException


def plan(refs: Sequence[WeightsRef], *, torch_home=None) -> list[FetchResult]:
    """What a fetch would do, without network: cached (verified), corrupt or would-download."""
    hub = _hub_dir(torch_home)
    out = []
    for ref in refs:
        final = hub / "checkpoints" / ref.filename
        state, sha, size = _check_present(final, ref)
        if state == "ok":
            out.append(FetchResult(ref, final, "cached", size, sha))
        elif state == "absent":
            out.append(FetchResult(ref, final, "would-download", _exact_size(ref) or ref.size_hint))
        else:
            out.append(FetchResult(ref, final, "corrupt", size, sha,
                                   error="does not match the lockfile" if state == "pin-mismatch"
                                   else "hash or size mismatch"))
    return out


def fetch_results(selectors: Iterable[str] = (), *, refs: Sequence[WeightsRef] | None = None,
                  all_weights: bool = False, registry: Sequence[str] = (), torch_home=None,
                  mirrors: Sequence[str] | None = None, upstream: bool = True, jobs: int = 4,
                  lock=None, offline: bool | None = None, with_backbones: bool = False,
                  dry_run: bool = False, progress: bool = False, policy: Policy | None = None,
                  raise_errors: bool = True, lock_timeout: float | None = None) -> list[FetchResult]:
    """Like :func:`fetch`, returning one :class:`FetchResult` per weights.

    With ``raise_errors=False`` failures are returned as ``status="failed"`` results instead.
    """
    selected = _select(list(selectors), refs, all_weights, registry, lock, with_backbones)
    offline = env.offline() if offline is None else offline
    if mirrors is not None:
        mirrors = [os.fspath(m) for m in mirrors]
    if not offline:
        for mirror in (env.mirrors() if mirrors is None else mirrors):
            normalize_mirror(mirror)  # a malformed mirror is a usage error before any work
    if dry_run:
        return plan(selected, torch_home=torch_home)
    if offline:
        results = plan(selected, torch_home=torch_home)
        missing = [r for r in results if r.status != "cached"]
        if missing:
            names = ", ".join(f"{r.ref.name} ({'missing' if r.status == 'would-download' else r.status})"
                              for r in missing)
            if raise_errors:
                raise OfflineError(f"offline mode: {len(missing)} of {len(results)} weights not cached: {names}")
            return [r if r.status == "cached" else replace(r, status="missing" if r.status == "would-download"
                                                           else r.status, error=r.error or "offline: not cached")
                    for r in results]
        return results
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    hub = _hub_dir(torch_home)
    policy = policy or DEFAULT_POLICY
    unique = _dedupe(selected)
    total = sum((_exact_size(r) or r.size_hint or 0) for r in unique)
    bars = _Bars(progress, total, min(jobs, len(unique) or 1))
    run = _Run(hub, bars, _resolve_lock_timeout(lock_timeout))
    done: dict[str, FetchResult] = {}
    try:
        def work(ref):
            try:
                return _fetch_one(ref, hub, mirrors=mirrors, upstream=upstream, policy=policy, run=run)
            except TvpackError as exc:
                return exc

        outcomes = _in_parallel(work, unique, min(jobs, len(unique) or 1), run.cancel)
    finally:
        bars.finish()
    if any(not isinstance(o, TvpackError) and o.status == "downloaded" for o in outcomes):
        # Once for all renames: each file's bytes were fsynced before its rename, so a crash can
        # only lose a rename (the file is fetched again), never expose wrong bytes.
        fsync_dir(hub / "checkpoints")
    errors = []
    for ref, outcome in zip(unique, outcomes):
        if isinstance(outcome, TvpackError):
            errors.append((ref, outcome))
            done[ref.filename] = FetchResult(ref, hub / "checkpoints" / ref.filename, "failed",
                                             error=outcome.format())
        else:
            done[ref.filename] = outcome
    if errors and raise_errors:
        if len(errors) == 1:
            raise errors[0][1]
        first = errors[0][1]
        raise type(first)(f"{len(errors)} of {len(unique)} weights failed; first: {first.format()}") \
            if type(first) in (DownloadError, CacheError) else first
    out = []
    for ref in selected:
        result = done[ref.filename]
        out.append(result if result.ref == ref else replace(result, ref=ref))
    return out


def fetch(selectors: Iterable[str] = (), *, refs: Sequence[WeightsRef] | None = None, all_weights: bool = False,
          registry: Sequence[str] = (), torch_home=None, mirrors: Sequence[str] | None = None,
          upstream: bool = True, jobs: int = 4, lock=None, offline: bool | None = None,
          with_backbones: bool = False, dry_run: bool = False, progress: bool = False,
          policy: Policy | None = None, lock_timeout: float | None = None) -> list[Path]:
    """Fetch weights into the torch.hub cache; returns the final paths, in the order of the refs.

    ``selectors`` are resolved through the registry (torchvision plus ``registry`` modules);
    ``refs`` skips that; ``lock`` (a ``tvpack.lock`` path) fetches exactly the pinned files and
    refuses any whose full sha256 differs, without importing torch. ``mirrors`` (None: the
    ``TVPACK_MIRROR`` variable) are tried in order, then upstream unless ``upstream=False``.
    ``offline`` (None: ``TVPACK_OFFLINE``) verifies what is cached and raises OfflineError naming
    what is missing. ``dry_run`` transfers nothing and returns where files would be.
    ``lock_timeout``: seconds to wait for another process fetching the same file before giving up
    (None: see :func:`lock_timeout`).
    """
    return [r.path for r in fetch_results(
        selectors, refs=refs, all_weights=all_weights, registry=registry, torch_home=torch_home,
        mirrors=mirrors, upstream=upstream, jobs=jobs, lock=lock, offline=offline,
        with_backbones=with_backbones, dry_run=dry_run, progress=progress, policy=policy,
        lock_timeout=lock_timeout)]


def ensure_cached(refs: Sequence[WeightsRef], *, torch_home=None, mirrors: Sequence[str] | None = None,
                  upstream: bool = True, offline: bool | None = None, jobs: int = 4,
                  progress: bool = False, policy: Policy | None = None,
                  lock_timeout: float | None = None) -> dict[str, Path]:
    """Make sure each ref's verified file is in the cache; ``{ref.name: path}``.

    Offline (or ``TVPACK_OFFLINE``), raises OfflineError listing what is missing.
    """
    results = fetch_results(refs=list(refs), torch_home=torch_home, mirrors=mirrors, upstream=upstream,
                            offline=offline, jobs=jobs, progress=progress, policy=policy,
                            lock_timeout=lock_timeout)
    return {r.ref.name: r.path for r in results}


# -- scanning --------------------------------------------------------------------------------------

STATUSES = ("verified", "unverified", "corrupt", "partial", "unknown", "broken")


@dataclass(frozen=True)
class CachedFile:
    path: Path
    size: int
    mtime: float
    status: str  # one of STATUSES
    weights: tuple[str, ...] = ()
    sha256: str | None = None  # known from the index (None when unverified)
    expected: str | None = None  # full pinned sha256 (manifest) or the name's prefix
    detail: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def to_dict(self) -> dict:
        return {"file": self.name, "path": str(self.path), "size": self.size,
                "modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.mtime)),
                "status": self.status, "weights": list(self.weights), "sha256": self.sha256,
                "expected": self.expected, "detail": self.detail}


@dataclass(frozen=True)
class CacheInfo:
    hub_dir: Path
    files: tuple[CachedFile, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUSES}
        for f in self.files:
            counts[f.status] += 1
        return counts

    def to_dict(self) -> dict:
        return {"hub_dir": str(self.hub_dir), "files": [f.to_dict() for f in self.files],
                "total_size": self.size, "counts": self.counts()}


def _is_partial(name: str) -> bool:
    """A download or write in progress (or abandoned): never an ordinary, let alone verified, file."""
    return (name.endswith(PART_SUFFIX) or name.endswith(PART_SUFFIX + ".json") or bool(TORCH_HUB_PARTIAL.search(name))
            or bool(_TEMP_NAME.match(name)))


def _manifest_pins(hub: Path) -> dict[str, tuple[str, str | None]]:
    """filename -> (weights name, sha256) from installed bundle manifests."""
    pins: dict[str, tuple[str, str | None]] = {}
    try:
        paths = sorted(manifests_dir(hub).glob("*.json"))
    except OSError:
        return pins
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        weights = data.get("weights") if isinstance(data, dict) else None
        for item in weights if isinstance(weights, list) else []:  # a damaged manifest pins nothing
            if isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
                pins.setdefault(os.path.basename(item["path"]), (item.get("name"), item.get("sha256")))
    return pins


def _registry_names(registry: Sequence[str]) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for ref in get_catalog(registry).all_refs():
        names.setdefault(ref.filename, []).append(ref.name)
    return names


def _listing(ckpt: Path, *, strict: bool = False) -> list[tuple[str, Path, os.stat_result]]:
    """``(name, path, stat)`` of each entry of ``ckpt``, by name; entries gone meanwhile are left out.

    ``stat`` follows symlinks; a dangling symlink is listed with its own (``lstat``) result, which
    :func:`_dangling` recognises. A missing directory lists nothing; one that cannot be read lists
    nothing either, or with ``strict`` is a :class:`CacheError`.
    """
    try:
        names = sorted(os.listdir(ckpt))
    except FileNotFoundError:
        return []
    except OSError as exc:
        if strict:
            raise CacheError(f"cannot read {ckpt}: {exc.strerror or exc}") from None
        return []
    out = []
    for name in names:
        path = ckpt / name
        try:
            out.append((name, path, path.stat()))
        except OSError:
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat_module.S_ISLNK(st.st_mode):
                out.append((name, path, st))
    return out


def _dangling(st: os.stat_result) -> bool:
    return stat_module.S_ISLNK(st.st_mode)  # a followed stat is never a link: only dangling ones are


def _link_detail(path: Path) -> str:
    try:
        return f"dangling symlink -> {os.readlink(path)}"
    except OSError:
        return "dangling symlink"


def scan_cache(*, torch_home=None, registry: Sequence[str] = (), use_registry: bool = True) -> CacheInfo:
    """Every file in ``checkpoints/`` with its weights (if known), size and status, no hashing."""
    hub = _hub_dir(torch_home)
    listing = _listing(hub / "checkpoints", strict=True)
    if not listing:
        return CacheInfo(hub, ())
    index = _load_index(hub)
    pins = _manifest_pins(hub)
    known: dict[str, list[str]] | None = None
    files = []
    for name, path, st in listing:
        if _dangling(st):
            files.append(CachedFile(path, 0, st.st_mtime, "broken", detail=_link_detail(path)))
            continue
        if not path.is_file():
            continue
        if _is_partial(name):
            files.append(CachedFile(path, st.st_size, st.st_mtime, "partial"))
            continue
        entry = index.get(name) if isinstance(index.get(name), dict) else {}
        fresh = _fresh(entry, st)
        weights: list[str] = []
        if entry.get("weights"):
            weights.append(entry["weights"])
        pin_name, pin_sha = pins.get(name, (None, None))
        if pin_name and pin_name not in weights:
            weights.append(pin_name)
        if not weights and use_registry:
            if known is None:
                try:
                    known = _registry_names(registry)
                except TvpackError:
                    known = {}
            weights.extend(known.get(name, []))
        prefix = hash_prefix_from_filename(name)
        expected = pin_sha or prefix
        sha = entry.get("sha256") if fresh else None
        if sha is not None:
            bad = (pin_sha and sha != pin_sha) or (prefix and not sha.startswith(prefix))
            status, detail = ("corrupt", "sha256 does not match " + ("the manifest" if pin_sha and sha != pin_sha
                                                                      else "the name's prefix")) \
                if bad else ("verified", None)
        elif expected or weights:
            status, detail = "unverified", ("changed since verified" if entry else None)
        else:
            status, detail = "unknown", "no known weights and no hash to check"
        files.append(CachedFile(path, st.st_size, st.st_mtime, status, tuple(weights), sha, expected, detail))
    return CacheInfo(hub, tuple(files))


# -- verify ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerifyResult:
    path: Path
    size: int
    sha256: str | None
    ok: bool
    detail: str | None = None
    weights: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"file": self.path.name, "path": str(self.path), "size": self.size, "sha256": self.sha256,
                "ok": self.ok, "detail": self.detail, "weights": list(self.weights)}


_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def _files_for(selectors: Sequence[str], hub: Path, registry: Sequence[str]) -> list[Path]:
    """Checkpoint paths named by selectors: plain file names, or weights selectors (registry)."""
    ckpt = hub / "checkpoints"
    paths, rest = [], []
    for selector in selectors:
        if "/" not in selector and ((ckpt / selector).is_file() or (ckpt / selector).is_symlink()):
            paths.append(ckpt / selector)
        elif selector.endswith(_FILE_SUFFIXES) and "/" not in selector:
            # A file name, not a selector: say so rather than "unknown weights enum".
            raise CacheError(f"not in the cache: {selector} (no such file in {ckpt})")
        else:
            rest.append(selector)
    if rest:
        for ref in resolve(rest, registry=registry):
            paths.append(ckpt / ref.filename)
    return list(dict.fromkeys(paths))


def verify_cache(selectors: Sequence[str] = (), *, torch_home=None, registry: Sequence[str] = (),
                 deep: bool = False, jobs: int | None = None, progress: bool = False) -> list[VerifyResult]:
    """Re-hash cached files (all, or those selected) on every core and record the results.

    A file is ok when its sha256 matches what its name promises and any installed manifest pins;
    ``deep`` also requires ``torch.load(weights_only=True)`` to succeed.
    """
    hub = _hub_dir(torch_home)
    info = scan_cache(torch_home=torch_home, registry=registry, use_registry=False)
    by_path = {f.path: f for f in info.files}
    if selectors:
        paths = _files_for(selectors, hub, registry)
        missing = [p.name for p in paths if p not in by_path]
        if missing:
            raise CacheError("not in the cache: " + ", ".join(missing))
    else:
        paths = [f.path for f in info.files if f.status != "partial"]
    pins = _manifest_pins(hub)
    # Largest first, so that the last file to finish is a small one.
    paths.sort(key=lambda p: by_path[p].size, reverse=True)
    jobs = jobs or os.cpu_count() or 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(by_path[p].size for p in paths), unit="B", unit_scale=True, unit_divisor=1024,
                   desc="verify", dynamic_ncols=True)
    mutex = threading.Lock()

    def one(path: Path) -> VerifyResult:
        cached = by_path[path]
        if cached.status == "broken":
            return VerifyResult(path, 0, None, False, cached.detail, cached.weights)
        try:
            digest = hash_file(path)
        except OSError as exc:
            return VerifyResult(path, cached.size, None, False, f"cannot read: {exc.strerror or exc}", cached.weights)
        record_verified(path, digest)
        if bar is not None:
            with mutex:
                bar.update(cached.size)
        prefix = hash_prefix_from_filename(path.name)
        pin = pins.get(path.name, (None, None))[1]
        detail = None
        if pin and digest != pin:
            detail = f"sha256 {digest} differs from the manifest's {pin}"
        elif prefix and not digest.startswith(prefix):
            detail = f"sha256 starts {digest[:len(prefix)]}, name promises {prefix}"
        elif deep:
            detail = deep_check(path)
        return VerifyResult(path, cached.size, digest, detail is None, detail, cached.weights)

    try:
        # torch.load's deprecation chatter (TypedStorage, quantized tensors) says nothing about the
        # files: the finding is the result. Filters are process-wide, so set once around the pool.
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=max(1, min(jobs, len(paths) or 1)),
                                                           thread_name_prefix="tvpack-verify") as pool:
            if deep:
                warnings.simplefilter("ignore")
            results = list(pool.map(one, paths))
    finally:
        if bar is not None:
            bar.close()
    results.sort(key=lambda r: r.path.name)
    return results


# -- prune and rm ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Removal:
    path: Path
    size: int
    reason: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "size": self.size, "reason": self.reason}


def _hold_unless_busy(hub: Path, stem: str, held: list[FileLock]) -> bool:
    """Take the file lock of a part's file without waiting: False when someone holds it (a fetch
    is running, in whatever pid namespace or container), True when it is ours now (or there is
    no lock to take: then nobody can hold it either)."""
    lock = FileLock(locks_dir(hub) / f"{stem}.lock")
    try:
        if not lock.try_acquire():
            return False
    except OSError:
        return True
    held.append(lock)
    return True


def _prunable(hub: Path, min_age: float, held: list[FileLock]) -> list[Removal]:
    """Abandoned parts and temporary files. The lock of each part's file is taken (into ``held``)
    and must stay held until the removal, so no fetch can claim the part meanwhile."""
    out: list[Removal] = []
    ckpt = hub / "checkpoints"
    now = time.time()
    stems_held: dict[str, bool] = {}
    for name, path, st in _listing(ckpt):
        if _dangling(st):
            continue  # a user's link, not our litter
        match = _PART_NAME.match(name)
        if match:
            stem = match["file"]
            if stem not in stems_held:
                stems_held[stem] = _hold_unless_busy(hub, stem, held)
            if stems_held[stem] and _part_abandoned(path, match):
                out.append(Removal(path, st.st_size, "abandoned partial download"))
                state = part_state_path(path)
                if state.exists():
                    out.append(Removal(state, state.stat().st_size, "partial download state"))
        elif name.endswith(PART_SUFFIX + ".json"):
            if not (ckpt / name[: -len(".json")]).exists():
                out.append(Removal(path, st.st_size, "orphaned partial download state"))
        elif TORCH_HUB_PARTIAL.search(name) and now - st.st_mtime > min_age:
            out.append(Removal(path, st.st_size, "torch.hub temporary file"))
        elif (tmp := _TEMP_NAME.match(name)) is not None:
            # install / atomic-write temp files of a killed process (SIGTERM, OOM, power loss).
            # The name holds no host, so a dead pid only counts once the file stopped changing.
            age = now - st.st_mtime
            if age > min_age or (age > _DEAD_TEMP_AGE and not pid_alive(int(tmp["pid"]))):
                out.append(Removal(path, st.st_size, "abandoned temporary file"))
    tv = tvpack_dir(hub)
    try:
        for path in sorted(tv.glob(".index.*.tmp")):
            if now - path.stat().st_mtime > min_age:
                out.append(Removal(path, path.stat().st_size, "temporary index file"))
    except OSError:
        pass
    return out


def _stale_locks(hub: Path, remove: bool) -> list[Removal]:
    """Lock files nobody holds; each removed (when ``remove``) while we hold it, so a process
    waiting on it notices (the lock re-checks that its path still names the file it locked)."""
    out: list[Removal] = []
    try:
        lock_paths = sorted(locks_dir(hub).glob("*.lock"))
    except OSError:
        return out
    for path in lock_paths:
        lock = FileLock(path)
        try:
            if not lock.try_acquire():
                continue  # held: a fetch is running
        except OSError:
            continue
        try:
            out.append(Removal(path, path.stat().st_size if path.exists() else 0, "stale lock file"))
            if remove:
                _remove(path)
        finally:
            lock.release()
    return out


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            return
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CacheError(f"cannot remove {path}: {exc.strerror or exc}") from None


# -- private staging directories (OCI installs) ----------------------------------------------------

STAGING_DIR = "oci-layers"  # under <hub>/tvpack: one directory per run, for the layers of the image it installs
_STAGING_NAME = re.compile(r"^(?P<key>[0-9a-f]{16,64})\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})$")


def staging_root(hub: Path) -> Path:
    return tvpack_dir(hub) / STAGING_DIR


def _quiet_for(path: Path, now: float) -> float:
    """Seconds since anything in directory ``path`` (or the directory itself) changed."""
    try:
        times = [path.stat().st_mtime]
        with os.scandir(path) as entries:
            times += [entry.stat(follow_symlinks=False).st_mtime for entry in entries]
    except OSError:
        return 0.0
    return now - max(times)


@contextmanager
def staging(hub: Path, key: str, *, notify: Callable[[str], None] | None = None):
    """A directory only this run writes in, ``<hub>/tvpack/oci-layers/<key>.<pid>.<token>``, for work on ``key``
    (an image digest's hex), with the key's lock held meanwhile: a second run on the same image waits (saying for
    whom, ``--lock-timeout`` applies) and then finds the files the first one installed. The directory an
    interrupted run left for ``key`` is adopted (renamed: one adopter wins), so its complete and partial layers
    are continued. Correctness does not rest on the lock (each run writes only in its own directory); without
    it, a directory is adopted only when its owner is gone and nothing in it changed for a minute. The caller
    empties the directory, or keeps it after an interrupt."""
    root = staging_root(hub)
    try:
        make_dirs(root)
        make_dirs(locks_dir(hub))
    except OSError as exc:
        raise CacheError(f"cannot create {root}: {exc.strerror or exc}") from None
    lock = _lock(hub, f"oci-{key}")
    timeout = _resolve_lock_timeout(None)

    def waiting(holder) -> None:
        if notify is not None:
            notify(f"waiting for image sha256:{key[:16]}...: {describe_holder(holder)}")

    try:
        held = lock.acquire(timeout=timeout if timeout is not None else LOCK_WAIT, on_wait=waiting)
    except OSError as exc:
        raise CacheError(f"cannot lock {lock.path}: {exc.strerror or exc}") from None
    if not held and timeout is not None:
        raise CacheError(f"gave up after {timeout:g}s waiting for the lock on image sha256:{key[:16]}...: "
                         f"{describe_holder(lock.holder())} (--lock-timeout / TVPACK_LOCK_TIMEOUT)")
    try:
        mine = root / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        now = time.time()
        for old in sorted(root.iterdir()):
            match = _STAGING_NAME.match(old.name)
            if match is None or match["key"] != key:
                continue
            pid = int(match["pid"])
            if held:  # nobody else works on this image (where locks work): an earlier run of ours, or a dead one
                free = pid == os.getpid() or not pid_alive(pid)
            else:
                free = not pid_alive(pid) and _quiet_for(old, now) > _DEAD_TEMP_AGE
            if free:
                try:
                    os.rename(old, mine)
                    break
                except OSError:
                    continue
        else:
            try:
                mine.mkdir()
            except OSError as exc:
                raise CacheError(f"cannot create {mine}: {exc.strerror or exc}") from None
        yield mine
    finally:
        if held:
            lock.release()


def _abandoned_staging(hub: Path, min_age: float, held: list[FileLock]) -> list[Removal]:
    """Staging directories of OCI installs nobody runs: the image's lock is free (taken into ``held``) and the
    owner is gone, or nothing in them changed for ``min_age`` seconds."""
    out: list[Removal] = []
    root = staging_root(hub)
    try:
        names = sorted(os.listdir(root))
        make_dirs(locks_dir(hub))
    except OSError:
        return out
    now = time.time()
    taken: set[str] = set()  # images whose lock we took (one lock serves all their directories)
    for name in names:
        match = _STAGING_NAME.match(name)
        path = root / name
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        quiet = _quiet_for(path, now)
        if pid_alive(int(match["pid"])) and quiet <= min_age:
            continue
        if match["key"] not in taken:
            lock = _lock(hub, f"oci-{match['key']}")
            try:
                if not lock.acquire(timeout=0):
                    continue  # an install of that image is running
            except OSError:
                continue
            held.append(lock)
            taken.add(match["key"])
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        out.append(Removal(path, size, "layers of an interrupted OCI install"))
    return out


def prune_cache(*, torch_home=None, dry_run: bool = False, min_age: float = 600.0) -> list[Removal]:
    """Remove abandoned partial downloads, temporary files and lock files nobody holds.

    Returns what was (or, with ``dry_run``, would be) removed. Part files whose file lock is held
    (a fetch running anywhere, in any pid namespace), or whose owner is alive, and torch.hub temp
    files younger than ``min_age`` seconds are left alone.
    """
    hub = _hub_dir(torch_home)
    held: list[FileLock] = []
    try:
        plan_ = _prunable(hub, min_age, held) + _abandoned_staging(hub, min_age, held)
        if not dry_run:
            gone = [name for name in _load_index(hub) if not (hub / "checkpoints" / name).exists()]
            if gone:  # index entries of files deleted by hand
                _update_index(hub, dict.fromkeys(gone))
            for item in plan_:
                _remove(item.path)
    finally:
        for lock in held:
            lock.release()
    return plan_ + _stale_locks(hub, remove=not dry_run)


def remove_from_cache(selectors: Sequence[str], *, torch_home=None, registry: Sequence[str] = (),
                      dry_run: bool = False) -> list[Removal]:
    """Remove the files of the selected weights (or file names) and their index entries."""
    if not selectors:
        raise UsageError("name the weights (selectors) or file names to remove")
    hub = _hub_dir(torch_home)
    removals = []
    for path in _files_for(list(selectors), hub, registry):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        removals.append(Removal(path, size, "removed on request"))
        for part in _parts_of(path.parent, path.name):
            removals.append(Removal(part, part.stat().st_size, "partial download"))
    if not dry_run:
        for item in removals:
            _remove(item.path)
            if item.path.name.endswith(PART_SUFFIX):
                discard_part(item.path)
        _update_index(hub, {item.path.name: None for item in removals if item.reason == "removed on request"})
    return removals


__all__ = [
    "fetch", "fetch_results", "ensure_cached", "plan", "FetchResult", "lock_timeout",
    "file_sha256", "record_verified", "index_entry", "hash_file",
    "scan_cache", "CacheInfo", "CachedFile", "verify_cache", "VerifyResult",
    "prune_cache", "remove_from_cache", "Removal", "staging", "staging_root", "STAGING_DIR",
]


# -- lockfiles -------------------------------------------------------------------------------------

def write_lockfile(selectors: Iterable[str], output, *, registry: Sequence[str] = (), all_weights: bool = False,
                   with_backbones: bool = False, torch_home=None, mirrors: Sequence[str] | None = None,
                   upstream: bool = True, offline: bool | None = None, jobs: int = 4,
                   progress: bool = False, policy=None, lock_timeout: float | None = None) -> Path:
    """Resolve selectors, fetch whatever is missing, and pin each file's sha256 and size."""
    refs = resolve(list(selectors), registry=registry, all_weights=all_weights, with_backbones=with_backbones)
    results = fetch_results(refs=refs, torch_home=torch_home, mirrors=mirrors, upstream=upstream,
                            offline=offline, jobs=jobs, progress=progress, policy=policy, lock_timeout=lock_timeout)
    pinned = []
    for result in results:
        sha = result.sha256 or file_sha256(result.path)
        pinned.append(WeightsRef(**{**result.ref.__dict__, "sha256": sha, "size_hint": result.path.stat().st_size}))
    return dump_lockfile(pinned, output)
