"""Release fields of a manifest, and the install record a site keeps of each manifest. Pure.

A bundle made for a release channel carries, inside its (signed) manifest::

    "release": {"channel": "prod", "sequence": 42, "expires": "2027-01-05T00:00:00Z",
                "revokes": [{"sha256": "<64 hex>", "reason": "poisoned"}]}

``expires`` and ``revokes`` are optional; ``revokes`` is sorted by sha256. Every signature covers the
manifest, so it covers these fields too. A manifest without the key is not a channel release.

A site remembers each channel in a *channel record* (``hub/tvpack/channels/<channel>.json``,
:class:`ChannelRecord`): the release installed, who signed it, when, when it expires, the checkpoints the
channel revoked here and every override an operator made (``--allow-rollback``, ``--allow-expired``).

An *install record* (``hub/tvpack/installed/<manifest-id>.json``) says when a manifest was last
installed here, so "which manifest is current" is a fact tvpack wrote, not a file's mtime.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import BundleError

INSTALLED_DIR = "hub/tvpack/installed"
_CHANNEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_ID = re.compile(r"[0-9a-f]{16}")
MAX_REASON = 500


@dataclass(frozen=True)
class Revocation:
    sha256: str
    reason: str = ""


@dataclass(frozen=True)
class Release:
    """Which release of which channel a manifest is."""

    channel: str
    sequence: int
    expires: datetime | None = None  # aware, UTC
    revokes: tuple[Revocation, ...] = ()

    def to_dict(self) -> dict:
        data: dict = {"channel": self.channel, "sequence": self.sequence}
        if self.expires is not None:
            data["expires"] = format_time(self.expires)
        if self.revokes:
            data["revokes"] = [{"sha256": r.sha256, "reason": r.reason} for r in self.revokes]
        return data

    def checked_against(self, carried: set[str]) -> Release:
        """This release, unless it revokes a checkpoint (sha256) the bundle carries: one line then."""
        clash = sorted(r.sha256 for r in self.revokes if r.sha256 in carried)
        if clash:
            raise BundleError(f"{self} revokes sha256 {clash[0][:12]}..., which the bundle would carry: take those "
                              "weights out of the selection or do not revoke them")
        return self

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires

    def __str__(self) -> str:
        return f"release {self.sequence} of {self.channel}"


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, what: str) -> datetime:
    """An ISO-8601 date or date-time; a naive one is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (TypeError, ValueError):
        raise BundleError(f"{what}: {text!r} is not an ISO-8601 date or time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


_DURATION = re.compile(r"([0-9]{1,6})([wdhm])")
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes"}


def parse_expires(text: str, now: datetime) -> datetime:
    """``--expires``: a duration from ``now`` (``90d``, ``12h``, ``2w``, ``30m``) or an ISO-8601 date or time."""
    match = _DURATION.fullmatch(text.strip())
    if match:
        return (now + timedelta(**{_UNITS[match[2]]: int(match[1])})).astimezone(timezone.utc).replace(microsecond=0)
    return parse_time(text, "--expires (a duration such as 90d or 12h, or an ISO-8601 date or time)")


def format_day(moment: datetime) -> str:
    """For messages: ``2027-01-05``, or ``2027-01-05 12:00 UTC`` when the time is not midnight."""
    moment = moment.astimezone(timezone.utc)
    return f"{moment:%Y-%m-%d}" if (moment.hour, moment.minute, moment.second) == (0, 0, 0) \
        else f"{moment:%Y-%m-%d %H:%M} UTC"


def check_channel(name: str) -> str:
    if not isinstance(name, str) or not _CHANNEL.fullmatch(name):
        raise BundleError(f"release channel {name!r} is not a name of lowercase letters, digits, '.', '_' or '-'"
                          " (at most 64, starting with a letter or digit)")
    return name


def release_of(document: dict) -> Release | None:
    """The validated ``"release"`` of a manifest document, or None when it has none."""
    if "release" not in document:
        return None
    data = document["release"]
    if not isinstance(data, dict):
        raise BundleError("manifest: 'release' is not an object")
    unknown = sorted(set(data) - {"channel", "sequence", "expires", "revokes"})
    if unknown:
        raise BundleError(f"manifest: 'release' has an unknown field {unknown[0]!r}")
    channel = check_channel(data.get("channel"))
    sequence = data.get("sequence")
    if type(sequence) is not int or sequence < 0:
        raise BundleError("manifest: release 'sequence' is not a whole number >= 0")
    expires = data.get("expires")
    if expires is not None:
        if not isinstance(expires, str):
            raise BundleError("manifest: release 'expires' is not a time")
        expires = parse_time(expires, "manifest: release 'expires'")
    revokes = []
    listed = data.get("revokes", [])
    if not isinstance(listed, list):
        raise BundleError("manifest: release 'revokes' is not a list")
    for item in listed:
        if not isinstance(item, dict) or not isinstance(item.get("sha256"), str) \
                or not _SHA256.fullmatch(item["sha256"]) or not isinstance(item.get("reason", ""), str) \
                or set(item) - {"sha256", "reason"}:
            raise BundleError("manifest: release 'revokes' holds an entry that is not {sha256, reason}")
        revokes.append(Revocation(item["sha256"], item.get("reason", "")[:MAX_REASON]))
    shas = [r.sha256 for r in revokes]
    if len(set(shas)) != len(shas):
        raise BundleError("manifest: release 'revokes' lists a checkpoint twice")
    return Release(channel, sequence, expires, tuple(sorted(revokes, key=lambda r: r.sha256)))


# -- channel records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Override:
    """An operator installed what the channel rules refuse: ``kind`` is "rollback" or "expired"."""

    kind: str
    sequence: int  # the release installed
    manifest: str
    at: str  # ISO-8601 UTC
    command: str
    previous: int | None = None  # a rollback: the sequence the site was at

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sequence": self.sequence, "manifest": self.manifest, "at": self.at,
                "command": self.command, "previous": self.previous}


@dataclass(frozen=True)
class Revoked:
    """A checkpoint a release of the channel revoked here; ``file``: its name, when it was found and moved."""

    sha256: str
    reason: str
    sequence: int
    file: str = ""
    at: str = ""

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "reason": self.reason, "sequence": self.sequence, "file": self.file,
                "at": self.at}


@dataclass(frozen=True)
class ChannelRecord:
    """What a site remembers of one channel."""

    channel: str
    sequence: int
    manifest: str
    signer: str
    installed: str  # ISO-8601 UTC
    expires: str | None = None
    revoked: tuple[Revoked, ...] = ()
    overrides: tuple[Override, ...] = ()

    def to_dict(self) -> dict:
        return {"channel": self.channel, "sequence": self.sequence, "manifest": self.manifest, "signer": self.signer,
                "installed": self.installed, "expires": self.expires, "revoked": [r.to_dict() for r in self.revoked],
                "overrides": [o.to_dict() for o in self.overrides]}

    def revocation(self, sha256: str) -> Revoked | None:
        return next((r for r in self.revoked if r.sha256 == sha256), None)


def encode_channel_record(record: ChannelRecord) -> bytes:
    return (json.dumps(record.to_dict(), indent=1, sort_keys=True) + "\n").encode("utf-8")


def parse_channel_record(data: bytes, where: str = "channel record") -> ChannelRecord:
    try:
        doc = json.loads(data.decode("utf-8"))
        record = ChannelRecord(
            check_channel(doc["channel"]), int(doc["sequence"]), str(doc["manifest"]), str(doc["signer"]),
            str(doc["installed"]), None if doc.get("expires") is None else str(doc["expires"]),
            tuple(Revoked(str(r["sha256"]), str(r.get("reason", "")), int(r["sequence"]), str(r.get("file", "")),
                          str(r.get("at", ""))) for r in doc.get("revoked", [])),
            tuple(Override(str(o["kind"]), int(o["sequence"]), str(o["manifest"]), str(o["at"]),
                           str(o.get("command", "")), o.get("previous")) for o in doc.get("overrides", [])))
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, BundleError):
        raise BundleError(f"{where} is malformed; it is tvpack's record of a release channel (remove it only if "
                          "you mean this site to forget the channel)") from None
    if not all(_SHA256.fullmatch(r.sha256) for r in record.revoked):
        raise BundleError(f"{where} is malformed: a revoked sha256 is not 64 hex digits")
    return record


# -- install records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstallRecord:
    """When a manifest was (last) installed into a TORCH_HOME, and by what command."""

    manifest: str  # 16-hex manifest id
    installed: float  # unix time, ns precision as a float; orders installs
    command: str = ""

    def to_dict(self) -> dict:
        return {"manifest": self.manifest, "installed": self.installed, "command": self.command}


def encode_install_record(record: InstallRecord) -> bytes:
    return (json.dumps(record.to_dict(), sort_keys=True) + "\n").encode("utf-8")


def parse_install_record(data: bytes, where: str = "install record") -> InstallRecord:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError(f"{where} is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifest"), str) \
            or not _MANIFEST_ID.fullmatch(doc["manifest"]) or type(doc.get("installed")) not in (int, float) \
            or not isinstance(doc.get("command", ""), str):
        raise BundleError(f"{where} is malformed")
    return InstallRecord(doc["manifest"], float(doc["installed"]), doc.get("command", ""))
