"""Signatures attached to an image in a registry, as OCI 1.1 referrers (the way cosign v3 and notation attach
theirs): signing an image that is already pushed, without changing its digest, and finding those signatures.

    packager.oci.attach_signature("oci://registry.example/ml/vision:v1", signer)   # the digest stays the same
    found = attached_signatures(client, "ml/vision", digest, manifest_id)   # [(archive path, bytes)]

An attached signature is an artifact manifest: ``artifactType`` ``application/vnd.dev.sigstore.bundle.v0.3+json``,
the empty config, one layer holding the OMS signature (the same Sigstore bundle tvpack writes into bundles, its
archive path in ``org.tvpack.path``) and ``subject`` the image manifest. It is found through the registry's
referrers API, else through the referrers tag schema (an index tagged ``sha256-<hex>``, which tvpack keeps up to
date when the registry has no API). Read side: :func:`packager.oci.remote.read_image` adds what it finds to the
bundle's signature members, so install, pull, verify and inspect treat it exactly as a signature inside the
bundle: the trust policy is applied before any checkpoint layer is fetched, and ``pull`` writes it into the file.
"""
from __future__ import annotations

from ..errors import OCIError
from ..formats import descriptor
from ..formats.image import IMAGE_MANIFEST, TITLE, canonical_json
from ..formats.signature import manifest_id_of_signature
from ..transport.oci import digest_of
from ..transport.oci.referrers import referrers, tag_index

SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
A_PATH = "org.tvpack.path"
MAX_SIGNATURE = 1 << 20
MAX_ATTACHED = 64


def artifact_manifest(subject: dict, path: str, data: bytes, manifest_id: str) -> bytes:
    return canonical_json({
        "schemaVersion": 2, "mediaType": IMAGE_MANIFEST, "artifactType": SIGSTORE_BUNDLE,
        "config": {"mediaType": EMPTY_CONFIG, "digest": digest_of(EMPTY), "size": len(EMPTY)},
        "layers": [{"mediaType": SIGSTORE_BUNDLE, "digest": digest_of(data), "size": len(data),
                    "annotations": {A_PATH: path, TITLE: path.rsplit("/", 1)[-1]}}],
        "subject": subject, "annotations": {"org.tvpack.manifest.id": manifest_id},
    })


def attached_signatures(client, repository: str, digest: str, manifest_id: str, where: str) -> list[tuple[str, bytes]]:
    """The signatures attached to ``digest`` that are over bundle manifest ``manifest_id``: (archive path,
    bytes), each artifact manifest and blob digest-checked; anything else attached is left alone."""
    found = referrers(client, repository, digest)
    if found is None:
        found = tag_index(client, repository, digest)
    out: dict[str, bytes] = {}
    for referrer in [d for d in found if d.get("artifactType") == SIGSTORE_BUNDLE][:MAX_ATTACHED]:
        artifact = client.get_manifest(repository, str(referrer.get("digest")), (IMAGE_MANIFEST,)).data
        path, layer = _signature_layer(artifact, digest, where)
        if manifest_id_of_signature(path) != manifest_id or path in out:
            continue
        data = bytearray()
        restart = {"restart": data.clear} if hasattr(client, "_each") else {}  # through mirrors
        client.stream_blob(repository, layer["digest"], data.extend, size=layer["size"], **restart)
        out[path] = bytes(data)
    return sorted(out.items())


def _signature_layer(artifact: bytes, subject: str, where: str) -> tuple[str, dict]:
    def refuse(why: str):
        raise OCIError(f"{where}: an attached signature is malformed ({why})")

    document = descriptor.json_object(artifact, refuse, "the artifact")
    if document.get("artifactType") != SIGSTORE_BUNDLE:
        refuse("not a sigstore bundle artifact")
    if not isinstance(document.get("subject"), dict) or document["subject"].get("digest") != subject:
        refuse("its subject is another manifest")
    layers = descriptor.layers(document, refuse)
    if len(layers) != 1 or not isinstance(layers[0], dict):
        refuse("not one layer")
    layer = layers[0]
    path = descriptor.annotations(layer).get(A_PATH)
    if layer.get("mediaType") != SIGSTORE_BUNDLE or not isinstance(path, str) or manifest_id_of_signature(path) is None:
        refuse(f"its layer is not a tvpack signature ({A_PATH})")
    if not descriptor.is_descriptor(layer, min_size=1, max_size=MAX_SIGNATURE):
        refuse("its layer has no valid size and digest")
    return path, layer


__all__ = ["A_PATH", "EMPTY", "SIGSTORE_BUNDLE", "artifact_manifest", "attached_signatures"]
