"""Transform specs and meta as JSON: fidelity for every torchvision weights, user classes, safety."""
from __future__ import annotations

import functools
import json
import math
import sys
import textwrap
from enum import Enum
from pathlib import Path

import pytest
import torch

from packager import spec as S
from packager.discovery import get_registry

torchvision = pytest.importorskip("torchvision")
from torchvision.transforms import InterpolationMode, _presets  # noqa: E402


def _json_trip(data):
    """Through real JSON text, strictly (no NaN literals)."""
    return json.loads(json.dumps(data, allow_nan=False))


def _all_weights():
    reg = get_registry()
    return [reg.weights(ref.name) for ref in reg.all_refs()]


def _assert_same(a, b, path="meta"):
    """Equality with types preserved: tuples stay tuples, enum members identical, NaN == NaN."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, Enum):
        assert a is b, path
    else:
        assert a == b, path


def _public_state(module) -> dict:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


# -- the 166 weights of torchvision ---------------------------------------------------------------
def test_registry_has_166_weights():
    assert len(_all_weights()) == 166


def test_every_weights_spec_is_complete_json_and_rebuilds_the_same_module():
    for weights in _all_weights():
        spec = S.transform_spec(weights)
        assert spec == _json_trip(spec), weights
        assert spec["kind"] == "preset" and spec["class"] in S.PRESETS
        cls = getattr(_presets, spec["class"])
        if cls.__init__ is not torch.nn.Module.__init__:
            # every constructor argument is recorded, defaults included
            assert set(spec["kwargs"]) == set(_init_params(cls)), weights
        if "interpolation" in spec["kwargs"]:
            assert spec["kwargs"]["interpolation"] in {"bilinear", "bicubic"}
        original = weights.transforms()
        rebuilt = S.build_transforms(_json_trip(spec))
        assert type(rebuilt) is type(original)
        assert _public_state(rebuilt) == _public_state(original), weights


def _init_params(cls):
    import inspect

    return [name for name in inspect.signature(cls).parameters]


def _sample_inputs(kind: str):
    gen = torch.Generator().manual_seed(0)
    image_u8 = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=gen)
    image_f = torch.rand((2, 3, 41, 29), generator=gen)
    if kind == "VideoClassification":
        clip_u8 = torch.randint(0, 256, (3, 3, 19, 27), dtype=torch.uint8, generator=gen)
        return [(clip_u8,), (torch.rand((1, 2, 3, 21, 17), generator=gen),)]
    if kind == "OpticalFlow":
        return [(image_u8, torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=gen)),
                (image_f, torch.rand((2, 3, 41, 29), generator=gen))]
    return [(image_u8,), (image_f,)]


def _assert_outputs_equal(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_outputs_equal(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


def test_rebuilt_pipelines_give_equal_outputs_for_all_weights():
    # Many weights share a pipeline: run the tensors once per distinct spec, but every weights'
    # own transforms() is compared against its own rebuilt spec (cheap, see the test above).
    groups: dict[str, list] = {}
    for weights in _all_weights():
        groups.setdefault(json.dumps(S.transform_spec(weights), sort_keys=True), []).append(weights)
    assert 20 < len(groups) < 60
    with torch.no_grad():
        for key, members in groups.items():
            spec = json.loads(key)
            rebuilt = S.build_transforms(spec)
            original = members[0].transforms()
            for inputs in _sample_inputs(spec["class"]):
                _assert_outputs_equal(rebuilt(*inputs), original(*inputs))


def test_every_meta_round_trips_exactly():
    quantized = 0
    for weights in _all_weights():
        data = S.meta_to_json(weights.meta)
        back = S.meta_from_json(_json_trip(data))
        _assert_same(weights.meta, back)
        assert isinstance(back["min_size"], tuple)
        if "unquantized" in weights.meta:
            quantized += 1
            assert back["unquantized"] is weights.meta["unquantized"]
    assert quantized >= 10


def test_missing_weights_member_comes_back_as_typed_reference():
    meta = S.meta_to_json(get_registry().weights("ResNet50_QuantizedWeights.IMAGENET1K_FBGEMM_V1").meta)
    meta["unquantized"]["__weights__"].update(member="IMAGENET1K_V9")
    back = S.meta_from_json(_json_trip(meta))
    ref = back["unquantized"]
    assert isinstance(ref, S.WeightsReference)
    assert (ref.enum, ref.member, ref.module) == ("ResNet50_Weights", "IMAGENET1K_V9", "torchvision.models.resnet")
    assert repr(ref) == "WeightsReference('ResNet50_Weights.IMAGENET1K_V9', module='torchvision.models.resnet')"
    assert ref.resolve() is None
    # and it round trips as itself
    assert S.meta_from_json(_json_trip(S.meta_to_json(back)))["unquantized"] == ref
    # an enum from a module that is not importable here
    meta["unquantized"]["__weights__"].update(module="nowhere_pkg.models", member="IMAGENET1K_V1")
    back = S.meta_from_json(_json_trip(meta))
    assert back["unquantized"] == S.WeightsReference("ResNet50_Weights", "IMAGENET1K_V1", "nowhere_pkg.models")
    assert "nowhere_pkg" not in sys.modules


def test_value_codec_edge_cases():
    import numpy as np

    meta = {
        "tuple": (1, (2.5, "x"), [3, (4,)]),
        "empty": (),
        "nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"),
        "int_keys": {1: "a", (2, 3): "b"},
        "tag_like": {"__tuple__": [1, 2]},
        "nested": {"a": {"b": [None, True, False, 0, -1, 1e-300, 2**70]}},
        "interp": InterpolationMode.NEAREST_EXACT,
        "array": np.arange(3),
    }
    data = _json_trip(S.meta_to_json(meta))
    back = S.meta_from_json(data)
    expected = dict(meta, array=S.OpaqueValue("numpy.ndarray", repr(np.arange(3))))
    _assert_same(expected, back)
    assert back["tag_like"] == {"__tuple__": [1, 2]}
    assert "OpaqueValue(numpy.ndarray" in repr(back["array"])
    # opaque values are kept, never evaluated, and round trip as themselves
    _assert_same(back, S.meta_from_json(_json_trip(S.meta_to_json(back))))


def test_malformed_meta_is_a_clear_error():
    with pytest.raises(S.SpecError, match="malformed __float__"):
        S.meta_from_json({"x": {"__float__": "__import__('os')"}})
    with pytest.raises(S.SpecError, match="unknown interpolation"):
        S.meta_from_json({"x": {"__interpolation__": "sinc"}})
    with pytest.raises(S.SpecError, match="malformed __weights__"):
        S.meta_from_json({"x": {"__weights__": {"enum": "A"}}})


def test_spec_keeps_pipeline_when_library_defaults_change(monkeypatch):
    weights = get_registry().weights("ResNet50_Weights.IMAGENET1K_V2")
    spec = _json_trip(S.transform_spec(weights))
    image = torch.randint(0, 256, (3, 31, 45), dtype=torch.uint8)
    expected = weights.transforms()(image)
    # a "later torchvision" whose defaults moved
    defaults = dict(_presets.ImageClassification.__init__.__kwdefaults__)
    defaults.update(resize_size=64, mean=(0.0, 0.0, 0.0), interpolation=InterpolationMode.NEAREST, antialias=False)
    monkeypatch.setattr(_presets.ImageClassification.__init__, "__kwdefaults__", defaults)
    assert not torch.equal(weights.transforms()(image), expected)  # the patch really changed defaults
    assert torch.equal(S.build_transforms(spec)(image), expected)


def test_preset_spec_with_unknown_argument_is_refused():
    spec = _json_trip(S.transform_spec(get_registry().weights("ResNet50_Weights.IMAGENET1K_V2")))
    spec["kwargs"]["sharpen"] = True
    with pytest.raises(S.SpecError, match="does not accept sharpen"):
        S.build_transforms(spec)
    spec = {"spec_version": 1, "kind": "preset", "class": "ObjectDetection", "kwargs": {"x": 1}}
    with pytest.raises(S.SpecError, match="does not accept x"):
        S.build_transforms(spec)
    with pytest.raises(S.SpecError, match="not one of"):
        S.build_transforms({"spec_version": 1, "kind": "preset", "class": "Compose", "kwargs": {}})
    with pytest.raises(S.SpecError, match="version"):
        S.build_transforms({"spec_version": 99, "kind": "preset", "class": "ObjectDetection", "kwargs": {}})


def test_summaries():
    reg = get_registry()
    assert S.summarize(S.transform_spec(reg.weights("Swin_T_Weights.IMAGENET1K_V1"))) == (
        "ImageClassification resize 232 bicubic, crop 224")
    assert S.summarize(S.transform_spec(reg.weights("MViT_V1_B_Weights.KINETICS400_V1"))) == (
        "VideoClassification resize 256 bilinear, crop 224x224")
    assert S.summarize(S.transform_spec(reg.weights("Raft_Small_Weights.C_T_V1"))) == "OpticalFlow"
    assert S.summarize({"kind": "nonsense"}) == "?"


# -- user classes outside the allow-list ------------------------------------------------------------
USER_MODULE = textwrap.dedent('''
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    class Scale(torch.nn.Module):
        def __init__(self, factor, *, size=(7, 5), mode=InterpolationMode.BILINEAR, tag="x"):
            super().__init__()
            self.factor, self.size, self.mode, self.tag = factor, size, mode, tag

        def forward(self, img):
            return img.float() * self.factor

    class MyClassification(ImageClassification):
        pass
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    pkg = tmp_path / "tvpack_user_tf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "presets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("tvpack_user_tf.presets")
    yield module
    for name in ("tvpack_user_tf.presets", "tvpack_user_tf"):
        sys.modules.pop(name, None)


def test_user_class_is_recorded_by_import_path_with_all_arguments(user_module):
    spec = _json_trip(S.transform_spec(functools.partial(user_module.Scale, 2.5, tag="y")))
    assert spec == {
        "spec_version": 1, "kind": "custom", "class": "tvpack_user_tf.presets:Scale", "args": [],
        "kwargs": {"factor": 2.5, "size": {"__tuple__": [7, 5]}, "mode": {"__interpolation__": "bilinear"},
                   "tag": "y"},
    }
    rebuilt = S.build_transforms(spec)
    assert type(rebuilt) is user_module.Scale
    assert (rebuilt.factor, rebuilt.size, rebuilt.mode, rebuilt.tag) == (2.5, (7, 5), InterpolationMode.BILINEAR, "y")
    # a subclass of a preset is not the preset: it is a custom class too
    sub = S.transform_spec(functools.partial(user_module.MyClassification, crop_size=9))
    assert sub["kind"] == "custom" and sub["class"] == "tvpack_user_tf.presets:MyClassification"
    image = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    assert torch.equal(S.build_transforms(_json_trip(sub))(image), _presets.ImageClassification(crop_size=9)(image))


def test_user_class_rebuilds_from_a_registry_module_in_a_fresh_import(user_module):
    spec = _json_trip(S.transform_spec(functools.partial(user_module.Scale, 3)))
    for name in ("tvpack_user_tf.presets", "tvpack_user_tf"):
        sys.modules.pop(name)
    # not imported and not a registry module: refused without importing anything
    with pytest.raises(S.SpecError, match="neither imported nor a registry module"):
        S.build_transforms(spec)
    assert "tvpack_user_tf.presets" not in sys.modules
    # the same package given as a registry: imported and rebuilt
    rebuilt = S.build_transforms(spec, registry=["tvpack_user_tf"])
    assert rebuilt.factor == 3 and type(rebuilt).__module__ == "tvpack_user_tf.presets"


def test_user_class_not_importable_here_is_a_clear_error(user_module, monkeypatch):
    spec = _json_trip(S.transform_spec(functools.partial(user_module.Scale, 3)))
    for name in ("tvpack_user_tf.presets", "tvpack_user_tf"):
        sys.modules.pop(name)
    package_root = str(Path(user_module.__file__).parent.parent)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry != package_root])
    with pytest.raises(S.SpecError, match="not importable here"):
        S.build_transforms(spec, registry=["tvpack_user_tf"])
    spec["class"] = "tvpack_user_tf:<locals>.Scale"
    with pytest.raises(S.SpecError, match="not a module-level name"):
        S.build_transforms(spec)


def test_hostile_custom_spec_never_calls_or_imports_anything(tmp_path):
    marker = tmp_path / "pwned"
    hostile = {"spec_version": 1, "kind": "custom", "class": "os:system", "args": [f"touch {marker}"], "kwargs": {}}
    with pytest.raises(S.SpecError, match="not a torch.nn.Module class"):
        S.build_transforms(hostile)
    hostile["class"] = "subprocess:Popen"
    with pytest.raises(S.SpecError):
        S.build_transforms(hostile)
    assert not marker.exists()
    sys.modules.pop("antigravity", None)
    with pytest.raises(S.SpecError, match="neither imported nor a registry module"):
        S.build_transforms({"spec_version": 1, "kind": "custom", "class": "antigravity:X", "kwargs": {}})
    assert "antigravity" not in sys.modules
