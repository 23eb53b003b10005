"""Bundles, our store of record: written from the cache, verified, installed into a TORCH_HOME.

The archive is a TORCH_HOME overlay, so ``tar -xf BUNDLE -C "$TORCH_HOME"`` alone gives vanilla
torchvision a working offline cache::

    hub/tvpack/manifests/<id>.json     first member: JSON manifest, id = sha256(manifest)[:16]
    hub/checkpoints/<basename(url)>    each checkpoint, byte-identical to the downloaded file
    hub/tvpack/sbom/<sha[:16]>.cdx.json   the CycloneDX ML-BOM (formats/sbom.py), listed in the manifest
    hub/tvpack/signatures/<id>[.<label>].sig   OMS signatures, if any (made after the manifest: see signing.py)

Writing is deterministic (members sorted, mtime from ``SOURCE_DATE_EPOCH`` or 0, uid/gid 0, no
user or group names, mode 0644, ustar headers with pax records only for long names or sizes over
8 GiB) and streaming: each checkpoint is copied once by the kernel (``copy_file_range``), its
sha256 taken from the cache's verification index when the file is unchanged.

Reading trusts nothing: our own header parser accepts regular files only (no links, devices,
FIFOs or directories), relative paths under ``hub/`` without ``..``, each member once, exactly the
members the manifest lists, with the sizes and sha256 it states, then only signature members, zero
padding and a proper end of archive. A checkpoint must load with ``torch.load(weights_only=True)``
(without reading its tensor data) before it counts as valid: vanilla torchvision unpickles cache
files with ``weights_only=False``, so a poisoned pickle would run code there.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping, Sequence

from . import cache, channels
from .bundle_write import archive_size, write_file, write_split
from .channels import ReleaseOptions
from .config import Config, config_from
from .errors import BundleError, CacheError, OfflineError, SelectorError, UsageError
from .formats.archive import Member, TarArchive, each_member, source_date_epoch
from .formats.checkpoint import check_checkpoint
from .formats.manifest import (
    CHECKPOINT_DIR,
    MANIFEST_DIR,
    MANIFEST_NAME,
    MAX_MANIFEST,
    BundleEntry,
    build_manifest,
    decode_manifest,
    encode_manifest,
    is_checkpoint_path,
    manifest_path_for,
    parse_manifest,
    site_files,
)
from .formats.release import Release
from .formats.sbom import add_bom
from .formats.signature import MAX_SIGNATURE, MAX_SIGNATURES, SIGNATURES_DIR, manifest_id_of_signature
from .formats.volumes import MAX_PARTS, SplitWriter, listing_name, open_source, part_name
from .fsutil import fsync_dir, make_dirs, remove_stale_temps, reserve_space, share_with_group, temp_path, write_all
from .home import hub_dir as _hub_dir
from .registry import WeightsRef, hash_prefix_from_filename, parse_selector, select_described
from .report import Reporter, reporter_for
from .snapshot import describe, resolve
from .spec import build_transforms, meta_from_json


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    manifest_id: str
    weights: int
    members: int  # archive members, manifest included
    bytes: int  # payload bytes hashed
    created_by: dict
    at_site: int = 0  # checkpoints a delta bundle expects at the site (not in the archive, not checked here)

    def to_dict(self) -> dict:
        return {"ok": True, "path": str(self.path), "manifest_id": self.manifest_id, "weights": self.weights,
                "members": self.members, "bytes": self.bytes, "created_by": self.created_by,
                "at_site": self.at_site}


@dataclass(frozen=True)
class Placed:
    path: Path
    status: str  # "installed", "replaced", "unchanged"; "present": expected at the site (delta) and found
    size: int
    weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class InstallReport:
    bundle: Path
    manifest: Path
    files: tuple[Placed, ...]

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle), "manifest": str(self.manifest),
                "files": [{"path": str(p.path), "status": p.status, "size": p.size, "weights": list(p.weights)}
                          for p in self.files]}


# -- the archive of a bundle ---------------------------------------------------------------------------
class _Archive(TarArchive):
    """A bundle's tar structure and its manifest, cross-checked; no payload hashing."""

    def __init__(self, source):
        super().__init__(source)
        self._read_manifest()

    def _read_manifest(self) -> None:
        if not self.members or not MANIFEST_NAME.fullmatch(self.members[0].path):
            self.fail(f"the first member is not a manifest ({MANIFEST_DIR}/<id>.json); not a tvpack bundle")
        first = self.members[0]
        if first.size > MAX_MANIFEST:
            self.fail(f"manifest of {first.size} bytes is implausibly large")
        data = self._read(first.offset, first.size)
        if manifest_path_for(data) != first.path:
            self.fail("manifest does not match its id (it was altered)")
        try:
            document = decode_manifest(data)
            self.entries, listed = parse_manifest(document, f"{self.path}:{first.path}")
        except BundleError as exc:
            self.fail(exc.message)
        self.site_files = site_files(self.entries)  # a delta bundle's checkpoints expected at the site, not members
        self.expected = {path: value for path, value in listed.items() if path not in self.site_files}
        self.manifest_bytes = data
        self.manifest = document
        self.manifest_path = first.path
        self.manifest_id = MANIFEST_NAME.fullmatch(first.path).group(1)
        present, self.signatures = {}, []
        for member in self.members[1:]:
            if member.path.startswith(SIGNATURES_DIR + "/"):
                self._check_signature_member(member)
                self.signatures.append(member)
            elif self.signatures:
                self.fail(f"member {member.path!r} follows a signature; signatures come after the files they sign")
            else:
                present[member.path] = member
        for path, (size, _sha) in self.expected.items():
            member = present.get(path)
            if member is None:
                self.fail(f"the manifest lists {path!r} but the archive lacks it")
            if member.size != size:
                self.fail(f"the manifest says {path!r} is {size} bytes, the archive holds {member.size}")
        for path in present:
            if path not in self.expected:
                self.fail(f"member {path!r} is not listed in the manifest")
        self.payload = self.members[1:len(self.members) - len(self.signatures)]

    def _check_signature_member(self, member: Member) -> None:
        # Signatures are made after the manifest, so it cannot list them: only their name and size are checked here.
        named = manifest_id_of_signature(member.path)
        if named is None:
            self.fail(f"member {member.path!r} is not a signature ({SIGNATURES_DIR}/<manifest-id>[.<label>].sig)")
        if named != self.manifest_id:  # installed, it would sit beside (or replace) another manifest's signature
            self.fail(f"signature {member.path!r} is named for manifest {named}, not this bundle's {self.manifest_id}")
        if member.size > MAX_SIGNATURE:
            self.fail(f"signature {member.path!r} of {member.size} bytes is implausibly large")
        if len(self.signatures) >= MAX_SIGNATURES:
            self.fail(f"more than {MAX_SIGNATURES} signatures")


def _check_member_pickle(archive: _Archive, member: Member) -> None:
    with archive.open_member(member) as f:
        check_checkpoint(f, member.path)


# -- open / verify -----------------------------------------------------------------------------------
class Bundle:
    """An opened bundle (structure and manifest checked; payload hashes not yet)."""

    def __init__(self, path: Path, archive: _Archive):
        self.path = path
        self._archive = archive
        self.manifest: dict = archive.manifest
        self.manifest_id: str = archive.manifest_id
        self.manifest_path: str = archive.manifest_path
        self.entries: tuple[BundleEntry, ...] = tuple(archive.entries)
        self.members: tuple[Member, ...] = tuple(archive.members)
        self.manifest_bytes: bytes = archive.manifest_bytes
        # archive path -> (size, sha256) of every file the manifest lists, carried or (delta) expected at the site
        self.files: dict[str, tuple[int, str]] = dict(sorted({**archive.expected, **archive.site_files}.items()))
        self.signatures: tuple[Member, ...] = tuple(archive.signatures)  # after the payload, not listed

    def __repr__(self) -> str:
        return f"<Bundle {self.path} {len(self.entries)} weights, manifest {self.manifest_id}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._archive.source.close()

    @property
    def created_by(self) -> dict:
        value = self.manifest.get("created_by")
        return value if isinstance(value, dict) else {}

    @property
    def size(self) -> int:
        """Bytes of the members carried (the manifest excluded)."""
        return sum(m.size for m in self._archive.payload)

    @property
    def site_files(self) -> dict[str, tuple[int, str]]:
        """{archive path: (size, sha256)} of the checkpoints a delta bundle expects at the site."""
        return dict(self._archive.site_files)

    @property
    def file_size(self) -> int:
        """The archive's size in bytes (all parts of a split bundle)."""
        return self._archive.source.size

    @property
    def parts(self) -> list[Path]:
        """The files holding the archive: the bundle itself, or the parts of a split bundle."""
        return list(self._archive.source.parts)

    def entry(self, name: str) -> BundleEntry:
        """By weights name (``Enum.MEMBER``, ``Enum.DEFAULT``), model name (when one weights of it is bundled),
        ``model:MEMBER`` or ``model:DEFAULT`` (:func:`packager.registry.parse_selector`)."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        selector = parse_selector(name)
        if selector.model is not None and selector.member is None:
            selector = replace(selector, member="all")  # a bare model: fine when one weights of it is bundled
        try:
            matches = select_described(selector, self.entries)
        except SelectorError as exc:
            raise BundleError(f"{self.path.name}: {exc.message}") from None
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise BundleError(f"{name!r} matches {len(matches)} weights in {self.path.name}: "
                              + ", ".join(e.name for e in matches))
        raise BundleError(f"{self.path.name} holds no weights {name!r}; it holds: "
                          + ", ".join(e.name for e in self.entries))

    def member(self, path: str) -> Member:
        for member in self.members:
            if member.path == path:
                return member
        raise BundleError(f"{self.path.name} has no member {path!r}")

    def open_member(self, path: str) -> BinaryIO:
        """A seekable read-only file object over one member's bytes."""
        return self._archive.open_member(self.member(path))

    def open_checkpoint(self, name: str) -> BinaryIO:
        return self.open_member(self.entry(name).path)

    def meta(self, name: str, *, registry=None) -> dict:
        return meta_from_json(self.entry(name).meta, registry=registry)

    def transforms(self, name: str, *, registry=()):
        return build_transforms(self.entry(name).transforms, registry=registry)


def _open_archive(path) -> _Archive:
    # a source object (the formats.volumes interface) is read as it is: an OCI image's layers, for one
    source = path if hasattr(path, "readinto_at") else open_source(path)
    try:
        return _Archive(source)
    except BaseException:
        source.close()
        raise


def open_bundle(path) -> Bundle:
    """Open a bundle: its structure and manifest are checked, payload hashes are not (see verify)."""
    archive = _open_archive(path)
    return Bundle(_path_of(path), archive)


def _path_of(path) -> Path:
    """What reports name: the file, or a source object's ``path``."""
    return Path(getattr(path, "path", path))


def _refuse_mismatches(archive, hashed) -> None:
    """``hashed``: (member, sha256 read) pairs. Refuse, in one line, when any differs from the manifest; the spans
    of those members let a split bundle name the part to blame."""
    bad = [m for m, sha in hashed if sha != archive.expected[m.path][1]]
    if bad:
        archive.fail(f"sha256 mismatch for {', '.join(repr(m.path) for m in bad)} (the archive is corrupt or altered)",
                     spans=[(m.offset, m.offset + m.size) for m in bad])


def verify_bundle(path, *, progress: bool = False, check=None, reporter: Reporter | None = None) -> VerifyReport:
    """Every structural check, every sha256 and the weights-only pickle check of each checkpoint; progress goes to
    ``reporter`` (:mod:`packager.report`; ``progress=True``: bars on stderr).

    Returns a report when all hold; raises :class:`BundleError` (one line) at the first failure.
    ``check(bundle)`` (e.g. the signature check of :mod:`packager.signing`) runs on the opened bundle
    before any payload is read; it raises to refuse.
    """
    archive = _open_archive(path)
    try:
        if check is not None:
            check(Bundle(_path_of(path), archive))
        bar = reporter_for(reporter, progress).progress(sum(m.size for m in archive.payload), "verify")
        try:
            digests = each_member([(m,) for m in archive.payload],
                                   lambda member, pool: archive.hash_member(member, pool, bar=bar))
        finally:
            bar.close()
        _refuse_mismatches(archive, zip(archive.payload, digests))
        for member in archive.payload:
            if is_checkpoint_path(member.path):
                _check_member_pickle(archive, member)
        return VerifyReport(_path_of(path), archive.manifest_id, len(archive.entries), 1 + len(archive.payload),
                            sum(m.size for m in archive.payload), archive.manifest.get("created_by") or {},
                            len(archive.site_files))
    finally:
        archive.source.close()


# -- install -----------------------------------------------------------------------------------------
def _destination(hub: Path, member_path: str) -> Path:
    # member paths were checked: "hub/" + safe relative components, no "..".
    return hub.joinpath(*member_path.split("/")[1:])


_INSTALL_SUFFIX = ".tvpack-install"  # of install's temp files


def _current_sha(dest: Path) -> str | None:
    return cache.file_sha256(dest) if dest.is_file() else None


def _conflict(dest: Path, current: str | None, expected: str) -> str:
    """The refusal for a different file in the way (only ``--force`` replaces it)."""
    if dest.is_symlink() and not dest.exists():
        return f"{dest} is a dangling symbolic link (to {os.readlink(dest)}); remove it or use --force to replace it"
    if current is None:
        return f"{dest} exists and is not a regular file; remove it or use --force to replace it"
    return (f"{dest} exists with different contents (sha256 {current[:12]}..., bundle has {expected[:12]}...); "
            "it is another version of this file, not a damaged one: use --force to replace it")


def _proves_corrupt(dest: Path, current: str | None) -> bool:
    """The file's own name promises a hash prefix that its bytes do not have: it can only be damaged."""
    prefix = hash_prefix_from_filename(dest.name)
    return current is not None and prefix is not None and not current.startswith(prefix)


def _stage_file(dest: Path) -> tuple[Path, int]:
    tmp = temp_path(dest, _INSTALL_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for fetch
    except OSError as exc:
        raise CacheError(f"cannot write {dest}: {exc.strerror or exc}") from None
    share_with_group(tmp, fd=fd)  # and a group-shared cache stays writable by the whole group
    return tmp, fd


@dataclass(frozen=True)
class FileStep:
    """What install does with one archive member: ``action`` is install, unchanged, repaired or replaced."""

    member: Member
    dest: Path
    action: str


@dataclass(frozen=True)
class InstallPlan:
    """Everything install decided before reading any payload byte (step 1); the steps after it only carry it out."""

    hub: Path
    files: tuple[FileStep, ...]  # the archive's checkpoints, in archive order
    present: tuple[tuple[str, Path], ...]  # a delta bundle's checkpoints found at the site: (archive path, file)
    manifest_dest: Path
    weights_of: Mapping[str, tuple[str, ...]]  # archive path -> the weights that use it
    signers: tuple | None = None  # the valid signatures the check found (formats.signature.Verified), if it ran
    extras: tuple[Member, ...] = ()  # small tvpack members (the ML-BOM): staged as the manifest is


@dataclass(frozen=True)
class _Staged:
    """Step 3's result: the temp files written, each under its final directory, none yet under its final name."""

    checkpoints: tuple[tuple[FileStep, Path | None], ...]  # temp file, None when unchanged
    moves: tuple[tuple[Path, Path], ...]  # (destination, temp file), in placing order: the manifest last


def install_bundle(path, *, torch_home=None, force: bool = False, progress: bool = False, check=None,
                   release: ReleaseOptions | None = None, reporter: Reporter | None = None) -> InstallReport:
    """Verify a bundle and place its files under the hub directory; see :func:`install`.
    ``check(bundle)`` runs on the opened bundle before anything is read or written; it raises to refuse, and may
    return the valid signatures it found (the release checks need to know who signed).

    The steps: 0. ``check``; 1. plan (:func:`_plan_install`: every decision, refusals of conflicts and of a delta
    bundle's missing site files); 2. release checks (:func:`packager.channels.check_install`: no revoked checkpoint
    comes back; a channel release passes its channel's rules, ``release`` holding the operator's overrides); 3. stage
    (:func:`_stage_install`: every new file,
    the manifest included, written and fsynced under a temporary name, every sha256 and the weights-only pickle
    check; a full disk fails here, before any final name changes); 4. place (:func:`_place`: the checkpoints
    renamed into place and the manifest last; if a rename fails, the files placed so far are put back as they
    were); 5. record (:func:`_record_install`: the verification index; then the channel record and the
    revocations, :func:`packager.channels.commit_release`). All or nothing as
    :func:`packager.loader.load_model` sees it.
    """
    archive = _open_archive(path)
    temps: list[Path] = []
    try:
        with contextlib.ExitStack() as held:
            signers = check(Bundle(_path_of(path), archive)) if check is not None else None  # 0
            plan = _plan_install(archive, _hub_dir(torch_home), force, signers)  # 1
            decision = channels.check_install(plan.hub, archive.manifest, archive.manifest_id,  # 2
                                              {**archive.expected, **archive.site_files}, plan.signers,
                                              release or ReleaseOptions(), held)
            staged = _stage_install(archive, plan, temps, held, reporter_for(reporter, progress))  # 3
            _place(list(staged.moves), temps)  # 4
            placed = _record_install(archive, plan, staged)  # 5
            if decision is not None:
                channels.commit_release(plan.hub, decision)
            cache.record_install(plan.hub, plan.manifest_dest.stem)  # now current for its weights (even unchanged)
            return InstallReport(_path_of(path), plan.manifest_dest, placed)
    finally:
        for tmp in temps:
            _unlink(tmp)
        archive.source.close()


def _plan_install(archive: _Archive, hub: Path, force: bool, signers) -> InstallPlan:
    """Step 1: decide per file, refusing conflicts (and a delta bundle's missing site files) before any write."""
    weights_of: dict[str, list[str]] = {}
    for entry in archive.entries:
        weights_of.setdefault(entry.path, []).append(entry.name)
    present = _check_site(archive, hub)
    steps = []
    for member in (m for m in archive.payload if is_checkpoint_path(m.path)):
        dest = _destination(hub, member.path)
        expected = archive.expected[member.path][1]
        action = "install"
        if dest.is_symlink() or dest.exists():
            if dest.is_dir() and not dest.is_symlink():
                raise BundleError(f"cannot install {dest}: a directory is in the way")
            current = _current_sha(dest)
            if current == expected:
                action = "unchanged"
            elif _proves_corrupt(dest, current):
                action = "repaired"  # damaged by its own name's hash: nothing of value is lost
            elif not force:
                raise BundleError(_conflict(dest, current, expected))
            else:
                action = "replaced"
        steps.append(FileStep(member, dest, action))
    return InstallPlan(hub, tuple(steps), tuple(present), _destination(hub, archive.manifest_path),
                       {path: tuple(names) for path, names in weights_of.items()},
                       tuple(signers) if signers is not None else None,
                       tuple(m for m in archive.payload if not is_checkpoint_path(m.path)))


def _stage_install(archive: _Archive, plan: InstallPlan, temps: list[Path], held: contextlib.ExitStack,
                   reporter: Reporter) -> _Staged:
    """Step 3: one pass over the payload hashes everything and writes what is new into temp files (refused at once
    when the file system cannot hold them beside what is there: the old copy of a replaced file goes last); every
    checkpoint must load weights-only; then the manifest and its signatures are staged the same way."""
    needed = sum(step.member.size for step in plan.files if step.action != "unchanged")
    held.enter_context(reserve_space(plan.hub / "checkpoints" / "new", needed + len(archive.manifest_bytes)
                                     + sum(m.size for m in (*archive.signatures, *plan.extras))))
    for step in plan.files:
        if step.action != "unchanged":
            _makedirs(step.dest.parent)

    def stage(step: FileStep, pool) -> tuple[Path | None, str]:
        if step.action == "unchanged":
            return None, archive.hash_member(step.member, pool, bar=bar)
        tmp, fd = _stage_file(step.dest)
        temps.append(tmp)
        try:
            digest = archive.hash_member(step.member, pool, sink=fd, bar=bar)
            os.fsync(fd)  # the bytes are on disk before any name points at them
            return tmp, digest
        except OSError as exc:
            raise CacheError(f"cannot write {step.dest}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    bar = reporter.progress(sum(step.member.size for step in plan.files), "install")
    try:
        outcomes = each_member([(step,) for step in plan.files], stage)
    finally:
        bar.close()
    _refuse_mismatches(archive, ((step.member, sha) for step, (_t, sha) in zip(plan.files, outcomes)))
    staged = tuple((step, tmp) for step, (tmp, _sha) in zip(plan.files, outcomes))
    for step, tmp in staged:  # every checkpoint must load weights-only before anything gets its final name
        if is_checkpoint_path(step.member.path):
            if tmp is not None:
                check_checkpoint(str(tmp), step.member.path)
            else:
                _check_member_pickle(archive, step.member)
    manifest_tmp = _stage_bytes(plan.manifest_dest, archive.manifest_bytes, temps, "the bundle manifest")
    # its signatures go beside it (packager.signing checks them against it), staged the same way
    signature_moves = []  # the extra members (their sha256 checked here) and the signatures, beside the manifest
    for member in (*plan.extras, *archive.signatures):
        dest, data = _destination(plan.hub, member.path), archive._read(member.offset, member.size)
        if member in plan.extras and hashlib.sha256(data).hexdigest() != archive.expected[member.path][1]:
            archive.fail(f"sha256 mismatch for {member.path!r} (the archive is corrupt or altered)",
                         spans=[(member.offset, member.offset + member.size)])
        tmp = _stage_bytes(dest, data, temps, "the bundle member")
        if tmp is not None:
            signature_moves.append((dest, tmp))
    # placing order: checkpoints first, the manifest last (the loader trusts what it lists)
    moves = [(step.dest, tmp) for step, tmp in staged if tmp is not None] + signature_moves \
        + ([(plan.manifest_dest, manifest_tmp)] if manifest_tmp is not None else [])
    return _Staged(staged, tuple(moves))


def _stage_bytes(dest: Path, data: bytes, temps: list[Path], what: str) -> Path | None:
    """``data`` written and fsynced under a temp name beside ``dest``; None when ``dest`` already holds it."""
    _makedirs(dest.parent)
    if dest.is_file() and not dest.is_symlink() and dest.read_bytes() == data:
        return None
    tmp, fd = _stage_file(dest)
    temps.append(tmp)
    try:
        write_all(fd, memoryview(data))
        os.fsync(fd)
    except OSError as exc:
        raise CacheError(f"cannot write {what} {dest}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return tmp


def _record_install(archive: _Archive, plan: InstallPlan, staged: _Staged) -> tuple[Placed, ...]:
    """Step 5: the verification index learns every file placed or found; the report says what happened to each."""
    first_entry = {}
    for entry in archive.entries:
        first_entry.setdefault(entry.path, entry)
    placed = []
    for step, _tmp in staged.checkpoints:
        entry = first_entry.get(step.member.path)
        cache.record_verified(step.dest, archive.expected[step.member.path][1], weights=entry and entry.name,
                              url=entry and entry.url)
        placed.append(Placed(step.dest, "installed" if step.action == "install" else step.action, step.member.size,
                             plan.weights_of.get(step.member.path, ())))
    for member_path, dest in plan.present:
        entry = first_entry[member_path]
        cache.record_verified(dest, entry.sha256, weights=entry.name, url=entry.url)
        placed.append(Placed(dest, "present", entry.size, plan.weights_of[member_path]))
    return tuple(placed)


def _place(moves: list[tuple[Path, Path]], temps: list[Path]) -> None:
    """Rename each staged temp file over its destination, durably; on failure undo the ones done.

    A file being replaced is first hard-linked to a backup name, so that undoing restores it.
    """
    done: list[tuple[Path, Path | None]] = []
    try:
        for dest, tmp in moves:
            backup = None
            if dest.is_symlink() or dest.exists():
                backup = temp_path(dest, _INSTALL_SUFFIX)
                try:
                    os.link(dest, backup, follow_symlinks=False)
                except OSError:
                    backup = None  # cannot keep a copy (another file system, no links): replace anyway
                else:
                    temps.append(backup)
            os.replace(tmp, dest)
            temps.remove(tmp)
            done.append((dest, backup))
        for directory in dict.fromkeys(dest.parent for dest, _tmp in moves):
            fsync_dir(directory)
    except OSError as exc:
        for dest, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, dest)
                else:
                    dest.unlink()
            except OSError:
                pass
        raise CacheError(f"cannot place {dest}: {exc.strerror or exc}; nothing was installed") from None


def _check_site(archive: _Archive, hub: Path) -> list[tuple[str, Path]]:
    """The checkpoints a delta bundle expects at the site, as (archive path, file) once each is found
    in the cache with its size and sha256 (from the verification index when the file is unchanged
    since it was hashed, else hashed now; nothing is recorded yet). Raises one line naming every
    file missing or different: the bundle was made for another state of this site."""
    found, problems = [], []
    for member_path, (size, sha) in archive.site_files.items():
        dest = _destination(hub, member_path)
        try:
            st = os.stat(dest)
        except FileNotFoundError:
            problems.append(f"{dest.name} (missing)")
            continue
        except OSError as exc:
            problems.append(f"{dest.name} (unreadable: {exc.strerror or exc})")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{dest.name} (not a regular file)")
            continue
        if st.st_size != size:
            problems.append(f"{dest.name} (different: {st.st_size} bytes, expected {size})")
            continue
        entry = cache.index_entry(dest)
        try:
            got = entry["sha256"] if entry and entry.get("sha256") else cache.hash_file(dest)
        except OSError as exc:
            problems.append(f"{dest.name} (unreadable: {exc.strerror or exc})")
            continue
        if got != sha:
            problems.append(f"{dest.name} (different: sha256 {got[:12]}..., expected {sha[:12]}...)")
            continue
        found.append((member_path, dest))
    if problems:
        shown = ", ".join(problems[:8]) + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise BundleError(f"{archive.path.name} is a delta bundle: {len(problems)} of the {len(archive.site_files)} "
                          f"checkpoints it expects at the site are missing or different in {hub / 'checkpoints'}: "
                          f"{shown}; nothing was installed (install the bundles it was made against first, or "
                          "make a full bundle)")
    return found


def install(path, *, torch_home=None, force: bool = False, progress: bool = False,
            reporter: Reporter | None = None) -> list[Path]:
    """Install a bundle into ``<hub dir>/checkpoints`` (``torch_home``: as ``--torch-home``), as
    :func:`install_bundle` does; returns the paths of the files placed or found."""
    report = install_bundle(path, torch_home=torch_home, force=force, progress=progress, reporter=reporter)
    return [placed.path for placed in report.files]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _makedirs(path: Path) -> None:
    try:
        make_dirs(path)  # shared with the group where the cache is (a team's setgid TORCH_HOME)
    except OSError as exc:
        raise BundleError(f"cannot create {path}: {exc.strerror or exc}") from None


def _select_refs(selectors, refs, all_weights, registry, with_backbones, live=None) -> list[WeightsRef]:
    if refs is not None:
        return list(refs)
    return resolve(list(selectors), registry=registry, all_weights=all_weights, with_backbones=with_backbones, live=live)


def _refuse_cache_output(output: Path, hub: Path) -> None:
    """A bundle never overwrites what the cache holds (a checkpoint, the index, a manifest)."""
    target = output.resolve() if output.exists() or output.is_symlink() else output.parent.resolve() / output.name
    inside = hub.resolve()
    if target == inside or inside in target.parents:
        raise BundleError(f"refusing to write the bundle to {output}: it is inside the checkpoint cache {hub}"
                          " (choose a path outside it)")


@dataclass(frozen=True)
class BundlePlan:
    """What a bundle of a selection holds, its checkpoints in the cache: written out by :func:`bundle`,
    or pushed as an OCI image straight from the cache (:mod:`packager.oci`)."""

    manifest_bytes: bytes
    files: tuple[tuple[str, Path, int, str], ...]  # (archive path, cached file, size, sha256), sorted: carried
    mtime: int  # of every member (SOURCE_DATE_EPOCH or 0)
    at_site: tuple[tuple[str, int, str], ...] = ()  # (archive path, size, sha256): a delta bundle's, not carried
    extra: tuple[tuple[str, bytes], ...] = ()  # small tvpack members (the ML-BOM), after the checkpoints

    @property
    def manifest_path(self) -> str:
        return manifest_path_for(self.manifest_bytes)

    @property
    def listed(self) -> dict[str, tuple[int, str]]:
        """{archive path: (size, sha256)} of every file the manifest lists, carried or not: what a signature covers."""
        return dict(sorted([*((a, (size, sha)) for a, _p, size, sha in self.files),
                            *((a, (size, sha)) for a, size, sha in self.at_site),
                            *((a, (len(data), hashlib.sha256(data).hexdigest())) for a, data in self.extra)]))


def plan_bundle(selectors: Iterable[str] = (), *, refs: Sequence[WeightsRef] | None = None,
                all_weights: bool = False, registry: Sequence[str] = (), torch_home=None, fetch: bool = True,
                with_backbones: bool = False, site=None, release: Release | None = None,
                config: Config | None = None, **keywords) -> BundlePlan:
    """Select, fetch what is missing into the cache (see :func:`bundle`) and describe the bundle;
    with ``site`` (see :func:`bundle`), a delta bundle that carries only what the site lacks; with ``release``,
    a release of a channel (the manifest's ``"release"``); ``config`` (or its fields as keywords) as in
    :func:`packager.cache.fetch`."""
    config = config_from(config, **keywords)
    live = config.live
    selected = _select_refs(selectors, refs, all_weights, registry, with_backbones, live)
    if not selected:
        raise BundleError("nothing to bundle: the selection is empty")
    by_file: dict[str, WeightsRef] = {}
    for ref in selected:
        other = by_file.setdefault(ref.filename, ref)
        if other.url != ref.url:
            raise BundleError(f"{other.name} and {ref.name} both use the file name {ref.filename} for different urls")
    try:
        paths = cache.ensure_cached(selected, torch_home=torch_home,
                                    config=config if fetch else config.but(offline=True))
    except OfflineError as exc:
        if fetch:
            raise
        raise OfflineError(exc.message.replace("offline mode", "--no-fetch", 1)) from None
    files: dict[str, tuple[Path, int, str]] = {}
    for ref in selected:
        path = Path(paths[ref.name])
        files[ref.name] = (path, os.stat(path).st_size, cache.file_sha256(path))
    at_site = {p.name for p, _size, sha in files.values() if site is not None and site.has(p.name, sha)}
    infos = describe(selected, registry=registry, live=live)
    manifest = build_manifest(infos, {name: (size, sha) for name, (_path, size, sha) in files.items()},
                              at_site=at_site)
    if release is not None:
        manifest["release"] = release.checked_against({sha for _path, _size, sha in files.values()}).to_dict()
    bom = add_bom(manifest, source_date_epoch())  # the ML-BOM, listed in the manifest: every signature covers it
    unique = sorted({(f"{CHECKPOINT_DIR}/{p.name}", p, size, sha) for p, size, sha in files.values()
                     if p.name not in at_site})
    expected = sorted({(f"{CHECKPOINT_DIR}/{p.name}", size, sha) for p, size, sha in files.values()
                       if p.name in at_site})
    return BundlePlan(encode_manifest(manifest), tuple(unique), source_date_epoch(), tuple(expected),
                      (bom,))


def bundle(selectors: Iterable[str] = (), output=None, *, refs: Sequence[WeightsRef] | None = None,
           all_weights: bool = False, registry: Sequence[str] = (), torch_home=None, fetch: bool = True,
           with_backbones: bool = False, site=None, split: int | None = None, sign=None,
           release: Release | None = None, config: Config | None = None, **keywords) -> Path:
    """Write a bundle of the selected weights to ``output``; returns its path.

    Missing checkpoints are fetched through the cache as ``config`` says (:class:`packager.config.Config`, or its
    fields as keywords: mirrors, then upstream; ``jobs``, ``policy``, ``lock_timeout``, ``live``, ``reporter``)
    unless ``fetch=False`` or offline (``offline`` or ``TVPACK_OFFLINE``): then missing weights are an
    :class:`~packager.errors.OfflineError` naming them. The archive is written to a temp file
    beside ``output`` and renamed into place only when complete.

    ``site``: what the destination already holds, anything with ``has(file, sha256)`` (an
    :class:`~packager.formats.inventory.Inventory`; :func:`packager.delta.read_site` reads one from a
    SITE.json, an earlier bundle or a lockfile). The manifest still describes every selected
    weights, but checkpoints the site holds with the same name and sha256 are not carried: they are
    listed as expected at the site (a delta bundle). Every checkpoint is still read from this
    cache, so the manifest only ever pins hashes taken here.

    ``split``: write ``output.000``, ``output.001``, ... of at most ``split`` bytes each and
    ``output.sha256`` (``sha256sum -c`` format) while the archive streams, with no full-size temp
    file; the parts appear together when complete, and the path of ``output.sha256`` is returned.

    ``sign(manifest_bytes, {archive path: (size, sha256)})`` returns ``[(archive path, bytes)]`` of signature
    members, written after the checkpoints in the same pass (:meth:`packager.signing.Signer.members`); they cover
    every file the manifest lists, those a delta bundle expects at the site included.

    ``release``: a :class:`~packager.formats.release.Release` (channel, sequence, expires, revokes) the manifest
    carries, so every signature covers it; a site installs it only signed (see :mod:`packager.channels`).
    """
    if output is None:
        raise BundleError("no output file given (-o FILE)")
    output = Path(output)
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split <= 0):
        raise UsageError(f"invalid part size {split!r}: must be a positive number of bytes")
    _refuse_cache_output(output, _hub_dir(torch_home))
    remove_stale_temps(output)  # what a killed earlier run of the same bundle left behind
    config = config_from(config, **keywords)
    plan = plan_bundle(selectors, refs=refs, all_weights=all_weights, registry=registry, torch_home=torch_home,
                       fetch=fetch, with_backbones=with_backbones, site=site, release=release, config=config)
    manifest_bytes, mtime, unique = plan.manifest_bytes, plan.mtime, plan.files
    # the extra members (the ML-BOM) are written as signatures are, after the checkpoints and before them
    signatures = [*plan.extra, *(sign(manifest_bytes, plan.listed) if sign else [])]
    if split is not None:
        total = archive_size(manifest_bytes, unique, signatures, mtime)
        if -(-total // split) > MAX_PARTS:
            raise UsageError(f"a part size of {split} bytes splits this {total}-byte bundle into "
                             f"{-(-total // split)} parts, more than {MAX_PARTS}: choose a larger size")
        for index in range(-(-total // split)):
            remove_stale_temps(output.with_name(part_name(output.name, index)))
        remove_stale_temps(output.with_name(listing_name(output.name)))
    bar = config.reporter.progress(sum(size for _a, _p, size, _s in unique), f"bundle {output.name}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if split is None:
            write_file(output, manifest_bytes, unique, signatures, mtime, bar)
            return output
        with SplitWriter(output, split) as writer:  # commits on success, removes every part on failure
            write_split(writer, manifest_bytes, unique, signatures, mtime, bar)
        return output.with_name(listing_name(output.name))
    except OSError as exc:
        raise BundleError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        bar.close()


__all__ = ["Bundle", "BundlePlan", "InstallReport", "Placed", "VerifyReport", "bundle", "install", "install_bundle",
           "open_bundle", "plan_bundle", "verify_bundle"]
