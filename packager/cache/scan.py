"""What a hub holds, without hashing or writing anything: every checkpoint file with its weights, size and
status (:func:`scan_cache`), and the installed state with the current manifest of each weights (:func:`scan_hub`)."""
from __future__ import annotations

import os
import stat as stat_module
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import CacheError, TvpackError
from ..formats.manifest import BundleEntry
from ..registry import hash_prefix_from_filename
from ..snapshot import get_catalog
from .index import _fresh, _load_index
from .installed import InstalledWeights, ManifestInfo, current_weights, read_manifests
from .layout import _TEMP_NAME, PART_SUFFIX, TORCH_HUB_PARTIAL, HubLayout

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


def _manifest_pins(hub: Path, manifests: Sequence[ManifestInfo] | None = None,
                   current: Mapping[str, InstalledWeights] | None = None) -> dict[str, tuple[str, str | None]]:
    """filename -> (weights name, sha256) from the installed manifests: the current manifest's pin first."""
    if manifests is None:
        manifests = read_manifests(HubLayout(Path(hub)))
    if current is None:
        current = current_weights(manifests)
    pins: dict[str, tuple[str, str | None]] = {}
    for weights in current.values():
        if weights.entry is not None:
            pins.setdefault(weights.entry.filename, (weights.name, weights.entry.sha256))
    for manifest in manifests:
        for entry in manifest.entries:
            pins.setdefault(entry.filename, (entry.name, entry.sha256))
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
    return scan_hub(HubLayout.of(torch_home), registry=registry, use_registry=use_registry).cache


def _scan_checkpoints(hub: Path, pins: Mapping[str, tuple[str, str | None]], registry: Sequence[str],
                      use_registry: bool) -> CacheInfo:
    listing = _listing(HubLayout(hub).checkpoints, strict=True)
    if not listing:
        return CacheInfo(hub, ())
    index = _load_index(hub)
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
        files.append(_cached_file(path, st, entry, tuple(weights), pin_sha))
    return CacheInfo(hub, tuple(files))


def _cached_file(path: Path, st: os.stat_result, entry: dict, weights: tuple[str, ...],
                 pin_sha: str | None) -> CachedFile:
    prefix = hash_prefix_from_filename(path.name)
    expected = pin_sha or prefix
    sha = entry.get("sha256") if _fresh(entry, st) else None
    if sha is not None:
        bad = (pin_sha and sha != pin_sha) or (prefix and not sha.startswith(prefix))
        status, detail = ("corrupt", "sha256 does not match " + ("the manifest" if pin_sha and sha != pin_sha
                                                                  else "the name's prefix")) \
            if bad else ("verified", None)
    elif expected or weights:
        status, detail = "unverified", ("changed since verified" if entry else None)
    else:
        status, detail = "unknown", "no known weights and no hash to check"
    return CachedFile(path, st.st_size, st.st_mtime, status, weights, sha, expected, detail)


# -- installed state: the one reader ---------------------------------------------------------------

@dataclass(frozen=True)
class HubInfo:
    """What a hub holds, read once, in the style of huggingface_hub's ``scan_cache_dir``: the checkpoint files
    (``cache``; None when not asked for), the installed manifests with their releases, install records and
    signatures, and for each weights they describe which manifest is current."""

    layout: HubLayout
    manifests: tuple[ManifestInfo, ...] = ()
    weights: Mapping[str, InstalledWeights] = field(default_factory=dict, compare=False)
    cache: CacheInfo | None = None

    @property
    def hub_dir(self) -> Path:
        return self.layout.hub

    def manifest(self, manifest_id: str) -> ManifestInfo | None:
        return next((m for m in self.manifests if m.manifest_id == manifest_id), None)

    @property
    def problems(self) -> list[str]:
        """One line per installed manifest that cannot be used."""
        return [f"skipping installed manifest {m.path}: {m.problem}" for m in self.manifests if m.problem]

    def current_entries(self) -> dict[str, BundleEntry]:
        """name -> the current manifest's entry, for every weights that has one."""
        return {name: w.entry for name, w in self.weights.items() if w.entry is not None}

    def to_dict(self) -> dict:
        return {"hub_dir": str(self.layout.hub), "manifests": [m.to_dict() for m in self.manifests],
                "weights": [w.to_dict() for w in self.weights.values()],
                **({"cache": self.cache.to_dict()} if self.cache is not None else {})}


def scan_hub(layout: HubLayout, *, registry: Sequence[str] = (), use_registry: bool = True,
             checkpoints: bool = True) -> HubInfo:
    """Read a hub once: manifests (through ``parse_manifest``), their signatures and install records, which
    manifest is current for each weights, and (unless ``checkpoints=False``) every checkpoint file with its
    size and status (:func:`scan_cache`). Writes nothing, hashes nothing."""
    manifests = read_manifests(layout)
    current = current_weights(manifests)
    cache = _scan_checkpoints(layout.hub, _manifest_pins(layout.hub, manifests, current), registry,
                              use_registry) if checkpoints else None
    return HubInfo(layout, manifests, current, cache)
