"""Discovery and selectors, against torchvision's real registry and user registry modules."""
from __future__ import annotations

import textwrap

import pytest

from packager.discovery import get_registry
from packager.errors import RegistryError, SelectorError, UsageError
from packager.registry import hash_prefix_from_filename
from packager.snapshot import resolve


@pytest.fixture(scope="module")
def reg():
    return get_registry()


def names(refs):
    return [r.name for r in refs]


def test_torchvision_registry_is_complete(reg):
    import torchvision.models as tvm

    assert len(reg.models) == len(tvm.list_models()) == 121
    refs = reg.all_refs()
    assert len(refs) == 166
    # every weights of every enum torchvision knows, each with a hash in its file name
    assert all(r.hash_prefix for r in refs)
    total_mb = sum(reg.weights(r.name).meta["_file_size"] for r in refs)
    assert 39_000 < total_mb < 40_500


def test_families_follow_torchvision_modules(reg):
    fam = {r.name: r.family for r in reg.all_refs()}
    assert fam["ResNet50_Weights.IMAGENET1K_V2"] == "classification"
    assert fam["FasterRCNN_ResNet50_FPN_Weights.COCO_V1"] == "detection"
    assert fam["FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1"] == "segmentation"
    assert fam["R3D_18_Weights.KINETICS400_V1"] == "video"
    assert fam["Raft_Large_Weights.C_T_V2"] == "optical_flow"
    assert fam["ResNet50_QuantizedWeights.IMAGENET1K_FBGEMM_V2"] == "quantization"


@pytest.mark.parametrize("selector, expected", [
    ("resnet50", ["ResNet50_Weights.IMAGENET1K_V2"]),
    ("resnet50:DEFAULT", ["ResNet50_Weights.IMAGENET1K_V2"]),
    ("resnet50:IMAGENET1K_V1", ["ResNet50_Weights.IMAGENET1K_V1"]),
    ("resnet50:all", ["ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"]),
    ("ResNet50_Weights.IMAGENET1K_V2", ["ResNet50_Weights.IMAGENET1K_V2"]),
    ("ResNet50_Weights.DEFAULT", ["ResNet50_Weights.IMAGENET1K_V2"]),
])
def test_selector_forms(reg, selector, expected):
    assert names(reg.resolve([selector])) == expected


def test_globs_select_default_of_each_model(reg):
    refs = reg.resolve(["quantized_*"])
    assert len(refs) == 12 and all(r.family == "quantization" for r in refs)
    assert {m for r in refs for m in r.models} == {m for m in reg.models if m.startswith("quantized_")}
    assert "ResNet50_Weights.IMAGENET1K_V2" in names(reg.resolve(["resnet*"]))


def test_duplicates_collapse(reg):
    refs = reg.resolve(["resnet50", "resnet50:DEFAULT", "ResNet50_Weights.IMAGENET1K_V2", "resnet50:all"])
    assert names(refs) == ["ResNet50_Weights.IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V1"]


def test_all_and_with_backbones(reg):
    assert len(reg.resolve([], all_weights=True)) == 166
    refs = reg.resolve(["fasterrcnn_resnet50_fpn"], with_backbones=True)
    assert names(refs) == ["FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "ResNet50_Weights.IMAGENET1K_V1"]
    assert names(reg.resolve(["resnet50"], with_backbones=True)) == ["ResNet50_Weights.IMAGENET1K_V2"]


def test_ref_fields(reg):
    (ref,) = reg.resolve(["ResNet50_Weights.IMAGENET1K_V2"])
    assert ref.models == ("resnet50",)
    assert ref.builders == ("torchvision.models.resnet.resnet50",)
    assert ref.filename == "resnet50-11ad3fa6.pth" and ref.hash_prefix == "11ad3fa6"
    assert ref.module == "torchvision.models.resnet"
    assert abs(ref.size_hint - 97.79 * 2**20) < 2**20
    assert ref.weights() is __import__("torchvision").models.ResNet50_Weights.IMAGENET1K_V2


@pytest.mark.parametrize("selector, message", [
    ("resnt50", "did you mean resnet50"),
    ("resnet50:IMAGENET1K_V3", "did you mean IMAGENET1K_V"),
    ("ResNet50_Weight.IMAGENET1K_V2", "did you mean ResNet50_Weights"),
    ("nomatch*", "no model matches"),
])
def test_unknown_names_suggest(reg, selector, message):
    with pytest.raises(SelectorError, match=message):
        reg.resolve([selector])


@pytest.mark.parametrize("selector", ["a:b:c", "resnet50:", ":x", "", "res net", "a.b.c", "resnet50:IMAGENET-1"])
def test_bad_syntax_is_a_usage_error(reg, selector):
    with pytest.raises(UsageError):
        reg.resolve([selector])


def test_nothing_selected_is_a_usage_error():
    with pytest.raises(UsageError):
        resolve([])


def test_hash_prefix_rules():
    assert hash_prefix_from_filename("resnet50-0676ba61.pth") == "0676ba61"
    assert hash_prefix_from_filename("resnet50_fbgemm_bf931d71.pth") == "bf931d71"
    assert hash_prefix_from_filename("mobilenet_v2_qnnpack_37f702c5.pth") == "37f702c5"
    assert hash_prefix_from_filename("plain.pth") is None


def test_zoo_registry_module(zoo):
    reg = get_registry(["packager.testing.zoo"])
    assert set(zoo.ZOO_MODELS) <= set(reg.models)
    fam = {m: reg.models[m].family for m in zoo.ZOO_MODELS}
    assert fam == {
        "zoo_mobilenet_v3_small": "classification", "zoo_mobilenet_v3_large": "classification",
        "zoo_shufflenet_v2": "classification", "zoo_ssdlite320": "detection", "zoo_lraspp": "segmentation",
        "zoo_s3d": "video", "zoo_raft_small": "optical_flow", "zoo_quantized_shufflenet_v2": "quantization",
    }
    assert names(reg.resolve(["zoo_mobilenet_v3_small"])) == ["ZooMobileNetV3Small_Weights.IMAGENET10_V2"]
    assert len(reg.resolve(["zoo_mobilenet_v3_small:all"])) == 2
    assert names(reg.resolve(["zoo_ssdlite320"], with_backbones=True)) == [
        "ZooSSDLite320_Weights.COCO5_V1", "ZooMobileNetV3Large_Weights.IMAGENET10_V1"]
    assert len(reg.resolve(["zoo_*"])) == 8
    (q,) = reg.resolve(["zoo_quantized_shufflenet_v2"])
    assert q.filename.endswith(".pth") and "_fbgemm_" in q.filename and q.hash_prefix
    # the registry still has every torchvision weights too
    assert len(reg.all_refs()) == 166 + 9


def test_user_registry_module_with_string_annotations(tmp_path, monkeypatch):
    (tmp_path / "myweights.py").write_text(textwrap.dedent('''
        from __future__ import annotations
        from functools import partial
        from typing import Optional
        from torchvision.models._api import Weights, WeightsEnum
        from torchvision.transforms._presets import ImageClassification

        class Tiny_Weights(WeightsEnum):
            A = Weights(url="https://example.com/w/tiny-abcdef12.pth",
                        transforms=partial(ImageClassification, crop_size=8),
                        meta={"categories": ["x", "y"], "_file_size": 1.0})
            B = Weights(url="https://example.com/w/tiny-12abcdef.pth",
                        transforms=partial(ImageClassification, crop_size=8), meta={"categories": ["x"]})

        def tiny_net(*, weights: Optional[Tiny_Weights] = None, **kwargs):
            raise NotImplementedError

        def helper(x):  # not a builder
            return x
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = get_registry(["myweights"])
    assert "tiny_net" in reg.models and "helper" not in reg.models
    with pytest.raises(SelectorError, match="no DEFAULT weights"):
        reg.resolve(["tiny_net"])
    assert names(reg.resolve(["tiny_net:all"])) == ["Tiny_Weights.A", "Tiny_Weights.B"]
    (ref,) = reg.resolve(["Tiny_Weights.A"])
    assert ref.models == ("tiny_net",) and ref.family == "classification" and ref.size_hint == 2**20


def test_registry_from_environment(monkeypatch, zoo):
    monkeypatch.setenv("TVPACK_REGISTRY", "packager.testing.zoo")
    assert "zoo_s3d" in get_registry().models


def test_broken_registry_modules(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_reg.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "empty_reg.py").write_text("X = 1\n")
    with pytest.raises(RegistryError, match="boom"):
        get_registry(["broken_reg"])
    with pytest.raises(RegistryError, match="cannot import"):
        get_registry(["does_not_exist_anywhere"])
    with pytest.raises(RegistryError, match="no WeightsEnum"):
        get_registry(["empty_reg"])


def test_empty_registry_name_is_a_usage_error():
    with pytest.raises(UsageError, match="empty"):
        get_registry([""])
