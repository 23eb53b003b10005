"""Release fields of a manifest, and the install record a site keeps of each manifest. Pure.

A bundle made for a release channel carries, inside its (signed) manifest::

    "release": {"channel": "prod", "sequence": 42, "expires": "2027-01-05T00:00:00Z",
                "revokes": [{"sha256": "<64 hex>", "reason": "poisoned"}]}

``expires`` and ``revokes`` are optional; ``revokes`` is sorted by sha256. Every signature covers the
manifest, so it covers these fields too. A manifest without the key is not a channel release.

An *install record* (``hub/tvpack/installed/<manifest-id>.json``) says when a manifest was last
installed here, so "which manifest is current" is a fact tvpack wrote, not a file's mtime.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone

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
