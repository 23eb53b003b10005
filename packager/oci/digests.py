"""What tvpack remembers about blobs between runs: ``<tvpack cache>/oci/digests.json``."""
from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_write_json
from ..home import tvpack_cache_dir
from .image import Layer


# -- what tvpack remembers about blobs ----------------------------------------------------------------
class DigestCache:
    """What tvpack learnt about blobs, kept between runs in ``<tvpack cache>/oci/digests.json``:

    * the digest of each checkpoint layer it made, under :meth:`Layer.key` (path, size, sha256, mtime,
      layer format), so an unchanged checkpoint is never hashed again;
    * which repositories of which registry hold each blob it pushed: where to mount it from next time.

    Only a cache, read-modify-written without a lock: a lost update costs a re-hash or an upload later.
    A wrong layer digest cannot make a wrong image: an upload under it is checked by the registry and
    the transport, and a HEAD or mount of a digest finds the blob with those bytes or nothing."""

    VERSION = 1
    MAX_REPOSITORIES = 8  # per blob: mount candidates worth a request

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else tvpack_cache_dir() / "oci" / "digests.json"
        self._data = self._read()
        self._new_layers: dict[str, str] = {}
        self._new_blobs: list[tuple[str, str, str]] = []

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"version": self.VERSION, "layers": {}, "blobs": {}}
        if not isinstance(data, dict) or data.get("version") != self.VERSION:
            return {"version": self.VERSION, "layers": {}, "blobs": {}}
        for key in ("layers", "blobs"):
            if not isinstance(data.get(key), dict):
                data[key] = {}
        return data

    def layer(self, layer: Layer) -> str | None:
        digest = self._data["layers"].get(layer.key())
        return digest if isinstance(digest, str) and digest.startswith("sha256:") else None

    def remember_layer(self, layer: Layer, digest: str) -> None:
        self._data["layers"][layer.key()] = self._new_layers[layer.key()] = digest

    def repositories(self, host: str, digest: str) -> list[str]:
        repos = (self._data["blobs"].get(host) or {}).get(digest) or []
        return [r for r in repos if isinstance(r, str)]

    def remember_blob(self, host: str, repository: str, digest: str) -> None:
        self._add_blob(self._data, host, repository, digest)
        self._new_blobs.append((host, repository, digest))

    def _add_blob(self, data: dict, host: str, repository: str, digest: str) -> None:
        per_host = data["blobs"].setdefault(host, {})
        repos = [r for r in per_host.get(digest) or [] if r != repository]
        per_host[digest] = ([repository] + repos)[:self.MAX_REPOSITORIES]

    def save(self) -> None:
        """Merge what this run learnt into the file (best effort: a cache that cannot be written is
        only slower next time)."""
        if not self._new_layers and not self._new_blobs:
            return
        data = self._read()
        data["layers"].update(self._new_layers)
        for host, repository, digest in self._new_blobs:
            self._add_blob(data, host, repository, digest)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, data, durable=False)
        except OSError:
            return
        self._data = data
        self._new_layers, self._new_blobs = {}, []


__all__ = ["DigestCache"]
