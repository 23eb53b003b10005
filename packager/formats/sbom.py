"""The CycloneDX ML-BOM of a bundle: one ``machine-learning-model`` component per weights. Pure over data.

Built with ``cyclonedx-python-lib`` (imported here only, lazily: ``list`` and ``fetch --dry-run`` never pay for
it) from the manifest's weights entries (JSON data as :mod:`packager.formats.manifest` writes them):

* per weights: the checkpoint's SHA-256, its url (``distribution``), recipe (``build-meta``) and documentation
  (``documentation``) as external references, the licence where meta names one (torchvision's SWAG weights), and a
  ``modelCard``: the task (from the family), the architecture (the builder), the datasets its metrics name, and
  ``quantitativeAnalysis.performanceMetrics`` from ``_metrics``. The library's typed API has no model card (11.x),
  so that part is added as data to the JSON it writes;
* ``metadata``: tvpack, torch and torchvision with their versions as tools, and the release fields as properties.

Deterministic: the serial number is a UUID5 over the weights' hashes and the release, the timestamp is the
bundle's member mtime (``SOURCE_DATE_EPOCH`` or 0), so the same selection gives the same bytes.

**Its name.** The manifest lists the BOM as a member, and the manifest id is the hash of the manifest's bytes, so
the BOM cannot be named after that id. It is named after its own content: ``hub/tvpack/sbom/<sha256(bom)[:16]>
.cdx.json``. Two bundles never write different BOMs under one name (installed side by side, each manifest's
member keeps the bytes it lists), and ``tvpack sbom`` finds a bundle's BOM through its manifest.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timezone
from typing import Mapping, Sequence

SBOM_DIR = "hub/tvpack/sbom"
SPEC_VERSION = "1.6"
TASKS = {"classification": "image-classification", "quantization": "image-classification",
         "detection": "object-detection", "segmentation": "image-segmentation", "video": "video-classification",
         "optical_flow": "optical-flow"}
_NAMESPACE = uuid.UUID("6f1c1c36-5c1e-4d7e-9a57-7470766b626f")  # tvpack's UUID5 namespace for BOM serial numbers
_DOCS = "https://docs.pytorch.org/vision/stable/models/generated/torchvision.models.{}.html"


def sbom_path(data: bytes) -> str:
    """The archive path of a BOM: named by its own content (see the module docstring)."""
    return f"{SBOM_DIR}/{hashlib.sha256(data).hexdigest()[:16]}.cdx.json"


def is_sbom_path(path: str) -> bool:
    return path.startswith(SBOM_DIR + "/") and path.endswith(".cdx.json") and path.count("/") == 3


def _float(value):
    return value["__float__"] if isinstance(value, dict) and "__float__" in value else value


def _metrics(meta: Mapping) -> list[tuple[str, str, str]]:
    """(dataset, metric, value) of ``_metrics``, in their order."""
    out = []
    for dataset, values in (meta.get("_metrics") or {}).items():
        if isinstance(values, dict):
            out.extend((str(dataset), str(metric), str(_float(value))) for metric, value in values.items())
    return out


def _component(item: Mapping):
    from cyclonedx.model import ExternalReference, ExternalReferenceType, HashAlgorithm, HashType, XsUri
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.license import DisjunctiveLicense

    meta = item.get("meta") or {}
    refs = [ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(item["url"]))]
    if isinstance(meta.get("recipe"), str) and meta["recipe"].startswith(("http://", "https://")) \
            and " " not in meta["recipe"]:
        refs.append(ExternalReference(type=ExternalReferenceType.BUILD_META, url=XsUri(meta["recipe"]),
                                      comment="training recipe"))
    builders = item.get("builders") or []
    if builders and str(builders[0]).startswith("torchvision.models."):
        refs.append(ExternalReference(type=ExternalReferenceType.DOCUMENTATION,
                                      url=XsUri(_DOCS.format(builders[0].rsplit(".", 1)[-1]))))
    licence = meta.get("license")
    licenses = [DisjunctiveLicense(name="license of the weights", url=XsUri(licence))] \
        if isinstance(licence, str) and licence.startswith(("http://", "https://")) else \
        [DisjunctiveLicense(name=licence)] if isinstance(licence, str) and licence else []
    docs = meta.get("_docs")
    return Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=item["name"], bom_ref=item["name"],
                     group=item.get("module") or None, description=" ".join(docs.split()) if isinstance(docs, str)
                     else None, hashes=[HashType(alg=HashAlgorithm.SHA_256, content=item["sha256"])],
                     external_references=refs, licenses=licenses)


def _model_card(item: Mapping) -> dict:
    meta = item.get("meta") or {}
    metrics = _metrics(meta)
    parameters: dict = {"task": TASKS.get(item.get("family") or "", "image-classification")}
    if item.get("builders"):
        parameters["modelArchitecture"] = item["builders"][0]
    if item.get("family"):
        parameters["architectureFamily"] = item["family"]
    datasets = list(dict.fromkeys(dataset for dataset, _m, _v in metrics))
    if datasets:
        parameters["datasets"] = [{"type": "dataset", "name": name} for name in datasets]
    card: dict = {"modelParameters": parameters}
    if metrics:
        card["quantitativeAnalysis"] = {"performanceMetrics": [{"type": metric, "value": value, "slice": dataset}
                                                               for dataset, metric, value in metrics]}
    return card


def build_bom(weights: Sequence[Mapping], *, created_by: Mapping, release: Mapping | None = None,
              mtime: int = 0) -> bytes:
    """The BOM's bytes for manifest weights entries ``weights``; ``created_by`` and ``release`` as the manifest
    holds them (``release``: the ``"release"`` object, or None)."""
    from cyclonedx.model import Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6

    items = sorted(weights, key=lambda w: w["name"])
    tools = [Component(type=ComponentType.APPLICATION if name == "tvpack" else ComponentType.LIBRARY, name=name,
                       version=str(version)) for name, version in (("tvpack", created_by.get("packager")),
                                                                   ("torch", created_by.get("torch")),
                                                                   ("torchvision", created_by.get("torchvision")))
             if version]
    properties = []
    if release:
        properties += [Property(name="tvpack:release:channel", value=str(release["channel"])),
                       Property(name="tvpack:release:sequence", value=str(release["sequence"]))]
        if release.get("expires"):
            properties.append(Property(name="tvpack:release:expires", value=str(release["expires"])))
        properties += [Property(name="tvpack:release:revokes", value=f"{r['sha256']} {r.get('reason', '')}".strip())
                       for r in release.get("revokes", [])]
    seed = json.dumps([[w["name"], w["sha256"]] for w in items] + [release or {}], sort_keys=True)
    bom = Bom(serial_number=uuid.uuid5(_NAMESPACE, seed), components=[_component(w) for w in items],
              metadata=BomMetaData(tools=ToolRepository(components=tools), properties=properties,
                                   timestamp=datetime.fromtimestamp(mtime, timezone.utc)))
    document = json.loads(JsonV1Dot6(bom).output_as_string())
    cards = {w["name"]: _model_card(w) for w in items}
    for component in document.get("components", []):
        component["modelCard"] = cards[component["name"]]
    return (json.dumps(document, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def add_bom(manifest: dict, mtime: int = 0) -> tuple[str, bytes]:
    """The BOM of a manifest document being built, listed in its ``members``; returns (archive path, bytes)."""
    data = build_bom(manifest["weights"], created_by=manifest.get("created_by") or {},
                     release=manifest.get("release"), mtime=mtime)
    manifest.setdefault("members", {})[sbom_path(data)] = {"size": len(data),
                                                           "sha256": hashlib.sha256(data).hexdigest()}
    return sbom_path(data), data


def bom_of(files) -> str | None:
    """The archive path of the BOM among a manifest's listed ``files`` (archive paths), or None."""
    return next((path for path in sorted(files) if is_sbom_path(path)), None)


__all__ = ["SBOM_DIR", "SPEC_VERSION", "add_bom", "bom_of", "build_bom", "is_sbom_path", "sbom_path"]
