"""The verification index ``<hub>/tvpack/index.json``: (sha256, size, mtime_ns, ctime_ns, inode) of each
file hashed, so an unchanged file is never hashed twice (:func:`file_sha256`). ctime and inode are what a user
cannot set back (``touch -r``, an edit that restores the mtime). The index is only a shortcut: a cache we cannot
write, or an index lock held for long, skips an update.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ..fsutil import atomic_write_json, hash_file, make_dirs
from .layout import HubLayout, _lock

INDEX_VERSION = 1
INDEX_LOCK_WAIT = 10.0  # the index is only a shortcut: skip an update rather than wait long

_index_mutex = threading.Lock()


def _hub_of(path: Path) -> Path | None:
    """The hub directory of a checkpoint path, or None for a file outside any ``checkpoints/``."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _load_index(hub: Path) -> dict:
    try:
        data = json.loads(HubLayout(hub).index.read_text())
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
        layout = HubLayout(hub)
        probe = layout.tvpack
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            return  # a read-only cache: nothing to try (and no lock to take)
        make_dirs(layout.locks)
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
                atomic_write_json(layout.index, {"version": INDEX_VERSION, "files": files}, indent=1,
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

