"""Discover every ``WeightsEnum`` and resolve selectors to :class:`WeightsRef` values.

Discovery follows torchvision: builders come from ``torchvision.models.list_models()`` /
``get_model_builder`` and each builder's enum from its ``weights`` annotation. User registries
(``--registry MODULE`` / ``TVPACK_REGISTRY``) are modules whose ``WeightsEnum`` subclasses and
builder functions (a function with a ``weights`` parameter annotated with one of those enums) are
added exactly like torchvision's own; the model is named by the function.

``WeightsRef`` is the one value that flows from here to every later stage. It is plain data, so it
can also be rebuilt from a lockfile or manifest without importing torch.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence
from urllib.parse import urlparse

from . import env
from .errors import RegistryError, SelectorError, UsageError

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


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: typing.Callable = field(repr=False)
    enum: type = field(repr=False)
    family: str

    @property
    def builder_path(self) -> str:
        return f"{self.builder.__module__}.{self.builder.__qualname__}"


def _import_user_module(name: str):
    if not name.strip():
        raise UsageError("--registry needs a module name, got an empty string")
    if name.endswith(".py") or os.sep in name:
        raise UsageError(f"--registry takes a module name such as 'mypkg.weights', not a path: {name!r}")
    # Like `python -m`, let modules next to the caller be found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RegistryError(f"cannot import registry module {name!r}: {exc}") from exc
    except Exception as exc:  # a user's module failed while importing
        raise RegistryError(f"registry module {name!r} failed to import: {type(exc).__name__}: {exc}") from exc


def _weights_enum_base():
    from torchvision.models._api import WeightsEnum

    return WeightsEnum


def _enums_in_annotation(annotation, namespace: dict) -> list[type]:
    WeightsEnum = _weights_enum_base()
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, namespace)  # noqa: S307 - the user's own module namespace
        except Exception:
            return []
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, WeightsEnum) and annotation is not WeightsEnum else []
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_enums_in_annotation(arg, namespace))
    return found


def _family_of(builder, enum) -> str:
    parts = builder.__module__.split(".")
    for family in FAMILIES:
        if family in parts:
            return family
    if "quantize" in inspect.signature(builder).parameters:
        return "quantization"
    # A user's module: judge by the preprocessing preset it declares.
    for member in enum:
        transforms = member.transforms
        target = getattr(transforms, "func", transforms)
        kind = getattr(target, "__name__", "")
        return {
            "ObjectDetection": "detection",
            "SemanticSegmentation": "segmentation",
            "VideoClassification": "video",
            "OpticalFlow": "optical_flow",
        }.get(kind, "classification")
    return "classification"


class Registry:
    """Models and weights from torchvision plus any user registry modules."""

    def __init__(self, modules: Sequence[str] = ()):
        self.modules = tuple(modules)
        self.models: dict[str, ModelInfo] = {}
        self.enums: dict[str, type] = {}
        self._discover_torchvision()
        for name in self.modules:
            self._discover_module(name)

    # -- discovery -------------------------------------------------------------------------
    def _add_model(self, name: str, builder, enum) -> None:
        self.enums.setdefault(enum.__name__, enum)
        self.models[name] = ModelInfo(name, builder, enum, _family_of(builder, enum))

    def _discover_torchvision(self) -> None:
        import torchvision.models as tvm

        for name in tvm.list_models():
            builder = tvm.get_model_builder(name)
            try:
                enum = tvm.get_model_weights(name)
            except ValueError:
                continue
            self._add_model(name, builder, enum)

    def _discover_module(self, module_name: str) -> None:
        WeightsEnum = _weights_enum_base()
        module = _import_user_module(module_name)
        namespace = vars(module)
        enums = [
            obj for obj in namespace.values()
            if isinstance(obj, type) and issubclass(obj, WeightsEnum) and obj is not WeightsEnum
        ]
        for enum in enums:
            self.enums.setdefault(enum.__name__, enum)
        builders = 0
        for attr, obj in namespace.items():
            if attr.startswith("_") or not inspect.isfunction(obj):
                continue
            try:
                param = inspect.signature(obj).parameters.get("weights")
            except (TypeError, ValueError):
                continue
            if param is None:
                continue
            found = _enums_in_annotation(param.annotation, {**vars(typing), **namespace})
            if found:
                self._add_model(attr, obj, found[0])
                builders += 1
        if not enums and not builders:
            raise RegistryError(f"registry module {module_name!r} defines no WeightsEnum and no builder")

    # -- views -------------------------------------------------------------------------------
    def models_for(self, enum) -> list[ModelInfo]:
        return [info for info in self.models.values() if info.enum is enum]

    def ref(self, member) -> WeightsRef:
        enum = type(member)
        infos = self.models_for(enum)
        file_size = member.meta.get("_file_size")
        size_hint = int(round(float(file_size) * 1024 * 1024)) if isinstance(file_size, (int, float)) else None
        return WeightsRef(
            enum=enum.__name__,
            member=member.name,
            url=member.url,
            module=enum.__module__,
            models=tuple(info.name for info in infos),
            builders=tuple(info.builder_path for info in infos),
            family=infos[0].family if infos else "",
            size_hint=size_hint,
        )

    def all_refs(self) -> list[WeightsRef]:
        seen: dict[str, WeightsRef] = {}
        for enum in self.enums.values():
            for member in enum:
                ref = self.ref(member)
                seen.setdefault(ref.name, ref)
        return sorted(seen.values(), key=lambda r: r.name)

    # -- selectors ---------------------------------------------------------------------------
    def resolve(self, selectors: Iterable[str], *, all_weights: bool = False,
                with_backbones: bool = False) -> list[WeightsRef]:
        """Selectors to WeightsRefs, duplicates collapsed, in first-seen order."""
        members: list = []
        if all_weights:
            for enum in self.enums.values():
                members.extend(enum)
        for selector in selectors:
            members.extend(self._resolve_one(selector, with_backbones))
        if with_backbones and all_weights:
            for info in self.models.values():
                members.extend(_backbone_members(info))
        refs: dict[str, WeightsRef] = {}
        for member in members:
            ref = self.ref(member)
            refs.setdefault(ref.name, ref)
        return list(refs.values())

    def _resolve_one(self, selector: str, with_backbones: bool) -> list:
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
        infos = self._models_matching(model_part)
        members = []
        for info in infos:
            members.extend(self._members_of(info, member_part))
            if with_backbones:
                members.extend(_backbone_members(info))
        return members

    def _models_matching(self, pattern: str) -> list[ModelInfo]:
        if any(ch in pattern for ch in "*?["):
            names = sorted(fnmatch.filter(self.models, pattern))
            if not names:
                raise SelectorError(f"no model matches {pattern!r}")
            return [self.models[name] for name in names]
        if pattern not in self.models:
            raise SelectorError(_unknown("model", pattern, self.models))
        return [self.models[pattern]]

    def _members_of(self, info: ModelInfo, member: str | None) -> list:
        enum = info.enum
        if member == "all":
            return list(enum)
        if member is None or member == "DEFAULT":
            if "DEFAULT" in enum.__members__:
                return [enum.DEFAULT]
            if member is None and len(enum) == 1:
                return list(enum)
            raise SelectorError(
                f"model {info.name!r} has no DEFAULT weights; choose one of: "
                + ", ".join(f"{info.name}:{m.name}" for m in enum)
            )
        if member not in enum.__members__:
            raise SelectorError(_unknown(f"weights of {info.name} ({enum.__name__})", member, enum.__members__))
        return [enum.__members__[member]]

    def _weights_by_name(self, name: str):
        enum_name, member = name.split(".", 1)
        if enum_name not in self.enums:
            raise SelectorError(_unknown("weights enum", enum_name, self.enums))
        enum = self.enums[enum_name]
        if member not in enum.__members__:
            raise SelectorError(_unknown(f"member of {enum_name}", member, enum.__members__))
        return enum.__members__[member]

    def weights(self, name: str):
        """``get_weight``-style lookup: ``ResNet50_Weights.IMAGENET1K_V2`` -> member."""
        return self._weights_by_name(name)


# MODEL, MODEL:MEMBER, GLOB, GLOB:all, Enum.MEMBER
_SELECTOR = re.compile(r"[A-Za-z0-9_*?\[\]\-]+(:[A-Za-z0-9_]+)?|[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


def _unknown(kind: str, name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    message = f"unknown {kind} {name!r}"
    if close:
        message += "; did you mean " + " or ".join(close) + "?"
    return message


def _backbone_members(info: ModelInfo) -> list:
    WeightsEnum = _weights_enum_base()
    param = inspect.signature(info.builder).parameters.get("weights_backbone")
    if param is not None and isinstance(param.default, WeightsEnum):
        return [param.default]
    return []


@lru_cache(maxsize=8)
def _cached_registry(modules: tuple[str, ...]) -> Registry:
    return Registry(modules)


def get_registry(modules: Sequence[str] = ()) -> Registry:
    """The registry for torchvision plus ``modules`` and ``$TVPACK_REGISTRY`` (cached)."""
    combined = tuple(dict.fromkeys([*env.registries(), *modules]))
    return _cached_registry(combined)


def resolve(selectors: Iterable[str], *, registry: Sequence[str] = (), all_weights: bool = False,
            with_backbones: bool = False) -> list[WeightsRef]:
    """Public API: selectors (``resnet50``, ``resnet50:all``, ``'resnet*'``,
    ``ResNet50_Weights.IMAGENET1K_V2``) to WeightsRefs."""
    selectors = list(selectors)
    if not selectors and not all_weights:
        raise UsageError("no weights selected: give one or more selectors or --all")
    return get_registry(registry).resolve(selectors, all_weights=all_weights, with_backbones=with_backbones)


def headline_metric(meta: dict) -> str | None:
    """The first metric torchvision reports, e.g. ``ImageNet-1K acc@1 80.858``."""
    metrics = meta.get("_metrics") or {}
    for dataset, values in metrics.items():
        if isinstance(values, dict):
            for metric, value in values.items():
                return f"{dataset} {metric} {value}"
    return None
