"""Push an image, moving as few bytes as possible (see :mod:`packager.oci`)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import BundleError, OCIError
from ..formats.image import DEFAULT_PLATFORM, IMAGE_MANIFEST, LayerInfo, encode_config, encode_image_manifest
from ..transport.oci import Reference, RegistryClient, digest_of
from .digests import DigestCache
from .image import Image, hash_layer, image_of_bundle
from .remote import as_reference, progress_bar, push_client_for

BlobCallback = Callable[["BlobResult"], None]


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
    ref, client = push_client_for(as_reference(ref), client, plain_http)
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
    bar = progress_bar(progress, image.size, f"push {repo}")
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


__all__ = ["BlobResult", "PushReport", "push", "push_bundle"]
