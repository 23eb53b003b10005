"""Weights as data: :class:`WeightsRef`, the :class:`Catalog` of every known weights, selectors.

Nothing here imports torch. ``WeightsRef`` is the one value that flows from the registry to every
later stage (cache, bundle, lockfile, mirror); a :class:`Catalog` is everything tvpack knows
about the available weights as plain data (models, enums and their members, each weights' url,
transform spec and meta as JSON data), so that ``list``, ``fetch``, ``lock``, ``bundle`` and
``mirror`` can select and describe weights without live ``WeightsEnum`` objects.

A catalog comes from live discovery (:mod:`packager.discovery`) or from the snapshot of it
(:mod:`packager.snapshot`); selectors resolve the same way against either:

    resnet50                    the model's DEFAULT weights
    resnet50:IMAGENET1K_V1      one member (``:DEFAULT``, ``:all``)
    'resnet*'                   a glob on model names
    ResNet50_Weights.IMAGENET1K_V2   the ``get_weight()`` form
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import os
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping
from urllib.parse import urlparse

from .errors import SelectorError, UsageError

FAMILIES = ("classification", "detection", "segmentation", "video", "optical_flow", "quantization")

# torch.hub's rule (``-<hex>.``) and torchvision's quantized names (``_<hex>.``), which torch.hub
# never checks. The prefix must be at least 6 hex digits to count as a hash.
_HUB_HASH = re.compile(r"-([a-f0-9]*)\.")
_UNDERSCORE_HASH = re.compile(r"_([a-f0-9]{6,})\.")


def filename_from_url(url: str) -> str:
    """``basename(url)``, the name torch.hub stores the download under."""
    return os.path.basename(urlparse(url).path)


def hash_prefix_from_filename(filename: str) -> str | None:
    """The sha256 prefix a checkpoint file name promises, or None when it promises none."""
    match = _HUB_HASH.search(filename)
    if match and len(match.group(1)) >= 6:
        return match.group(1)
    match = _UNDERSCORE_HASH.search(filename)
    return match.group(1) if match else None


@dataclass(frozen=True)
class WeightsRef:
    """One checkpoint: which enum member describes it and where its bytes come from."""

    enum: str  # "ResNet50_Weights"
    member: str  # "IMAGENET1K_V2"
    url: str
    module: str = ""  # import path of the module defining the enum
    models: tuple[str, ...] = ()  # every model whose builder takes this enum
    builders: tuple[str, ...] = ()  # "torchvision.models.resnet.resnet50", same order as models
    family: str = ""
    size_hint: int | None = None  # bytes, from meta["_file_size"] (MB) when present
    sha256: str | None = None  # full hash, when pinned by a lockfile or manifest

    @property
    def name(self) -> str:
        return f"{self.enum}.{self.member}"

    @property
    def filename(self) -> str:
        return filename_from_url(self.url)

    @property
    def hash_prefix(self) -> str | None:
        return hash_prefix_from_filename(self.filename)

    def with_sha256(self, sha256: str) -> "WeightsRef":
        return WeightsRef(**{**self.__dict__, "sha256": sha256})

    def weights(self):
        """The live ``WeightsEnum`` member (imports its module, so torch)."""
        module = importlib.import_module(self.module)
        return getattr(getattr(module, self.enum), self.member)

    def to_dict(self) -> dict:
        return {
            "weights": self.name,
            "enum": self.enum,
            "member": self.member,
            "module": self.module,
            "models": list(self.models),
            "builders": list(self.builders),
            "family": self.family,
            "url": self.url,
            "filename": self.filename,
            "hash_prefix": self.hash_prefix,
            "size_hint": self.size_hint,
            "sha256": self.sha256,
        }


def headline_metric(meta: Mapping) -> str | None:
    """The first metric torchvision reports, e.g. ``ImageNet-1K acc@1 80.858`` (live or JSON meta)."""
    metrics = meta.get("_metrics") or {}
    for dataset, values in metrics.items():
        if isinstance(values, dict):
            for metric, value in values.items():
                if isinstance(value, dict) and "__float__" in value:  # JSON form of a non-finite float
                    value = value["__float__"]
                return f"{dataset} {metric} {value}"
    return None


# -- the catalog -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsInfo:
    """One weights as data: its ref, transform spec and meta (JSON forms, see :mod:`packager.spec`).

    ``problem`` says why the transforms or meta could not be captured as data (a user's weights
    with an exotic pipeline): listing and fetching still work, bundling reports the problem.
    """

    ref: WeightsRef
    transforms: dict | None = field(default=None, repr=False, compare=False)
    meta: dict = field(default_factory=dict, repr=False, compare=False)
    problem: str | None = None

    @property
    def headline_metric(self) -> str | None:
        return headline_metric(self.meta)


@dataclass(frozen=True)
class EnumInfo:
    """A ``WeightsEnum`` class as data. ``names`` maps every member name, aliases such as DEFAULT
    included, to its canonical member (``Enum.__members__``); ``members`` lists the canonical ones
    in definition order (``list(Enum)``)."""

    key: str  # "module.Name": unique even when two modules define enums of the same name
    name: str
    module: str
    members: tuple[str, ...]
    names: Mapping[str, str] = field(compare=False)

    @property
    def default(self) -> str | None:
        return self.names.get("DEFAULT")


@dataclass(frozen=True)
class ModelInfo:
    """A model builder as data."""

    name: str
    enum: str  # EnumInfo.key
    family: str
    builder: str  # import path: "torchvision.models.resnet.resnet50"
    backbone: tuple[str, str] | None = None  # (EnumInfo.key, member) of the builder's default weights_backbone


class Catalog:
    """Every known model and weights, as data; resolves selectors to WeightsRefs.

    ``models`` by name; ``enum_infos`` by key, in discovery order; ``enums`` by name as ``--all``
    and ``Enum.MEMBER`` see them (the first enum of a name wins, as in live discovery);
    ``weights`` by ``(enum key, member)``, default backbones from outside the enums included.
    """

    def __init__(self, models: Mapping[str, ModelInfo], enum_infos: Iterable[EnumInfo],
                 weights: Mapping[tuple[str, str], WeightsInfo], modules: Iterable[str] = ()):
        self.models = dict(models)
        self.enum_infos = {info.key: info for info in enum_infos}
        self.enums: dict[str, EnumInfo] = {}
        for info in self.enum_infos.values():
            self.enums.setdefault(info.name, info)
        self.weights = dict(weights)
        self.modules = tuple(modules)

    def merged(self, other: "Catalog") -> "Catalog":
        """This catalog plus ``other`` (a user registry module): its models replace same-named
        ones, its enums are added after these (a taken name stays with the first), as live
        discovery does."""
        ordered = [*self.enum_infos.values(), *(i for k, i in other.enum_infos.items() if k not in self.enum_infos)]
        models = {**self.models, **other.models}
        weights = {**other.weights, **self.weights}
        # A ref names every model whose builder takes its enum: models of both sides count.
        of_enum: dict[str, list[ModelInfo]] = {}
        for model in models.values():
            of_enum.setdefault(model.enum, []).append(model)
        for key, info in weights.items():
            found = of_enum.get(key[0], [])
            names, builders = tuple(m.name for m in found), tuple(m.builder for m in found)
            if (names, builders) != (info.ref.models, info.ref.builders):
                ref = replace(info.ref, models=names, builders=builders, family=found[0].family if found else "")
                weights[key] = replace(info, ref=ref)
        return Catalog(models, ordered, weights, (*self.modules, *other.modules))

    # -- views -------------------------------------------------------------------------------
    def all_refs(self) -> list[WeightsRef]:
        seen: dict[str, WeightsRef] = {}
        for enum in self.enums.values():
            for member in enum.members:
                ref = self.weights[(enum.key, member)].ref
                seen.setdefault(ref.name, ref)
        return sorted(seen.values(), key=lambda r: r.name)

    def info(self, ref: WeightsRef | str) -> WeightsInfo:
        """The WeightsInfo of a ref or ``Enum.MEMBER`` name."""
        name = ref.name if isinstance(ref, WeightsRef) else ref
        if isinstance(ref, WeightsRef) and ref.module:
            found = self.weights.get((f"{ref.module}.{ref.enum}", ref.member))
            if found is not None:
                return found
        key = self._weights_by_name(name)
        return self.weights[key]

    # -- selectors ---------------------------------------------------------------------------
    def resolve(self, selectors: Iterable[str], *, all_weights: bool = False,
                with_backbones: bool = False) -> list[WeightsRef]:
        """Selectors to WeightsRefs, duplicates collapsed, in first-seen order."""
        keys: list[tuple[str, str]] = []
        if all_weights:
            for enum in self.enums.values():
                keys.extend((enum.key, member) for member in enum.members)
        for selector in selectors:
            try:
                keys.extend(self._resolve_one(selector, with_backbones))
            except (SelectorError, UsageError):
                if os.path.exists(selector):  # ``tvpack bundle s.tar -o x.tar``: say so, not "unknown enum 's'"
                    raise UsageError(f"{selector!r} is a file, given where selectors belong: selectors name weights "
                                     "(resnet50, resnet50:all, ResNet50_Weights.IMAGENET1K_V2)",
                                     hint="a lockfile goes after --lock, a site inventory after --for; a bundle "
                                          "is read by install, inspect, verify, split and push") from None
                raise
        if with_backbones and all_weights:
            keys.extend(model.backbone for model in self.models.values() if model.backbone)
        refs: dict[str, WeightsRef] = {}
        for key in keys:
            ref = self.weights[key].ref
            refs.setdefault(ref.name, ref)
        return list(refs.values())

    def _resolve_one(self, selector: str, with_backbones: bool) -> list[tuple[str, str]]:
        selector = selector.strip()
        if not _SELECTOR.fullmatch(selector):
            raise UsageError(
                f"bad selector {selector!r}: use MODEL, MODEL:MEMBER, MODEL:all, 'GLOB*' or Enum.MEMBER"
            )
        if ":" in selector:
            model_part, member_part = selector.split(":", 1)
        elif "." in selector:
            return [self._weights_by_name(selector)]
        else:
            model_part, member_part = selector, None
        keys = []
        for model in self._models_matching(model_part):
            keys.extend(self._members_of(model, member_part))
            if with_backbones and model.backbone:
                keys.append(model.backbone)
        return keys

    def _models_matching(self, pattern: str) -> list[ModelInfo]:
        if any(ch in pattern for ch in "*?["):
            names = sorted(fnmatch.filter(self.models, pattern))
            if not names:
                raise SelectorError(f"no model matches {pattern!r}")
            return [self.models[name] for name in names]
        if pattern not in self.models:
            raise SelectorError(unknown("model", pattern, self.models))
        return [self.models[pattern]]

    def _members_of(self, model: ModelInfo, member: str | None) -> list[tuple[str, str]]:
        enum = self.enum_infos[model.enum]
        if member == "all":
            return [(enum.key, m) for m in enum.members]
        if member is None or member == "DEFAULT":
            if enum.default is not None:
                return [(enum.key, enum.default)]
            if member is None and len(enum.members) == 1:
                return [(enum.key, enum.members[0])]
            raise SelectorError(
                f"model {model.name!r} has no DEFAULT weights; choose one of: "
                + ", ".join(f"{model.name}:{m}" for m in enum.members)
            )
        if member not in enum.names:
            raise SelectorError(unknown(f"weights of {model.name} ({enum.name})", member, enum.names))
        return [(enum.key, enum.names[member])]

    def _weights_by_name(self, name: str) -> tuple[str, str]:
        enum_name, member = name.split(".", 1)
        if enum_name not in self.enums:
            raise SelectorError(unknown("weights enum", enum_name, self.enums))
        enum = self.enums[enum_name]
        if member not in enum.names:
            raise SelectorError(unknown(f"member of {enum_name}", member, enum.names))
        return enum.key, enum.names[member]


# MODEL, MODEL:MEMBER, GLOB, GLOB:all, Enum.MEMBER
_SELECTOR = re.compile(r"[A-Za-z0-9_*?\[\]\-]+(:[A-Za-z0-9_]+)?|[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


def unknown(kind: str, name: str, choices: Iterable[str]) -> str:
    """``unknown model 'resnt50'; did you mean resnet50?``"""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    message = f"unknown {kind} {name!r}"
    if close:
        message += "; did you mean " + " or ".join(close) + "?"
    return message
