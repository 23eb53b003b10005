"""Bundles as OCI images: pushed to a registry, pulled back into a bundle, installed, inspected.

    with image_of_bundle("models.tvpack") as image:          # or image_of_plan(bundle.plan_bundle(...)): the cache
        push(image, "oci://registry.example/ml/models:v1")
    pull("oci://registry.example/ml/models:v1", "models.tvpack")     # byte-identical to the pushed bundle
    install("oci://registry.example/ml/models:v1", torch_home=HOME)  # bundle.install_bundle over the layers
    with open_image("oci://registry.example/ml/models:v1") as b:     # a Bundle; only the manifest layer is read
        b.entries

The image layout is :mod:`packager.formats.image`; the protocol is :mod:`packager.transport.oci`.

* Push moves as few bytes as it can. A layer's digest is the sha256 of its tar, not of the checkpoint, so
  the first push of a checkpoint hashes it (once, on a worker thread while earlier layers go up, checking
  the checkpoint's own sha256 on the way) and remembers the digest (:class:`DigestCache`). A re-push of an
  unchanged image then hashes nothing and asks one question: does the registry hold this manifest digest?
  Otherwise each blob is asked for (HEAD), mounted from another repository of the same registry where it
  was pushed before (or from ``mount_from``), and only then uploaded (in chunks when large). Finished
  blobs stay finished, so an interrupted push re-run sends only the rest.
* Pull streams each layer into its place in the bundle being written (a temp file renamed when
  complete): the blob's digest, the tar around the checkpoint and the checkpoint's sha256 are all checked
  while it streams. The result is then opened by the bundle reader, as any bundle file would be.
* Install goes through :func:`packager.bundle.install_bundle`, the path bundle files take, over an
  :class:`ImageSource`: the bundle's bytes composed from the manifest layer, the checkpoints the cache
  already holds with the right sha256 (never fetched), and the other layers, fetched when install_bundle
  first reads them (into this run's own ``<hub>/tvpack/oci-layers/<image>.<pid>.<token>/``, under the image's
  lock, digest-checked, removed afterwards; an interrupted run's directory is adopted by the next).
  Every check and decision a bundle file gets (the signature checks of :mod:`packager.signing`, sha256
  against the manifest, the weights-only pickle check, conflicts, all-or-nothing placement, the manifest
  last) applies to an image unchanged, through :func:`packager.signing.install_signed`; ``verify`` is
  :func:`packager.signing.verify_signed` the same way.

Importing this module never imports torch.
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import hashlib
import json
import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import bundle as bundles
from . import cache, signing
from .errors import BundleError, CacheError, OCIError
from .formats.archive import BLOCK, RECORD, MemberFile, TarArchive, round_up, tar_header
from .formats.image import (
    DEFAULT_PLATFORM,
    END,
    IMAGE_INDEX,
    IMAGE_MANIFEST,
    LAYER_FORMAT,
    ImageInfo,
    LayerInfo,
    bundle_order,
    bundle_size,
    check_header,
    encode_config,
    encode_image_manifest,
    layer_size,
    member_span,
    parse_image_manifest,
    parse_platform,
)
from .formats.manifest import MANIFEST_NAME, decode_manifest, is_checkpoint_path, manifest_path_for, parse_manifest
from .formats.volumes import FileSource, open_source
from .fsutil import atomic_write_json, human_bytes, pid_alive, reserve_space, short_name, temp_path
from .home import hub_dir, tvpack_cache_dir
from .transport.stream import Cancel, cancelled_by_interrupt
from .transport.oci import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Reference, RegistryClient, digest_of, parse_reference

CHUNK = 8 << 20  # bytes per read while hashing a layer
BlobCallback = Callable[["BlobResult"], None]


def is_oci_reference(text) -> bool:
    return isinstance(text, str) and text.startswith("oci://")


def _reference(ref) -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(str(ref))


# -- sources: bytes laid end to end ------------------------------------------------------------------
class _BytesSource:
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

    @property
    def header(self) -> bytes:
        return tar_header(self.path, self.size, self.mtime)


@dataclass(frozen=True)
class Layer:
    kind: str  # "checkpoint" or "manifest"
    members: tuple[ImageMember, ...]

    @property
    def path(self) -> str:
        return self.members[0].path

    @property
    def size(self) -> int:
        return layer_size((m.path, m.size) for m in self.members)

    def pieces(self) -> list[tuple[int, object]]:
        out: list[tuple[int, object]] = []
        for m in self.members:
            out += [(len(m.header), m.header), (m.size, (m.source, m.offset)), (-m.size % BLOCK, bytes(-m.size % BLOCK))]
        return out + [(END, bytes(END))]

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
                           hashlib.sha256(manifest_bytes).hexdigest(), mtime, _BytesSource(manifest_bytes))]
    for path, data in others:  # signatures, in the bundle's order
        members.append(ImageMember(path, len(data), hashlib.sha256(data).hexdigest(), mtime, _BytesSource(data)))
    return Layer("manifest", tuple(members))


def _weights_of(manifest_bytes: bytes) -> tuple[str, ...]:
    entries, _expected = parse_manifest(decode_manifest(manifest_bytes))
    return tuple(sorted(e.name for e in entries))


def image_of_plan(plan: "bundles.BundlePlan", *, platform: str = DEFAULT_PLATFORM, sign=None) -> Image:
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
    with bundles.open_bundle(path) as opened:
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
        mtimes, end = {}, 0
        for m in members:
            try:
                mtimes[m.path] = check_header(source.read_at(m.offset - end, end), m.path, m.size, name)
            except OCIError:
                refuse(f"the tar header of {m.path} is not the one tvpack writes")
            end = m.offset + round_up(m.size)
        if source.size != bundle_size((m.path, m.size) for m in members):
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


# -- what tvpack remembers about blobs ----------------------------------------------------------------
class DigestCache:
    """What tvpack learnt about blobs, kept between runs in ``<tvpack cache>/oci/digests.json``:

    * the digest of each checkpoint layer it made, under :meth:`Layer.key` (path, size, sha256, mtime,
      layer format), so an unchanged checkpoint is never hashed again;
    * which repositories of which registry hold each blob it pushed: where to mount it from next time.

    Only a cache, read-modify-written without a lock: a lost update costs a re-hash or an upload later.
    A wrong layer digest cannot make a wrong image: an upload under it is checked by the registry and
    the transport, and a HEAD or mount of a digest finds the blob with those bytes or nothing."""

    VERSION = 1
    MAX_REPOSITORIES = 8  # per blob: mount candidates worth a request

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else tvpack_cache_dir() / "oci" / "digests.json"
        self._data = self._read()
        self._new_layers: dict[str, str] = {}
        self._new_blobs: list[tuple[str, str, str]] = []

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"version": self.VERSION, "layers": {}, "blobs": {}}
        if not isinstance(data, dict) or data.get("version") != self.VERSION:
            return {"version": self.VERSION, "layers": {}, "blobs": {}}
        for key in ("layers", "blobs"):
            if not isinstance(data.get(key), dict):
                data[key] = {}
        return data

    def layer(self, layer: Layer) -> str | None:
        digest = self._data["layers"].get(layer.key())
        return digest if isinstance(digest, str) and digest.startswith("sha256:") else None

    def remember_layer(self, layer: Layer, digest: str) -> None:
        self._data["layers"][layer.key()] = self._new_layers[layer.key()] = digest

    def repositories(self, host: str, digest: str) -> list[str]:
        repos = (self._data["blobs"].get(host) or {}).get(digest) or []
        return [r for r in repos if isinstance(r, str)]

    def remember_blob(self, host: str, repository: str, digest: str) -> None:
        self._add_blob(self._data, host, repository, digest)
        self._new_blobs.append((host, repository, digest))

    def _add_blob(self, data: dict, host: str, repository: str, digest: str) -> None:
        per_host = data["blobs"].setdefault(host, {})
        repos = [r for r in per_host.get(digest) or [] if r != repository]
        per_host[digest] = ([repository] + repos)[:self.MAX_REPOSITORIES]

    def save(self) -> None:
        """Merge what this run learnt into the file (best effort: a cache that cannot be written is
        only slower next time)."""
        if not self._new_layers and not self._new_blobs:
            return
        data = self._read()
        data["layers"].update(self._new_layers)
        for host, repository, digest in self._new_blobs:
            self._add_blob(data, host, repository, digest)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, data, durable=False)
        except OSError:
            return
        self._data = data
        self._new_layers, self._new_blobs = {}, []


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
        for m in layer.members:
            digest.update(m.header)
            content = hashlib.sha256()
            for view in _chunks(m.source, m.offset, m.size):
                job = pool.submit(content.update, view)
                digest.update(view)
                job.result()
            digest.update(bytes(-m.size % BLOCK))
            contents[m.path] = content.hexdigest()
    digest.update(bytes(END))
    return "sha256:" + digest.hexdigest(), contents


# -- push ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlobResult:
    what: str  # a member path, or "config"
    digest: str
    size: int
    status: str  # "pushed", "exists" (the registry had it), "mounted" (from another repository)


@dataclass(frozen=True)
class PushReport:
    reference: str  # oci://HOST/REPO:TAG@DIGEST
    digest: str
    manifest_id: str
    size: int  # of the config and layers
    status: str  # "pushed", "unchanged" (the registry held this image under this name), "tagged"
    blobs: tuple[BlobResult, ...] = ()

    @property
    def uploaded(self) -> int:
        return sum(b.size for b in self.blobs if b.status == "pushed")

    def to_dict(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "manifest_id": self.manifest_id,
                "size": self.size, "status": self.status, "uploaded": self.uploaded,
                "blobs": [{"what": b.what, "digest": b.digest, "size": b.size, "status": b.status} for b in self.blobs]}


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def _client(ref: Reference, client, plain_http: bool) -> RegistryClient:
    return client if client is not None else RegistryClient(ref.host, plain_http=plain_http)


def _encode(image: Image, digests: Sequence[str]) -> tuple[bytes, bytes]:
    infos = [LayerInfo(layer.kind, digest, layer.size, layer.path,
                       layer.members[0].sha256 if layer.kind == "checkpoint" else None)
             for layer, digest in zip(image.layers, digests)]
    config = encode_config(infos, image.manifest_id, image.platform)
    return config, encode_image_manifest(config, digest_of(config), infos, image.manifest_id, image.weights)


def push(image: Image, ref, *, plain_http: bool = False, mount_from: Sequence[str] = (), progress: bool = False,
         on_blob: BlobCallback | None = None, client: RegistryClient | None = None,
         digest_cache: DigestCache | None = None) -> PushReport:
    """Push ``image`` to ``ref`` (``oci://HOST/REPO[:TAG|@DIGEST]``), moving as few bytes as possible
    (see the module's docstring). ``on_blob`` is called as each blob is made sure of."""
    ref = _reference(ref)
    client = _client(ref, client, plain_http)
    known = digest_cache if digest_cache is not None else DigestCache()
    repo = ref.repository
    manifest_layer = image.layers[-1]
    digests: list[str | None] = [known.layer(layer) for layer in image.layers[:-1]]
    digests.append(hash_layer(manifest_layer)[0])  # small, in memory

    def report(status, digest, blobs=()) -> PushReport:
        return PushReport(str(ref.with_digest(digest)), digest, image.manifest_id,
                          image.size + len(_encode(image, digests)[0]), status, tuple(blobs))

    if None not in digests:  # the cheap case: is this very image there already?
        _config, manifest = _encode(image, digests)
        digest = _check_ref_digest(ref, digest_of(manifest))
        if client.manifest_digest(repo, digest) == digest:
            if ref.digest is not None or client.manifest_digest(repo, ref.reference) == digest:
                return report("unchanged", digest)
            client.put_manifest(repo, ref.reference, manifest, IMAGE_MANIFEST)
            return report("tagged", digest)
    results: list[BlobResult] = []
    bar = _bar(progress, image.size, f"push {repo}")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvpack-oci-layers")
    # layers not seen before are hashed in order on one thread while earlier ones upload
    futures = {i: pool.submit(hash_layer, layer) for i, layer in enumerate(image.layers) if digests[i] is None}
    try:
        for i, layer in enumerate(image.layers):
            if digests[i] is None:
                digest, contents = futures.pop(i).result()
                for m in layer.members:
                    if contents[m.path] != m.sha256:
                        raise BundleError(f"{m.path}: sha256 {contents[m.path][:12]}... does not match the "
                                          f"{m.sha256[:12]}... the bundle manifest states; refusing to push it")
                known.remember_layer(layer, digest)
                digests[i] = digest
            results.append(_ensure(client, ref, layer.path, layer.open, layer.size, digests[i], mount_from, known,
                                   bar, on_blob))
        config, manifest = _encode(image, digests)
        results.append(_ensure(client, ref, "config", config, len(config), digest_of(config), mount_from, known, bar,
                               on_blob))
        digest = _check_ref_digest(ref, digest_of(manifest))
        client.put_manifest(repo, ref.reference, manifest, IMAGE_MANIFEST)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        known.save()
        if bar is not None:
            bar.close()
    return report("pushed", digest, results)


def _ensure(client: RegistryClient, ref: Reference, what: str, source, size: int, digest: str,
            mount_from: Sequence[str], known: DigestCache, bar, on_blob) -> BlobResult:
    candidates = list(dict.fromkeys([*mount_from, *known.repositories(ref.host, digest)]))
    status = client.ensure_blob(ref.repository, source, size=size, digest=digest, mount_from=tuple(candidates),
                                on_bytes=bar.update if bar is not None else None)
    if bar is not None and status != "pushed":
        bar.update(size)
    known.remember_blob(ref.host, ref.repository, digest)
    result = BlobResult(what, digest, size, status)
    if on_blob is not None:
        on_blob(result)
    return result


def _check_ref_digest(ref: Reference, digest: str) -> str:
    if ref.digest is not None and ref.digest != digest:
        raise OCIError(f"{ref}: the image's digest is {digest}, not the one in the reference")
    return digest


def push_bundle(path, ref, *, platform: str = DEFAULT_PLATFORM, **options) -> PushReport:
    """:func:`push` of :func:`image_of_bundle`."""
    with image_of_bundle(path, platform=platform) as image:
        return push(image, ref, **options)


# -- reading an image ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteImage:
    """An image in a registry, its manifest layer read and everything cross-checked: the image manifest,
    the tar of the manifest layer, the bundle manifest and the layer annotations agree."""

    reference: Reference  # with the manifest's digest
    info: ImageInfo
    inline: dict  # the manifest layer's members: path -> data
    mtime: int  # of the manifest member (tvpack writes one mtime for every member)
    expected: dict  # path -> (size, sha256 hex) of every member but the bundle manifest
    layers: dict  # checkpoint path -> LayerInfo

    @property
    def order(self) -> list[str]:
        return bundle_order([*self.inline, *self.layers])

    def size_of(self, path: str) -> int:
        return len(self.inline[path]) if path in self.inline else self.expected[path][0]


def _accept() -> tuple[str, ...]:
    # every manifest kind, so that a docker image or an index is named as such rather than "not found"
    return IMAGE_MANIFEST, IMAGE_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST


def read_image(ref, *, client: RegistryClient | None = None, plain_http: bool = False) -> RemoteImage:
    """Fetch and check an image manifest and its manifest layer (nothing else)."""
    ref = _reference(ref)
    client = _client(ref, client, plain_http)
    fetched = client.get_manifest(ref.repository, ref.reference, _accept())
    where = str(ref)
    info = parse_image_manifest(fetched.data, fetched.media_type, where)
    layer = info.manifest_layer
    data = bytearray()
    client.stream_blob(ref.repository, layer.digest, data.extend, size=layer.size)
    inline, mtime = _parse_manifest_layer(bytes(data), layer, where)

    def refuse(why: str):
        raise OCIError(f"{where}: the image is not a consistent tvpack bundle: {why}")

    try:
        _entries, expected = parse_manifest(decode_manifest(inline[layer.path]), f"{where}:{layer.path}")
    except BundleError as exc:
        refuse(exc.message)
    others = {path: value for path, value in inline.items() if path != layer.path}
    layers = {info_layer.path: info_layer for info_layer in info.checkpoint_layers}
    listed = {p for p in expected if is_checkpoint_path(p)}
    if listed != set(layers):
        missing, extra = sorted(listed - set(layers)), sorted(set(layers) - listed)
        refuse(f"checkpoints without a layer: {', '.join(missing)}" if missing
               else f"layers the manifest does not list: {', '.join(extra)}")
    for path, info_layer in layers.items():
        size, sha = expected[path]
        if info_layer.sha256 != sha:
            refuse(f"the layer of {path} is annotated sha256 {info_layer.sha256[:12]}..., the manifest says {sha[:12]}...")
        if info_layer.size != layer_size([(path, size)]):
            refuse(f"the layer of {path} is {info_layer.size} bytes; a layer of a {size}-byte file is "
                   f"{layer_size([(path, size)])}")
    for path, value in others.items():
        if is_checkpoint_path(path):
            refuse(f"the manifest layer holds a checkpoint ({path})")
        if path in expected and expected[path] != (len(value), hashlib.sha256(value).hexdigest()):
            refuse(f"{path} does not match the manifest's size and sha256")
    for path in expected:
        if path not in layers and path not in inline:
            refuse(f"the manifest lists {path}, which no layer holds")
    # members the manifest does not list (signatures over it): whether they may be there is the bundle reader's call
    expected = {**expected, **{p: (len(v), hashlib.sha256(v).hexdigest()) for p, v in others.items() if p not in expected}}
    return RemoteImage(ref.with_digest(fetched.digest), info, inline, mtime, expected, layers)


def _parse_manifest_layer(data: bytes, layer: LayerInfo, where: str) -> tuple[dict[str, bytes], int]:
    """The members of the manifest layer (manifest first), each header as tvpack writes it."""
    try:
        archive = TarArchive(_BytesSource(data, f"{where} manifest layer"))
    except BundleError as exc:
        raise OCIError(f"{where}: not a tvpack layer: {exc.message}") from None
    members = archive.members
    if not members or members[0].path != layer.path:
        raise OCIError(f"{where}: not a tvpack layer: the manifest layer does not start with {layer.path}")
    if len(data) != layer_size((m.path, m.size) for m in members):
        raise OCIError(f"{where}: not a tvpack layer: the manifest layer does not end as tvpack writes layers")
    inline, end, mtime = {}, 0, None
    for m in members:
        header_mtime = check_header(data[end:m.offset], m.path, m.size, where)
        mtime = header_mtime if mtime is None else mtime
        inline[m.path] = data[m.offset:m.offset + m.size]
        end = m.offset + round_up(m.size)
    if manifest_path_for(inline[layer.path]) != layer.path:
        raise OCIError(f"{where}: the bundle manifest does not match its id (it was altered)")
    return inline, mtime


# -- pull ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PullReport:
    reference: str
    digest: str
    path: Path
    manifest_id: str
    size: int
    weights: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "path": str(self.path),
                "manifest_id": self.manifest_id, "size": self.size, "weights": list(self.weights)}


class _LayerWriter:
    """Takes one checkpoint layer's bytes in order (on the transport's worker thread, after they were
    hashed for the digest) and writes the member they hold (header, data, padding) at ``offset`` of
    ``fd``, checking on the way that the tar around the data is exactly what tvpack writes; the data's
    sha256 is computed on one more thread."""

    def __init__(self, fd: int, offset: int, path: str, size: int, where: str):
        self.fd, self.offset, self.path, self.size, self.where = fd, offset, path, size, where
        self.header_len = len(tar_header(path, size, 0))
        self.data_end = self.header_len + size
        self.member_end = self.header_len + round_up(size)
        self.total = self.member_end + END
        self.pos = 0
        self.head = bytearray()
        self.content = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvpack-oci-sha")
        self._jobs: deque = deque()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        start, end = self.pos, self.pos + len(view)
        if end > self.total:
            raise OCIError(f"{self.where}: the layer of {self.path} is longer than a tar of it")
        if start < self.header_len:
            self.head += view[:self.header_len - start]
            if len(self.head) == self.header_len:
                check_header(bytes(self.head), self.path, self.size, self.where)
        lo, hi = max(start, self.header_len), min(end, self.data_end)
        if lo < hi:  # bytes objects are immutable: the slice may be hashed on another thread
            while len(self._jobs) >= 4:
                self._jobs.popleft().result()
            self._jobs.append(self._pool.submit(self.content.update, view[lo - start:hi - start]))
        lo = max(start, self.data_end)
        if lo < end and view[lo - start:].tobytes().count(0) != end - lo:
            raise OCIError(f"{self.where}: not a tvpack layer: non-zero bytes after {self.path} in its layer")
        hi = min(end, self.member_end)
        written = 0
        while start + written < hi:
            written += os.pwrite(self.fd, view[written:hi - start], self.offset + start + written)
        self.pos = end

    def finish(self) -> str:
        """The data's sha256 (hex), once every byte of the layer arrived."""
        self.close()
        if self.pos != self.total:
            raise OCIError(f"{self.where}: the layer of {self.path} ended early")
        return self.content.hexdigest()

    def close(self) -> None:
        try:
            while self._jobs:
                self._jobs.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def pull(ref, output, *, plain_http: bool = False, progress: bool = False,
         client: RegistryClient | None = None) -> PullReport:
    """Write the bundle an image holds to ``output`` (a temp file beside it, renamed when complete and
    checked): byte for byte the bundle that was pushed. Every layer is checked as it streams in (its
    digest, its tar, the checkpoint's sha256 against the bundle manifest); nothing is left on failure.

    An interrupted pull (Ctrl-C, SIGTERM) keeps its temp file; the next pull of the same image to the same
    ``output`` takes it over and fetches only the layers whose checkpoint is not already there in full
    (each one re-hashed and compared with the bundle manifest before it counts)."""
    ref = _reference(ref)
    client = _client(ref, client, plain_http)
    image = read_image(ref, client=client)
    where = str(image.reference)
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {output.parent}: {exc.strerror or exc}") from None
    suffix = f".{image.reference.digest.split(':')[1][:16]}{PULL_SUFFIX}"
    tmp = _adopt_pull(output, suffix)
    adopted = tmp is not None
    tmp = tmp if adopted else temp_path(output, suffix)
    total = bundle_size((p, image.size_of(p)) for p in image.order)
    with reserve_space(tmp, total - (_size_of(tmp) if adopted else 0)):  # refused before the first request
        pass
    bar = _bar(progress, sum(layer.size for layer in image.layers.values()), f"pull {output.name}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | (0 if adopted else os.O_EXCL), 0o644)
        try:
            offset = 0
            for path in image.order:
                size = image.size_of(path)
                if path in image.inline:
                    data = image.inline[path]
                    _write_at(fd, tar_header(path, size, image.mtime) + data + bytes(-size % BLOCK), offset)
                elif adopted and _holds_member(fd, offset, path, size, image):
                    if bar is not None:
                        bar.update(image.layers[path].size)
                else:
                    layer = image.layers[path]
                    writer = _LayerWriter(fd, offset, path, size, where)
                    try:
                        client.stream_blob(ref.repository, layer.digest, writer.write, size=layer.size,
                                           on_bytes=bar.update if bar is not None else None)
                    finally:
                        writer.close()
                    sha = writer.finish()
                    if sha != layer.sha256:
                        raise OCIError(f"{where}: {path} refused: its sha256 is {sha}, the bundle manifest says "
                                       f"{layer.sha256}")
                offset += member_span(path, size)
            _write_at(fd, bytes(total - offset), offset)
            os.ftruncate(fd, total)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with bundles.open_bundle(tmp) as opened:  # the bundle reader's own checks, as for any file
                weights = tuple(e.name for e in opened.entries)
        except BundleError as exc:
            raise OCIError(f"{where}: the image does not make a valid bundle: {exc.message}") from None
        os.replace(tmp, output)
    except OSError as exc:
        _unlink(tmp)
        raise _write_error(exc, output.parent) from None
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: what arrived is kept for the next pull of this image
        if _size_of(tmp):
            print(f"tvpack: kept {human_bytes(_size_of(tmp))} in {tmp}: pulling {where} to {output} again "
                  "continues from there", file=sys.stderr, flush=True)
        else:
            _unlink(tmp)
        raise
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    return PullReport(where, image.reference.digest, output, image.info.manifest_id, total, weights)


PULL_SUFFIX = ".tvpack-pull"


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _adopt_pull(output: Path, suffix: str) -> Path | None:
    """The temp file of an interrupted pull of the same image to ``output``, renamed to this process's own
    temp name (one adopter wins); temp files of other images' interrupted pulls to ``output`` are removed.
    Only a file whose owner is gone (or is this process) is taken: pulls write the same bytes at the same
    offsets, so even a mistaken take-over could not mix two bundles."""
    prefix = f".{short_name(output.name)}."
    try:
        names = sorted(os.listdir(output.parent))
    except OSError:
        return None
    found = None
    for name in names:
        if not (name.startswith(prefix) and name.endswith(PULL_SUFFIX)):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and pid_alive(int(pid))):
            continue
        old = output.parent / name
        if not name.endswith(suffix):
            _unlink(old)  # another image's: of no use to this pull
        elif found is None:
            mine = temp_path(output, suffix)
            try:
                os.rename(old, mine)
                found = mine
            except OSError:
                continue
    return found


def _holds_member(fd: int, offset: int, path: str, size: int, image: RemoteImage) -> bool:
    """Whether an adopted temp file already holds this checkpoint's member in full: the exact header, and data
    whose sha256 is the one the bundle manifest states (its padding is zeros: written so, or a hole)."""
    header = tar_header(path, size, image.mtime)
    if os.pread(fd, len(header), offset) != header:
        return False
    hasher = hashlib.sha256()
    pos, end = offset + len(header), offset + len(header) + size
    while pos < end:
        chunk = os.pread(fd, min(8 << 20, end - pos), pos)
        if not chunk:
            return False
        hasher.update(chunk)
        pos += len(chunk)
    return hasher.hexdigest() == image.layers[path].sha256


def _write_error(exc: OSError, where: Path) -> CacheError:
    if exc.errno == errno.ENOSPC:
        return CacheError(f"disk full while writing to {where} (nothing was kept)")
    return CacheError(f"cannot write to {where}: {exc.strerror or exc}")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


# -- inspect and install ------------------------------------------------------------------------------
def _pieces(image: RemoteImage, data_of: Callable[[str, int], object]) -> list[tuple[int, object]]:
    """The pieces of the bundle an image holds; ``data_of(path, size)`` gives each checkpoint's data."""
    pieces: list[tuple[int, object]] = []
    for path in image.order:
        size = image.size_of(path)
        data = image.inline[path] if path in image.inline else data_of(path, size)
        header = tar_header(path, size, image.mtime)
        pieces += [(len(header), header), (size, data), (-size % BLOCK, bytes(-size % BLOCK))]
    end = sum(length for length, _ in pieces) + END
    return pieces + [(END + (-end % RECORD), bytes(END + (-end % RECORD)))]


def open_image(ref, *, plain_http: bool = False, client: RegistryClient | None = None) -> "bundles.Bundle":
    """The bundle an image holds, opened without fetching a checkpoint (only the image manifest and the
    manifest layer): entries, manifest, sizes; reading a checkpoint is an :class:`OCIError`."""
    image = read_image(ref, client=client, plain_http=plain_http)
    return bundles.open_bundle(ImageSource(str(image.reference), _pieces(image, lambda path, size: None)))


class _LazyLayer:
    """A checkpoint's data in a layer fetched on the first read (install_bundle reads the data of what
    it installs, and refuses a conflict before reading anything); one fetch at a time, as the
    registry client serves one thread."""

    def __init__(self, fetch: Callable[[], tuple[FileSource, int]], lock: threading.Lock):
        self._fetch, self._lock = fetch, lock
        self._source: FileSource | None = None
        self._base = 0

    def readinto_at(self, view, offset: int) -> int:
        if self._source is None:
            with self._lock:
                if self._source is None:
                    self._source, self._base = self._fetch()
        return self._source.readinto_at(view, self._base + offset)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()


@contextlib.contextmanager
def _fetching(image: RemoteImage, client: RegistryClient, hub: Path | None, progress: bool, *,
              staging_hub: Path | None = None):
    """An :class:`ImageSource` over ``image``: a checkpoint already under ``hub`` with the right sha256 is read
    where it is; any other layer is fetched when first read (digest-checked, resumable), its tar checked around
    the data, into this run's private staging directory under ``staging_hub`` (default ``hub``; see
    :func:`packager.cache.staging`). Staged layers are removed at the end (kept after an interrupt, for the
    next run on the image to continue)."""
    staging_hub = staging_hub if staging_hub is not None else hub
    with cache.staging(staging_hub, image.reference.digest.split(":")[1],
                       notify=lambda message: print(f"tvpack: {message}", file=sys.stderr, flush=True)) as staging:
        with _fetching_into(image, client, staging, hub, progress) as source:
            yield source


@contextlib.contextmanager
def _fetching_into(image: RemoteImage, client: RegistryClient, staging: Path, hub: Path | None, progress: bool):
    owned: list = []
    staged: list[Path] = []
    lock = threading.Lock()
    bar = _bar(progress, sum(layer.size for layer in image.layers.values()), f"fetch {image.reference.repository}")
    where = str(image.reference)
    cancel = Cancel()  # layers are fetched on the reader's worker threads: Ctrl-C reaches them through this

    def fetch(path: str, size: int, layer: LayerInfo) -> tuple[FileSource, int]:
        blob = staging / f"{layer.digest.split(':')[1]}.tar"
        part = blob.with_name(blob.name + ".part")
        staged.extend((blob, part))
        if blob.is_file():  # kept by an interrupted run: pull_blob checks a complete part before a request
            os.replace(blob, part)
        try:
            client.pull_blob(image.reference.repository, layer.digest, blob, size=layer.size, part=part,
                             on_bytes=bar.update if bar is not None else None, cancel=cancel)
        except OSError as exc:  # writing the staged layer (reading the registry raises OCIError)
            _unlink(part)
            raise _write_error(exc, staging) from None
        source = FileSource(blob)
        owned.append(source)
        header_len = len(tar_header(path, size, 0))
        check_header(source.read_at(header_len, 0), path, size, where)
        tail = source.read_at(layer.size - header_len - size, header_len + size)
        if tail.count(0) != len(tail):
            raise OCIError(f"{where}: not a tvpack layer: non-zero bytes after {path} in its layer")
        return source, header_len

    def data_of(path: str, size: int):
        layer = image.layers[path]
        dest = hub.joinpath(*path.split("/")[1:]) if hub is not None else None
        if dest is not None and dest.is_file() and not dest.is_symlink() \
                and cache.file_sha256(dest) == image.expected[path][1]:
            if bar is not None:
                bar.update(layer.size)
            source = FileSource(dest)  # already there: install_bundle finds it unchanged
        else:
            source = _LazyLayer(functools.partial(fetch, path, size, layer), lock)
            to_fetch.append(layer.size)
        owned.append(source)
        return source, 0

    to_fetch: list[int] = []
    keep = False
    try:
        with cancelled_by_interrupt(cancel), ImageSource(where, _pieces(image, data_of)) as source, \
                reserve_space(staging / "layer", sum(to_fetch)):
            yield source
    except KeyboardInterrupt:
        keep = True
        raise
    finally:
        if bar is not None:
            bar.close()
        for source in owned:
            source.close()
        if not keep:
            for blob in staged:
                _unlink(blob)
            _rmdir_quietly(staging)  # empty unless an adopted run left layers of no use now: prune takes those


def install(ref, *, trust=None, torch_home=None, force: bool = False, plain_http: bool = False,
            progress: bool = False, client: RegistryClient | None = None,
            release=None) -> "signing.SignedInstallReport":
    """Install the bundle an image holds into ``<hub dir>/checkpoints``, as
    :func:`packager.signing.install_signed` installs a bundle file (the signature checks of ``trust``,
    then :func:`packager.bundle.install_bundle`: its decisions, checks and placement), over the image's
    layers: a checkpoint the cache already holds with the right sha256 is not fetched; any other layer is
    fetched when install_bundle first reads it (after the signature checks; a conflict it refuses costs no
    transfer), into this run's staging directory (:func:`packager.cache.staging`); a second install of the same
    image waits for the first and then finds its files in place."""
    ref = _reference(ref)
    client = _client(ref, client, plain_http)
    image = read_image(ref, client=client)
    hub = hub_dir(torch_home)
    with _fetching(image, client, hub, progress) as source:
        return signing.install_signed(source, trust if trust is not None else signing.NO_TRUST_POLICY,
                                      torch_home=torch_home, force=force, progress=progress, release=release)


def verify(ref, *, trust=None, plain_http: bool = False, progress: bool = False,
           client: RegistryClient | None = None) -> "signing.SignedVerifyReport":
    """:func:`packager.signing.verify_signed` of the bundle an image holds (signatures, structure, every
    sha256, the weights-only pickle check), its layers fetched into a temporary directory of tvpack's
    cache and removed afterwards."""
    ref = _reference(ref)
    client = _client(ref, client, plain_http)
    image = read_image(ref, client=client)
    with _fetching(image, client, None, progress, staging_hub=tvpack_cache_dir() / "oci-verify") as source:
        return signing.verify_signed(source, trust if trust is not None else signing.NO_TRUST_POLICY, progress=progress)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


__all__ = [
    "BlobResult", "DigestCache", "Image", "ImageMember", "ImageSource", "Layer", "PullReport", "PushReport",
    "RemoteImage", "hash_layer", "image_of_bundle", "image_of_plan", "install", "is_oci_reference", "open_image",
    "pull", "push", "push_bundle", "read_image", "verify",
]
