"""A bundle as a CNCF ModelPack artifact (modelpack/model-spec v1): manifest and config, encoded and parsed. Pure.

    manifest  application/vnd.oci.image.manifest.v1+json, artifactType application/vnd.cncf.model.manifest.v1+json;
              annotations org.tvpack.format ("tvpack-modelpack"), org.tvpack.format.version,
              org.tvpack.manifest.id, org.tvpack.weights
    config    application/vnd.cncf.model.config.v1+json: descriptor (name, ...), config (format "pt", ...),
              modelfs {type: layers, diffIds: the layers' digests}
    layers    application/vnd.cncf.model.weight.v1.raw, one per checkpoint in path order: the file itself, so
              its digest is the checkpoint's own sha256 and needs no hashing pass; then
              application/vnd.cncf.model.weight.config.v1.raw: the bundle manifest (transform specs and
              meta), then the bundle's other members (signatures) in the bundle's order

Every layer carries ``org.cncf.model.filepath`` (``hub/checkpoints/<file>``, ``hub/tvpack/manifests/<id>.json``),
``org.opencontainers.image.title`` and ``org.cncf.model.file.metadata+json`` (name, mode, uid, gid, size, mtime,
typeflag: the spec's FileMetadata), whose mtime lets a pull write back the bundle byte for byte.

Raw layers are what CRI-O, KServe's ``oci+native`` storage and modctl read; container image volumes in
containerd and podman mount the tar-layer image format (:mod:`.image`) instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

from ..errors import OCIError
from ..registry import hash_prefix_from_filename
from . import descriptor
from .archive import path_problem
from .image import A_FORMAT, A_FORMAT_VERSION, A_MANIFEST_ID, A_WEIGHTS, IMAGE_MANIFEST, TITLE, canonical_json
from .manifest import MANIFEST_NAME, is_checkpoint_path

ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
A_FILEPATH = "org.cncf.model.filepath"
A_FILE_METADATA = "org.cncf.model.file.metadata+json"

FORMAT = "tvpack-modelpack"
FORMAT_VERSION = 1
MODEL_FORMAT = "pt"  # the spec's name for PyTorch files
MAX_CONFIG = 4 << 20
_SCALES = ((10 ** 15, "Q"), (10 ** 12, "T"), (10 ** 9, "B"), (10 ** 6, "M"), (10 ** 3, "K"))
_MODE, _TYPEFLAG = 0o644, ord("0")  # what tvpack's tar writer gives every member


@dataclass(frozen=True)
class ModelFile:
    """One layer: a checkpoint (``kind`` "weight"), the bundle manifest ("manifest") or another bundle
    member such as a signature ("member"); its bytes are the file itself."""

    kind: str
    digest: str  # sha256:<hex> of the file
    size: int
    path: str  # hub/checkpoints/<file>, hub/tvpack/manifests/<id>.json, ...
    mtime: int  # the bundle's member mtime (seconds since the epoch)

    @property
    def sha256(self) -> str:
        return self.digest.split(":", 1)[1]

    def metadata(self) -> str:
        """The spec's FileMetadata for this file, as the annotation's JSON string."""
        return canonical_json({"name": self.path, "mode": _MODE, "uid": 0, "gid": 0, "size": self.size,
                               "mtime": rfc3339(self.mtime), "typeflag": _TYPEFLAG}).decode()

    def descriptor(self) -> dict:
        return {"mediaType": WEIGHT_RAW if self.kind == "weight" else WEIGHT_CONFIG_RAW, "digest": self.digest,
                "size": self.size, "annotations": {A_FILEPATH: self.path, TITLE: self.path.rsplit("/", 1)[-1],
                                                   A_FILE_METADATA: self.metadata()}}


@dataclass(frozen=True)
class ModelPackInfo:
    """What a tvpack ModelPack manifest says: the bundle manifest's id, its weights, config and files
    (checkpoints, the manifest, other members)."""

    manifest_id: str
    weights: tuple[str, ...]
    config_digest: str
    config_size: int
    files: tuple[ModelFile, ...]

    @property
    def weight_files(self) -> tuple[ModelFile, ...]:
        return tuple(f for f in self.files if f.kind == "weight")

    @property
    def manifest_file(self) -> ModelFile:
        return next(f for f in self.files if f.kind == "manifest")

    @property
    def member_files(self) -> tuple[ModelFile, ...]:
        return tuple(f for f in self.files if f.kind == "member")

    @property
    def size(self) -> int:
        return self.config_size + sum(f.size for f in self.files)


def rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    seconds = moment.timestamp()
    return int(seconds) if seconds == int(seconds) and seconds >= 0 else None


def param_size(count: int) -> str:
    """The spec's ``paramSize``: ``<count><scale>`` with at most one decimal (25557032 -> "25.6M")."""
    for scale, letter in _SCALES:
        if count >= scale:
            return f"{count / scale:.1f}".removesuffix(".0") + letter
    return str(count)


def order(files: Sequence[ModelFile]) -> list[ModelFile]:
    """Layer order: checkpoints by path, the bundle manifest, the other members as given."""
    return (sorted((f for f in files if f.kind == "weight"), key=lambda f: f.path)
            + [f for f in files if f.kind == "manifest"] + [f for f in files if f.kind == "member"])


# -- encoding ----------------------------------------------------------------------------------------
def encode_config(files: Sequence[ModelFile], *, name: str, description: str | None = None,
                  created: int | None = None, params: int | None = None, precision: str | None = None) -> bytes:
    """The model config: a descriptor, the technical config and ``modelfs`` (the layers' digests in order).
    Only what is known goes in (no timestamp unless ``created``), so it is a function of its arguments."""
    if not name:
        raise OCIError("a ModelPack config needs a model name")
    descriptor: dict = {"name": name}
    if description:
        descriptor["description"] = description
    if created is not None:
        descriptor["createdAt"] = rfc3339(created)
    config: dict = {"format": MODEL_FORMAT}
    if params:
        config["paramSize"] = param_size(params)
    if precision:
        config["precision"] = precision
    return canonical_json({"descriptor": descriptor, "config": config,
                           "modelfs": {"type": "layers", "diffIds": [f.digest for f in order(files)]}})


def encode_manifest(config: bytes, config_digest: str, files: Sequence[ModelFile], manifest_id: str,
                    weights: Sequence[str]) -> bytes:
    kinds = [f.kind for f in files]
    if kinds.count("manifest") != 1 or not set(kinds) <= {"weight", "manifest", "member"}:
        raise OCIError("a ModelPack artifact of a bundle holds exactly one bundle manifest")
    return canonical_json({
        "schemaVersion": 2, "mediaType": IMAGE_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MODEL_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [f.descriptor() for f in order(files)],
        "annotations": {A_FORMAT: FORMAT, A_FORMAT_VERSION: str(FORMAT_VERSION), A_MANIFEST_ID: manifest_id,
                        A_WEIGHTS: ",".join(weights)},
    })


# -- parsing -----------------------------------------------------------------------------------------
def is_modelpack(document) -> bool:
    """Whether a decoded manifest says it is a ModelPack artifact (so :func:`parse_manifest` is its reader)."""
    return isinstance(document, dict) and (document.get("artifactType") == ARTIFACT_TYPE or (
        isinstance(document.get("config"), dict) and document["config"].get("mediaType") == MODEL_CONFIG))


def parse_manifest(data: bytes, media_type: str, where: str) -> ModelPackInfo:
    """Check that a manifest is a ModelPack artifact of a tvpack bundle; one-line :class:`OCIError` otherwise."""
    def refuse(why: str):
        raise OCIError(f"{where}: not a tvpack ModelPack artifact ({why})")

    document = descriptor.json_object(data, refuse)
    if (document.get("mediaType") or media_type) != IMAGE_MANIFEST or document.get("schemaVersion") != 2:
        refuse(f"media type {document.get('mediaType') or media_type or 'unknown'}, schema version "
               f"{document.get('schemaVersion')}")
    if document.get("artifactType") != ARTIFACT_TYPE:
        refuse(f"artifactType {document.get('artifactType')!r}, not {ARTIFACT_TYPE}")
    config = document.get("config")
    if not descriptor.is_descriptor(config, (MODEL_CONFIG,), max_size=MAX_CONFIG):
        refuse(f"its config is not a {MODEL_CONFIG} descriptor")
    annotations = descriptor.annotations(document)
    descriptor.format_version(annotations, refuse, where, key=A_FORMAT, value=FORMAT, version_key=A_FORMAT_VERSION,
                              reads=FORMAT_VERSION, what="ModelPack")
    files = tuple(_parse_layer(raw, i, refuse) for i, raw in enumerate(descriptor.layers(document, refuse)))
    if list(files) != order(files):
        refuse("its layers are not checkpoints by path, then the bundle manifest, then other members")
    manifests = [f for f in files if f.kind == "manifest"]
    if len(manifests) != 1:
        refuse(f"{len(manifests)} bundle manifests")
    manifest_id = MANIFEST_NAME.fullmatch(manifests[0].path).group(1)
    if annotations.get(A_MANIFEST_ID) != manifest_id:
        refuse(f"the layers hold manifest {manifest_id}, the annotations say {annotations.get(A_MANIFEST_ID)}")
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        refuse("a file in two layers")
    weights = annotations.get(A_WEIGHTS) if isinstance(annotations.get(A_WEIGHTS), str) else ""
    return ModelPackInfo(manifest_id, tuple(w for w in weights.split(",") if w), config["digest"], config["size"], files)


def _parse_layer(raw, i: int, refuse) -> ModelFile:
    if not isinstance(raw, dict) or raw.get("mediaType") not in (WEIGHT_RAW, WEIGHT_CONFIG_RAW):
        kind = raw.get("mediaType") if isinstance(raw, dict) else None
        refuse(f"layer {i} is {kind or 'malformed'}, not a raw weight or weight config")
    if not descriptor.is_descriptor(raw):
        refuse(f"layer {i} has no sha256 digest and size")
    annotations = descriptor.annotations(raw)
    path = annotations.get(A_FILEPATH)
    if not isinstance(path, str) or path_problem(path):
        refuse(f"layer {i} has no valid {A_FILEPATH} annotation")
    if raw["mediaType"] == WEIGHT_RAW:
        if not is_checkpoint_path(path):
            refuse(f"weight layer {i} is not under hub/checkpoints/: {path}")
        prefix = hash_prefix_from_filename(path.rsplit("/", 1)[-1])
        if prefix and not raw["digest"].startswith(f"sha256:{prefix}"):
            refuse(f"weight layer {i}'s digest {raw['digest']} contradicts its file name {path}")
        kind = "weight"
    else:
        kind = "manifest" if MANIFEST_NAME.fullmatch(path) else "member"
        if kind == "member" and (is_checkpoint_path(path) or not path.startswith("hub/tvpack/")):
            refuse(f"config layer {i} holds {path}, not a tvpack member")
    try:
        metadata = json.loads(annotations.get(A_FILE_METADATA, ""))
    except (TypeError, ValueError):
        metadata = None
    if not isinstance(metadata, dict):
        refuse(f"layer {i} has no {A_FILE_METADATA} annotation")
    mtime = _epoch(metadata.get("mtime"))
    if (metadata.get("name"), metadata.get("size"), metadata.get("mode"), metadata.get("uid"), metadata.get("gid"),
            metadata.get("typeflag")) != (path, raw["size"], _MODE, 0, 0, _TYPEFLAG) or mtime is None:
        refuse(f"layer {i}'s file metadata is not that of a tvpack bundle member {path}")
    return ModelFile(kind, raw["digest"], raw["size"], path, mtime)


def parse_config(data: bytes, info: ModelPackInfo, where: str) -> dict:
    """The decoded config, checked: the spec's required parts, and ``modelfs.diffIds`` equal to the layers'
    digests in order (the config says what the manifest says)."""
    def refuse(why: str):
        raise OCIError(f"{where}: not a ModelPack config ({why})")

    try:
        document = json.loads(data)
    except ValueError:
        refuse("not JSON")
    if not isinstance(document, dict) or set(document) - {"descriptor", "config", "modelfs"}:
        refuse("not an object of descriptor, config and modelfs")
    for key in ("descriptor", "config", "modelfs"):
        if not isinstance(document.get(key), dict):
            refuse(f"no {key} object")
    name = document["descriptor"].get("name")
    if name is not None and not (isinstance(name, str) and name):
        refuse("descriptor.name is not a non-empty string")
    modelfs = document["modelfs"]
    if modelfs.get("type") != "layers" or not isinstance(modelfs.get("diffIds"), list):
        refuse("modelfs is not {type: layers, diffIds: [...]}")
    if modelfs["diffIds"] != [f.digest for f in info.files]:
        refuse("modelfs.diffIds are not the manifest's layer digests")
    return document


__all__ = ["A_FILEPATH", "A_FILE_METADATA", "ARTIFACT_TYPE", "FORMAT", "FORMAT_VERSION", "MODEL_CONFIG",
           "MODEL_FORMAT", "ModelFile", "ModelPackInfo", "WEIGHT_CONFIG_RAW", "WEIGHT_RAW", "encode_config",
           "encode_manifest", "is_modelpack", "order", "param_size", "parse_config", "parse_manifest", "rfc3339"]
