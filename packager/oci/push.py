"""Push an image, moving as few bytes as possible (see :mod:`packager.oci`)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import BundleError, OCIError, SignatureError, UsageError
from ..formats import modelpack
from ..formats.archive import MemberFile
from ..formats.image import DEFAULT_PLATFORM, IMAGE_MANIFEST, LayerInfo, canonical_json, encode_config, encode_image_manifest
from ..formats.manifest import decode_manifest, parse_manifest
from ..report import Reporter, reporter_for
from ..transport.oci import OCI_INDEX, Reference, RegistryClient, digest_of
from ..transport.oci.referrers import referrers, referrers_tag, tag_index
from .attached import A_PATH, EMPTY, SIGSTORE_BUNDLE, artifact_manifest
from .digests import DigestCache
from .image import Image, ImageMember, Layer, hash_layer, image_of_bundle
from .remote import as_reference, progress_bar, push_client_for, read_image

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
         digest_cache: DigestCache | None = None, reporter: Reporter | None = None) -> PushReport:
    """Push ``image`` to ``ref`` (``oci://HOST/REPO[:TAG|@DIGEST]``), moving as few bytes as possible
    (see the module's docstring). ``on_blob`` is called as each blob is made sure of; progress and notices go to
    ``reporter`` (:mod:`packager.report`; ``progress=True``: bars on stderr)."""
    reporter = reporter_for(reporter, progress)
    ref, client = push_client_for(as_reference(ref), client, plain_http, reporter)
    known = digest_cache if digest_cache is not None else DigestCache()
    # 1. every layer's digest: remembered (a hint, checked against the registry before it counts) or, for the
    # manifest layer (small, in memory), computed now
    digests: list[str | None] = [known.layer(layer) for layer in image.layers[:-1]]
    digests.append(hash_layer(image.layers[-1])[0])

    def report(status, digest, blobs=()) -> PushReport:
        return PushReport(str(ref.with_digest(digest)), digest, image.manifest_id,
                          image.size + len(_encode(image, digests)[0]), status, tuple(blobs))

    # 2. the cheap case: is this very image there already, under this name?
    if None not in digests:
        status, digest = _already_there(client, ref, *_encode(image, digests))
        if status is not None:
            return report(status, digest)
    # 3. each blob made sure of, then the manifest
    bar = progress_bar(reporter, image.size, f"push {ref.repository}")
    try:
        results = _push_layers(client, ref, image, digests, mount_from, known, bar, on_blob)
        config, manifest = _encode(image, digests)
        results.append(_ensure(client, ref, "config", config, len(config), digest_of(config), mount_from, known, bar,
                               on_blob))
        digest = _check_ref_digest(ref, digest_of(manifest))
        client.put_manifest(ref.repository, ref.reference, manifest, IMAGE_MANIFEST)
    finally:
        known.save()
        bar.close()
    return report("pushed", digest, results)


def _already_there(client: RegistryClient, ref: Reference, config: bytes, manifest: bytes) -> tuple[str | None, str]:
    """("unchanged", digest) when ``ref`` names this manifest already, ("tagged", digest) once it does (the registry
    held it under another name), else (None, digest). The first question is about the name the user gave, so a
    registry that cannot be reached is named as the user named it."""
    digest = _check_ref_digest(ref, digest_of(manifest))
    if client.manifest_digest(ref.repository, ref.reference) == digest:
        return "unchanged", digest
    if ref.digest is None and client.manifest_digest(ref.repository, digest) == digest:
        client.put_manifest(ref.repository, ref.reference, manifest, IMAGE_MANIFEST)
        return "tagged", digest
    return None, digest


def _push_layers(client: RegistryClient, ref: Reference, image: Image, digests: list[str | None],
                 mount_from: Sequence[str], known: DigestCache, bar, on_blob) -> list[BlobResult]:
    """Each layer made sure of, in order; ``digests`` filled in. Layers without a digest are hashed in order on one
    thread while earlier ones go up; a remembered digest the registry does not confirm is forgotten and its layer
    hashed then."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvpack-oci-layers")
    futures = {i: pool.submit(hash_layer, layer) for i, layer in enumerate(image.layers) if digests[i] is None}
    results: list[BlobResult] = []
    try:
        for i, layer in enumerate(image.layers):
            if i not in futures:  # remembered (checkpoint layers) or computed above (the manifest layer)
                trusted = i == len(image.layers) - 1
                result = _ensure(client, ref, layer.path, layer.open, layer.size, digests[i], mount_from, known,
                                 bar, on_blob, trusted=trusted)
                if result is not None:
                    results.append(result)
                    continue
                known.forget_layer(layer)
                futures[i] = pool.submit(hash_layer, layer)
            digests[i] = _hashed(layer, futures.pop(i).result(), known)
            results.append(_ensure(client, ref, layer.path, layer.open, layer.size, digests[i], mount_from, known,
                                   bar, on_blob))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _hashed(layer: Layer, hashed: tuple[str, dict[str, str]], known: DigestCache) -> str:
    """The layer's digest once its members' sha256 are the bundle manifest's (then remembered)."""
    digest, contents = hashed
    for m in layer.members:
        if contents[m.path] != m.sha256:
            raise BundleError(f"{m.path}: sha256 {contents[m.path][:12]}... does not match the "
                              f"{m.sha256[:12]}... the bundle manifest states; refusing to push it")
    if layer.kind == "checkpoint":
        known.remember_layer(layer, digest)
    return digest


def _ensure(client: RegistryClient, ref: Reference, what: str, source, size: int, digest: str,
            mount_from: Sequence[str], known: DigestCache, bar, on_blob, *, trusted: bool = True) -> BlobResult | None:
    """Make sure the repository holds blob ``digest``: it has it (HEAD), a mount from another repository gives it,
    or it is uploaded. ``trusted``: the digest was computed from the bytes in this run. A digest that was not (a
    remembered one) counts only for a blob the registry answers for with exactly ``size`` bytes, and is never
    uploaded under: None then, for the caller to hash the layer."""
    repo = ref.repository
    status = None
    found = client.blob_exists(repo, digest, for_push=True)
    if found is not None and (trusted or found == size):
        status = "exists"
    elif found is None:
        for other in dict.fromkeys([*mount_from, *known.repositories(ref.host, digest)]):
            if other != repo and client.mount_blob(repo, digest, other):
                if trusted or client.blob_exists(repo, digest) == size:
                    status = "mounted"
                break
        if status is None and trusted:
            client.push_blob(repo, source, size=size, digest=digest, on_bytes=bar.update if bar is not None else None)
            status = "pushed"
    if status is None:
        return None
    if bar is not None and status != "pushed":
        bar.update(size)
    known.remember_blob(ref.host, repo, digest)
    result = BlobResult(what, digest, size, status)
    if on_blob is not None:
        on_blob(result)
    return result


def _check_ref_digest(ref: Reference, digest: str) -> str:
    if ref.digest is not None and ref.digest != digest:
        raise OCIError(f"{ref}: the image's digest is {digest}, not the one in the reference")
    return digest


# -- CNCF ModelPack ------------------------------------------------------------------------------------
FORMATS = ("image", "modelpack")


def _modelpack_files(image: Image) -> list[tuple[modelpack.ModelFile, ImageMember]]:
    """Each member of the image as a ModelPack file: checkpoints (whose digest is their own sha256: no
    hashing pass), the bundle manifest, the other members."""
    out = []
    for layer in image.layers:
        for n, m in enumerate(layer.members):
            kind = "weight" if layer.kind == "checkpoint" else ("manifest" if n == 0 else "member")
            out.append((modelpack.ModelFile(kind, "sha256:" + m.sha256, m.size, m.path, m.mtime), m))
    return out


def _modelpack_config(image: Image, files: Sequence[modelpack.ModelFile]) -> bytes:
    manifest = next(m for layer in image.layers if layer.kind == "manifest" for m in layer.members[:1])
    entries, _ = parse_manifest(decode_manifest(MemberFile(manifest.source, manifest.offset, manifest.size).read()))
    params = entries[0].meta.get("num_params") if len(entries) == 1 else None
    name = image.weights[0] if len(image.weights) == 1 else f"tvpack-{image.manifest_id}"
    return modelpack.encode_config(files, name=name, description=", ".join(image.weights), created=manifest.mtime,
                                   params=params if type(params) is int else None)


def push_modelpack(image: Image, ref, *, plain_http: bool = False, mount_from: Sequence[str] = (),
                   progress: bool = False, on_blob: BlobCallback | None = None, client: RegistryClient | None = None,
                   digest_cache: DigestCache | None = None, reporter: Reporter | None = None) -> PushReport:
    """Push ``image``'s bundle as a CNCF ModelPack artifact (:mod:`packager.formats.modelpack`): each
    checkpoint uploaded as it is (a raw layer whose digest is its sha256, checked by the registry as it
    arrives), the bundle manifest and signatures as weight-config layers. Blobs the registry holds are
    not sent again, as for :func:`push`."""
    reporter = reporter_for(reporter, progress)
    ref, client = push_client_for(as_reference(ref), client, plain_http, reporter)
    known = digest_cache if digest_cache is not None else DigestCache()
    pairs = _modelpack_files(image)
    files = [f for f, _m in pairs]
    config = _modelpack_config(image, files)
    manifest = modelpack.encode_manifest(config, digest_of(config), files, image.manifest_id, image.weights)
    digest = _check_ref_digest(ref, digest_of(manifest))
    size = len(config) + sum(f.size for f in files)
    if client.manifest_digest(ref.repository, digest) == digest and (
            ref.digest is not None or client.manifest_digest(ref.repository, ref.reference) == digest):
        return PushReport(str(ref.with_digest(digest)), digest, image.manifest_id, size, "unchanged")
    bar = progress_bar(reporter, size, f"push {ref.repository}")
    results = []
    try:
        for f, m in sorted(pairs, key=lambda pair: modelpack.order(files).index(pair[0])):
            opener = (lambda m=m: MemberFile(m.source, m.offset, m.size))
            results.append(_ensure(client, ref, f.path, opener, f.size, f.digest, mount_from, known, bar, on_blob))
        results.append(_ensure(client, ref, "config", config, len(config), digest_of(config), mount_from, known, bar,
                               on_blob))
        client.put_manifest(ref.repository, ref.reference, manifest, IMAGE_MANIFEST)
    finally:
        known.save()
        bar.close()
    return PushReport(str(ref.with_digest(digest)), digest, image.manifest_id, size, "pushed", tuple(results))


def push_as(image: Image, ref, *, format: str = "image", **options) -> PushReport:
    """:func:`push` (``format`` "image") or :func:`push_modelpack` ("modelpack")."""
    if format not in FORMATS:
        raise UsageError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    return (push_modelpack if format == "modelpack" else push)(image, ref, **options)


def push_bundle(path, ref, *, platform: str = DEFAULT_PLATFORM, format: str = "image", **options) -> PushReport:
    """:func:`push` (or :func:`push_modelpack`) of :func:`image_of_bundle`."""
    with image_of_bundle(path, platform=platform) as image:
        return push_as(image, ref, format=format, **options)


# -- signatures attached to an image ---------------------------------------------------------------------
@dataclass(frozen=True)
class AttachReport:
    reference: str  # the image, by digest
    digest: str  # of the signature artifact
    signature: str  # its archive path
    signer: str | None
    via: str  # "referrers API" or "tag sha256-<hex>"

    def to_dict(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "signature": self.signature,
                "signer": self.signer, "via": self.via}


def attach_signature(ref, signer, *, label: str | None = None, plain_http: bool = False, client=None) -> AttachReport:
    """Sign the bundle an image holds (its manifest and the files it lists) and attach the signature to the
    image's manifest digest as a referrer; the image itself is not touched."""
    ref, client = push_client_for(as_reference(ref), client, plain_http)
    image = read_image(ref, client=client)
    digest = image.reference.digest
    manifest_bytes = image.inline[image.info.manifest_layer.path]
    _entries, files = parse_manifest(decode_manifest(manifest_bytes))
    ((path, data),) = signer.members(manifest_bytes, files, label)
    if path in image.inline:
        raise SignatureError(f"{image.reference} already has a signature {path}; choose another --label")
    subject_data = client.get_manifest(ref.repository, digest).data
    subject = {"mediaType": IMAGE_MANIFEST, "digest": digest, "size": len(subject_data)}
    artifact = artifact_manifest(subject, path, data, image.info.manifest_id)
    for blob in (EMPTY, data):
        client.ensure_blob(ref.repository, blob, size=len(blob), digest=digest_of(blob))
    artifact_digest = client.put_manifest(ref.repository, digest_of(artifact), artifact, IMAGE_MANIFEST)
    via = "referrers API"
    if referrers(client, ref.repository, digest) is None:  # no API: keep the tag schema's index current
        via = f"tag {referrers_tag(digest)}"
        listed = [d for d in tag_index(client, ref.repository, digest) if d.get("digest") != artifact_digest]
        listed.append({"mediaType": IMAGE_MANIFEST, "artifactType": SIGSTORE_BUNDLE, "digest": artifact_digest,
                       "size": len(artifact), "annotations": {A_PATH: path}})
        index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed})
        client.put_manifest(ref.repository, referrers_tag(digest), index, OCI_INDEX)
    return AttachReport(str(image.reference), artifact_digest, path, str(signer.signer) if signer.signer else None, via)


__all__ = ["FORMATS", "AttachReport", "BlobResult", "PushReport", "attach_signature", "push", "push_as", "push_bundle",
           "push_modelpack"]
