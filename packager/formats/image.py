"""A bundle as an OCI image: the image manifest, its config and the layer tars, encoded and checked. Pure.

    manifest  application/vnd.oci.image.manifest.v1+json; annotations org.tvpack.format ("tvpack-bundle"),
              org.tvpack.format.version, org.tvpack.manifest.id (the bundle manifest's id), org.tvpack.weights
    config    application/vnd.oci.image.config.v1+json: os, architecture, rootfs {type: layers, diff_ids}
    layers    application/vnd.oci.image.layer.v1.tar, uncompressed, so each layer's diff_id is its digest:
              one per checkpoint, holding hub/checkpoints/<file> (path order), then one holding the bundle
              manifest hub/tvpack/manifests/<id>.json and the bundle's other members (signatures) in its order

A layer is the bundle's own members written as the bundle writes them (:func:`~.archive.tar_header`: ustar,
uid/gid 0, mode 0644, the bundle's mtime; zero padding) followed by the two zero blocks that end a tar. So a
bundle's layers are a function of the bundle, the image digest a function of the layers (every JSON document
here is encoded canonically: sorted keys, no spaces), and the bundle a function of the layers: manifest
member, checkpoints in path order, the other members in the manifest layer's order, end blocks, padding
to a tar record (:func:`bundle_order`). A layer in any other shape is not a tvpack layer and is refused.

Which file is where is said twice, by layer annotations (read before anything is fetched) and by the tar
inside (read as it streams); the two must agree, and both must agree with the bundle manifest.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import OCIError
from . import descriptor
from .archive import BLOCK, END_OF_ARCHIVE, TarLayout, path_problem, tar_header, tar_layout
from .manifest import MANIFEST_NAME, is_checkpoint_path

IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"

FORMAT = "tvpack-bundle"
LAYER_FORMAT = 1  # bump when a layer's bytes for the same member change (cached layer digests then miss)

TITLE = "org.opencontainers.image.title"
A_FORMAT = "org.tvpack.format"
A_FORMAT_VERSION = "org.tvpack.format.version"
A_MANIFEST_ID = "org.tvpack.manifest.id"
A_WEIGHTS = "org.tvpack.weights"
A_CONTENT = "org.tvpack.content"  # per layer: "checkpoint" or "manifest"
A_PATH = "org.tvpack.path"  # per checkpoint layer: hub/checkpoints/<file>
A_SHA256 = "org.tvpack.sha256"  # per checkpoint layer: the checkpoint's sha256 (hex), as in the bundle manifest

END = END_OF_ARCHIVE  # the end-of-archive marker closing every layer
MAX_MANIFEST_LAYER = 80 << 20  # the bundle manifest (64 MiB at most) plus signatures
DEFAULT_PLATFORM = "linux/amd64"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLATFORM = re.compile(r"([a-z0-9]+)/([a-z0-9_]+)(?:/([a-z0-9]+))?")


def canonical_json(document) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# -- layers ------------------------------------------------------------------------------------------
def layer_layout(members: Iterable[tuple], mtime: int = 0) -> TarLayout:
    """Where each of ``members`` (``(path, size[, mtime])``) lies in a layer: their spans, then the end-of-archive
    blocks (no padding to a record)."""
    return tar_layout(members, mtime, record=False)


def bundle_layout(members: Iterable[tuple], mtime: int = 0) -> TarLayout:
    """Where each member lies in the bundle file: as bundle.py writes it, padded to a tar record."""
    return tar_layout(members, mtime)


def layer_size(members: Iterable[tuple[str, int]]) -> int:
    """Bytes of a layer holding ``(path, size)`` members."""
    return layer_layout(members).size


def bundle_size(members: Iterable[tuple[str, int]]) -> int:
    """Bytes of the bundle with these members."""
    return bundle_layout(members).size


def bundle_order(paths: Iterable[str]) -> list[str]:
    """The member order of a bundle as tvpack writes it: the manifest, the checkpoints by path, then the
    other members (signatures) in the order given (the manifest layer keeps them in the bundle's order)."""
    paths = list(paths)
    manifest = [p for p in paths if MANIFEST_NAME.fullmatch(p)][:1]
    checkpoints = sorted(p for p in paths if is_checkpoint_path(p))
    return manifest + checkpoints + [p for p in paths if p not in manifest and not is_checkpoint_path(p)]


def header_mtime(header: bytes) -> int:
    """The mtime of a member's header blocks (the ustar block, which is last)."""
    field = header[-BLOCK + 136:-BLOCK + 148].split(b"\0", 1)[0].strip(b" ")
    try:
        return int(field or b"-1", 8)
    except ValueError:
        return -1


def check_header(header: bytes, path: str, size: int, where: str) -> int:
    """``header`` must be exactly what the bundle writer emits for ``path`` and ``size``; returns its mtime."""
    mtime = header_mtime(header)
    if mtime < 0 or header != tar_header(path, size, mtime):
        raise OCIError(f"{where}: not a tvpack layer: the tar header is not the one tvpack writes for {path} "
                       f"({size} bytes)")
    return mtime


# -- image manifest and config -----------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    """One layer as the image manifest describes it."""

    kind: str  # "checkpoint" or "manifest"
    digest: str
    size: int
    path: str  # the checkpoint's path, or the bundle manifest's for the manifest layer
    sha256: str | None = None  # the checkpoint's sha256 (hex)

    def descriptor(self) -> dict:
        annotations = {TITLE: self.path.rsplit("/", 1)[-1], A_CONTENT: self.kind, A_PATH: self.path}
        if self.sha256:
            annotations[A_SHA256] = self.sha256
        return {"mediaType": LAYER_TAR, "digest": self.digest, "size": self.size, "annotations": annotations}


@dataclass(frozen=True)
class ImageInfo:
    """What an image manifest of a bundle says: the bundle manifest's id, its weights, config and layers
    (checkpoint layers, then the manifest layer)."""

    manifest_id: str
    weights: tuple[str, ...]
    config_digest: str
    config_size: int
    layers: tuple[LayerInfo, ...]

    @property
    def manifest_layer(self) -> LayerInfo:
        return self.layers[-1]

    @property
    def checkpoint_layers(self) -> tuple[LayerInfo, ...]:
        return self.layers[:-1]

    @property
    def size(self) -> int:
        return self.config_size + sum(layer.size for layer in self.layers)


def parse_platform(text: str) -> tuple[str, str, str | None]:
    """``linux/amd64`` or ``linux/arm64/v8`` -> (os, architecture, variant)."""
    match = _PLATFORM.fullmatch(text or "")
    if not match:
        raise OCIError(f"platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return match.group(1), match.group(2), match.group(3)


def _markers(manifest_id: str) -> dict[str, str]:
    return {A_FORMAT: FORMAT, A_FORMAT_VERSION: str(LAYER_FORMAT), A_MANIFEST_ID: manifest_id}


def encode_config(layers: Sequence[LayerInfo], manifest_id: str, platform: str = DEFAULT_PLATFORM) -> bytes:
    """The image config: what container tools need to unpack the layers (no entrypoint: data only).
    No timestamps, so it is a function of the layers."""
    os_name, arch, variant = parse_platform(platform)
    config = {"architecture": arch, "os": os_name, "config": {"Labels": _markers(manifest_id)},
              "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]}}
    if variant:
        config["variant"] = variant
    return canonical_json(config)


def encode_image_manifest(config: bytes, config_digest: str, layers: Sequence[LayerInfo], manifest_id: str,
                          weights: Sequence[str]) -> bytes:
    annotations = {**_markers(manifest_id), A_WEIGHTS: ",".join(weights)}
    return canonical_json({
        "schemaVersion": 2, "mediaType": IMAGE_MANIFEST,
        "config": {"mediaType": IMAGE_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [layer.descriptor() for layer in layers], "annotations": annotations,
    })


def parse_image_manifest(data: bytes, media_type: str, where: str) -> ImageInfo:
    """Check that an image manifest is one of a tvpack bundle; one-line :class:`OCIError` otherwise."""
    def refuse(why: str):
        raise OCIError(f"{where}: not a tvpack image ({why})")

    document = descriptor.json_object(data, refuse)
    kind = document.get("mediaType") or media_type
    if kind != IMAGE_MANIFEST:
        refuse(f"an image index, not an image manifest: {kind}" if "index" in kind or "list" in kind
               else f"media type {kind or 'unknown'}")
    annotations = descriptor.annotations(document)
    version = descriptor.format_version(annotations, refuse, where, key=A_FORMAT, value=FORMAT,
                                        version_key=A_FORMAT_VERSION, reads=LAYER_FORMAT, what="image")
    if version != LAYER_FORMAT:
        refuse(f"unsupported format version {version}")
    manifest_id = annotations.get(A_MANIFEST_ID)
    if not isinstance(manifest_id, str) or not re.fullmatch(r"[0-9a-f]{16}", manifest_id):
        refuse(f"no valid {A_MANIFEST_ID} annotation")
    config = document.get("config")
    if not descriptor.is_descriptor(config, (IMAGE_CONFIG,)):
        refuse("its config is not an OCI image config")
    layers = [_parse_layer(raw, i, refuse) for i, raw in enumerate(descriptor.layers(document, refuse))]
    *checkpoints, last = layers
    if last.kind != "manifest" or any(layer.kind != "checkpoint" for layer in checkpoints):
        refuse("the bundle manifest is not in the last layer, alone")
    if MANIFEST_NAME.fullmatch(last.path).group(1) != manifest_id:
        refuse(f"the manifest layer holds {last.path}, the annotations say manifest {manifest_id}")
    if last.size > MAX_MANIFEST_LAYER:
        refuse(f"a manifest layer of {last.size} bytes")
    paths = [layer.path for layer in checkpoints]
    if len(set(paths)) != len(paths):
        refuse("a checkpoint in two layers")
    weights = annotations.get(A_WEIGHTS) if isinstance(annotations.get(A_WEIGHTS), str) else ""
    return ImageInfo(manifest_id, tuple(w for w in weights.split(",") if w), config["digest"], config["size"],
                     tuple(layers))


def _parse_layer(raw, i: int, refuse) -> LayerInfo:
    if not isinstance(raw, dict) or raw.get("mediaType") != LAYER_TAR:
        kind = raw.get("mediaType") if isinstance(raw, dict) else None
        refuse(f"layer {i} is {kind or 'malformed'}, not an uncompressed tar")
    if not descriptor.is_descriptor(raw):
        refuse(f"layer {i} has no sha256 digest and size")
    annotations = descriptor.annotations(raw)
    kind, path, sha = annotations.get(A_CONTENT), annotations.get(A_PATH), annotations.get(A_SHA256)
    if not isinstance(path, str) or path_problem(path):
        refuse(f"layer {i} has no valid {A_PATH} annotation")
    if kind == "checkpoint":
        if not is_checkpoint_path(path) or not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            refuse(f"checkpoint layer {i} needs a path under hub/checkpoints/ and a sha256 annotation")
        if raw["size"] < layer_size([(path, 0)]):
            refuse(f"layer {i} is too small to hold {path}")
    elif kind == "manifest":
        if not MANIFEST_NAME.fullmatch(path):
            refuse(f"the manifest layer's path {path!r} is not a bundle manifest")
        sha = None
    else:
        refuse(f"layer {i} has no {A_CONTENT} annotation")
    return LayerInfo(kind, raw["digest"], raw["size"], path, sha)


__all__ = [
    "A_CONTENT", "A_FORMAT", "A_FORMAT_VERSION", "A_MANIFEST_ID", "A_PATH", "A_SHA256", "A_WEIGHTS", "DEFAULT_PLATFORM",
    "END", "FORMAT", "IMAGE_CONFIG", "IMAGE_INDEX", "IMAGE_MANIFEST", "LAYER_FORMAT", "LAYER_TAR", "MAX_MANIFEST_LAYER",
    "TITLE", "ImageInfo", "LayerInfo", "bundle_order", "bundle_size", "canonical_json", "check_header",
    "bundle_layout", "encode_config", "encode_image_manifest", "header_mtime", "layer_layout", "layer_size",
    "parse_image_manifest", "parse_platform",
]
