"""Bundles: one uncompressed POSIX tar holding checkpoints, their transform specs and meta.

The archive is a TORCH_HOME overlay, so ``tar -xf BUNDLE -C "$TORCH_HOME"`` alone gives vanilla
torchvision a working offline cache::

    hub/tvpack/manifests/<id>.json     first member: JSON manifest, id = sha256(manifest)[:16]
    hub/checkpoints/<basename(url)>    each checkpoint, byte-identical to the downloaded file

Writing is deterministic (members sorted, mtime from ``SOURCE_DATE_EPOCH`` or 0, uid/gid 0, no
user or group names, mode 0644, ustar headers with pax records only for long names or sizes over
8 GiB) and streaming: each checkpoint is copied once by the kernel (``copy_file_range``), its
sha256 taken from the cache's verification index when the file is unchanged.

Reading trusts nothing: our own header parser accepts regular files only (no links, devices,
FIFOs or directories), relative paths under ``hub/`` without ``..``, each member once, exactly the
members the manifest lists, with the sizes and sha256 it states, zero padding and a proper end of
archive. A checkpoint must load with ``torch.load(weights_only=True)`` (without reading its tensor
data) before it counts as valid: vanilla torchvision unpickles cache files with
``weights_only=False``, so a poisoned pickle would run code there.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

from . import __version__
from .errors import BundleError, CacheError, OfflineError
from .fsutil import atomic_write_bytes, temp_path
from .home import hub_dir as _hub_dir
from .registry import WeightsRef, hash_prefix_from_filename

FORMAT = "tvpack-bundle"
FORMAT_VERSION = 1
MANIFEST_DIR = "hub/tvpack/manifests"
CHECKPOINT_DIR = "hub/checkpoints"

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default record: the archive is padded to a multiple of it
CHUNK = 8 << 20  # read/hash/write granularity (two such buffers in flight at most)
HASH_JOBS = min(2, os.cpu_count() or 1)  # members hashed at once
MAX_MANIFEST = 64 << 20
MAX_PAX = 1 << 20
_USTAR_MAX_SIZE = 0o77777777777  # 8 GiB - 1: larger sizes go into a pax record
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_NAME = re.compile(re.escape(MANIFEST_DIR) + r"/([0-9a-f]{16})\.json")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ZERO_BLOCK = bytes(BLOCK)
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))

# tar type flags we name in refusals; everything but a regular file is refused.
_TYPE_NAMES = {
    b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
    b"5": "a directory", b"6": "a FIFO", b"7": "a contiguous file", b"g": "a global pax header",
    b"L": "a GNU long-name record", b"K": "a GNU long-link record", b"S": "a GNU sparse file",
}


# -- values ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleEntry:
    """One weights in a bundle, as its manifest describes it."""

    name: str  # "ResNet50_Weights.IMAGENET1K_V2"
    enum: str
    member: str
    module: str
    models: tuple[str, ...]
    builders: tuple[str, ...]
    family: str
    url: str
    path: str  # archive path: hub/checkpoints/<file>
    size: int
    sha256: str
    transforms: dict = field(repr=False, hash=False, compare=False)
    meta: dict = field(repr=False, hash=False, compare=False)  # JSON form: spec.meta_from_json
    created_by: dict = field(default_factory=dict, repr=False, hash=False, compare=False)  # the manifest's
    manifest: str = field(default="", repr=False, hash=False, compare=False)  # where this entry was read

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def builder_path(self, model: str | None) -> str | None:
        """The recorded builder of ``model`` (the first one when the manifest does not pair them)."""
        if model in self.models and len(self.builders) == len(self.models):
            return self.builders[self.models.index(model)]
        return self.builders[0] if self.builders else None

    def to_dict(self) -> dict:
        return {"weights": self.name, "models": list(self.models), "family": self.family, "url": self.url,
                "path": self.path, "size": self.size, "sha256": self.sha256, "manifest": self.manifest}

    @property
    def ref(self) -> WeightsRef:
        """A WeightsRef pinned to this file's exact size and sha256."""
        return WeightsRef(enum=self.enum, member=self.member, url=self.url, module=self.module, models=self.models,
                          builders=self.builders, family=self.family, size_hint=self.size, sha256=self.sha256)

    @property
    def headline_metric(self) -> str | None:
        for dataset, values in (self.meta.get("_metrics") or {}).items():
            if isinstance(values, dict):
                for metric, value in values.items():
                    if isinstance(value, dict) and "__float__" in value:
                        value = value["__float__"]
                    return f"{dataset} {metric} {value}"
        return None

    @property
    def transform_summary(self) -> str:
        from .spec import summarize

        return summarize(self.transforms)


@dataclass(frozen=True)
class Member:
    """A regular file inside the archive."""

    path: str
    offset: int  # of its data
    size: int


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    manifest_id: str
    weights: int
    members: int  # archive members, manifest included
    bytes: int  # payload bytes hashed
    created_by: dict

    def to_dict(self) -> dict:
        return {"ok": True, "path": str(self.path), "manifest_id": self.manifest_id, "weights": self.weights,
                "members": self.members, "bytes": self.bytes, "created_by": self.created_by}


@dataclass(frozen=True)
class Placed:
    path: Path
    status: str  # "installed", "replaced", "unchanged"
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


# -- tar headers (writing) -------------------------------------------------------------------------
def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:  # the length counts its own digits
        length = len(str(length)) + len(body)
    return str(length).encode("ascii") + body


def _ustar_block(name: bytes, prefix: bytes, size: int, mtime: int, typeflag: bytes) -> bytes:
    header = bytearray(BLOCK)
    header[0:len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b" " * 8
    header[156:157] = typeflag
    header[257:265] = b"ustar\x0000"
    # uname / gname stay empty
    header[329:337] = b"0000000\0"
    header[337:345] = b"0000000\0"
    header[345:345 + len(prefix)] = prefix
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _split_ustar(raw: bytes) -> tuple[bytes, bytes] | None:
    """(name, prefix) when ``raw`` fits the ustar fields, else None."""
    if len(raw) <= 100:
        return raw, b""
    for cut in range(min(len(raw) - 1, 155), 0, -1):
        if raw[cut:cut + 1] == b"/" and len(raw) - cut - 1 <= 100:
            return raw[cut + 1:], raw[:cut]
    return None


def tar_header(path: str, size: int, mtime: int) -> bytes:
    """The header block(s) for one regular file: ustar, plus a pax header when needed."""
    raw = path.encode("utf-8")
    split = _split_ustar(raw) if raw.isascii() else None
    records = b""
    if split is None:
        records += _pax_record("path", raw)
        split = (raw[:100].decode("utf-8", "ignore").encode("ascii", "ignore")[:100] or b"pax-path", b"")
    ustar_size = size
    if size > _USTAR_MAX_SIZE:
        records += _pax_record("size", str(size).encode("ascii"))
        ustar_size = 0
    out = b""
    if records:
        pad = -len(records) % BLOCK
        out = _ustar_block(b"././@PaxHeader", b"", len(records), mtime, b"x") + records + bytes(pad)
    return out + _ustar_block(split[0], split[1], ustar_size, mtime, b"0")


def source_date_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` (reproducible builds), 0 when unset."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    try:
        epoch = int(value)
    except ValueError:
        raise BundleError(f"SOURCE_DATE_EPOCH must be an integer number of seconds, got {value!r}") from None
    if not 0 <= epoch <= 0o77777777777:
        raise BundleError(f"SOURCE_DATE_EPOCH out of range: {epoch}")
    return epoch


# -- member paths ----------------------------------------------------------------------------------
def _path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe relative member path under ``hub/``, or None."""
    if not path:
        return "an empty path"
    if "\0" in path or any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return "a control character"
    if "\\" in path:
        return "a backslash"
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        return "an absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "a '..' component"
    if any(part in ("", ".") for part in parts):
        return "an empty or '.' component"
    if parts[0] != "hub" or len(parts) < 3:
        return "a path outside hub/"
    if len(path.encode("utf-8", "surrogateescape")) > 1024 or any(len(p) > 255 for p in parts):
        return "an over-long name"
    return None


def _check_path(path: str, where: str) -> str:
    problem = _path_problem(path)
    if problem:
        raise BundleError(f"{where} {path!r} has {problem}; refusing it")
    return path


def _is_checkpoint_path(path: str) -> bool:
    return path.startswith(CHECKPOINT_DIR + "/") and path.count("/") == 2


# -- manifest --------------------------------------------------------------------------------------
def _created_by() -> dict:
    import torch
    import torchvision

    return {"packager": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def encode_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def manifest_path_for(data: bytes) -> str:
    return f"{MANIFEST_DIR}/{hashlib.sha256(data).hexdigest()[:16]}.json"


def _want(item: dict, key: str, kind, where: str):
    value = item.get(key)
    if kind is int:
        ok = type(value) is int and value >= 0
    elif kind == "strs":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise BundleError(f"manifest: {where} has a missing or malformed {key!r}")
    return value


def decode_manifest(data: bytes) -> dict:
    """The JSON document of a manifest's bytes (validate it with :func:`parse_manifest`)."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError("manifest is not valid JSON") from None


def parse_manifest(data: dict, where: str = "") -> tuple[list[BundleEntry], dict[str, tuple[int, str]]]:
    """Validate a manifest document; returns (weights entries, {archive path: (size, sha256)}).

    The single reader of manifests, in bundles and installed (``<hub>/tvpack/manifests``) alike;
    ``where`` (the manifest's location) is recorded in each entry.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError("manifest: not a tvpack bundle manifest (format is not 'tvpack-bundle')")
    version = data.get("format_version")
    if type(version) is not int:
        raise BundleError("manifest: format_version is missing")
    if version > FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is newer than this tvpack reads ({FORMAT_VERSION});"
                          " upgrade tvpack")
    if version != FORMAT_VERSION:
        raise BundleError(f"manifest: unsupported format_version {version}")
    weights = data.get("weights")
    if not isinstance(weights, list):
        raise BundleError("manifest: 'weights' is not a list")
    created_by = data.get("created_by")
    created_by = dict(created_by) if isinstance(created_by, dict) else {}
    expected: dict[str, tuple[int, str]] = {}
    entries: list[BundleEntry] = []
    names = set()
    for i, item in enumerate(weights):
        at = f"weights[{i}]"
        if not isinstance(item, dict):
            raise BundleError(f"manifest: {at} is not an object")
        enum, member = _want(item, "enum", str, at), _want(item, "member", str, at)
        name = _want(item, "name", str, at)
        if not (_IDENT.fullmatch(enum) and _IDENT.fullmatch(member)) or name != f"{enum}.{member}":
            raise BundleError(f"manifest: {at} has a malformed weights name {name!r}")
        if name in names:
            raise BundleError(f"manifest: weights {name} is listed twice")
        names.add(name)
        path = _want(item, "path", str, at)
        problem = _path_problem(path)
        if problem or not _is_checkpoint_path(path):
            why = f"it has {problem}" if problem else f"it is not under {CHECKPOINT_DIR}/"
            raise BundleError(f"manifest: {name}: unsafe or unexpected checkpoint path {path!r}: {why}")
        size, sha = _want(item, "size", int, at), _want(item, "sha256", str, at)
        if not _SHA256.fullmatch(sha):
            raise BundleError(f"manifest: {name}: sha256 is not 64 lowercase hex digits")
        prefix = hash_prefix_from_filename(path.rsplit("/", 1)[-1])
        if prefix and not sha.startswith(prefix):
            raise BundleError(f"manifest: {name}: sha256 {sha[:12]}... contradicts its file name's hash {prefix}")
        if path in expected and expected[path] != (size, sha):
            raise BundleError(f"manifest: two weights share {path} with different sizes or hashes")
        expected[path] = (size, sha)
        entries.append(BundleEntry(
            name=name, enum=enum, member=member, module=_want(item, "module", str, at),
            models=tuple(_want(item, "models", "strs", at)), builders=tuple(_want(item, "builders", "strs", at)),
            family=str(item.get("family") or ""), url=_want(item, "url", str, at), path=path, size=size,
            sha256=sha, transforms=_want(item, "transforms", dict, at), meta=_want(item, "meta", dict, at),
            created_by=created_by, manifest=where,
        ))
    members = data.get("members", {})
    if not isinstance(members, dict):
        raise BundleError("manifest: 'members' is not an object")
    for path, info in members.items():
        _check_path(path, "manifest: member")
        # Extra members are tvpack data only: never a checkpoint (that would skip the pickle
        # check), never the cache's own index, locks or manifests.
        if not path.startswith("hub/tvpack/") or path.startswith(("hub/tvpack/manifests/", "hub/tvpack/locks/")) \
                or path == "hub/tvpack/index.json":
            raise BundleError(f"manifest: member {path!r} is outside the places a bundle may write")
        if path in expected:
            raise BundleError(f"manifest: {path} is listed twice")
        if not isinstance(info, dict) or type(info.get("size")) is not int or info["size"] < 0 \
                or not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            raise BundleError(f"manifest: member {path!r} lacks a valid size and sha256")
        expected[path] = (info["size"], info["sha256"])
    return entries, expected


# -- reading ---------------------------------------------------------------------------------------
def _number(field_bytes: bytes, what: str, where: str) -> int:
    if field_bytes[:1] and field_bytes[0] & 0x80:  # base-256 (GNU / star) for big values
        if field_bytes[0] == 0xFF:
            raise BundleError(f"{where}: negative {what}")
        return int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise BundleError(f"{where}: malformed {what} field") from None


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        if length <= 0 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise BundleError(f"{where}: malformed pax header")
        key, sep, value = data[space + 1:pos + length - 1].partition(b"=")
        if not sep:
            raise BundleError(f"{where}: malformed pax header")
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{where}: pax header is not UTF-8") from None
        pos += length
    return records


class _Archive:
    """The structure of a bundle file: members, manifest, cross-checked. No payload hashing."""

    def __init__(self, path: Path, f: BinaryIO):
        self.path = path
        self.f = f
        self.fd = f.fileno()  # all reads are positional (pread): no shared file offset
        self.file_size = os.fstat(self.fd).st_size
        self.members: list[Member] = []
        self._scan()
        self._read_manifest()

    def fail(self, problem: str):
        raise BundleError(f"{self.path.name}: {problem}")

    def _read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def _number(self, field_bytes: bytes, what: str, where: str) -> int:
        try:
            return _number(field_bytes, what, where)
        except BundleError as exc:
            self.fail(exc.message)

    def _scan(self) -> None:
        offset = 0
        pax: dict[str, str] = {}
        seen: set[str] = set()
        while True:
            block = self._read(offset, BLOCK)
            if offset == 0 and (len(block) < BLOCK or block == _ZERO_BLOCK):
                self.fail("not a tar archive (empty or too short)")
            if len(block) < BLOCK:
                self.fail("truncated archive (it ends without an end-of-archive marker)")
            if block == _ZERO_BLOCK:
                if pax:
                    self.fail("truncated archive (a pax header is not followed by its member)")
                self._check_tail(offset)
                return
            where = f"tar header at byte {offset}"
            try:
                stored = int(block[148:156].split(b"\0", 1)[0].strip(b" ") or b"-1", 8)
            except ValueError:
                stored = -1
            unsigned = sum(block[:148]) + 256 + sum(block[156:])
            signed = unsigned - 2 * (sum(b for b in block[:148] if b > 127) + sum(b for b in block[156:] if b > 127))
            magic = block[257:263]
            if stored not in (unsigned, signed) or magic not in (b"ustar\0", b"ustar "):
                if offset == 0:
                    packed = next((name for sig, name in _COMPRESSED if block.startswith(sig)), None)
                    if packed:
                        self.fail(f"not a tar archive but {packed}-compressed data; tvpack bundles are "
                                  f"plain tar: decompress it first")
                    self.fail("not a tar archive (no POSIX tar header at the start)")
                self.fail(f"corrupt {where} (checksum or magic mismatch)")
            typeflag = block[156:157]
            size = self._number(block[124:136], "size", where)
            if typeflag == b"x":
                if size > MAX_PAX:
                    self.fail(f"{where}: pax header of {size} bytes is too large")
                data = self._read(offset + BLOCK, size)
                if len(data) < size:
                    self.fail("truncated archive (inside a pax header)")
                self._check_zero_pad(offset + BLOCK + size)
                pax = _parse_pax(data, f"{self.path.name}: {where}")
                if any(key.startswith("GNU.sparse") for key in pax):
                    self.fail(f"{where}: sparse files are not allowed in a bundle")
                offset += BLOCK + _round_up(size)
                continue
            name = block[0:100].split(b"\0", 1)[0]
            prefix = block[345:500].split(b"\0", 1)[0] if magic == b"ustar\0" else b""
            raw = prefix + b"/" + name if prefix else name
            try:
                path = pax.get("path") or raw.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"{where}: member name is not UTF-8")
            if "size" in pax:
                size = int(pax["size"]) if pax["size"].isdigit() else -1
                if size < 0:
                    self.fail(f"{where}: malformed pax size")
            pax = {}
            if typeflag not in (b"0", b"\0"):
                kind = _TYPE_NAMES.get(typeflag, f"an unsupported member type {typeflag!r}")
                self.fail(f"member {path!r} is {kind}; a bundle holds regular files only")
            problem = _path_problem(path)
            if problem:
                self.fail(f"member {path!r} has {problem}; refusing it")
            mode = self._number(block[100:108], "mode", where)
            if mode & ~0o777:
                self.fail(f"member {path!r} has mode {mode:o} (setuid, setgid or sticky bits)")
            if path in seen:
                self.fail(f"member {path!r} appears twice")
            seen.add(path)
            data_offset = offset + BLOCK
            if data_offset + size > self.file_size:
                self.fail(f"truncated archive (member {path!r} needs {size} bytes, "
                          f"{max(self.file_size - data_offset, 0)} remain)")
            self._check_zero_pad(data_offset + size)
            self.members.append(Member(path, data_offset, size))
            offset = data_offset + _round_up(size)

    def _check_zero_pad(self, end: int) -> None:
        pad = -end % BLOCK
        if pad and self._read(end, pad).strip(b"\0"):
            self.fail(f"non-zero padding after byte {end}")

    def _check_tail(self, offset: int) -> None:
        """Everything from the first zero block on must be zeros (at least two blocks of them)."""
        if self.file_size - offset < 2 * BLOCK:
            self.fail("truncated archive (incomplete end-of-archive marker)")
        while offset < self.file_size:
            chunk = self._read(offset, min(self.file_size - offset, 1 << 20))
            if not chunk:
                self.fail("truncated archive")
            if chunk.strip(b"\0"):
                self.fail("data after the end-of-archive marker")
            offset += len(chunk)

    def _read_manifest(self) -> None:
        if not self.members or not _MANIFEST_NAME.fullmatch(self.members[0].path):
            self.fail(f"the first member is not a manifest ({MANIFEST_DIR}/<id>.json); not a tvpack bundle")
        first = self.members[0]
        if first.size > MAX_MANIFEST:
            self.fail(f"manifest of {first.size} bytes is implausibly large")
        data = self._read(first.offset, first.size)
        if manifest_path_for(data) != first.path:
            self.fail("manifest does not match its id (it was altered)")
        try:
            document = decode_manifest(data)
            self.entries, self.expected = parse_manifest(document, f"{self.path}:{first.path}")
        except BundleError as exc:
            self.fail(exc.message)
        self.manifest_bytes = data
        self.manifest = document
        self.manifest_path = first.path
        self.manifest_id = _MANIFEST_NAME.fullmatch(first.path).group(1)
        present = {m.path: m for m in self.members[1:]}
        for path, (size, _sha) in self.expected.items():
            member = present.get(path)
            if member is None:
                self.fail(f"the manifest lists {path!r} but the archive lacks it")
            if member.size != size:
                self.fail(f"the manifest says {path!r} is {size} bytes, the archive holds {member.size}")
        for path in present:
            if path not in self.expected:
                self.fail(f"member {path!r} is not listed in the manifest")
        self.payload = self.members[1:]

    # -- payload ----------------------------------------------------------------------------------
    def hash_member(self, member: Member, pool: ThreadPoolExecutor, sink: int | None = None, bar=None) -> str:
        """sha256 of a member's data, optionally writing it to ``sink`` (a raw fd) as it streams.

        A pipeline over two buffers: while this thread hashes chunk k, ``pool``'s thread writes
        chunk k and reads chunk k+1 into the other buffer (hashlib and the I/O calls release the
        GIL). The bytes written are exactly the bytes hashed, even if the archive changes under us.
        """
        size = member.size
        chunk = max(min(CHUNK, size), 1)
        buffers = (bytearray(chunk), bytearray(chunk))

        def read(k: int):
            start = k * chunk
            if start >= size:
                return None
            view = memoryview(buffers[k % 2])[:min(chunk, size - start)]
            done = 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], member.offset + start + done)
                if not n:
                    self.fail(f"truncated archive (inside {member.path!r})")
                done += n
            return view

        def write_then_read(view, k_next: int):
            if sink is not None:
                _write_all(sink, view)
            return read(k_next)

        digest = hashlib.sha256()
        current, k = read(0), 0
        while current is not None:
            job = pool.submit(write_then_read, current, k + 1)
            try:
                digest.update(current)
            finally:
                following = job.result()  # never leave the helper touching a buffer we give up
            if bar is not None:
                bar.update(len(current))
            current, k = following, k + 1
        return digest.hexdigest()

    def open_member(self, member: Member) -> BinaryIO:
        return io.BufferedReader(MemberFile(self.fd, member.offset, member.size), 1 << 20)


def _each_member(items: Sequence[tuple], work) -> list:
    """``[work(*item, io_pool) for item in items]``, up to HASH_JOBS items at a time.

    Hashing is the CPU cost of reading a bundle; members are independent, so on a multi-core
    machine two are hashed at once (each with its own I/O thread). Results keep the input order;
    the first failure is raised once every started item has stopped.
    """
    def run(item):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvpack-io") as pool:
            return work(*item, pool)

    if HASH_JOBS <= 1 or len(items) <= 1:
        return [run(item) for item in items]
    with ThreadPoolExecutor(max_workers=HASH_JOBS, thread_name_prefix="tvpack-hash") as outer:
        futures = [outer.submit(run, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # those not started yet; the running ones finish before we return
            raise


def _round_up(n: int) -> int:
    return n + (-n % BLOCK)


def _write_all(fd: int, view) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


class MemberFile(io.RawIOBase):
    """A read-only, seekable window on ``size`` bytes at ``offset`` of an open file: an archive
    member (``os.preadv``, no shared file offset). ``readinto`` fills the caller's buffer directly,
    and torch.load reads through ``readinto`` into each storage, so unbuffered, tensor bytes are
    copied once, from the page cache."""

    def __init__(self, fd: int, offset: int, size: int):
        super().__init__()
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [view[:n]], self._offset + self._pos)
        self._pos += got
        return got

    def fileno(self) -> int:  # not a whole file: nothing may read the descriptor directly
        raise io.UnsupportedOperation("fileno")


# -- the pickle check -------------------------------------------------------------------------------
def check_checkpoint(source, what: str) -> None:
    """Refuse a checkpoint that ``torch.load(weights_only=True)`` would not load.

    ``source`` is a path (the same code path vanilla torch takes on a cache file) or a seekable
    file object. Tensor data is never read (``skip_data``); only the pickles are unpickled, by
    torch's restricted unpickler, which never runs code. (The meta device would be cheaper still
    but cannot hold quantized tensors.)
    """
    import warnings

    import torch

    if _head(source)[257:262] == b"ustar":
        # PyTorch's pre-2017 tar format: torch refuses weights_only for it (and only reads it
        # from a real file, which a window on the archive is not).
        raise BundleError(f"checkpoint {what} is in PyTorch's legacy .tar format, which cannot be loaded with"
                          " torch.load(weights_only=True); re-save it with a current torch")
    try:
        # skip_data: storages are allocated (untouched, so no resident memory) but never filled.
        with torch.serialization.skip_data(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(source, weights_only=True, map_location="cpu")
    except Exception as exc:  # any failure means vanilla torchvision cannot load it safely
        text = str(exc).strip()
        match = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
        reason = f"its pickle calls {match.group(1)}, which could run code" if match else \
            (text.splitlines()[0][:200] if text else type(exc).__name__)
        raise BundleError(f"checkpoint {what} does not load with torch.load(weights_only=True): {reason}") from None


def _head(source) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read(BLOCK)
    head = source.read(BLOCK)
    source.seek(0)
    return head


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

    def __repr__(self) -> str:
        return f"<Bundle {self.path} {len(self.entries)} weights, manifest {self.manifest_id}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._archive.f.close()

    @property
    def created_by(self) -> dict:
        value = self.manifest.get("created_by")
        return value if isinstance(value, dict) else {}

    @property
    def size(self) -> int:
        return sum(m.size for m in self._archive.payload)

    def entry(self, name: str) -> BundleEntry:
        """By weights name (``Enum.MEMBER``), model name (when one weights of it is bundled) or
        ``model:MEMBER``."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        model, _, member = name.partition(":")
        matches = [e for e in self.entries if model in e.models and (not member or e.member == member)]
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
        from .spec import meta_from_json

        return meta_from_json(self.entry(name).meta, registry=registry)

    def transforms(self, name: str, *, registry=()):
        from .spec import build_transforms

        return build_transforms(self.entry(name).transforms, registry=registry)

    def load_model(self, name: str, **kwargs):
        """Delegates to :func:`packager.loader.load_model` with this bundle as the source."""
        from .loader import load_model

        return load_model(self.path, name, **kwargs)


def _open_archive(path) -> _Archive:
    path = Path(path)
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise BundleError(f"no such bundle: {path}") from None
    except IsADirectoryError:
        raise BundleError(f"{path} is a directory, not a bundle") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return _Archive(path, f)
    except BaseException:
        f.close()
        raise


def open_bundle(path) -> Bundle:
    """Open a bundle: its structure and manifest are checked, payload hashes are not (see verify)."""
    archive = _open_archive(path)
    return Bundle(Path(path), archive)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def verify_bundle(path, *, progress: bool = False) -> VerifyReport:
    """Every structural check, every sha256 and the weights-only pickle check of each checkpoint.

    Returns a report when all hold; raises :class:`BundleError` (one line) at the first failure.
    """
    archive = _open_archive(path)
    try:
        bar = _progress(progress, sum(m.size for m in archive.payload), "verify")
        try:
            digests = _each_member([(m,) for m in archive.payload],
                                   lambda member, pool: archive.hash_member(member, pool, bar=bar))
        finally:
            if bar is not None:
                bar.close()
        bad = [m.path for m, sha in zip(archive.payload, digests) if sha != archive.expected[m.path][1]]
        if bad:
            archive.fail(f"sha256 mismatch for {', '.join(repr(p) for p in bad)} (the archive is corrupt or altered)")
        for member in archive.payload:
            if _is_checkpoint_path(member.path):
                _check_member_pickle(archive, member)
        return VerifyReport(Path(path), archive.manifest_id, len(archive.entries), len(archive.members),
                            sum(m.size for m in archive.payload), archive.manifest.get("created_by") or {})
    finally:
        archive.f.close()


# -- install -----------------------------------------------------------------------------------------
def _destination(hub: Path, member_path: str) -> Path:
    # member paths were checked: "hub/" + safe relative components, no "..".
    return hub.joinpath(*member_path.split("/")[1:])


_INSTALL_SUFFIX = ".tvpack-install"  # of install's temp files


def install_bundle(path, *, torch_home=None, force: bool = False, progress: bool = False) -> InstallReport:
    """Verify a bundle and place its files under the hub directory; see :func:`install`."""
    from . import cache

    archive = _open_archive(path)
    temps: list[Path] = []
    try:
        hub = _hub_dir(torch_home)
        weights_of: dict[str, list[str]] = {}
        for entry in archive.entries:
            weights_of.setdefault(entry.path, []).append(entry.name)
        # 1. decide per file (refuse conflicts before writing anything)
        plan = []
        for member in archive.payload:
            dest = _destination(hub, member.path)
            expected = archive.expected[member.path][1]
            action = "install"
            if dest.is_symlink() or dest.exists():
                if dest.is_dir() and not dest.is_symlink():
                    raise BundleError(f"cannot install {dest}: a directory is in the way")
                current = cache.file_sha256(dest) if dest.is_file() else None
                if current == expected:
                    action = "unchanged"
                elif not force:
                    raise BundleError(f"{dest} exists with different contents (sha256 {str(current)[:12]}..., bundle"
                                      f" has {expected[:12]}...); use --force to replace it")
                else:
                    action = "replaced"
            plan.append((member, dest, action))
        # 2. one pass over the payload: hash everything, write what is new into temp files
        for _member, dest, action in plan:
            if action != "unchanged":
                _makedirs(dest.parent)

        def stage(member: Member, dest: Path, action: str, pool) -> tuple[Path | None, str]:
            if action == "unchanged":
                return None, archive.hash_member(member, pool, bar=bar)
            tmp = temp_path(dest, _INSTALL_SUFFIX)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                temps.append(tmp)
                try:
                    return tmp, archive.hash_member(member, pool, sink=fd, bar=bar)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise CacheError(f"cannot write {dest}: {exc.strerror or exc}") from None

        bar = _progress(progress, sum(m.size for m in archive.payload), "install")
        try:
            outcomes = _each_member(plan, stage)
        finally:
            if bar is not None:
                bar.close()
        staged = [(member, dest, action, tmp) for (member, dest, action), (tmp, _sha) in zip(plan, outcomes)]
        bad = [member.path for (member, _d, _a), (_t, sha) in zip(plan, outcomes)
               if sha != archive.expected[member.path][1]]
        if bad:
            archive.fail(f"sha256 mismatch for {', '.join(repr(p) for p in bad)} (the archive is corrupt or altered)")
        # 3. every checkpoint must load weights-only before anything gets its final name
        for member, _dest, _action, tmp in staged:
            if _is_checkpoint_path(member.path):
                if tmp is not None:
                    check_checkpoint(str(tmp), member.path)
                else:
                    _check_member_pickle(archive, member)
        # 4. place: checkpoints first, the manifest last (the loader trusts what it lists)
        placed = []
        first_entry = {}
        for entry in archive.entries:
            first_entry.setdefault(entry.path, entry)
        for member, dest, action, tmp in staged:
            if tmp is not None:
                os.replace(tmp, dest)
                temps.remove(tmp)
            entry = first_entry.get(member.path)
            cache.record_verified(dest, archive.expected[member.path][1], weights=entry and entry.name,
                                  url=entry and entry.url)
            placed.append(Placed(dest, "installed" if action == "install" else action, member.size,
                                 tuple(weights_of.get(member.path, ()))))
        manifest_dest = _destination(hub, archive.manifest_path)
        _makedirs(manifest_dest.parent)
        if not (manifest_dest.is_file() and manifest_dest.read_bytes() == archive.manifest_bytes):
            atomic_write_bytes(manifest_dest, archive.manifest_bytes, durable=False, suffix=_INSTALL_SUFFIX)
        return InstallReport(Path(path), manifest_dest, tuple(placed))
    finally:
        for tmp in temps:
            _unlink(tmp)
        archive.f.close()


def install(path, *, torch_home=None, force: bool = False, progress: bool = False) -> list[Path]:
    """Install a bundle into ``<hub dir>/checkpoints`` (``torch_home``: as ``--torch-home``).

    Verifies first (structure, every sha256, the weights-only pickle check), then places each
    checkpoint atomically (temp file + rename), skips files already there with the same sha256,
    refuses to replace a different file unless ``force``, records the verification index and keeps
    the manifest under ``<hub dir>/tvpack/manifests/``. Returns the checkpoint paths.
    """
    report = install_bundle(path, torch_home=torch_home, force=force, progress=progress)
    return [placed.path for placed in report.files]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _makedirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {path}: {exc.strerror or exc}") from None


# -- writing -----------------------------------------------------------------------------------------
def _copy_file(src_fd: int, dst_fd: int, size: int, bar=None) -> None:
    """Copy ``size`` bytes from the current offset of ``src_fd`` to ``dst_fd``, in the kernel when it
    can (copy_file_range, then sendfile), else through one large buffer."""
    remaining = size
    for call in ("copy_file_range", "sendfile"):
        func = getattr(os, call, None)
        if func is None:
            continue
        try:
            while remaining:
                n = func(src_fd, dst_fd, min(remaining, 1 << 30)) if call == "copy_file_range" \
                    else func(dst_fd, src_fd, None, min(remaining, 1 << 30))
                if n == 0:
                    raise BundleError("a checkpoint shrank while it was being bundled")
                remaining -= n
                if bar is not None:
                    bar.update(n)
            return
        except OSError as exc:
            if remaining != size:  # failed midway: not a capability problem
                raise BundleError(f"copying into the bundle failed: {exc.strerror or exc}") from None
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while remaining:
        n = os.readv(src_fd, [view[:min(CHUNK, remaining)]])
        if n == 0:
            raise BundleError("a checkpoint shrank while it was being bundled")
        _write_all(dst_fd, view[:n])
        remaining -= n
        if bar is not None:
            bar.update(n)


def _select_refs(selectors, refs, all_weights, registry, with_backbones) -> list[WeightsRef]:
    if refs is not None:
        return list(refs)
    from .registry import resolve

    return resolve(list(selectors), registry=registry, all_weights=all_weights, with_backbones=with_backbones)


def build_manifest(refs: Sequence[WeightsRef], files: dict[str, tuple[Path, int, str]], *, registry=()) -> dict:
    """The manifest for ``refs`` whose checkpoints are ``files`` (ref.name -> (path, size, sha256))."""
    from .registry import get_registry
    from .spec import meta_to_json, transform_spec

    reg = get_registry(registry)
    weights = []
    for ref in sorted(refs, key=lambda r: r.name):
        live = ref.weights() if ref.module else reg.weights(ref.name)
        _path, size, sha = files[ref.name]
        weights.append({
            "name": ref.name, "enum": ref.enum, "member": ref.member, "module": ref.module,
            "models": list(ref.models), "builders": list(ref.builders), "family": ref.family, "url": ref.url,
            "path": f"{CHECKPOINT_DIR}/{ref.filename}", "size": size, "sha256": sha,
            "transforms": transform_spec(live), "meta": meta_to_json(live.meta),
        })
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": _created_by(),
            "weights": weights, "members": {}}


def bundle(selectors: Iterable[str] = (), output=None, *, refs: Sequence[WeightsRef] | None = None,
           all_weights: bool = False, registry: Sequence[str] = (), torch_home=None,
           mirrors: Sequence[str] | None = None, upstream: bool = True, fetch: bool = True,
           offline: bool | None = None, with_backbones: bool = False, jobs: int = 4,
           progress: bool = False) -> Path:
    """Write a bundle of the selected weights to ``output``; returns its path.

    Missing checkpoints are fetched through the cache (``mirrors``, then upstream) unless
    ``fetch=False`` or offline (``offline`` or ``TVPACK_OFFLINE``): then missing weights are an
    :class:`~packager.errors.OfflineError` naming them. The archive is written to a temp file
    beside ``output`` and renamed into place only when complete.
    """
    from . import cache

    if output is None:
        raise BundleError("no output file given (-o FILE)")
    output = Path(output)
    selected = _select_refs(selectors, refs, all_weights, registry, with_backbones)
    if not selected:
        raise BundleError("nothing to bundle: the selection is empty")
    by_file: dict[str, WeightsRef] = {}
    for ref in selected:
        other = by_file.setdefault(ref.filename, ref)
        if other.url != ref.url:
            raise BundleError(f"{other.name} and {ref.name} both use the file name {ref.filename} for different urls")
    try:
        paths = cache.ensure_cached(selected, torch_home=torch_home, mirrors=mirrors, upstream=upstream,
                                    offline=True if not fetch else offline, jobs=jobs, progress=progress)
    except OfflineError as exc:
        if fetch:
            raise
        raise OfflineError(exc.message.replace("offline mode", "--no-fetch", 1)) from None
    files: dict[str, tuple[Path, int, str]] = {}
    for ref in selected:
        path = Path(paths[ref.name])
        files[ref.name] = (path, os.stat(path).st_size, cache.file_sha256(path))
    manifest_bytes = encode_manifest(build_manifest(selected, files, registry=registry))
    mtime = source_date_epoch()
    unique = sorted({(f"{CHECKPOINT_DIR}/{p.name}", p, size, sha) for p, size, sha in files.values()})
    tmp = temp_path(output)
    bar = _progress(progress, sum(size for _a, _p, size, _s in unique), f"bundle {output.name}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb", buffering=0) as out:
            fd = out.fileno()
            _write_all(fd, memoryview(tar_header(manifest_path_for(manifest_bytes), len(manifest_bytes), mtime)))
            _write_all(fd, memoryview(manifest_bytes + bytes(-len(manifest_bytes) % BLOCK)))
            for arcname, path, size, sha in unique:
                _write_checkpoint(fd, arcname, path, size, sha, mtime, bar)
            end = out.tell() + 2 * BLOCK
            _write_all(fd, memoryview(bytes(2 * BLOCK + (-end % RECORD))))
        os.replace(tmp, output)
    except OSError as exc:
        _unlink(tmp)
        raise BundleError(f"cannot write {output}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    return output


def _write_checkpoint(fd: int, arcname: str, path: Path, size: int, sha: str, mtime: int, bar) -> None:
    from . import cache

    with open(path, "rb", buffering=0) as src:
        st = os.fstat(src.fileno())
        if st.st_size != size:
            raise BundleError(f"{path} changed while it was being bundled; run the bundle again")
        _write_all(fd, memoryview(tar_header(arcname, size, mtime)))
        # The manifest's hash is only as good as the index entry behind it: copy in the kernel
        # when the index vouches for exactly this file (size and mtime), else hash while copying.
        entry = cache.index_entry(path)
        if entry and entry.get("sha256") == sha and entry.get("mtime_ns") == st.st_mtime_ns:
            _copy_file(src.fileno(), fd, size, bar)
        elif _copy_hashing(src.fileno(), fd, size, bar) != sha:
            raise BundleError(f"{path} changed while it was being bundled; run the bundle again")
        after = os.fstat(src.fileno())
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise BundleError(f"{path} changed while it was being bundled; run the bundle again")
    _write_all(fd, memoryview(bytes(-size % BLOCK)))


def _copy_hashing(src_fd: int, dst_fd: int, size: int, bar) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    remaining = size
    while remaining:
        n = os.readv(src_fd, [view[:min(CHUNK, remaining)]])
        if n == 0:
            raise BundleError("a checkpoint shrank while it was being bundled")
        digest.update(view[:n])
        _write_all(dst_fd, view[:n])
        remaining -= n
        if bar is not None:
            bar.update(n)
    return digest.hexdigest()


__all__ = [
    "Bundle", "BundleEntry", "InstallReport", "Member", "MemberFile", "Placed", "VerifyReport", "bundle",
    "build_manifest", "check_checkpoint", "decode_manifest", "install", "install_bundle", "open_bundle",
    "parse_manifest", "tar_header", "verify_bundle",
]
