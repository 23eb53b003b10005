"""``cache prune`` and ``cache rm``: what is abandoned or asked for goes, and nothing anyone is using."""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import CacheError, UsageError
from ..fsutil import left_behind, make_dirs, pid_alive, quiet_for, temps_of
from ..locking import FileLock, Holder
from ..transport import discard_part, part_state_path
from .fetching import STALE_FOREIGN_PART, _part_abandoned, _parts_of
from .index import _load_index, _update_index
from .layout import _DEAD_TEMP_AGE, _PART_NAME, _TEMP_NAME, PART_SUFFIX, STAGING_NAME, TORCH_HUB_PARTIAL, HubLayout, _lock
from .scan import _dangling, _listing
from .verify import _files_for


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
    lock = FileLock(HubLayout(hub).locks / f"{stem}.lock")
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
    ckpt = HubLayout(hub).checkpoints
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
                # only the part's owner writes its record, and it is gone: what it was writing goes too, however new
                for temp, _pid in temps_of(state):
                    out.append(Removal(temp, _size(temp), "partial download state its killed run was writing"))
        elif name.endswith(PART_SUFFIX + ".json"):
            if not (ckpt / name[: -len(".json")]).exists():
                out.append(Removal(path, st.st_size, "orphaned partial download state"))
        elif TORCH_HUB_PARTIAL.search(name) and now - st.st_mtime > min_age:
            out.append(Removal(path, st.st_size, "torch.hub temporary file"))
        elif (tmp := _TEMP_NAME.match(name)) is not None:
            # install / atomic-write temp files of a killed process (SIGTERM, OOM, power loss).
            # The name holds no host, so a dead pid only counts once the file stopped changing.
            if now - st.st_mtime > min_age or left_behind(int(tmp["pid"]), path, quiet=_DEAD_TEMP_AGE, now=now):
                out.append(Removal(path, st.st_size, "abandoned temporary file"))
    tv = HubLayout(hub).tvpack
    try:
        for path in sorted(tv.glob(".index.*.tmp")):
            if now - path.stat().st_mtime > min_age:
                out.append(Removal(path, path.stat().st_size, "temporary index file"))
    except OSError:
        pass
    seen: set[Path] = set()  # a record's temp may qualify twice (its part's, and as any old temp file)
    return [r for r in out if not (r.path in seen or seen.add(r.path))]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _stale_locks(hub: Path, remove: bool) -> list[Removal]:
    """Lock files left by a run that died holding them: nobody holds the lock, yet the holder's note is still in
    it (a run that finishes empties its note) and that holder is gone. A free, empty lock file is what every
    finished run leaves, and the next one reuses it: not litter, so not listed. Each stale one is removed (when
    ``remove``) while we hold it, so a process waiting on it notices (the lock re-checks its path)."""
    out: list[Removal] = []
    try:
        lock_paths = sorted(HubLayout(hub).locks.glob("*.lock"))
    except OSError:
        return out
    for path in lock_paths:
        holder = FileLock(path).holder()
        if holder is None:
            continue  # free and empty: a finished run's
        with _unheld(path) as fd:
            if fd is None:
                continue  # held: a fetch is running
            try:
                if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino or not _holder_gone(holder):
                    continue  # replaced meanwhile, or its holder may still be running
                size = os.fstat(fd).st_size
            except OSError:
                continue
            out.append(Removal(path, size, f"stale lock file: {holder.describe()} died holding it"))
            if remove:
                _remove(path)
    return out


@contextmanager
def _unheld(path: Path):
    """A read-only descriptor of the lock file ``path``, its lock taken (so taking it cannot overwrite the note it
    holds), for as long as the block runs; ``None`` when another process holds it or it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fd_or_none = None
        else:
            fd_or_none = fd
        yield fd_or_none
    finally:
        os.close(fd)


def _holder_gone(holder: Holder) -> bool:
    if holder.host == (socket.gethostname() or "?"):
        return not pid_alive(holder.pid)
    return time.time() - holder.since > STALE_FOREIGN_PART  # another host's: only once it is old


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
def _abandoned_staging(hub: Path, min_age: float, held: list[FileLock]) -> list[Removal]:
    """Staging directories of OCI installs nobody runs: the image's lock is free (taken into ``held``) and the
    owner is gone, or nothing in them changed for ``min_age`` seconds."""
    out: list[Removal] = []
    root = HubLayout(hub).staging
    try:
        names = sorted(os.listdir(root))
        make_dirs(HubLayout(hub).locks)
    except OSError:
        return out
    now = time.time()
    taken: set[str] = set()  # images whose lock we took (one lock serves all their directories)
    for name in names:
        match = STAGING_NAME.match(name)
        path = root / name
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        quiet = quiet_for(path, now)
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
    """Remove abandoned partial downloads, temporary files and lock files left by runs that died holding them.

    Returns what was (or, with ``dry_run``, would be) removed. Part files whose file lock is held
    (a fetch running anywhere, in any pid namespace), or whose owner is alive, and torch.hub temp
    files younger than ``min_age`` seconds are left alone.
    """
    hub = HubLayout.of(torch_home).hub
    held: list[FileLock] = []
    try:
        plan_ = _prunable(hub, min_age, held) + _abandoned_staging(hub, min_age, held)
        if not dry_run:
            gone = [name for name in _load_index(hub) if not HubLayout(hub).checkpoint(name).exists()]
            if gone:  # index entries of files deleted by hand
                _update_index(hub, dict.fromkeys(gone))
            for item in plan_:
                _remove(item.path)
    finally:
        for lock in held:
            lock.release()
    return plan_ + _stale_locks(hub, remove=not dry_run) + _stale_marks(hub, {r.path for r in plan_}, not dry_run)


def _stale_marks(hub: Path, removed: set, remove: bool) -> list[Removal]:
    """In-use marks of part files (``<hub>/tvpack/locks/<part>.inuse``, see :mod:`.fetching`) left by a run that was
    killed: nobody holds the mark and its part is gone (removed by hand, or by this prune: ``removed``)."""
    layout, out = HubLayout(hub), []
    try:
        marks = sorted(layout.locks.glob("*" + PART_SUFFIX + ".inuse"))
    except OSError:
        return out
    for path in marks:
        part = layout.checkpoints / path.name[: -len(".inuse")]
        if part.exists() and part not in removed:
            continue
        with _unheld(path) as fd:
            if fd is None:
                continue  # held: its transfer is running
            out.append(Removal(path, os.fstat(fd).st_size, "in-use mark of a partial download whose run was killed"))
            if remove:
                _remove(path)
    return out


def remove_from_cache(selectors: Sequence[str], *, torch_home=None, registry: Sequence[str] = (),
                      dry_run: bool = False) -> list[Removal]:
    """Remove the files of the selected weights (or file names) and their index entries."""
    if not selectors:
        raise UsageError("name the weights (selectors) or file names to remove")
    hub = HubLayout.of(torch_home).hub
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
