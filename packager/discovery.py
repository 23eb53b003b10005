"""Live discovery: the ``WeightsEnum`` classes and builders of torchvision and of user modules.

This is where tvpack meets live torchvision objects to learn what weights exist. Builders come
from ``torchvision.models.list_models()`` / ``get_model_builder`` and each builder's enum from its
``weights`` annotation. User registries (``--registry MODULE`` / ``TVPACK_REGISTRY``) are modules
whose ``WeightsEnum`` subclasses and builder functions (a function with a ``weights`` parameter
annotated with one of those enums) are added exactly like torchvision's own; the model is named
by the function.

:class:`Registry` keeps the live objects (the loader builds models with them);
:meth:`Registry.catalog` turns them into a :class:`packager.registry.Catalog` of plain data, which
:mod:`packager.snapshot` caches for torchvision so that later commands never import torch.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence

from . import env
from .errors import RegistryError, SelectorError, UsageError
from .registry import FAMILIES, Catalog, EnumInfo, ModelInfo, WeightsInfo, WeightsRef, unknown
from .spec import SpecError, meta_to_json, transform_spec


@dataclass(frozen=True)
class LiveModel:
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


def _enum_key(enum) -> str:
    return f"{enum.__module__}.{enum.__qualname__}"


def _backbone_member(builder):
    WeightsEnum = _weights_enum_base()
    param = inspect.signature(builder).parameters.get("weights_backbone")
    if param is not None and isinstance(param.default, WeightsEnum):
        return param.default
    return None


class Registry:
    """Models and weights, live, from torchvision (unless ``torchvision=False``) plus user modules."""

    def __init__(self, modules: Sequence[str] = (), *, torchvision: bool = True):
        self.modules = tuple(modules)
        self.models: dict[str, LiveModel] = {}
        self.enums: dict[str, type] = {}
        self._infos: dict[tuple[str, str, str], tuple[dict, WeightsInfo]] = {}
        if torchvision:
            self._discover_torchvision()
        for name in self.modules:
            self._discover_module(name)

    # -- discovery -------------------------------------------------------------------------
    def _add_model(self, name: str, builder, enum) -> None:
        self.enums.setdefault(enum.__name__, enum)
        self.models[name] = LiveModel(name, builder, enum, _family_of(builder, enum))

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

    # -- live lookups ------------------------------------------------------------------------
    def weights(self, name: str):
        """``get_weight``-style lookup: ``ResNet50_Weights.IMAGENET1K_V2`` -> the live member."""
        enum_name, _, member = name.partition(".")
        if enum_name not in self.enums:
            raise SelectorError(unknown("weights enum", enum_name, self.enums))
        members = self.enums[enum_name].__members__
        if member not in members:
            raise SelectorError(unknown(f"member of {enum_name}", member, members))
        return members[member]

    def _all_enums(self) -> list[type]:
        """Every enum discovered, in order: the visible ones, then those shadowed by name, then
        the enums of default backbones."""
        found: dict[str, type] = {}
        for enum in [*self.enums.values(), *(m.enum for m in self.models.values())]:
            found.setdefault(_enum_key(enum), enum)
        for model in self.models.values():
            backbone = _backbone_member(model.builder)
            if backbone is not None:
                found.setdefault(_enum_key(type(backbone)), type(backbone))
        return list(found.values())

    def ref(self, member) -> WeightsRef:
        """The WeightsRef of a live member."""
        enum = type(member)
        infos = [m for m in self.models.values() if m.enum is enum]
        file_size = member.meta.get("_file_size")
        size_hint = int(round(float(file_size) * 1024 * 1024)) if isinstance(file_size, (int, float)) else None
        return WeightsRef(
            enum=enum.__name__,
            member=member.name,
            url=member.url,
            module=enum.__module__,
            models=tuple(m.name for m in infos),
            builders=tuple(m.builder_path for m in infos),
            family=infos[0].family if infos else "",
            size_hint=size_hint,
        )

    # -- as data -----------------------------------------------------------------------------
    def catalog(self) -> Catalog:
        """Everything discovered as plain data (transform specs and meta captured as JSON).

        Made afresh from the live objects on every call, so that an in-process change of a member
        (tests point a real member's url at a synthetic file) is seen; the costly part, capturing
        each member's transforms and meta, is remembered per member and url.
        """
        enum_infos, weights = [], {}
        for enum in self._all_enums():
            key = _enum_key(enum)
            members = tuple(m.name for m in enum)
            names = {alias: m.name for alias, m in enum.__members__.items()}
            if enum in self.enums.values() or any(m.enum is enum for m in self.models.values()):
                enum_infos.append(EnumInfo(key, enum.__name__, enum.__module__, members, names))
            for member in enum:
                ref = self.ref(member)
                memo = (key, member.name, member.url)
                seen, info = self._infos.get(memo, (None, None))
                # a shallow copy of the meta it was made from: an in-place edit of a member's meta
                # (a test's monkeypatch.setitem) makes it stale; equal values compare by identity first
                if info is None or info.ref != ref or seen != member.meta:
                    info = _weights_info(ref, member)
                    self._infos[memo] = (dict(member.meta), info)
                weights[(key, member.name)] = info
        models = {}
        for name, model in self.models.items():
            backbone = _backbone_member(model.builder)
            models[name] = ModelInfo(name, _enum_key(model.enum), model.family, model.builder_path,
                                     (_enum_key(type(backbone)), backbone.name) if backbone is not None else None)
        return Catalog(models, enum_infos, weights, self.modules)

    # -- selection (through the catalog, the one implementation) --------------------------------
    def all_refs(self) -> list[WeightsRef]:
        return self.catalog().all_refs()

    def resolve(self, selectors: Iterable[str], *, all_weights: bool = False,
                with_backbones: bool = False) -> list[WeightsRef]:
        return self.catalog().resolve(selectors, all_weights=all_weights, with_backbones=with_backbones)


def _weights_info(ref: WeightsRef, member) -> WeightsInfo:
    try:
        return WeightsInfo(ref, transform_spec(member), meta_to_json(member.meta))
    except SpecError as exc:
        try:
            meta = meta_to_json(member.meta)
        except SpecError:
            meta = {}
        return WeightsInfo(ref, None, meta, problem=f"{ref.name}: {exc}")


def describe_live(ref: WeightsRef) -> WeightsInfo:
    """A ref's WeightsInfo from its live member (imports ``ref.module``)."""
    if not ref.module:
        raise RegistryError(f"{ref.name}: unknown weights (no module recorded; pass --registry MODULE)")
    try:
        member = ref.weights()
    except ImportError as exc:
        raise RegistryError(f"{ref.name}: cannot import {ref.module}: {exc}") from None
    except AttributeError:
        raise RegistryError(f"{ref.name}: {ref.module} has no such weights") from None
    return _weights_info(ref, member)


def live_registry(modules: tuple[str, ...], *, torchvision: bool = True) -> Registry:
    """The live registry of exactly ``modules`` (plus torchvision), cached: one object per arguments,
    however they are spelled."""
    return _live_registry(tuple(modules), bool(torchvision))


@lru_cache(maxsize=8)
def _live_registry(modules: tuple[str, ...], torchvision: bool) -> Registry:
    return Registry(modules, torchvision=torchvision)


def get_registry(modules: Sequence[str] = ()) -> Registry:
    """The live registry for torchvision plus ``modules`` and ``$TVPACK_REGISTRY`` (cached)."""
    return live_registry(tuple(dict.fromkeys([*env.registries(), *modules])))
