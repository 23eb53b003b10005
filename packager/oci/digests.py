"""What tvpack remembers about blobs between runs: ``<tvpack cache>/oci/digests.json``."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..fsutil import atomic_write_json
from ..home import tvpack_cache_dir
from ..locking import FileLock
from .image import Layer

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SAVE_LOCK_WAIT = 10.0  # seconds to wait for another run saving the file; then this run's news are dropped


class DigestCache:
    """What tvpack learnt about blobs, kept between runs in ``<tvpack cache>/oci/digests.json``:

    * the digest and size of each checkpoint layer it made, under :meth:`Layer.key` (the layer format, the
      checkpoint's sha256, size, mtime and path: what makes the layer's bytes), so an unchanged checkpoint is
      not hashed again;
    * which repositories of which registry hold each blob it pushed: where to mount it from next time.

    It is only a hint, never trusted: an entry whose shape or size does not fit the layer is ignored, and
    :func:`packager.oci.push` uses a remembered digest only for a blob the registry answers for (HEAD, after
    a mount too) with exactly the layer's size; anything else (a digest the registry does not hold, or holds
    at another size) is forgotten and the layer hashed, and nothing is ever uploaded under a digest this run
    did not compute. A damaged file is a cold cache. Each run merges what it learnt into the file under a
    lock and replaces it atomically (temp file and rename), so readers never see half a file."""

    VERSION = 2
    MAX_REPOSITORIES = 8  # per blob: mount candidates worth a request

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else tvpack_cache_dir() / "oci" / "digests.json"
        self._data = self._read()
        self._new_layers: dict[str, dict] = {}
        self._forgotten: set[str] = set()
        self._new_blobs: list[tuple[str, str, str]] = []

    def _read(self) -> dict:
        empty = {"version": self.VERSION, "layers": {}, "blobs": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return empty
        if not isinstance(data, dict) or data.get("version") != self.VERSION:
            return empty
        layers = data.get("layers") if isinstance(data.get("layers"), dict) else {}
        blobs = data.get("blobs") if isinstance(data.get("blobs"), dict) else {}
        return {"version": self.VERSION,
                "layers": {key: value for key, value in layers.items() if _layer_entry(value) is not None},
                "blobs": {host: per_host for host, per_host in blobs.items() if isinstance(per_host, dict)}}

    def layer(self, layer: Layer) -> str | None:
        """The remembered digest of ``layer`` (a hint, see the class docstring), or None."""
        entry = _layer_entry(self._data["layers"].get(layer.key()))
        return entry[0] if entry is not None and entry[1] == layer.size else None

    def remember_layer(self, layer: Layer, digest: str) -> None:
        entry = {"digest": digest, "size": layer.size}
        self._data["layers"][layer.key()] = self._new_layers[layer.key()] = entry
        self._forgotten.discard(layer.key())

    def forget_layer(self, layer: Layer) -> None:
        """Drop a remembered digest found wrong (also from the file, at :meth:`save`)."""
        self._data["layers"].pop(layer.key(), None)
        self._new_layers.pop(layer.key(), None)
        self._forgotten.add(layer.key())

    def repositories(self, host: str, digest: str) -> list[str]:
        repos = self._data["blobs"].get(host, {}).get(digest)
        return [r for r in repos if isinstance(r, str)] if isinstance(repos, list) else []

    def remember_blob(self, host: str, repository: str, digest: str) -> None:
        self._add_blob(self._data, host, repository, digest)
        self._new_blobs.append((host, repository, digest))

    def _add_blob(self, data: dict, host: str, repository: str, digest: str) -> None:
        per_host = data["blobs"].setdefault(host, {})
        known = per_host.get(digest) if isinstance(per_host.get(digest), list) else []
        repos = [r for r in known if r != repository and isinstance(r, str)]
        per_host[digest] = ([repository] + repos)[:self.MAX_REPOSITORIES]

    def save(self) -> None:
        """Merge what this run learnt into the file, under its lock, replacing it atomically (best effort: a
        cache that cannot be written, or whose lock stays busy, is only slower next time)."""
        if not self._new_layers and not self._new_blobs and not self._forgotten:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path.with_name(self.path.name + ".lock"))
            if not lock.acquire(timeout=SAVE_LOCK_WAIT):
                return
        except OSError:
            return
        try:
            data = self._read()
            for key in self._forgotten:
                data["layers"].pop(key, None)
            data["layers"].update(self._new_layers)
            for host, repository, digest in self._new_blobs:
                self._add_blob(data, host, repository, digest)
            atomic_write_json(self.path, data, durable=False)
        except OSError:
            return
        finally:
            lock.release()
        self._data = data
        self._new_layers, self._new_blobs, self._forgotten = {}, [], set()


def _layer_entry(value) -> tuple[str, int] | None:
    """(digest, layer size) of a well-formed layer entry, else None."""
    if not isinstance(value, dict):
        return None
    digest, size = value.get("digest"), value.get("size")
    if not (isinstance(digest, str) and _DIGEST.fullmatch(digest) and type(size) is int and size > 0):
        return None
    return digest, size


__all__ = ["DigestCache"]
