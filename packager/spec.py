"""Transform specs and weights meta as plain JSON data: what a bundle stores instead of pickles.

A **transform spec** names the preprocessing class a ``Weights.transforms`` builds and every
constructor argument, defaults included, so that a later torchvision whose defaults moved still
rebuilds the same pipeline::

    {"spec_version": 1, "kind": "preset", "class": "ImageClassification",
     "kwargs": {"crop_size": 224, "resize_size": 232, "mean": {"__tuple__": [0.485, 0.456, 0.406]},
                "std": {"__tuple__": [...]}, "interpolation": "bicubic", "antialias": true}}

Presets (torchvision's five classes in ``torchvision.transforms._presets``) come from an
allow-list and are rebuilt from that list only. Any other class is recorded as
``{"kind": "custom", "class": "pkg.module:Qualname", "args": [...], "kwargs": {...}}`` and rebuilt
only when that import path resolves locally.

**Meta** (``Weights.meta``) round-trips exactly through :func:`meta_to_json` /
:func:`meta_from_json`: values JSON cannot hold are written in a tagged form, an object with one
``"__tag__"`` key: ``{"__tuple__": [...]}``, ``{"__weights__": {"enum", "member", "module"}}``,
``{"__interpolation__": "bilinear"}``, ``{"__float__": "nan"}``, ``{"__dict__": [[k, v], ...]}``
(non-string keys, or a dict that would look like a tag) and ``{"__opaque__": {"type", "repr"}}``
for anything else (kept as an :class:`OpaqueValue`, never evaluated). A weights member that does
not exist locally comes back as a :class:`WeightsReference`.

torch/torchvision are imported only by the functions that need them.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from . import env
from .errors import LoadError

SPEC_VERSION = 1
PRESET_MODULE = "torchvision.transforms._presets"
# The allow-list: only these names are looked up in PRESET_MODULE when rebuilding a preset.
PRESETS = ("ImageClassification", "ObjectDetection", "SemanticSegmentation", "VideoClassification", "OpticalFlow")

_TAGS = ("__tuple__", "__weights__", "__interpolation__", "__float__", "__dict__", "__opaque__")


class SpecError(LoadError):
    """A transform spec or meta document is malformed or names something unusable here."""


# -- typed stand-ins -------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsReference:
    """A ``WeightsEnum`` member named by a bundle that does not exist in this environment.

    Kept instead of the live member (``meta["unquantized"]`` of a quantized weights whose float
    enum is not importable here); :meth:`resolve` tries again later, e.g. after a registry import.
    """

    enum: str  # "ResNet50_Weights"
    member: str  # "IMAGENET1K_V1"
    module: str  # "torchvision.models.resnet"

    @property
    def name(self) -> str:
        return f"{self.enum}.{self.member}"

    def resolve(self, registry=None):
        """The live member, or None when it still does not exist."""
        return _find_weights(self.enum, self.member, self.module, registry)

    def __repr__(self) -> str:
        return f"WeightsReference({self.name!r}, module={self.module!r})"


@dataclass(frozen=True)
class OpaqueValue:
    """A meta value JSON cannot hold and tvpack does not know how to rebuild; kept as its repr."""

    type: str  # "numpy.ndarray"
    repr: str

    def __repr__(self) -> str:
        return f"OpaqueValue({self.type}: {self.repr})"


# -- generic value codec ---------------------------------------------------------------------------
def _qualified_type(value) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_weights_member(value) -> bool:
    models_api = sys.modules.get("torchvision.models._api")
    return models_api is not None and isinstance(value, models_api.WeightsEnum)


def _is_interpolation(value) -> bool:
    functional = sys.modules.get("torchvision.transforms.functional")
    return functional is not None and isinstance(value, functional.InterpolationMode)


def encode_value(value: Any) -> Any:
    """One Python value as JSON data (tagged where JSON alone would lose its type)."""
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if math.isfinite(value) else {"__float__": repr(value)}  # 'nan', 'inf', '-inf'
    if kind is list:
        return [encode_value(item) for item in value]
    if kind is tuple:
        return {"__tuple__": [encode_value(item) for item in value]}
    if kind is dict:
        plain = all(type(key) is str for key in value) and not (len(value) == 1 and next(iter(value)) in _TAGS)
        if plain:
            return {key: encode_value(item) for key, item in value.items()}
        return {"__dict__": [[encode_value(key), encode_value(item)] for key, item in value.items()]}
    if isinstance(value, WeightsReference):
        return {"__weights__": {"enum": value.enum, "member": value.member, "module": value.module}}
    if _is_weights_member(value):
        enum = type(value)
        return {"__weights__": {"enum": enum.__name__, "member": value.name, "module": enum.__module__}}
    if _is_interpolation(value):
        return {"__interpolation__": value.value}
    if isinstance(value, OpaqueValue):
        return {"__opaque__": {"type": value.type, "repr": value.repr}}
    # Anything else (numpy arrays, dtypes, user objects...) is kept as a labelled repr, never a pickle.
    return {"__opaque__": {"type": _qualified_type(value), "repr": repr(value)}}


def decode_value(data: Any, *, registry=None) -> Any:
    """Inverse of :func:`encode_value`."""
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode_value(item, registry=registry) for item in data]
    if kind is not dict:
        raise SpecError(f"not JSON data: {type(data).__name__}")
    if len(data) == 1:
        tag, body = next(iter(data.items()))
        if tag in _TAGS:
            return _decode_tagged(tag, body, registry)
    return {key: decode_value(item, registry=registry) for key, item in data.items()}


def _decode_tagged(tag: str, body: Any, registry) -> Any:
    try:
        if tag == "__tuple__":
            return tuple(decode_value(item, registry=registry) for item in body)
        if tag == "__float__":
            if body not in ("nan", "inf", "-inf"):
                raise ValueError(body)
            return float(body)
        if tag == "__dict__":
            return {_hashable(decode_value(k, registry=registry)): decode_value(v, registry=registry) for k, v in body}
        if tag == "__interpolation__":
            return _interpolation(body)
        if tag == "__weights__":
            enum, member, module = (str(body[k]) for k in ("enum", "member", "module"))
            found = _find_weights(enum, member, module, registry)
            return found if found is not None else WeightsReference(enum, member, module)
        if tag == "__opaque__":
            return OpaqueValue(str(body["type"]), str(body["repr"]))
    except SpecError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise SpecError(f"malformed {tag} value in meta/spec: {body!r:.80}") from exc
    raise AssertionError(tag)  # pragma: no cover


def _hashable(key):
    if isinstance(key, list):
        raise SpecError("a dict key cannot be a list")
    return key


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        choices = ", ".join(mode.value for mode in InterpolationMode)
        raise SpecError(f"unknown interpolation {name!r} (this torchvision knows: {choices})") from None


def _find_weights(enum_name: str, member: str, module_name: str, registry):
    """The live member for (enum, member, module), or None.

    Only modules that are already trusted are consulted: the given registry, modules already
    imported, and torchvision itself. A name read from an archive never makes us import a module.
    """
    candidates = []
    if isinstance(registry, (list, tuple)):  # registry module names: trusted, the user named them
        for name in dict.fromkeys([*registry, *env.registries()]):
            try:
                enum = getattr(importlib.import_module(name), enum_name, None)
            except Exception:  # noqa: BLE001 - a module that fails to import holds nothing usable here
                enum = None
            if enum is not None:
                candidates.append(enum)
    elif registry is not None:  # a live packager.discovery.Registry
        enum = registry.enums.get(enum_name)
        if enum is not None:
            candidates.append(enum)
    module = sys.modules.get(module_name)
    if module is None and (module_name == "torchvision" or module_name.startswith("torchvision.")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    if module is not None:
        enum = getattr(module, enum_name, None)
        if enum is not None:
            candidates.append(enum)
    for enum in candidates:
        found = getattr(enum, "__members__", {}).get(member)
        if found is not None:
            return found
    return None


# -- meta ------------------------------------------------------------------------------------------
def meta_to_json(meta: Mapping) -> dict:
    """``Weights.meta`` as JSON data (see the module docstring for the tagged forms)."""
    if not isinstance(meta, Mapping):
        raise SpecError(f"meta must be a mapping, not {type(meta).__name__}")
    return encode_value(dict(meta))


def meta_from_json(data: Mapping, *, registry=None) -> dict:
    """JSON data from :func:`meta_to_json` back to the meta dict, types preserved.

    ``registry`` (a :class:`packager.discovery.Registry` or a list of registry module names) is
    where weights references are looked up besides torchvision and already imported modules.
    """
    meta = decode_value(data, registry=registry)
    if not isinstance(meta, dict):
        raise SpecError("meta must be a JSON object")
    return meta


# -- transform specs -------------------------------------------------------------------------------
def _unwrap(transforms) -> tuple[Any, tuple, dict]:
    """(class or callable, positional args, keyword args) of a ``Weights.transforms`` value."""
    args: tuple = ()
    kwargs: dict = {}
    target = transforms
    # partial(partial(cls, a=1), b=2) flattens the same way functools does.
    while isinstance(target, functools.partial):
        args = tuple(target.args) + args
        kwargs = {**target.keywords, **kwargs}
        target = target.func
    return target, args, kwargs


def _bind_all(target, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except TypeError as exc:
        raise SpecError(f"cannot resolve the arguments of {_import_path(target)}: {exc}") from exc
    bound.apply_defaults()
    return bound


def _flatten(bound: inspect.BoundArguments) -> tuple[list, dict]:
    """Bound arguments (defaults applied) as the (args, kwargs) of one explicit call; named
    parameters go by keyword unless a filled ``*args`` forces what precedes it to be positional."""
    params = bound.signature.parameters
    if any(params[name].kind is inspect.Parameter.VAR_POSITIONAL and value for name, value in bound.arguments.items()):
        return list(bound.args), dict(bound.kwargs)
    args, kwargs = [], {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[name] = value
    return args, kwargs


def _import_path(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _preset_name(target) -> str | None:
    presets = sys.modules.get(PRESET_MODULE)
    if presets is None or not isinstance(target, type):
        return None
    for name in PRESETS:
        if getattr(presets, name, None) is target:  # identity: a subclass is a custom class
            return name
    return None


def transform_spec(weights) -> dict:
    """The transform spec (JSON data) of a ``WeightsEnum`` member or ``Weights`` value, or of a
    ``transforms`` callable itself."""
    import torchvision.transforms._presets  # noqa: F401 - so _preset_name can see the classes

    transforms = getattr(weights, "transforms", weights)
    target, args, kwargs = _unwrap(transforms)
    name = _preset_name(target)
    if name is not None:
        spec_args, spec_kwargs = _flatten(_bind_all(target, args, kwargs))
        if spec_args:
            raise SpecError(f"transform preset {name} takes keyword arguments only, got {spec_args!r:.80}")
        resolved = {}
        for key, value in spec_kwargs.items():
            if _is_interpolation(value):
                resolved[key] = value.value  # by name: "bilinear"
            else:
                resolved[key] = encode_value(value)
        return {"spec_version": SPEC_VERSION, "kind": "preset", "class": name, "kwargs": resolved}
    if not callable(target):
        raise SpecError(f"transforms is not callable: {target!r:.80}")
    spec_args, spec_kwargs = list(args), dict(kwargs)
    if isinstance(target, type):
        try:
            bound = _bind_all(target, args, kwargs)
        except SpecError:
            bound = None  # a signature we cannot bind (C types, *args tricks): keep what was given
        if bound is not None:
            spec_args, spec_kwargs = _flatten(bound)
    return {
        "spec_version": SPEC_VERSION,
        "kind": "custom",
        "class": _import_path(target),
        "args": [encode_value(v) for v in spec_args],
        "kwargs": {k: encode_value(v) for k, v in spec_kwargs.items()},
    }


def _check_spec(spec) -> None:
    if not isinstance(spec, Mapping) or spec.get("kind") not in ("preset", "custom"):
        raise SpecError("not a transform spec (expected an object with kind 'preset' or 'custom')")
    version = spec.get("spec_version")
    if version != SPEC_VERSION:
        raise SpecError(f"transform spec version {version!r} is not supported (this tvpack reads {SPEC_VERSION})")
    if not isinstance(spec.get("class"), str) or not isinstance(spec.get("kwargs", {}), Mapping):
        raise SpecError("transform spec lacks a class name or its kwargs are not an object")


def build_transforms(spec: Mapping, *, registry=()):
    """Rebuild the preprocessing module a spec describes (a ``torch.nn.Module``).

    Presets come from torchvision's allow-list. A custom class is rebuilt only when its import
    path resolves here *and* its module is trusted: already imported, torchvision, or inside a
    registry module's package (``registry``: module names or a Registry, plus ``TVPACK_REGISTRY``).
    A name read from an archive never makes us import an arbitrary module, and only a
    ``torch.nn.Module`` subclass is ever called. Raises :class:`SpecError` (a LoadError) otherwise,
    or when the local torchvision no longer accepts a recorded preset argument.
    """
    _check_spec(spec)
    if spec["kind"] == "preset":
        name = spec["class"]
        if name not in PRESETS:
            raise SpecError(f"transform preset {name!r} is not one of {', '.join(PRESETS)}")
        presets = importlib.import_module(PRESET_MODULE)
        cls = getattr(presets, name, None)
        if cls is None:
            raise SpecError(f"this torchvision has no transform preset {name!r}")
        kwargs = {}
        for key, value in spec["kwargs"].items():
            kwargs[key] = _interpolation(value) if key == "interpolation" and isinstance(value, str) else decode_value(value)
        if cls.__init__ is _module_init():  # no constructor arguments of its own
            unknown = sorted(kwargs)
        else:
            params = inspect.signature(cls).parameters
            open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
            unknown = [] if open_ended else sorted(set(kwargs) - set(params))
        if unknown:
            raise SpecError(
                f"this torchvision's {name} does not accept {', '.join(unknown)}; the bundle's pipeline cannot be"
                " rebuilt exactly"
            )
        return cls(**kwargs)
    cls = _import_class(spec["class"], registry)
    args = [decode_value(v) for v in spec.get("args", [])]
    kwargs = {k: decode_value(v) for k, v in spec.get("kwargs", {}).items()}
    try:
        return cls(*args, **kwargs)
    except Exception as exc:
        raise SpecError(f"cannot rebuild transforms {spec['class']}: {type(exc).__name__}: {exc}") from exc


def _module_init():
    import torch

    return torch.nn.Module.__init__


def _trusted_packages(registry) -> set[str]:
    modules = list(getattr(registry, "modules", registry) or ())
    modules += env.registries()
    return {"torchvision", *(name.split(".")[0] for name in modules)}


def _import_class(path: str, registry):
    import torch

    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname or "<locals>" in qualname:
        raise SpecError(f"transforms class {path!r} cannot be imported (it is not a module-level name)")
    module = sys.modules.get(module_name)
    if module is None:
        if module_name.split(".")[0] not in _trusted_packages(registry):
            raise SpecError(
                f"transforms class {path} comes from a module that is neither imported nor a registry module;"
                " import it first or pass it with --registry"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SpecError(f"transforms class {path} is not importable here ({exc}); install the package that"
                            " provides it or rebuild the pipeline by hand") from exc
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise SpecError(f"transforms class {path} is not importable here (no {part!r} in {module_name})")
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise SpecError(f"transforms class {path} is not a torch.nn.Module class; refusing to call it")
    return obj


def summarize(spec: Mapping) -> str:
    """A one-line human summary: ``ImageClassification resize 232 bicubic, crop 224``."""
    try:
        _check_spec(spec)
    except SpecError:
        return "?"
    if spec["kind"] == "custom":
        return f"custom {spec['class']}"
    kwargs = {key: (value if key == "interpolation" else decode_value(value)) for key, value in spec["kwargs"].items()}
    parts = []

    def size(value):
        return "x".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)

    if "resize_size" in kwargs:
        resize = kwargs["resize_size"]
        parts.append("no resize" if resize is None else f"resize {size(resize)} {kwargs.get('interpolation', '')}".rstrip())
    if "crop_size" in kwargs:
        parts.append(f"crop {size(kwargs['crop_size'])}")
    return spec["class"] + (" " + ", ".join(parts) if parts else "")

