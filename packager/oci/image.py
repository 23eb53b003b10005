"""A bundle as an image before anything is pushed: its layers (members, where their bytes are), their digests,
and :class:`ImageSource`, a bundle's bytes composed from pieces (what install and inspect read as a bundle)."""
from __future__ import annotations

import bisect
import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..bundle import BundlePlan, open_bundle
from ..errors import BundleError, OCIError
from ..formats.archive import MemberFile, TarLayout
from ..formats.image import (
    DEFAULT_PLATFORM,
    LAYER_FORMAT,
    bundle_layout,
    bundle_order,
    check_header,
    layer_layout,
    parse_platform,
)
from ..formats.manifest import MANIFEST_NAME, decode_manifest, is_checkpoint_path, manifest_path_for, parse_manifest
from ..formats.volumes import FileSource, open_source

CHUNK = 8 << 20  # bytes per read while hashing a layer


# -- sources: bytes laid end to end ------------------------------------------------------------------
class BytesSource:
    """Bytes in memory behind the positional interface of :mod:`packager.formats.volumes` sources."""

    def __init__(self, data: bytes, path: str = "<memory>"):
        self.data, self.size, self.path = bytes(data), len(data), Path(path)

    def readinto_at(self, view, offset: int) -> int:
        view = memoryview(view).cast("B")
        piece = self.data[offset:offset + len(view)]
        view[:len(piece)] = piece
        return len(piece)

    def read_at(self, n: int, offset: int) -> bytes:
        return self.data[offset:offset + n]

    def close(self) -> None:
        pass


class ImageSource:
    """A bundle's bytes composed from pieces: literal bytes (headers, padding, the manifest layer's
    members), windows of files (a fetched layer, an installed checkpoint), or ``None`` for data not
    fetched (reading it is an :class:`OCIError`; inspecting reads headers and padding only). It has the
    positional interface of :mod:`packager.formats.volumes`, so the bundle reader takes it as a bundle."""

    def __init__(self, name: str, pieces: Sequence[tuple[int, object]], owned: Sequence = ()):
        self.path = Path(name)
        self.name = name
        self.parts: list[Path] = []
        self._pieces = [(length, piece) for length, piece in pieces if length]
        self._starts, total = [], 0
        for length, _piece in self._pieces:
            self._starts.append(total)
            total += length
        self.size = total
        self._owned = list(owned)  # sources to close with this one

    def readinto_at(self, view, offset: int) -> int:
        view = memoryview(view).cast("B")
        n = max(0, min(len(view), self.size - offset))
        done = 0
        i = bisect.bisect_right(self._starts, offset) - 1
        while done < n:
            length, piece = self._pieces[i]
            inner = offset + done - self._starts[i]
            take = min(length - inner, n - done)
            target = view[done:done + take]
            if isinstance(piece, bytes):
                target[:] = piece[inner:inner + take]
            elif piece is None:
                raise OCIError(f"{self.name}: this layer was not fetched")
            else:
                source, base = piece
                got = 0
                while got < take:
                    read = source.readinto_at(target[got:], base + inner + got)
                    if not read:
                        raise OCIError(f"{self.name}: a fetched layer is shorter than it was")
                    got += read
            done += take
            i += 1
        return n

    def read_at(self, n: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(n, self.size - offset)))
        return bytes(buf[:self.readinto_at(buf, offset)])

    def diagnose(self, spans=()) -> str | None:
        return None

    def check_all(self) -> None:
        """Nothing beyond what the bundle's own hashes check (each layer was digest-checked when fetched)."""

    def close(self) -> None:
        for source in self._owned:
            source.close()
        self._owned = []

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- an image of a bundle, before digests ------------------------------------------------------------
@dataclass(frozen=True)
class ImageMember:
    """One bundle member as a layer carries it, and where its data is (a positional source)."""

    path: str
    size: int
    sha256: str
    mtime: int
    source: object = field(repr=False, compare=False)
    offset: int = 0


@dataclass(frozen=True)
class Layer:
    kind: str  # "checkpoint" or "manifest"
    members: tuple[ImageMember, ...]

    @property
    def path(self) -> str:
        return self.members[0].path

    @functools.cached_property
    def layout(self) -> TarLayout:
        """Where each member lies in the layer's tar."""
        return layer_layout((m.path, m.size, m.mtime) for m in self.members)

    @property
    def size(self) -> int:
        return self.layout.size

    def pieces(self) -> list[tuple[int, object]]:
        out: list[tuple[int, object]] = []
        for span, m in zip(self.layout, self.members):
            out += [(len(span.header), span.header), (m.size, (m.source, m.offset)), (span.padding, bytes(span.padding))]
        return out + [(self.layout.trailer, bytes(self.layout.trailer))]

    def open(self) -> MemberFile:
        """A seekable read-only file over the layer's bytes (what the transport uploads from)."""
        source = ImageSource(self.path, self.pieces())
        return MemberFile(source, 0, source.size)

    def key(self) -> str:
        """What decides this layer's bytes (its digest is cached under it): one member's path, size,
        sha256 and mtime, and the layer format."""
        (m,) = self.members
        return f"{LAYER_FORMAT}:{m.sha256}:{m.size}:{m.mtime}:{m.path}"


@dataclass
class Image:
    """A bundle as an image: checkpoint layers by path, then the manifest layer. Close it when done
    (it holds the bundle or the cached files open)."""

    manifest_id: str
    weights: tuple[str, ...]
    layers: tuple[Layer, ...]
    platform: str = DEFAULT_PLATFORM
    _sources: list = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def close(self) -> None:
        for source in self._sources:
            source.close()
        self._sources.clear()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _manifest_layer(manifest_bytes: bytes, others: Sequence[tuple[str, bytes]], mtime: int) -> Layer:
    members = [ImageMember(manifest_path_for(manifest_bytes), len(manifest_bytes),
                           hashlib.sha256(manifest_bytes).hexdigest(), mtime, BytesSource(manifest_bytes))]
    for path, data in others:  # signatures, in the bundle's order
        members.append(ImageMember(path, len(data), hashlib.sha256(data).hexdigest(), mtime, BytesSource(data)))
    return Layer("manifest", tuple(members))


def _weights_of(manifest_bytes: bytes) -> tuple[str, ...]:
    entries, _expected = parse_manifest(decode_manifest(manifest_bytes))
    return tuple(sorted(e.name for e in entries))


def image_of_plan(plan: "BundlePlan", *, platform: str = DEFAULT_PLATFORM, sign=None) -> Image:
    """The image of the bundle ``plan`` describes, its checkpoints read from the cache (no bundle file).
    ``sign`` as for :func:`packager.bundle.bundle`: its signature members go into the manifest layer."""
    parse_platform(platform)
    signatures = list(sign(plan.manifest_bytes, plan.listed)) if sign else []  # every file listed, carried or not
    sources = []
    layers = []
    try:
        for path, file, size, sha in plan.files:
            source = FileSource(file)
            sources.append(source)
            if source.size != size:
                raise BundleError(f"{file} changed since it was selected; run the command again")
            layers.append(Layer("checkpoint", (ImageMember(path, size, sha, plan.mtime, source),)))
    except BaseException:
        for source in sources:
            source.close()
        raise
    layers.append(_manifest_layer(plan.manifest_bytes, [*plan.extra, *signatures], plan.mtime))  # extra: the ML-BOM
    manifest_id = MANIFEST_NAME.fullmatch(plan.manifest_path).group(1)
    return Image(manifest_id, _weights_of(plan.manifest_bytes), tuple(layers), platform, sources)


def image_of_bundle(path, *, platform: str = DEFAULT_PLATFORM) -> Image:
    """The image of a bundle file (or split volumes). The bundle must be laid out as tvpack writes
    bundles (member order, headers, end padding): only then is a pull of the image byte-identical to it."""
    parse_platform(platform)
    with open_bundle(path) as opened:
        members = list(opened.members)
        shas = {e.path: e.sha256 for e in opened.entries}
        manifest_id = opened.manifest_id
    source = open_source(path)
    try:
        name = Path(path).name

        def refuse(why: str):
            raise BundleError(f"{name}: {why}; it is not laid out as tvpack writes bundles, so an image of it "
                              f"could not be pulled back byte for byte (write it again with tvpack bundle)")

        if [m.path for m in members] != bundle_order(m.path for m in members):
            refuse("its members are not in tvpack's order (the manifest, the checkpoints by path, signatures)")
        layout, mtimes = bundle_layout((m.path, m.size) for m in members), {}
        for span, m in zip(layout, members):
            try:
                if span.data_offset != m.offset:
                    raise OCIError("not where tvpack writes it")
                mtimes[m.path] = check_header(source.read_at(len(span.header), span.offset), m.path, m.size, name)
            except OCIError:
                refuse(f"the tar header of {m.path} is not the one tvpack writes")
        if source.size != layout.size:
            refuse("its end-of-archive padding differs")
        layers = [Layer("checkpoint", (ImageMember(m.path, m.size, shas[m.path], mtimes[m.path], source, m.offset),))
                  for m in members[1:] if is_checkpoint_path(m.path)]
        manifest = members[0]
        others = [(m.path, source.read_at(m.size, m.offset)) for m in members[1:] if not is_checkpoint_path(m.path)]
        manifest_bytes = source.read_at(manifest.size, manifest.offset)
        layers.append(_manifest_layer(manifest_bytes, others, mtimes[manifest.path]))
        if any(m.mtime != mtimes[m.path] for m in layers[-1].members):
            refuse("its members have different mtimes")
        return Image(manifest_id, _weights_of(manifest_bytes), tuple(layers), platform, [source])
    except BaseException:
        source.close()
        raise



def _chunks(source, offset: int, size: int):
    """The bytes of a window of a positional source, as views of two alternating buffers (a view is
    valid until the next but one is produced)."""
    buffers = (bytearray(min(CHUNK, max(size, 1))), bytearray(min(CHUNK, max(size, 1))))
    done, k = 0, 0
    while done < size:
        view = memoryview(buffers[k % 2])[:min(CHUNK, size - done)]
        got = 0
        while got < len(view):
            n = source.readinto_at(view[got:], offset + done + got)
            if not n:
                raise BundleError(f"{getattr(source, 'name', source)}: file ended early while it was being read")
            got += n
        yield view
        done += got
        k += 1


def hash_layer(layer: Layer) -> tuple[str, dict[str, str]]:
    """The layer's digest and the sha256 (hex) of each member's data, from one read of the data: the
    two hashes run on two threads (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    contents = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvpack-oci-hash") as pool:
        for span, m in zip(layer.layout, layer.members):
            digest.update(span.header)
            content = hashlib.sha256()
            for view in _chunks(m.source, m.offset, m.size):
                job = pool.submit(content.update, view)
                digest.update(view)
                job.result()
            digest.update(bytes(span.padding))
            contents[m.path] = content.hexdigest()
    digest.update(bytes(layer.layout.trailer))
    return "sha256:" + digest.hexdigest(), contents


__all__ = ["BytesSource", "Image", "ImageMember", "ImageSource", "Layer", "hash_layer", "image_of_bundle",
           "image_of_plan"]
