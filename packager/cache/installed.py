"""Installed state: the manifests bundles left under ``<hub>/tvpack/manifests/``, their signatures and install
records, and which manifest is *current* for each weights.

Manifests are read only through :func:`packager.formats.manifest.parse_manifest`. Nothing here writes, except
:func:`record_install` (called by an install): a read-only TORCH_HOME reads as well as any.

Which manifest is current, when several describe the same weights (never by file mtime):

1. one manifest (or several describing it identically) -> that one;
2. all of them releases of the same channel -> the highest sequence;
3. any of them with an install record -> the most recently installed (re-installing makes it current again);
4. otherwise (``tar -xf`` of two bundles, say) nothing says which: the weights is *ambiguous*, and loading it
   is refused in one line naming the manifests.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import BundleError, CacheError
from ..formats.manifest import MANIFEST_DIR, MAX_MANIFEST, BundleEntry, decode_manifest, manifest_path_for, parse_manifest
from ..formats.release import InstallRecord, Release, encode_install_record, parse_install_record, release_of
from ..formats.signature import SIGNATURES_DIR, manifest_id_of_signature
from ..fsutil import atomic_write_bytes
from .layout import HubLayout, _makedirs

MAX_RECORD = 64 << 10


@dataclass(frozen=True)
class ManifestInfo:
    """One installed manifest as read (``problem`` says why it is unusable: unreadable, edited, malformed)."""

    manifest_id: str
    path: Path
    entries: tuple[BundleEntry, ...] = ()
    files: Mapping[str, tuple[int, str]] = field(default_factory=dict, compare=False)  # archive path -> (size, sha)
    release: Release | None = None
    record: InstallRecord | None = None  # None: not installed by tvpack (tar -xf, an image volume) or before records
    signatures: tuple[Path, ...] = ()  # installed signature files over it
    problem: str | None = None
    data: bytes = field(default=b"", repr=False, compare=False)  # the manifest's bytes (what signatures cover)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def signature_members(self) -> list[tuple[str, Path]]:
        """(archive path, file) of each installed signature over this manifest."""
        return [(f"{SIGNATURES_DIR}/{path.name}", path) for path in self.signatures]

    def to_dict(self) -> dict:
        return {"manifest": self.manifest_id, "path": str(self.path), "ok": self.ok, "problem": self.problem,
                "weights": [e.name for e in self.entries],
                "release": self.release.to_dict() if self.release else None,
                "installed": self.record.installed if self.record else None,
                "signatures": [p.name for p in self.signatures]}


@dataclass(frozen=True)
class InstalledWeights:
    """One weights the installed manifests describe, and which of them is current."""

    name: str
    manifests: tuple[str, ...]  # ids of the intact manifests describing it
    current: str | None  # the current one's id; None when nothing says which (``problem``)
    reason: str  # why that one: "only", "identical", "release", "installed", "ambiguous"
    entry: BundleEntry | None = None  # the current manifest's entry (None when ambiguous)
    problem: str | None = None

    def to_dict(self) -> dict:
        return {"weights": self.name, "current": self.current, "reason": self.reason,
                "manifests": list(self.manifests), "problem": self.problem,
                "file": self.entry.filename if self.entry else None, "sha256": self.entry.sha256 if self.entry else None}


# -- reading -----------------------------------------------------------------------------------------------

def _read_bytes(path: Path, limit: int) -> bytes:
    if path.stat().st_size > limit:
        raise OSError(f"{path.stat().st_size} bytes is implausibly large")
    return path.read_bytes()


def _record(layout: HubLayout, manifest_id: str) -> InstallRecord | None:
    path = layout.install_record(manifest_id)
    try:
        record = parse_install_record(_read_bytes(path, MAX_RECORD), str(path))
    except (OSError, BundleError):
        return None  # none, or damaged: the manifest is then as good as laid down by hand
    return record if record.manifest == manifest_id else None


def _records(layout: HubLayout) -> list[InstallRecord]:
    try:
        names = sorted(n for n in os.listdir(layout.installed) if n.endswith(".json") and not n.startswith("."))
    except OSError:
        return []
    found = (_record(layout, name[: -len(".json")]) for name in names)
    return [record for record in found if record is not None]


def _signatures(layout: HubLayout) -> dict[str, list[Path]]:
    try:
        names = sorted(os.listdir(layout.signatures))
    except OSError:
        return {}
    out: dict[str, list[Path]] = {}
    for name in names:
        manifest_id = manifest_id_of_signature(f"{SIGNATURES_DIR}/{name}")
        if manifest_id is not None:
            out.setdefault(manifest_id, []).append(layout.signatures / name)
    return out


def read_manifest(layout: HubLayout, path: Path, signatures: Sequence[Path] = ()) -> ManifestInfo:
    """One installed manifest; never raises for a bad one (``problem`` says what is wrong)."""
    info = ManifestInfo(path.stem, path, signatures=tuple(signatures))
    try:
        data = _read_bytes(path, MAX_MANIFEST)
    except OSError as exc:
        return replace(info, problem=f"unreadable: {exc.strerror or exc}")
    if manifest_path_for(data) != f"{MANIFEST_DIR}/{path.name}":
        return replace(info, problem="its content does not match its name (edited or corrupt)")
    try:
        document = decode_manifest(data)
        entries, files = parse_manifest(document, str(path))
        release = release_of(document)
    except BundleError as exc:
        return replace(info, problem=exc.format(), data=data)
    return replace(info, entries=tuple(entries), files=dict(files), release=release,
                   record=_record(layout, path.stem), data=data)


def read_manifests(layout: HubLayout) -> tuple[ManifestInfo, ...]:
    """Every ``<hub>/tvpack/manifests/*.json``, by id."""
    try:
        paths = sorted(p for p in layout.manifests.glob("*.json") if not p.name.startswith("."))
    except OSError:
        return ()
    signatures = _signatures(layout)
    return tuple(read_manifest(layout, path, signatures.get(path.stem, ())) for path in paths)


# -- which manifest is current -----------------------------------------------------------------------------

def _same(a: BundleEntry, b: BundleEntry) -> bool:
    return a == b and a.transforms == b.transforms and a.meta == b.meta


def _choose(name: str, candidates: list[tuple[ManifestInfo, BundleEntry]]) -> InstalledWeights:
    ids = tuple(m.manifest_id for m, _e in candidates)
    if len(candidates) == 1 or all(_same(candidates[0][1], e) for _m, e in candidates[1:]):
        # alike: any would load the same bytes; the most recently installed speaks for them (its signatures count)
        recorded = [(m.record.installed, i) for i, (m, _e) in enumerate(candidates) if m.record is not None]
        pick = max(recorded)[1] if recorded else 0
        return InstalledWeights(name, ids, ids[pick], "only" if len(ids) == 1 else "identical", candidates[pick][1])
    releases = [m.release for m, _e in candidates]
    if all(r is not None for r in releases) and len({r.channel for r in releases}) == 1:
        top = max(r.sequence for r in releases)
        best = [(m, e) for m, e in candidates if m.release.sequence == top]
        if len(best) == 1:
            return InstalledWeights(name, ids, best[0][0].manifest_id, "release", best[0][1])
    recorded = [(m.record.installed, m.manifest_id, e) for m, e in candidates if m.record is not None]
    if recorded:
        _when, manifest_id, entry = max(recorded)
        return InstalledWeights(name, ids, manifest_id, "installed", entry)
    return InstalledWeights(name, ids, None, "ambiguous", None,
                            f"{name} is described differently by {len(ids)} installed manifests "
                            f"({', '.join(ids)}) and nothing says which is current (no install record, no releases "
                            "of one channel to order them); install the one to use with 'tvpack install BUNDLE'")


def current_weights(manifests: Sequence[ManifestInfo]) -> dict[str, InstalledWeights]:
    """For each weights the intact manifests describe: which manifest is current (see the module's rules)."""
    by_name: dict[str, list[tuple[ManifestInfo, BundleEntry]]] = {}
    for manifest in manifests:
        if manifest.ok:
            for entry in manifest.entries:
                by_name.setdefault(entry.name, []).append((manifest, entry))
    return {name: _choose(name, found) for name, found in sorted(by_name.items())}


# -- writing an install record -----------------------------------------------------------------------------

def record_install(hub, manifest_id: str, *, command: str | None = None) -> InstallRecord:
    """Write ``<hub>/tvpack/installed/<manifest-id>.json`` (atomically, durably): this manifest was installed now,
    later than any install recorded before it here (the clock may step back; the order of installs may not)."""
    layout = hub if isinstance(hub, HubLayout) else HubLayout(Path(hub))
    latest = max((r.installed for r in _records(layout)), default=0.0)
    when = max(time.time_ns() / 1e9, latest + 1e-6)
    record = InstallRecord(manifest_id, when, shlex.join(sys.argv) if command is None else command)
    _makedirs(layout.installed)
    try:
        atomic_write_bytes(layout.install_record(manifest_id), encode_install_record(record))
    except OSError as exc:
        raise CacheError(f"cannot record the install of manifest {manifest_id} in {layout.installed}: "
                         f"{exc.strerror or exc}") from None
    return record
