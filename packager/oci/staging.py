"""Private staging directories for the layers an OCI install or verify fetches, and the file helpers around them.

``<hub>/tvpack/oci-layers/<image digest hex>.<pid>.<token>/``: one directory per run, written by that run only,
under the image's lock (``<hub>/tvpack/locks/oci-<image digest hex>.lock``, the name ``cache prune`` takes too).
This module needs nothing above the values layer, so the cache's prune can use :func:`abandoned_staging`
without an import cycle.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .. import env
from ..errors import CacheError
from ..fsutil import make_dirs, pid_alive
from ..locking import FileLock, describe_holder

STAGING_DIR = "oci-layers"  # under <hub>/tvpack: one directory per run, for the layers of the image it installs
_STAGING_NAME = re.compile(r"^(?P<key>[0-9a-f]{16,64})\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})$")
LOCK_WAIT = 900.0  # seconds to wait for another run on the same image before going ahead without the lock
_DEAD_AGE = 60.0  # without the lock, a dead owner's directory is adopted once nothing in it changed for this long


def staging_root(hub: Path) -> Path:
    return hub / "tvpack" / STAGING_DIR


def _lock(hub: Path, key: str) -> FileLock:
    return FileLock(hub / "tvpack" / "locks" / f"oci-{key}.lock")


def _quiet_for(path: Path, now: float) -> float:
    """Seconds since anything in directory ``path`` (or the directory itself) changed."""
    try:
        times = [path.stat().st_mtime]
        with os.scandir(path) as entries:
            times += [entry.stat(follow_symlinks=False).st_mtime for entry in entries]
    except OSError:
        return 0.0
    return now - max(times)


def _hold(hub: Path, key: str, notify: Callable[[str], None] | None, timeout: float | None) -> FileLock | None:
    """The image's lock, or None when waiting ``LOCK_WAIT`` seconds did not get it (and no timeout was asked)."""
    lock = _lock(hub, key)

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
    return lock if held else None


def _adopt_or_make(root: Path, key: str, held: bool) -> Path:
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
            free = not pid_alive(pid) and _quiet_for(old, now) > _DEAD_AGE
        if free:
            try:
                os.rename(old, mine)
                return mine
            except OSError:
                continue
    try:
        mine.mkdir()
    except OSError as exc:
        raise CacheError(f"cannot create {mine}: {exc.strerror or exc}") from None
    return mine


@contextmanager
def staging(hub: Path, key: str, *, notify: Callable[[str], None] | None = None, lock_timeout: float | None = None):
    """A directory only this run writes in, ``<hub>/tvpack/oci-layers/<key>.<pid>.<token>``, for work on ``key``
    (an image digest's hex), with the key's lock held meanwhile: a second run on the same image waits (saying for
    whom; ``lock_timeout`` seconds, default ``TVPACK_LOCK_TIMEOUT``, else up to ``LOCK_WAIT`` and then without the
    lock) and then finds the files the first one installed. The directory an interrupted run left for ``key`` is
    adopted (renamed: one adopter wins), so its complete and partial layers are continued. Correctness does not
    rest on the lock (each run writes only in its own directory); without it, a directory is adopted only when its
    owner is gone and nothing in it changed for a minute. The caller empties the directory, or keeps it after an
    interrupt."""
    root = staging_root(hub)
    try:
        make_dirs(root)
        make_dirs(hub / "tvpack" / "locks")
    except OSError as exc:
        raise CacheError(f"cannot create {root}: {exc.strerror or exc}") from None
    lock = _hold(hub, key, notify, lock_timeout if lock_timeout is not None else env.lock_timeout())
    try:
        yield _adopt_or_make(root, key, lock is not None)
    finally:
        if lock is not None:
            lock.release()


def abandoned_staging(hub: Path, min_age: float, held: list[FileLock]) -> list[tuple[Path, int, str]]:
    """Staging directories nobody runs, as (path, bytes, reason): the image's lock is free (taken into ``held``,
    to be released by the caller after removing them) and the owner is gone, or nothing in them changed for
    ``min_age`` seconds. For ``cache prune``."""
    out: list[tuple[Path, int, str]] = []
    root = staging_root(hub)
    try:
        names = sorted(os.listdir(root))
        make_dirs(hub / "tvpack" / "locks")
    except OSError:
        return out
    now = time.time()
    taken: set[str] = set()  # images whose lock we took (one lock serves all their directories)
    for name in names:
        match = _STAGING_NAME.match(name)
        path = root / name
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        if pid_alive(int(match["pid"])) and _quiet_for(path, now) <= min_age:
            continue
        if match["key"] not in taken:
            lock = _lock(hub, match["key"])
            try:
                if not lock.acquire(timeout=0):
                    continue  # an install of that image is running
            except OSError:
                continue
            held.append(lock)
            taken.add(match["key"])
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        out.append((path, size, "layers of an interrupted OCI install"))
    return out


# -- files ---------------------------------------------------------------------------------------------
def write_error(exc: OSError, where: Path) -> CacheError:
    if exc.errno == errno.ENOSPC:
        return CacheError(f"disk full while writing to {where} (nothing was kept)")
    return CacheError(f"cannot write to {where}: {exc.strerror or exc}")


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


__all__ = ["LOCK_WAIT", "STAGING_DIR", "abandoned_staging", "rmdir_quietly", "staging", "staging_root",
           "unlink_quietly", "write_error"]
