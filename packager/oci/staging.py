"""Private staging directories for the layers an OCI install or verify fetches, and the file helpers around them.

``<hub>/tvpack/oci-layers/<image digest hex>.<pid>.<token>/``: one directory per run, written by that run only,
under the image's lock (``<hub>/tvpack/locks/oci-<image digest hex>.lock``, the name ``cache prune`` takes too).
The names and the paths are the cache's layout (:class:`packager.cache.HubLayout`); finding the directories
of dead runs is ``cache prune``'s job.
"""
from __future__ import annotations

import errno
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .. import env
from ..cache.layout import STAGING_DIR, STAGING_NAME, HubLayout
from ..errors import CacheError
from ..fsutil import adopt, left_behind, make_dirs
from ..locking import FileLock, describe_holder

LOCK_WAIT = 900.0  # seconds to wait for another run on the same image before going ahead without the lock
_DEAD_AGE = 60.0  # without the lock, a dead owner's directory is adopted once nothing in it changed for this long


def staging_root(hub: Path) -> Path:
    return HubLayout(hub).staging


def _lock(hub: Path, key: str) -> FileLock:
    return FileLock(HubLayout(hub).lock(f"oci-{key}"))


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
        match = STAGING_NAME.match(old.name)
        if match is None or match["key"] != key:
            continue
        # held: nobody else works on this image (where locks work): an earlier run of ours, or a dead one's;
        # else only a dead one's that stopped changing
        if left_behind(int(match["pid"]), old, ours=held, quiet=0.0 if held else _DEAD_AGE, now=now) \
                and adopt(old, mine):
            return mine
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
        make_dirs(HubLayout(hub).locks)
    except OSError as exc:
        raise CacheError(f"cannot create {root}: {exc.strerror or exc}") from None
    lock = _hold(hub, key, notify, lock_timeout if lock_timeout is not None else env.lock_timeout())
    try:
        yield _adopt_or_make(root, key, lock is not None)
    finally:
        if lock is not None:
            lock.release()


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


__all__ = ["LOCK_WAIT", "STAGING_DIR", "rmdir_quietly", "staging", "staging_root",
           "unlink_quietly", "write_error"]
