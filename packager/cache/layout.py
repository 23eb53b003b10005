"""Where everything lives under ``<hub>`` (``$TORCH_HOME/hub``), and how tvpack names what it writes there.

One :class:`HubLayout` spells every path: the torch.hub checkpoints, tvpack's own directory, the
verification index, the locks, the installed manifests, signatures and install records, the trusted
keys, and the rooms the release work uses (channels, revoked checkpoints, ML-BOMs). Nothing else in
tvpack joins path segments under a hub.
"""
from __future__ import annotations

import errno
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheError
from ..fsutil import make_dirs, short_name
from ..home import hub_dir as _hub_dir
from ..locking import FileLock

PART_SUFFIX = ".tvpack-part"
TORCH_HUB_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # torch.hub's own temp files
_PART_NAME = re.compile(
    r"^(?P<file>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)" + re.escape(PART_SUFFIX) + "$"
)
# fsutil.temp_path names: .<file>.<pid>.<hex8><suffix> (bundle install, atomic writes)
_TEMP_NAME = re.compile(r"^\.(?P<file>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})(?:\.tvpack-install|\.tmp)$")
_HOST = (re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host")[:40]
# A part name is <stem>.<host:40>.<pid:10>.<token:8>.tvpack-part (at most 200 bytes), its state
# file adds ".json" and an atomic write of that a ".<pid>.<hex8>.tmp" decoration: all under 255.
_STEM_MAX = 200 - (1 + 40 + 1 + 10 + 1 + 8 + len(PART_SUFFIX))
_DEAD_TEMP_AGE = 60.0  # seconds a dead process's temp file must be quiet before it counts as abandoned
STAGING_DIR = "oci-layers"  # under <hub>/tvpack: one directory per run, for the layers of the image it installs
STAGING_NAME = re.compile(r"^(?P<key>[0-9a-f]{16,64})\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})$")  # <key>.<pid>.<token>


def _stem(filename: str) -> str:
    """``filename`` as it appears in part and lock names (shortened when too long for them)."""
    return short_name(filename, _STEM_MAX)


@dataclass(frozen=True)
class HubLayout:
    """Every path under one hub directory. ``HubLayout.of(torch_home)`` resolves TORCH_HOME as torch.hub does."""

    hub: Path

    @classmethod
    def of(cls, torch_home=None) -> "HubLayout":
        return cls(_hub_dir(torch_home))

    @property
    def torch_home(self) -> Path:
        return self.hub.parent

    # -- torch.hub's own room ---------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.hub / "checkpoints"

    def checkpoint(self, filename: str) -> Path:
        return self.checkpoints / filename

    # -- tvpack's rooms -----------------------------------------------------------------------------------
    @property
    def tvpack(self) -> Path:
        return self.hub / "tvpack"

    @property
    def index(self) -> Path:
        return self.tvpack / "index.json"

    @property
    def locks(self) -> Path:
        return self.tvpack / "locks"

    def lock(self, name: str) -> Path:
        """The lock file guarding work on ``name`` (a checkpoint file name, ``index.json``, ``oci-<digest>``)."""
        return self.locks / f"{_stem(name)}.lock"

    @property
    def manifests(self) -> Path:
        return self.tvpack / "manifests"

    def manifest(self, manifest_id: str) -> Path:
        return self.manifests / f"{manifest_id}.json"

    @property
    def signatures(self) -> Path:
        return self.tvpack / "signatures"

    @property
    def trusted(self) -> Path:
        return self.tvpack / "trusted"

    @property
    def installed(self) -> Path:
        """Install records, ``<manifest-id>.json`` (:mod:`packager.formats.release`)."""
        return self.tvpack / "installed"

    def install_record(self, manifest_id: str) -> Path:
        return self.installed / f"{manifest_id}.json"

    @property
    def channels(self) -> Path:  # reserved for the release channels' records
        return self.tvpack / "channels"

    @property
    def revoked(self) -> Path:  # reserved: revoked checkpoints, kept for forensics
        return self.tvpack / "revoked"

    @property
    def sbom(self) -> Path:  # reserved: CycloneDX ML-BOMs, <manifest-id>.cdx.json
        return self.tvpack / "sbom"

    @property
    def staging(self) -> Path:
        return self.tvpack / STAGING_DIR


# The places as functions of a hub path, as the rest of the code has called them.
def tvpack_dir(hub: Path) -> Path:
    return HubLayout(Path(hub)).tvpack


def index_path(hub: Path) -> Path:
    return HubLayout(Path(hub)).index


def locks_dir(hub: Path) -> Path:
    return HubLayout(Path(hub)).locks


def manifests_dir(hub: Path) -> Path:
    return HubLayout(Path(hub)).manifests


# -- writing here ----------------------------------------------------------------------------------

def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _unwritable(path: Path, why: str | None = None) -> CacheError:
    """One line saying the cache cannot be written here, and why."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if _read_only(probe):
        why = "it is on a read-only file system"
    elif why is None:
        why = f"permission denied for user {_user()}"
    return CacheError(f"cannot write to the cache at {path}: {why} (files already cached and verified can still "
                      "be used; to fetch more, use a writable TORCH_HOME or --torch-home)")


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _makedirs(path: Path) -> None:
    try:
        make_dirs(path)
    except FileExistsError:
        raise CacheError(f"cannot create directory {path}: a file is in the way") from None
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _unwritable(path) from None
        raise CacheError(f"cannot create directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _unwritable(path)


def _lock(hub: Path, name: str) -> FileLock:
    """A per-name inter-process lock (also excludes threads: each acquisition opens its own descriptor)."""
    return FileLock(HubLayout(Path(hub)).lock(name))
