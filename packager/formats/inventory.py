"""The air-gapped site's inventory (``SITE.json``): what a site already holds, so the connected side
can bundle only what is missing (apt-offline's signature file, for checkpoints).

Plain JSON, small enough for a reviewer to read before it crosses the gap, one checkpoint per line::

    {
      "format": "tvpack-inventory",
      "format_version": 1,
      "versions": {"tvpack": "0.1.0", "torch": "2.14.1", "torchvision": "0.29.1", "python": "3.11.7"},
      "torch_home": "/srv/torch",
      "checkpoints": [
        {"file": "resnet50-11ad3fa6.pth", "size": 102540417, "sha256": "<64 hex>"}
      ],
      "manifests": [
        {"id": "<16 hex>", "weights": ["ResNet50_Weights.IMAGENET1K_V2"]}
      ]
    }

``created`` (an ISO 8601 time) is omitted unless given: the same site then yields the same bytes,
so two inventories compare with ``cmp`` and diff line by line. Checkpoints are sorted by file,
manifests by id, each manifest's weights by name. Parsing is strict (unknown keys, wrong types,
unsafe file names, malformed digests and duplicates are refused) because the file crosses a trust
boundary in both directions: every refusal is one :class:`~packager.errors.BundleError` line.
"""
from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from typing import Iterable

from ..errors import BundleError

FORMAT = "tvpack-inventory"
FORMAT_VERSION = 1
MAX_BYTES = 16 << 20  # a site with every torchvision checkpoint is ~30 KB; refuse anything absurd unread
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_ID = re.compile(r"[0-9a-f]{16}")  # sha256(manifest bytes)[:16]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VERSION_KEYS = ("tvpack", "torch", "torchvision", "python")


@dataclass(frozen=True)
class Versions:
    """Software at the site; None where a distribution is not installed."""

    tvpack: str | None = None
    torch: str | None = None
    torchvision: str | None = None
    python: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    """One file in the site's ``hub/checkpoints``."""

    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class InstalledManifest:
    """One bundle manifest installed at the site (``hub/tvpack/manifests/<id>.json``) and the weights it describes."""

    id: str
    weights: tuple[str, ...]


@dataclass(frozen=True)
class Inventory:
    """What a site holds. Constructing one validates and sorts it, so every Inventory encodes."""

    versions: Versions = Versions()
    torch_home: str | None = None
    checkpoints: tuple[Checkpoint, ...] = ()
    manifests: tuple[InstalledManifest, ...] = ()
    created: str | None = None
    _by_file: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        where = "inventory"
        by_file: dict[str, Checkpoint] = {}
        for ckpt in self.checkpoints:
            _check_file_name(ckpt.file, where)
            _check_size(ckpt.size, f"{where}: {ckpt.file}")
            _check_sha256(ckpt.sha256, f"{where}: {ckpt.file}")
            if ckpt.file in by_file:
                raise BundleError(f"{where}: checkpoint {ckpt.file} is listed twice")
            by_file[ckpt.file] = ckpt
        seen: set[str] = set()
        for manifest in self.manifests:
            if not isinstance(manifest.id, str) or not _MANIFEST_ID.fullmatch(manifest.id):
                raise BundleError(f"{where}: manifest id {manifest.id!r} is not 16 lower-case hex digits")
            if manifest.id in seen:
                raise BundleError(f"{where}: manifest {manifest.id} is listed twice")
            seen.add(manifest.id)
            for name in manifest.weights:
                if not isinstance(name, str) or not name or _CONTROL.search(name):
                    raise BundleError(f"{where}: manifest {manifest.id} lists weights {name!r}, not a weights name")
        # sorted only once known to be strings: the encoding is then canonical
        checkpoints = tuple(sorted(self.checkpoints, key=lambda c: c.file))
        manifests = tuple(sorted((InstalledManifest(m.id, tuple(sorted(m.weights))) for m in self.manifests),
                                 key=lambda m: m.id))
        for key in _VERSION_KEYS:
            value = getattr(self.versions, key)
            if value is not None and (not isinstance(value, str) or not value or _CONTROL.search(value)):
                raise BundleError(f"{where}: versions.{key} {value!r} is not a version string")
        if self.torch_home is not None and (not isinstance(self.torch_home, str) or "\x00" in self.torch_home):
            raise BundleError(f"{where}: torch_home {self.torch_home!r} is not a path")
        if self.created is not None:
            _check_created(self.created, where)
        object.__setattr__(self, "checkpoints", checkpoints)
        object.__setattr__(self, "manifests", manifests)
        object.__setattr__(self, "_by_file", by_file)

    def has(self, file: str, sha256: str) -> bool:
        """The site holds ``file`` with exactly this sha256 (a same-named file with other bytes does not count)."""
        ckpt = self._by_file.get(file)
        return ckpt is not None and ckpt.sha256 == sha256

    def checkpoint(self, file: str) -> Checkpoint | None:
        """The site's entry for ``file``, to tell "missing" from "different" in a message."""
        return self._by_file.get(file)

    @property
    def total_size(self) -> int:
        return sum(c.size for c in self.checkpoints)


def current_versions() -> Versions:
    """tvpack, torch, torchvision and Python here, read from installed metadata: never imports torch."""
    from .. import __version__

    def installed(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return Versions(tvpack=installed("tvpack") or __version__, torch=installed("torch"),
                    torchvision=installed("torchvision"), python=platform.python_version())


def make_inventory(checkpoints: Iterable[tuple[str, int, str] | Checkpoint], manifests: Iterable = (), *,
                   torch_home=None, created: str | None = None, versions: Versions | None = None) -> Inventory:
    """An Inventory of this machine: ``checkpoints`` as ``(file, size, sha256)`` or :class:`Checkpoint`,
    ``manifests`` as ``(id, weights)`` or :class:`InstalledManifest`; versions read here unless given."""
    ckpts = tuple(c if isinstance(c, Checkpoint) else Checkpoint(*c) for c in checkpoints)
    mans = tuple(m if isinstance(m, InstalledManifest) else InstalledManifest(m[0], tuple(m[1])) for m in manifests)
    return Inventory(versions=versions or current_versions(), torch_home=None if torch_home is None else str(torch_home),
                     checkpoints=ckpts, manifests=mans, created=created)


# ------------------------------------------------------------------------------------------- encoding

def encode(inv: Inventory) -> bytes:
    """The JSON bytes of ``inv``: deterministic, one checkpoint or manifest per line, ending in a newline."""
    def dumps(value) -> str:
        return json.dumps(value, ensure_ascii=True)

    versions = {key: getattr(inv.versions, key) for key in _VERSION_KEYS}
    lines = ["{", f'  "format": {dumps(FORMAT)},', f'  "format_version": {FORMAT_VERSION},']
    if inv.created is not None:
        lines.append(f'  "created": {dumps(inv.created)},')
    lines.append(f'  "versions": {dumps(versions)},')
    lines.append(f'  "torch_home": {dumps(inv.torch_home)},')
    lines.append(_json_list("checkpoints", [dumps({"file": c.file, "size": c.size, "sha256": c.sha256})
                                            for c in inv.checkpoints]) + ",")
    lines.append(_json_list("manifests", [dumps({"id": m.id, "weights": list(m.weights)}) for m in inv.manifests]))
    lines.append("}")
    return ("\n".join(lines) + "\n").encode("ascii")


def _json_list(key: str, items: list[str]) -> str:
    if not items:
        return f'  "{key}": []'
    return f'  "{key}": [\n' + ",\n".join(f"    {item}" for item in items) + "\n  ]"


# -------------------------------------------------------------------------------------------- parsing

def _no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse(data: bytes, where: str = "SITE.json") -> Inventory:
    """Read an inventory from its JSON bytes; ``where`` (a file name) starts every error message."""
    if len(data) > MAX_BYTES:
        raise BundleError(f"{where}: {len(data)} bytes is too large for an inventory (at most {MAX_BYTES})")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{where}: not UTF-8 text, so not an inventory") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except RecursionError:
        raise BundleError(f"{where}: JSON nested too deeply to be an inventory") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{where}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # duplicate keys, NaN, integers too long to convert
        raise BundleError(f"{where}: not a valid inventory ({exc})") from None
    return _from_document(doc, where)


def _from_document(doc, where: str) -> Inventory:
    obj = _object(doc, where, "the document",
                  required={"format", "format_version", "versions", "checkpoints", "manifests"},
                  optional={"created", "torch_home"})
    if obj["format"] != FORMAT:
        raise BundleError(f"{where}: format is {obj['format']!r}, not {FORMAT!r}: not a tvpack inventory")
    version = obj["format_version"]
    if type(version) is not int:
        raise BundleError(f"{where}: format_version {version!r} is not an integer")
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {version} is not supported by this tvpack (it reads "
                          f"{FORMAT_VERSION}): upgrade tvpack on this side")
    versions = _object(obj["versions"], where, "versions", required=set(), optional=set(_VERSION_KEYS))
    for key, value in versions.items():
        if value is not None and not isinstance(value, str):
            raise BundleError(f"{where}: versions.{key} is {type(value).__name__}, not a string")
    checkpoints = []
    for i, item in enumerate(_array(obj["checkpoints"], where, "checkpoints")):
        entry = _object(item, where, f"checkpoints[{i}]", required={"file", "size", "sha256"}, optional=set())
        if not isinstance(entry["file"], str):
            raise BundleError(f"{where}: checkpoints[{i}].file is not a string")
        checkpoints.append(Checkpoint(entry["file"], entry["size"], entry["sha256"]))
    manifests = []
    for i, item in enumerate(_array(obj["manifests"], where, "manifests")):
        entry = _object(item, where, f"manifests[{i}]", required={"id", "weights"}, optional=set())
        weights = _array(entry["weights"], where, f"manifests[{i}].weights")
        manifests.append(InstalledManifest(entry["id"], tuple(weights)))
    for key in ("created", "torch_home"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise BundleError(f"{where}: {key} is {type(obj[key]).__name__}, not a string")
    try:
        return Inventory(versions=Versions(**versions), torch_home=obj.get("torch_home"),
                         checkpoints=tuple(checkpoints), manifests=tuple(manifests), created=obj.get("created"))
    except BundleError as exc:  # name the file rather than "inventory"
        raise BundleError(where + exc.message[len("inventory"):]) from None
    except TypeError as exc:  # unhashable or uncomparable values while sorting
        raise BundleError(f"{where}: malformed entries ({exc})") from None


def _object(value, where: str, what: str, *, required: set, optional: set) -> dict:
    if not isinstance(value, dict):
        raise BundleError(f"{where}: {what} is {_json_type(value)}, not an object")
    missing = sorted(required - value.keys())
    if missing:
        raise BundleError(f"{where}: {what} lacks {', '.join(missing)}")
    unknown = sorted(value.keys() - required - optional)
    if unknown:
        raise BundleError(f"{where}: {what} has unknown key {unknown[0]!r}")
    return value


def _array(value, where: str, what: str) -> list:
    if not isinstance(value, list):
        raise BundleError(f"{where}: {what} is {_json_type(value)}, not an array")
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _check_file_name(name, where: str) -> None:
    """A bare file name that stays inside ``hub/checkpoints``: no separators, no dot-names, no control
    characters (the delta planner joins it to a directory on the connected side)."""
    if not isinstance(name, str):
        raise BundleError(f"{where}: checkpoint file {name!r} is not a string")
    if (not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith(".")
            or _CONTROL.search(name) or len(name.encode("utf-8", "surrogatepass")) > 255):
        raise BundleError(f"{where}: checkpoint file {name!r} is not a safe file name")


def _check_size(size, where: str) -> None:
    if type(size) is not int or size < 0:  # bool is an int subclass; True is no size
        raise BundleError(f"{where}: size {size!r} is not a non-negative integer")


def _check_sha256(digest, where: str) -> None:
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise BundleError(f"{where}: sha256 {digest!r} is not 64 lower-case hex digits")


def _check_created(created, where: str) -> None:
    try:
        datetime.fromisoformat(created.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        raise BundleError(f"{where}: created {created!r} is not an ISO 8601 time") from None


__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "InstalledManifest", "Inventory", "Versions", "current_versions",
           "encode", "make_inventory", "parse"]
