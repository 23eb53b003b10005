"""What a site remembers of each release channel, and the checks an install of a release must pass.

A bundle made with ``tvpack bundle --channel prod --sequence 42`` carries ``"release"`` in its signed manifest
(:mod:`packager.formats.release`). A TORCH_HOME keeps one record per channel, ``<hub>/tvpack/channels/<name>.json``
(:class:`~packager.formats.release.ChannelRecord`): the release installed, its manifest, its signer, when, when it
expires, what the channel revoked here and every override. Like TUF's client, the site refuses, before anything is
written (:func:`check_release`):

* an unsigned release, or one no trusted signature may sign for its channel (``tvpack-channels:`` limits in the
  trusted key files, see :mod:`packager.formats.signature`);
* a rollback (a lower sequence than the record's) unless ``--allow-rollback``;
* equivocation (the record's sequence with another manifest);
* a release past its ``expires`` unless ``--allow-expired``.

The record changes only when the install that earned it succeeded (:func:`commit_release`, install's last step),
atomically, durably and under a lock held from the check to the commit. A release's ``revokes`` move those
checkpoints from ``<hub>/checkpoints`` to ``<hub>/tvpack/revoked/`` (kept, never loaded: vanilla torchvision no
longer finds them), and any later install that would bring one back is refused (:func:`refuse_revoked`).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from . import cache
from .errors import BundleError, CacheError, LoadError, SignatureError
from .formats.release import (
    ChannelRecord,
    Override,
    Release,
    Revoked,
    encode_channel_record,
    format_day,
    format_time,
    parse_channel_record,
    release_of,
)
from .fsutil import atomic_write_bytes, fsync_dir, make_dirs
from .locking import FileLock
from .registry import hash_prefix_from_filename


def channels_dir(hub: Path) -> Path:
    return cache.HubLayout(Path(hub)).channels


def revoked_dir(hub: Path) -> Path:
    """``<hub>/tvpack/revoked/``: revoked checkpoints, kept for forensics, never loaded."""
    return cache.HubLayout(Path(hub)).revoked


def record_path(hub: Path, channel: str) -> Path:
    return channels_dir(hub) / f"{channel}.json"


@dataclass(frozen=True)
class ReleaseOptions:
    """An operator's say over the channel rules, and the clock (``now``; default: the current time)."""

    allow_rollback: bool = False
    allow_expired: bool = False
    now: datetime | None = None
    command: str = ""  # written into an override; default: this process's command line

    def clock(self) -> datetime:
        return self.now or datetime.now(timezone.utc)

    def command_line(self) -> str:
        return self.command or shlex.join(["tvpack", *sys.argv[1:]])


# -- reading ---------------------------------------------------------------------------------------------------
def read_record(hub: Path, channel: str) -> ChannelRecord | None:
    path = record_path(hub, channel)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CacheError(f"cannot read the channel record {path}: {exc.strerror or exc}") from None
    return parse_channel_record(data, str(path))


def records(hub: Path) -> list[ChannelRecord]:
    """Every channel record of this TORCH_HOME, by channel name."""
    folder = channels_dir(hub)
    try:
        names = sorted(p.stem for p in folder.glob("*.json"))
    except OSError:
        return []
    return [r for r in (read_record(hub, name) for name in names) if r is not None]


def revocation_of(hub: Path, *, sha256: str | None = None, filename: str | None = None) -> str | None:
    """For the loader: "revoked by release 43 of prod: <reason>" when a channel revoked that checkpoint here."""
    for record in records(hub):
        for revoked in record.revoked:
            if revoked.sha256 == sha256 or (filename and revoked.file == filename):
                return f"revoked by release {revoked.sequence} of {record.channel}: {revoked.reason or 'no reason given'}"
    return None


def unrevoked(hub: Path, entry) -> Path:
    """For the loader: ``<hub>/checkpoints/<file>`` of a manifest entry, unless a channel revoked that checkpoint
    here (then one line naming the release: it is never loaded, wherever the file is)."""
    revoked = revocation_of(hub, sha256=entry.sha256)
    if revoked is not None:
        raise LoadError(f"{entry.name}: {entry.filename} is {revoked}", hint="install a release that replaces it")
    return cache.HubLayout(Path(hub)).checkpoint(entry.filename)


@dataclass(frozen=True)
class RevokedFile:
    path: Path
    size: int
    record: Revoked
    channel: str

    @property
    def reason(self) -> str:
        return f"revoked by release {self.record.sequence} of {self.channel}: {self.record.reason or 'no reason given'}"

    def to_dict(self) -> dict:
        return {**self.record.to_dict(), "file": self.path.name, "path": str(self.path), "size": self.size,
                "channel": self.channel, "status": "revoked"}


def revoked_files(hub: Path) -> list[RevokedFile]:
    """The revoked checkpoints kept under ``<hub>/tvpack/revoked/`` (``cache ls``, ``cache prune --revoked``)."""
    found = []
    for record in records(hub):
        for revoked in record.revoked:
            path = revoked_dir(hub) / revoked.file if revoked.file else None
            if path is not None and path.is_file():
                found.append(RevokedFile(path, path.stat().st_size, revoked, record.channel))
    return found


def prune_revoked(hub: Path, *, dry_run: bool = False) -> list[RevokedFile]:
    """Delete the kept revoked checkpoints (the records keep naming them, so the loader still says why)."""
    found = revoked_files(hub)
    if not dry_run:
        for item in found:
            item.path.unlink(missing_ok=True)
        if found:
            fsync_dir(revoked_dir(hub))
    return found


# -- the checks ------------------------------------------------------------------------------------------------
def refuse_revoked(hub: Path, files: Mapping[str, tuple[int, str]]) -> None:
    """Any install: a checkpoint a channel revoked here must not come back (``files``: archive path ->
    (size, sha256) of every file the manifest lists)."""
    known = records(hub)
    for path, (_size, sha) in files.items():
        for record in known:
            revoked = record.revocation(sha)
            if revoked is not None:
                raise BundleError(f"{path.rsplit('/', 1)[-1]} was revoked by release {revoked.sequence} of "
                                  f"{record.channel}: {revoked.reason or 'no reason given'}; refusing to install it "
                                  "again")


@dataclass(frozen=True)
class ReleaseDecision:
    """What :func:`check_release` allowed, for :func:`commit_release` to write once the install succeeded."""

    release: Release
    manifest: str
    signer: str
    previous: ChannelRecord | None
    overrides: tuple[Override, ...]
    now: datetime


def _allowed_signer(release: Release, signers) -> str:
    if not signers:
        raise SignatureError(f"{release} is not signed by a trusted key: a channel release installs only when a "
                             "signature valid for the trust policy (--key, --ca-root, TVPACK_TRUSTED_KEYS or "
                             "<hub>/tvpack/trusted/) covers it")
    allowed = [v for v in signers if v.channels is None or release.channel in v.channels]
    if not allowed:
        limits = "; ".join(f"{v.signer} may sign {', '.join(sorted(v.channels))}" for v in signers)
        raise SignatureError(f"{release} claims channel {release.channel}, which no trusted key may sign ({limits})")
    return str(allowed[0].signer)


def check_release(hub: Path, release: Release, manifest: str, signers, options: ReleaseOptions,
                  lock=lambda: None) -> ReleaseDecision:
    """Refuse (one line) an unsigned release, a channel its signer may not sign and an expired release, then, after
    ``lock()`` (the channel lock: nothing is created before a refusal that needs no record), rollback and
    equivocation; the overrides an operator asked for are kept in the decision."""
    signer = _allowed_signer(release, signers)
    now = options.clock()
    at = format_time(now)
    overrides = []
    if release.expired(now):
        if not options.allow_expired:
            raise BundleError(f"{release} expired on {format_day(release.expires)} (--allow-expired installs it "
                              "anyway)")
        overrides.append(Override("expired", release.sequence, manifest, at, options.command_line()))
    lock()
    record = read_record(hub, release.channel)
    if record is not None and release.sequence < record.sequence:
        if not options.allow_rollback:
            raise BundleError(f"channel {release.channel} is at release {record.sequence} here; this bundle is "
                              f"release {release.sequence} (--allow-rollback installs it anyway)")
        overrides.insert(0, Override("rollback", release.sequence, manifest, at, options.command_line(),
                                     record.sequence))
    elif record is not None and release.sequence == record.sequence and manifest != record.manifest:
        raise BundleError(f"release {release.sequence} of {release.channel} here is manifest {record.manifest}; "
                          f"this bundle is another release {release.sequence} (manifest {manifest}): the producer "
                          "signed two different releases with one sequence number")
    return ReleaseDecision(release, manifest, signer, record, tuple(overrides), now)


def check_install(hub: Path, document: dict, manifest: str, files: Mapping[str, tuple[int, str]], signers,
                  options: ReleaseOptions, held: contextlib.ExitStack) -> ReleaseDecision | None:
    """Install's step 2, for every bundle: nothing a channel revoked here comes back (``files``: every file the
    manifest lists); a channel release (``document``: its manifest) must pass its channel's rules, checked under
    the channel lock, which ``held`` keeps until the install ends (after :func:`commit_release`)."""
    refuse_revoked(hub, files)
    release = release_of(document)
    if release is None:
        return None
    return check_release(hub, release, manifest, signers, options, lock=lambda: held.enter_context(locked(hub)))


@contextlib.contextmanager
def locked(hub: Path):
    """The channel records' lock, held from the check to the commit of an install."""
    folder = channels_dir(hub)
    try:
        make_dirs(folder)
    except OSError as exc:
        raise CacheError(f"cannot create {folder}: {exc.strerror or exc}") from None
    with FileLock(folder / ".lock"):
        yield


# -- after a successful install --------------------------------------------------------------------------------
def commit_release(hub: Path, decision: ReleaseDecision) -> ChannelRecord:
    """Move what the release revokes out of ``<hub>/checkpoints`` and write the channel's new record, atomically
    and durably."""
    release, at = decision.release, format_time(decision.now)
    previous = decision.previous
    kept = {r.sha256: r for r in previous.revoked} if previous else {}
    for revocation in release.revokes:
        moved = _move_revoked(hub, revocation.sha256)
        old = kept.get(revocation.sha256)
        if old is None or (moved and not old.file):
            kept[revocation.sha256] = Revoked(revocation.sha256, revocation.reason, release.sequence,
                                              moved or (old.file if old else ""), old.at if old and old.at else at)
    record = ChannelRecord(release.channel, release.sequence, decision.manifest, decision.signer, at,
                           format_time(release.expires) if release.expires else None,
                           tuple(sorted(kept.values(), key=lambda r: r.sha256)),
                           (previous.overrides if previous else ()) + decision.overrides)
    path = record_path(hub, release.channel)
    try:
        atomic_write_bytes(path, encode_channel_record(record))
    except OSError as exc:
        raise CacheError(f"cannot write the channel record {path}: {exc.strerror or exc}") from None
    return record


def _may_be(path: Path, sha256: str) -> bool:
    """Without reading it: the file's name carries a prefix of ``sha256``, or the verification index says so."""
    prefix = hash_prefix_from_filename(path.name)
    if prefix:
        return sha256.startswith(prefix)
    return (cache.index_entry(path) or {}).get("sha256") == sha256


def _move_revoked(hub: Path, sha256: str) -> str:
    """Move the checkpoint with ``sha256`` (if this cache holds it) to the revoked folder; its name, or ""."""
    folder = cache.HubLayout(Path(hub)).checkpoints
    try:
        candidates = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink() and _may_be(p, sha256)]
    except OSError:
        return ""
    for path in candidates:
        if cache.file_sha256(path) != sha256:  # the index vouches for an unchanged file, else it is hashed
            continue
        dest = revoked_dir(hub) / path.name
        try:
            make_dirs(dest.parent)
            os.replace(path, dest)
            fsync_dir(dest.parent)
            fsync_dir(path.parent)
        except OSError as exc:
            raise CacheError(f"cannot move the revoked {path} to {dest.parent}: {exc.strerror or exc}") from None
        return path.name
    return ""


__all__ = ["ReleaseDecision", "ReleaseOptions", "RevokedFile", "channels_dir", "check_release", "commit_release",
           "locked", "prune_revoked", "read_record", "record_path", "records", "refuse_revoked", "revocation_of",
           "revoked_dir", "revoked_files", "unrevoked"]
