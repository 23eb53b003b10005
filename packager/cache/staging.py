"""Private staging directories for OCI installs, ``<hub>/tvpack/oci-layers/<key>.<pid>.<token>``."""
from __future__ import annotations

import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..errors import CacheError
from ..fsutil import make_dirs, pid_alive
from ..locking import describe_holder
from .fetching import LOCK_WAIT, _resolve_lock_timeout
from .layout import _DEAD_TEMP_AGE, STAGING_DIR, _lock, locks_dir, tvpack_dir

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

