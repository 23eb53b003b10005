"""An image in a registry: references, the client, and the image manifest and manifest layer read and
cross-checked (:func:`read_image`); what pull, inspect and install start from."""
from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import BundleError, OCIError
from ..formats.archive import TarArchive
from ..formats.image import (
    IMAGE_INDEX,
    IMAGE_MANIFEST,
    MAX_MANIFEST_LAYER,
    ImageInfo,
    LayerInfo,
    bundle_order,
    check_header,
    layer_layout,
    layer_size,
    parse_image_manifest,
)
from ..formats.manifest import decode_manifest, is_checkpoint_path, manifest_path_for, parse_manifest
from ..formats.modelpack import is_modelpack, parse_config
from ..formats.modelpack import parse_manifest as parse_modelpack
from ..report import SILENT, Reporter
from ..transport.oci import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Reference, RegistryClient, parse_reference
from ..transport.oci.mirrors import MirroredClient, mirrored_client, push_target
from ..transport.stream import cancelled_by_interrupt
from .attached import attached_signatures
from .image import BytesSource


def is_oci_reference(text) -> bool:
    return isinstance(text, str) and text.startswith("oci://")


def as_reference(ref) -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(str(ref))


def progress_bar(reporter: Reporter, total: int, desc: str):
    """A byte counter from ``reporter`` (:mod:`packager.report`); never None."""
    return reporter.progress(total, desc)


def client_for(ref: Reference, client, plain_http: bool, reporter: Reporter = SILENT) -> RegistryClient | MirroredClient:
    """The client to read ``ref`` with: through the mirrors registries.conf names for it, else ``ref``'s host.
    A client made here tells its notices (retries, mirrors skipped) to ``reporter``."""
    if isinstance(client, MirroredClient):
        return client
    return mirrored_client(ref, client if client is not None else
                           RegistryClient(ref.host, plain_http=plain_http, notify=reporter.notice))


def push_client_for(ref: Reference, client, plain_http: bool,
                    reporter: Reporter = SILENT) -> tuple[Reference, RegistryClient]:
    """Where to push ``ref``: registries.conf's location for it (never a mirror), and the client for it."""
    return push_target(ref, client if client is not None else
                       RegistryClient(ref.host, plain_http=plain_http, notify=reporter.notice))


def stream_blob(client, repository: str, digest: str, write, *, restart, **kwargs) -> None:
    """``client.stream_blob``; through mirrors, ``restart()`` resets the sink before another endpoint is tried."""
    if isinstance(client, MirroredClient):
        client.stream_blob(repository, digest, write, restart=restart, **kwargs)
    else:
        client.stream_blob(repository, digest, write, **kwargs)


# -- layers in parallel -------------------------------------------------------------------------------
def each_layer(items: Sequence, work: Callable[[object, object], None], client, jobs: int) -> None:
    """``work(item, client)`` for each of ``items`` (layers), up to ``jobs`` at once: how pull and install fetch
    the layers of an image. Each worker thread gets a client of its own (a client is not thread-safe) sharing the
    client's :class:`~packager.transport.Cancel`: Ctrl-C (or SIGTERM) stops every transfer, and the first failure
    cancels the others and is the one raised. Through mirrors (registries.conf) too: the workers share which
    mirrors were given up on, so each is skipped once, with one notice. A caller's own client class is used as
    it is, one layer at a time."""
    if len(items) <= 1 or jobs <= 1 or type(client) not in (RegistryClient, MirroredClient):
        for item in items:
            work(item, client)
        return
    cancel = client.cancel
    local = threading.local()

    def one(item) -> None:
        if not hasattr(local, "client"):
            local.client = client.sibling()
        work(item, local.client)

    with cancelled_by_interrupt(cancel), ThreadPoolExecutor(max_workers=jobs,
                                                            thread_name_prefix="tvpack-oci-layer") as pool:
        futures = [pool.submit(one, item) for item in items]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            cancel.cancel()  # the others stop at their next read; the pool waits for them before this unwinds
            raise


def locked(call: Callable[[int], object] | None) -> Callable[[int], None] | None:
    """``call`` (a progress bar's update) made safe to call from several threads."""
    if call is None:
        return None
    lock = threading.Lock()

    def update(n: int) -> None:
        with lock:
            call(n)
    return update


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
    raw: bool = False  # a ModelPack artifact: each checkpoint layer is the file itself, not a tar of it

    @property
    def order(self) -> list[str]:
        return bundle_order([*self.inline, *self.layers])

    def size_of(self, path: str) -> int:
        return len(self.inline[path]) if path in self.inline else self.expected[path][0]


def _accept() -> tuple[str, ...]:
    # every manifest kind, so that a docker image or an index is named as such rather than "not found"
    return IMAGE_MANIFEST, IMAGE_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST


def read_image(ref, *, client: RegistryClient | None = None, plain_http: bool = False) -> RemoteImage:
    """Fetch and check an image manifest and its manifest layer, or a ModelPack artifact's manifest, config,
    bundle manifest and signatures (nothing else: no checkpoint)."""
    ref = as_reference(ref)
    client = client_for(ref, client, plain_http)
    fetched = client.get_manifest(ref.repository, ref.reference, _accept())
    where = str(ref)
    if _is_modelpack(fetched.data):
        return _read_modelpack(ref, client, fetched, where)
    info = parse_image_manifest(fetched.data, fetched.media_type, where)
    layer = info.manifest_layer
    data = _blob(client, ref, layer.digest, layer.size)
    inline, mtime = _parse_manifest_layer(data, layer, where)
    _attach(client, ref, fetched.digest, info.manifest_id, inline, where)
    return _checked(ref.with_digest(fetched.digest), info, inline, mtime, where)


def _attach(client, ref: Reference, digest: str, manifest_id: str, inline: dict, where: str) -> None:
    """Signatures attached to the image as referrers join the bundle's own (a name the bundle has wins)."""
    for path, data in attached_signatures(client, ref.repository, digest, manifest_id, where):
        inline.setdefault(path, data)


def _blob(client, ref: Reference, digest: str, size: int) -> bytes:
    data = bytearray()
    stream_blob(client, ref.repository, digest, data.extend, restart=data.clear, size=size)
    return bytes(data)


def _is_modelpack(data: bytes) -> bool:
    try:
        return is_modelpack(json.loads(data))
    except ValueError:
        return False


def _read_modelpack(ref: Reference, client, fetched, where: str) -> RemoteImage:
    """A ModelPack artifact of a bundle: its config checked, the bundle manifest and the other members read
    (each a small raw layer), checkpoints left in their layers."""
    info = parse_modelpack(fetched.data, fetched.media_type, where)
    parse_config(_blob(client, ref, info.config_digest, info.config_size), info, f"{where} config")
    small = (info.manifest_file, *info.member_files)
    if sum(f.size for f in small) > MAX_MANIFEST_LAYER:
        raise OCIError(f"{where}: not a tvpack ModelPack artifact (its manifest and signatures are too large)")
    inline = {f.path: _blob(client, ref, f.digest, f.size) for f in small}
    if len({f.mtime for f in info.files}) != 1:
        raise OCIError(f"{where}: not a tvpack ModelPack artifact (its files have different mtimes)")
    manifest = info.manifest_file
    if manifest_path_for(inline[manifest.path]) != manifest.path:
        raise OCIError(f"{where}: the bundle manifest does not match its id (it was altered)")
    _attach(client, ref, fetched.digest, info.manifest_id, inline, where)
    layers = tuple(LayerInfo("checkpoint", f.digest, f.size, f.path, f.sha256) for f in info.weight_files)
    image_info = ImageInfo(info.manifest_id, info.weights, info.config_digest, info.config_size,
                           layers + (LayerInfo("manifest", manifest.digest, manifest.size, manifest.path),))
    return _checked(ref.with_digest(fetched.digest), image_info, inline, manifest.mtime, where, raw=True)


def _checked(ref: Reference, info: ImageInfo, inline: dict, mtime: int, where: str, raw: bool = False) -> RemoteImage:
    """The image manifest, the bundle manifest and the members read agree (or a one-line OCIError)."""
    layer = info.manifest_layer

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
        want = size if raw else layer_size([(path, size)])
        if info_layer.size != want:
            refuse(f"the layer of {path} is {info_layer.size} bytes; a layer of a {size}-byte file is {want}")
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
    return RemoteImage(ref, info, inline, mtime, expected, layers, raw)


def _parse_manifest_layer(data: bytes, layer: LayerInfo, where: str) -> tuple[dict[str, bytes], int]:
    """The members of the manifest layer (manifest first), each header as tvpack writes it."""
    try:
        archive = TarArchive(BytesSource(data, f"{where} manifest layer"))
    except BundleError as exc:
        raise OCIError(f"{where}: not a tvpack layer: {exc.message}") from None
    members = archive.members
    if not members or members[0].path != layer.path:
        raise OCIError(f"{where}: not a tvpack layer: the manifest layer does not start with {layer.path}")
    layout = layer_layout((m.path, m.size) for m in members)
    if len(data) != layout.size:
        raise OCIError(f"{where}: not a tvpack layer: the manifest layer does not end as tvpack writes layers")
    inline, mtime = {}, None
    for span, m in zip(layout, members):
        header_mtime = check_header(data[span.offset:m.offset], m.path, m.size, where)
        mtime = header_mtime if mtime is None else mtime
        inline[m.path] = data[m.offset:m.offset + m.size]
    if manifest_path_for(inline[layer.path]) != layer.path:
        raise OCIError(f"{where}: the bundle manifest does not match its id (it was altered)")
    return inline, mtime


__all__ = ["RemoteImage", "as_reference", "client_for", "each_layer", "is_oci_reference", "locked", "progress_bar",
           "push_client_for", "read_image", "stream_blob"]
