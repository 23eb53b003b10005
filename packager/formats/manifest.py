"""The bundle manifest: what a bundle holds, encoded and parsed (pure).

The first member of every bundle, ``hub/tvpack/manifests/<id>.json`` with id = sha256(bytes)[:16],
lists each weights (enum, member, module, models, builders, family, url, archive path, size,
sha256, transform spec and meta as JSON data) and any extra tvpack members. :func:`parse_manifest`
is the single reader, for bundles and installed manifests alike; it refuses anything malformed or
unsafe with one line.

A *delta* bundle (made for a site's inventory) describes every selected weights as usual but does
not carry the checkpoints the site already holds: their archive paths are listed, sorted, under
``"at_site"``, and each keeps its size and sha256 in its weights entry, so installing checks the
site's copy against exactly those. The key is absent from full bundles (their bytes are unchanged),
and a reader that does not know it refuses a delta bundle as lacking members, never half-installs it.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Collection, Mapping, Sequence

from .. import __version__
from ..errors import BundleError
from ..registry import WeightsRef, hash_prefix_from_filename
from ..spec import summarize
from .archive import check_path, path_problem
from .release import release_of

FORMAT = "tvpack-bundle"
FORMAT_VERSION = 1
MANIFEST_DIR = "hub/tvpack/manifests"
CHECKPOINT_DIR = "hub/checkpoints"
MAX_MANIFEST = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
MANIFEST_NAME = re.compile(re.escape(MANIFEST_DIR) + r"/([0-9a-f]{16})\.json")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOT_MEMBERS = ("hub/tvpack/manifests/", "hub/tvpack/locks/", "hub/tvpack/signatures/", "hub/tvpack/trusted/")


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
    at_site: bool = False  # a delta bundle does not carry this checkpoint: the site already holds it

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
                "path": self.path, "size": self.size, "sha256": self.sha256, "manifest": self.manifest,
                "at_site": self.at_site}

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
        return summarize(self.transforms)


def is_checkpoint_path(path: str) -> bool:
    return path.startswith(CHECKPOINT_DIR + "/") and path.count("/") == 2


# -- manifest --------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def created_by() -> dict:
    """Who wrote a bundle: versions read from package metadata (importing torch to ask costs seconds)."""
    return {"packager": __version__, "torch": _version("torch"), "torchvision": _version("torchvision"),
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
    except RecursionError:
        raise BundleError("manifest is nested too deeply to be a tvpack manifest") from None


def parse_manifest(data: dict, where: str = "") -> tuple[list[BundleEntry], dict[str, tuple[int, str]]]:
    """Validate a manifest document; returns (weights entries, {archive path: (size, sha256)} of every
    file it lists). Checkpoints a delta bundle expects at the site (``"at_site"``) are listed too (a
    signature covers them, an install places or finds them) but are not archive members: their
    entries have ``at_site`` set, and :func:`site_files` gives them.

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
    release_of(data)  # a malformed release is refused here; readers take it with release_of
    created_by = data.get("created_by")
    created_by = dict(created_by) if isinstance(created_by, dict) else {}
    expected: dict[str, tuple[int, str]] = {}
    described: list[dict] = []  # each weights' fields; BundleEntry values once "at_site" is known
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
        problem = path_problem(path)
        if problem or not is_checkpoint_path(path):
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
        described.append(dict(
            name=name, enum=enum, member=member, module=_want(item, "module", str, at),
            models=tuple(_want(item, "models", "strs", at)), builders=tuple(_want(item, "builders", "strs", at)),
            family=str(item.get("family") or ""), url=_want(item, "url", str, at), path=path, size=size,
            sha256=sha, transforms=_want(item, "transforms", dict, at), meta=_want(item, "meta", dict, at),
            created_by=created_by, manifest=where,
        ))
    at_site = _at_site(data, expected)
    entries = [BundleEntry(**fields, at_site=fields["path"] in at_site) for fields in described]
    members = data.get("members", {})
    if not isinstance(members, dict):
        raise BundleError("manifest: 'members' is not an object")
    for path, info in members.items():
        check_path(path, "manifest: member")
        # Extra members are tvpack data only: never a checkpoint (that would skip the pickle
        # check), never the cache's own index, locks or manifests, never a signature (made after the
        # manifest, not listed in it) and never a trusted key (a bundle must not vouch for itself).
        if not path.startswith("hub/tvpack/") or path.startswith(_NOT_MEMBERS) or path == "hub/tvpack/index.json":
            raise BundleError(f"manifest: member {path!r} is outside the places a bundle may write")
        if path in expected:
            raise BundleError(f"manifest: {path} is listed twice")
        if not isinstance(info, dict) or type(info.get("size")) is not int or info["size"] < 0 \
                or not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            raise BundleError(f"manifest: member {path!r} lacks a valid size and sha256")
        expected[path] = (info["size"], info["sha256"])
    return entries, expected


def _at_site(data: dict, checkpoints: Mapping[str, tuple[int, str]]) -> set[str]:
    """The validated ``"at_site"`` list: checkpoint paths of this manifest's weights, each once."""
    if "at_site" not in data:
        return set()
    listed = data["at_site"]
    if not isinstance(listed, list) or not all(isinstance(path, str) for path in listed):
        raise BundleError("manifest: 'at_site' is not a list of checkpoint paths")
    seen: set[str] = set()
    for path in listed:
        if path not in checkpoints:
            raise BundleError(f"manifest: 'at_site' lists {path!r}, which is not the checkpoint of any weights in it")
        if path in seen:
            raise BundleError(f"manifest: 'at_site' lists {path} twice")
        seen.add(path)
    return seen


def site_files(entries: Sequence[BundleEntry]) -> dict[str, tuple[int, str]]:
    """{archive path: (size, sha256)} of the checkpoints a delta bundle expects at the site, sorted."""
    return {e.path: (e.size, e.sha256) for e in sorted(entries, key=lambda e: e.path) if e.at_site}


def build_manifest(weights: Sequence, files: Mapping[str, tuple[int, str]], *, at_site: Collection[str] = ()) -> dict:
    """The manifest document for ``weights`` (:class:`packager.registry.WeightsInfo`: ref, transform spec
    and meta as JSON data) whose checkpoints are ``files`` (weights name -> (size, sha256)).

    ``at_site``: checkpoint file names the bundle will not carry because the site holds them (a
    delta bundle); listed under ``"at_site"`` only when there are any."""
    items = []
    for info in sorted(weights, key=lambda w: w.ref.name):
        ref = info.ref
        size, sha = files[ref.name]
        items.append({
            "name": ref.name, "enum": ref.enum, "member": ref.member, "module": ref.module,
            "models": list(ref.models), "builders": list(ref.builders), "family": ref.family, "url": ref.url,
            "path": f"{CHECKPOINT_DIR}/{ref.filename}", "size": size, "sha256": sha,
            "transforms": info.transforms, "meta": info.meta,
        })
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": created_by(),
                "weights": items, "members": {}}
    paths = {item["path"] for item in items}
    site = sorted({f"{CHECKPOINT_DIR}/{name}" for name in at_site})
    unknown = [path for path in site if path not in paths]
    if unknown:
        raise BundleError(f"cannot expect {unknown[0]} at the site: no selected weights uses it")
    if site:
        document["at_site"] = site
    return document
