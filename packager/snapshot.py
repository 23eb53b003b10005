"""The registry snapshot: torchvision's catalog as JSON, so most commands never import torch.

Importing ``torchvision.models`` costs seconds and most of a gigabyte; listing, fetching, locking,
bundling and mirroring torchvision's weights only need data. The first command that needs the
catalog discovers it live (:mod:`packager.discovery`) and writes it to
``$XDG_CACHE_HOME/tvpack/registry/<key>.json``; later ones read it. The key is a hash of what the
catalog was made from: torchvision's version and the size and mtime of every source file of
``torchvision.models`` and ``torchvision.transforms._presets`` (plus tvpack's own formats), found
without importing torchvision; any change makes a new snapshot.

User registry modules (``--registry``, ``TVPACK_REGISTRY``) are imported live every time: their
code is the user's, and may change between two commands. They are imported before torchvision's
catalog is taken, which is then read from the live objects: a module may re-point torchvision's own
members (an internal mirror's url), and that must be what every command sees. ``TVPACK_NO_SNAPSHOT=1`` (or
``tvpack --live-registry``) discovers torchvision live too, and writes nothing.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

from . import __version__, env
from .errors import SelectorError, UsageError
from .fsutil import atomic_write_bytes
from .home import tvpack_cache_dir
from .registry import Catalog, EnumInfo, ModelInfo, WeightsInfo, WeightsRef
from .spec import SPEC_VERSION, SpecError

FORMAT = "tvpack-registry-snapshot"
FORMAT_VERSION = 1
_SOURCES = (("models",), ("transforms", "_presets.py"))  # inside the torchvision package


# -- the key ---------------------------------------------------------------------------------------
def _torchvision_dir() -> Path | None:
    spec = importlib.util.find_spec("torchvision")  # a top-level name: located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def source_key() -> str | None:
    """A hash of everything torchvision's catalog is made from, or None without torchvision."""
    root = _torchvision_dir()
    if root is None:
        return None
    try:
        version = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        version = "?"
    digest = hashlib.sha256()
    digest.update(f"{FORMAT}:{FORMAT_VERSION}:{SPEC_VERSION}:{__version__}:{version}:{root}\n".encode())
    for parts in _SOURCES:
        base = root.joinpath(*parts)
        if base.is_file():
            files = [base]
        else:
            files = sorted(p for p in base.rglob("*.py"))
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            digest.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def snapshot_path(key: str) -> Path:
    return tvpack_cache_dir() / "registry" / f"{key}.json"


# -- JSON ------------------------------------------------------------------------------------------
def catalog_to_json(catalog: Catalog) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "enums": [{"key": e.key, "name": e.name, "module": e.module, "members": list(e.members),
                   "names": dict(e.names)} for e in catalog.enum_infos.values()],
        "models": [{"name": m.name, "enum": m.enum, "family": m.family, "builder": m.builder,
                    "backbone": list(m.backbone) if m.backbone else None} for m in catalog.models.values()],
        "weights": [{"key": list(key), "ref": {k: v for k, v in info.ref.__dict__.items()},
                     "transforms": info.transforms, "meta": info.meta, "problem": info.problem}
                    for key, info in catalog.weights.items()],
    }


def catalog_from_json(data: dict) -> Catalog:
    """The catalog of a snapshot document; KeyError/TypeError/ValueError when it is damaged."""
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ValueError("not a registry snapshot of this version")
    enums = [EnumInfo(e["key"], e["name"], e["module"], tuple(e["members"]), dict(e["names"])) for e in data["enums"]]
    models = {m["name"]: ModelInfo(m["name"], m["enum"], m["family"], m["builder"],
                                   tuple(m["backbone"]) if m["backbone"] else None) for m in data["models"]}
    weights = {}
    for item in data["weights"]:
        ref = dict(item["ref"])
        ref["models"], ref["builders"] = tuple(ref["models"]), tuple(ref["builders"])
        weights[tuple(item["key"])] = WeightsInfo(WeightsRef(**ref), item["transforms"], item["meta"], item["problem"])
    return Catalog(models, enums, weights)


def _load(path: Path) -> Catalog | None:
    try:
        return catalog_from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # damaged or foreign: made anew


def _save(path: Path, catalog: Catalog) -> None:
    """Best effort: a cache that cannot be written (read-only home) only costs the next command time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(catalog_to_json(catalog), separators=(",", ":")).encode(),
                           durable=False)
    except OSError:
        pass


# -- the catalog commands use ----------------------------------------------------------------------
def _torchvision_catalog(live: bool) -> Catalog:
    """torchvision's catalog: discovered live, or the snapshot file (read on each call: about 30 ms for all 166
    weights, and no process-wide copy to go stale or to patch in tests; a caller that asks often holds the
    :class:`Catalog` it got)."""
    from .discovery import live_registry

    key = source_key()
    if key is None:  # torchvision is not installed: no weights of its own
        return Catalog({}, [], {})
    if live:
        return live_registry((), torchvision=True).catalog()
    found = _load(snapshot_path(key))
    if found is None:
        found = live_registry((), torchvision=True).catalog()
        _save(snapshot_path(key), found)
    return found


def get_catalog(modules: Sequence[str] = (), *, live: bool | None = None) -> Catalog:
    """torchvision's catalog plus each user registry module in ``modules`` and ``$TVPACK_REGISTRY``
    (always discovered live).

    torchvision's part comes from the snapshot, unless ``live`` (the CLI's ``--live-registry``), else (None)
    ``TVPACK_NO_SNAPSHOT=1``, a user module
    is given, or ``torchvision.models`` is already imported in this process: then the live objects are
    at hand and are the truth (they see in-process changes: a user module or a test pointing a member at
    another url).
    """
    from .discovery import live_registry

    # User modules first: one may re-point torchvision's own members (a url on an internal mirror) as it is
    # imported, so torchvision's part is then taken from the live objects, after that import, never before.
    combined = tuple(dict.fromkeys([*env.registries(), *modules]))
    user = live_registry(combined, torchvision=False).catalog() if combined else None
    if live is None:
        live = env.no_snapshot() or "torchvision.models" in sys.modules or user is not None
    catalog = _torchvision_catalog(live)
    return catalog.merged(user) if user is not None else catalog


def resolve(selectors: Iterable[str], *, registry: Sequence[str] = (), all_weights: bool = False,
            with_backbones: bool = False, live: bool | None = None) -> list[WeightsRef]:
    """Public API: selectors (``resnet50``, ``resnet50:all``, ``'resnet*'``,
    ``ResNet50_Weights.IMAGENET1K_V2``) to WeightsRefs, through :func:`get_catalog` (``live`` as there)."""
    selectors = list(selectors)
    if not selectors and not all_weights:
        raise UsageError("no weights selected: give one or more selectors or --all")
    return get_catalog(registry, live=live).resolve(selectors, all_weights=all_weights, with_backbones=with_backbones)


def describe(refs: Sequence[WeightsRef], *, registry: Sequence[str] = (), live: bool | None = None) -> list[WeightsInfo]:
    """The WeightsInfo (transform spec and meta as data) of each ref, from the catalog; a ref the
    catalog lacks (a lockfile's weights from a module not given as --registry) is described live
    from its recorded module, as torchvision's ``get_weight`` would import it."""
    from .discovery import describe_live

    catalog = get_catalog(registry, live=live)
    out = []
    for ref in refs:
        try:
            info = catalog.info(ref)
        except SelectorError:
            info = describe_live(ref)
        if info.ref.url != ref.url:
            info = describe_live(ref)
        if info.problem:
            raise SpecError(info.problem)
        out.append(info)
    return out


__all__ = ["describe", "catalog_from_json", "catalog_to_json", "get_catalog", "resolve", "snapshot_path", "source_key"]
