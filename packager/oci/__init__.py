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
  unchanged image then hashes nothing and asks one question: does the name given hold this manifest?
  Otherwise each blob is asked for (HEAD), mounted from another repository of the same registry where it
  was pushed before (or from ``mount_from``), and only then uploaded (in chunks when large). Finished
  blobs stay finished, so an interrupted push re-run sends only the rest. A remembered digest is a hint:
  it counts only for a blob the registry holds at exactly the layer's size; otherwise the layer is hashed,
  and nothing is uploaded under a digest not computed in this run.
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

The package: :mod:`.image` (the image of a bundle, its layers, :class:`ImageSource`), :mod:`.digests` (what is
remembered about blobs), :mod:`.remote` (references, reading an image), :mod:`.push`, :mod:`.pull`,
:mod:`.install` (install, verify, inspect) and :mod:`.staging` (the staging directories of installs).

Importing this package never imports torch.
"""
from __future__ import annotations

from .digests import DigestCache
from .image import Image, ImageMember, ImageSource, Layer, hash_layer, image_of_bundle, image_of_plan
from .install import install, open_image, verify
from .pull import PullReport, pull
from .push import AttachReport, BlobResult, PushReport, attach_signature, push, push_as, push_bundle, push_modelpack
from .remote import RemoteImage, is_oci_reference, read_image
from .staging import staging, staging_root

__all__ = [
    "AttachReport", "BlobResult", "attach_signature", "DigestCache", "Image", "ImageMember", "ImageSource", "Layer",
    "PullReport", "PushReport",
    "RemoteImage", "hash_layer", "image_of_bundle", "image_of_plan", "install", "is_oci_reference", "open_image",
    "pull", "push", "push_as", "push_bundle", "push_modelpack", "read_image", "staging", "staging_root", "verify",
]
