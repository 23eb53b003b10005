"""The offline loader: bundles and installed caches back into models identical to torchvision's.

Real torchvision builders run on synthetic checkpoints: each real member's url is patched to a
randomly initialised file whose name carries its own hash, so torchvision's own
``get_model(name, weights=member)`` (from the same TORCH_HOME) and tvpack see the same url and
bytes, and their outputs must be ``torch.equal``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import IN_CI, ROOT, ZOO_REGISTRY, run_tvpack

from packager import loader
from packager.bundle import bundle, install, open_bundle
from packager.discovery import get_registry
from packager.errors import BundleError, IntegrityError, LoadError
from packager.formats.archive import tar_header
from packager.formats.manifest import encode_manifest, manifest_path_for
from packager.snapshot import get_catalog
from packager.spec import meta_to_json, transform_spec
from packager.testing import zoo as zoo_module

M = torchvision.models
UPSTREAM = "https://download.pytorch.org/models/"


# -- synthetic checkpoints for real torchvision members (zoo.synthesize_checkpoint) ------------------

@pytest.fixture(scope="session")
def synth_store(tmp_path_factory):
    """Synthesized checkpoints, made once per session: weights name -> path."""
    store = tmp_path_factory.mktemp("synth")
    made: dict[str, Path] = {}

    def get(member) -> Path:
        name = f"{type(member).__name__}.{member.name}"
        if name not in made:
            made[name] = zoo_module.synthesize_checkpoint(member, store)
        return made[name]

    return get


@pytest.fixture
def use_synthetic(synth_store, monkeypatch):
    """Point a real member at its synthetic checkpoint (url patched for this test only)."""

    def use(member) -> Path:
        path = synth_store(member)
        monkeypatch.setattr(member.value, "url", UPSTREAM + path.name)
        return path

    return use


def stage(home: Path, *paths: Path) -> None:
    """Put files into ``home``'s checkpoint cache (hard links: no copy)."""
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = ckpt / path.name
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


def make_bundle(tmp_path: Path, selectors, *, registry=(), name="b.tar") -> Path:
    """A real bundle (packager.bundle) of weights already staged in ``tmp_path/src-home``."""
    return bundle(selectors, tmp_path / name, registry=registry, torch_home=tmp_path / "src-home", fetch=False)


def installed_home(tmp_path: Path, bundle_path: Path, name="home") -> Path:
    home = tmp_path / name
    install(bundle_path, torch_home=home)
    return home


def entry_for(weights, file: Path, **changes) -> dict:
    """A manifest entry as packager.bundle writes it, for hand-made (edited) manifests."""
    ref = get_registry(()).ref(weights)
    data = file.read_bytes()
    item = {
        "name": ref.name, "enum": ref.enum, "member": ref.member, "module": ref.module, "models": list(ref.models),
        "builders": list(ref.builders), "family": ref.family, "url": weights.url,
        "path": f"hub/checkpoints/{file.name}", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "transforms": transform_spec(weights), "meta": meta_to_json(weights.meta),
    }
    item.update(changes)
    item["name"] = f"{item['enum']}.{item['member']}"
    return item


def write_bundle(out: Path, items: list[dict], files: list[Path]) -> Path:
    """A bundle file in the tvpack layout with a hand-made manifest (hashes correct)."""
    manifest = {"format": "tvpack-bundle", "format_version": 1,
                "created_by": {"packager": "test", "torch": torch.__version__, "torchvision": "9.9.9"},
                "weights": items, "members": {}}
    data = encode_manifest(manifest)
    with open(out, "wb") as f:
        f.write(tar_header(manifest_path_for(data), len(data), 0) + data + bytes(-len(data) % 512))
        for path in sorted(set(files), key=lambda p: p.name):
            payload = path.read_bytes()
            f.write(tar_header(f"hub/checkpoints/{path.name}", len(payload), 0) + payload
                    + bytes(-len(payload) % 512))
        end = f.tell() + 1024
        f.write(bytes(1024 + (-end % 10240)))
    return out


def write_installed(home: Path, items: list[dict], files: list[Path]) -> Path:
    """Lay out an installed cache by hand: checkpoints plus one manifest."""
    stage(home, *files)
    data = encode_manifest({"format": "tvpack-bundle", "format_version": 1, "created_by": {},
                            "weights": items, "members": {}})
    target = home / manifest_path_for(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return home


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def run(model, inputs):
    with torch.inference_mode():
        return model(*inputs)


# -- equivalence with torchvision, per family ----------------------------------------------------------

def _rand(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1))


CASES = {
    # id: (weights member, model, inputs, builder kwargs, source kind, what the builder derived)
    "resnet": (lambda: M.ResNet18_Weights.IMAGENET1K_V1, "resnet18", lambda: (_rand(1, 3, 96, 96),), {}, "installed",
               lambda m: m.fc.out_features == 1000),
    "vit": (lambda: M.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1, "vit_b_16", lambda: (_rand(1, 3, 384, 384),), {},
            "installed", lambda m: m.image_size == 384),
    "googlenet": (lambda: M.GoogLeNet_Weights.IMAGENET1K_V1, "googlenet", lambda: (_rand(1, 3, 128, 128),), {},
                  "bundle", lambda m: m.transform_input and m.aux1 is None and not m.aux_logits),
    "detection": (lambda: M.detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1,
                  "fasterrcnn_mobilenet_v3_large_320_fpn", lambda: ([_rand(3, 120, 160)],), {}, "bundle",
                  lambda m: m.roi_heads.box_predictor.cls_score.out_features == 91),
    "keypoint": (lambda: M.detection.KeypointRCNN_ResNet50_FPN_Weights.COCO_V1, "keypointrcnn_resnet50_fpn",
                 # kwargs go to both builders: a smaller input and 2 detections keep the heads cheap
                 lambda: ([_rand(3, 120, 160)],),
                 {"min_size": 256, "max_size": 320, "rpn_post_nms_top_n_test": 50, "box_detections_per_img": 2},
                 "installed",
                 lambda m: m.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 17),
    "segmentation": (lambda: M.segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
                     "lraspp_mobilenet_v3_large", lambda: (_rand(1, 3, 96, 96),), {}, "bundle",
                     lambda m: m.classifier.low_classifier.out_channels == 21),
    "video": (lambda: M.video.S3D_Weights.KINETICS400_V1, "s3d", lambda: (_rand(1, 3, 16, 224, 224),), {},
              "installed", lambda m: m.classifier[1].out_channels == 400),
    "raft": (lambda: M.optical_flow.Raft_Small_Weights.C_T_V2, "raft_small",
             lambda: (_rand(1, 3, 128, 128), _rand(1, 3, 128, 128).flip(-1)), {}, "bundle", lambda m: True),
    "quantized": (lambda: M.quantization.ShuffleNet_V2_X0_5_QuantizedWeights.IMAGENET1K_FBGEMM_V1,
                  "quantized_shufflenet_v2_x0_5", lambda: (_rand(1, 3, 112, 112),), {}, "installed",
                  lambda m: m.fc._packed_params.dtype == torch.qint8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_torchvision(case, tmp_path, monkeypatch, use_synthetic):
    get_member, model_name, inputs, kwargs, kind, derived = CASES[case]
    member = get_member()
    path = use_synthetic(member)
    stage(tmp_path / "src-home", path)
    bundle_path = make_bundle(tmp_path, [f"{model_name}:{member.name}"])
    source = bundle_path if kind == "bundle" else installed_home(tmp_path, bundle_path)

    # torchvision's own path, from a warm cache (the file is there: no download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "src-home"))
    extra = {"quantize": True} if "quantize" in kwargs or case == "quantized" else {}
    expected_model = M.get_model(model_name, weights=member, **kwargs, **extra).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("error", loader.DriftWarning)
        model, weights = loader.load_model(source, model_name, **kwargs)

    assert not model.training
    assert derived(model)
    assert weights.name == f"{type(member).__name__}.{member.name}"
    assert weights.url == member.url and weights.meta == member.meta
    assert weights.installed is member and weights.differences == ()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    x = inputs()
    assert same(run(model, x), run(expected_model, x))
    # the preprocessing is torchvision's too (a fresh module each call)
    assert weights.transforms() is not weights.transforms()
    if case in ("resnet", "vit", "googlenet", "segmentation"):
        image = (torch.rand(3, 300, 260, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
        assert torch.equal(weights.transforms()(image), member.transforms()(image))


def test_fast_build_matches_plain_build_everywhere(tmp_path, use_synthetic):
    """The meta-device build leaves no tensor behind: parameters, buffers and plain tensor
    attributes (detection anchors...) are equal to a plain, randomly initialised then loaded build."""
    member = M.detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    stage(tmp_path / "src-home", use_synthetic(member))
    home = installed_home(tmp_path, make_bundle(tmp_path, ["ssdlite320_mobilenet_v3_large"]))
    fast, _ = loader.load_model(home, "ssdlite320_mobilenet_v3_large")
    plain, _ = loader.load_model(home, "ssdlite320_mobilenet_v3_large", fast=False)

    def tensors(model):
        found = {}
        for prefix, module in model.named_modules():
            for attr, value in vars(module).items():
                values = value.items() if isinstance(value, dict) and attr != "_modules" else \
                    enumerate(value) if isinstance(value, (list, tuple)) else [("", value)]
                for key, item in values:
                    if isinstance(item, torch.Tensor):
                        found[f"{prefix}.{attr}.{key}"] = item
        return found

    a, b = tensors(fast), tensors(plain)
    assert a.keys() == b.keys() and len(a) > 100
    assert all(same(a[k], b[k]) for k in a)
    assert all(p.requires_grad for p in fast.parameters())
    x = ([_rand(3, 100, 120)],)
    assert same(run(fast, x), run(plain, x))


def test_meta_with_nan_metrics_equals_torchvisions(tmp_path, monkeypatch, use_synthetic):
    """Found by scripts/sweep_registry.py on VGG16_Weights.IMAGENET1K_FEATURES, whose metrics are
    float("nan"): JSON gives back a new NaN, and nan != nan unless it is the same object, so
    weights.meta != member.meta. A small classifier with the same kind of meta stands in for it."""
    member = M.SqueezeNet1_1_Weights.IMAGENET1K_V1
    stage(tmp_path / "src-home", use_synthetic(member))
    get_catalog()  # as an earlier test would: the catalog has seen this member's meta before the edit
    monkeypatch.setitem(member.meta, "_metrics", {"ImageNet-1K": {"acc@1": float("nan"), "acc@5": float("nan")}})
    monkeypatch.setitem(member.meta, "categories", None)  # like the FEATURES weights (meta only: no build)
    bundle_path = make_bundle(tmp_path, ["squeezenet1_1"])
    for source in (bundle_path, installed_home(tmp_path, bundle_path)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", loader.DriftWarning)
            weights = loader.load_weights(source, "squeezenet1_1")
        assert weights.differences == () and weights.installed is member
        assert weights.meta == member.meta
        assert weights.meta is not member.meta  # a copy: editing it leaves torchvision's alone


# -- sources, names, integrity -------------------------------------------------------------------------

@pytest.fixture
def zoo_home(tmp_path, zoo):
    """A zoo bundle (two weights of one model, a detector, a quantized classifier) and its install."""
    files = zoo.zoo_files()
    stage(tmp_path / "src-home", *files.values())
    path = make_bundle(tmp_path, ["zoo_mobilenet_v3_small:all", "zoo_ssdlite320", "zoo_quantized_shufflenet_v2"],
                       registry=[ZOO_REGISTRY], name="zoo.tar")
    return path, installed_home(tmp_path, path)


def test_bundle_file_and_installed_cache_give_the_same_model(zoo_home, monkeypatch):
    bundle_path, home = zoo_home
    x = (_rand(2, 3, 64, 64),)
    outputs = []
    for source in (bundle_path, home, home / "hub"):
        model, weights = loader.load_model(source, "zoo_mobilenet_v3_small", registry=[ZOO_REGISTRY])
        assert weights.name == "ZooMobileNetV3Small_Weights.IMAGENET10_V2"  # the DEFAULT
        outputs.append(run(model, x))
    # vanilla: the zoo builder reads the same file from the installed TORCH_HOME
    monkeypatch.setenv("TORCH_HOME", str(home))
    expected = zoo_module.zoo_mobilenet_v3_small(weights=zoo_module.ZooMobileNetV3Small_Weights.IMAGENET10_V2)
    outputs.append(run(expected.eval(), x))
    assert all(same(outputs[0], o) for o in outputs[1:])


def test_names_pick_weights(zoo_home):
    bundle_path, _ = zoo_home
    reg = [ZOO_REGISTRY]
    source = loader.open_source(bundle_path)
    pick = lambda name: source.find(name, registry=reg)[0].name  # noqa: E731
    assert pick("zoo_mobilenet_v3_small") == "ZooMobileNetV3Small_Weights.IMAGENET10_V2"
    assert pick("zoo_mobilenet_v3_small:IMAGENET10_V1") == "ZooMobileNetV3Small_Weights.IMAGENET10_V1"
    assert pick("ZooMobileNetV3Small_Weights.DEFAULT") == "ZooMobileNetV3Small_Weights.IMAGENET10_V2"
    assert pick("zoo_ssdlite320") == "ZooSSDLite320_Weights.COCO5_V1"
    model, weights = loader.load_model(bundle_path, "ZooMobileNetV3Small_Weights.IMAGENET10_V1", registry=reg)
    assert weights.meta["_metrics"]["CIFAR-10"]["acc@1"] == 10.0
    assert repr(weights) == f"LoadedWeights(ZooMobileNetV3Small_Weights.IMAGENET10_V1, bundle={str(bundle_path)!r})"
    with pytest.raises(LoadError, match="holds no weights for model 'resnet50'.*ZooSSDLite320_Weights.COCO5_V1"):
        loader.load_model(bundle_path, "resnet50", registry=reg)
    with pytest.raises(LoadError, match="holds no weights 'zoo_mobilenet_v3_small:IMAGENET10_V7'"):
        loader.load_model(bundle_path, "zoo_mobilenet_v3_small:IMAGENET10_V7", registry=reg)


def test_quantized_zoo_model_matches_its_builder(zoo_home, monkeypatch):
    _, home = zoo_home
    model, weights = loader.load_model(home, "zoo_quantized_shufflenet_v2", registry=[ZOO_REGISTRY])
    assert weights.meta["backend"] == "fbgemm"
    assert weights.meta["unquantized"] is zoo_module.ZooShuffleNetV2_Weights.IMAGENET10_V1
    monkeypatch.setenv("TORCH_HOME", str(home))
    expected = zoo_module.zoo_quantized_shufflenet_v2(
        weights=zoo_module.ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1, quantize=True).eval()
    x = (_rand(1, 3, 64, 64),)
    assert same(run(model, x), run(expected, x))


def test_installed_checkpoint_is_verified_once_then_from_the_index(zoo_home, monkeypatch):
    from packager import cache

    _, home = zoo_home
    path = home / "hub" / "checkpoints" / zoo_module.zoo_files()["mobilenet_v3_small_v2"].name
    cache._update_index(home / "hub", {path.name: None})  # forget what install recorded
    loader.load_model(home, "zoo_mobilenet_v3_small", registry=[ZOO_REGISTRY])
    assert cache.index_entry(path)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    def no_hashing(*args, **kwargs):
        raise AssertionError("an unchanged, indexed file was hashed again")

    monkeypatch.setattr(cache.index, "hash_file", no_hashing)
    loader.load_model(home, "zoo_mobilenet_v3_small", registry=[ZOO_REGISTRY])


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_tampered_installed_checkpoint_refuses_to_load(zoo_home, cli):
    _, home = zoo_home
    path = home / "hub" / "checkpoints" / zoo_module.zoo_files()["mobilenet_v3_small_v2"].name
    _flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(IntegrityError, match=r"sha256: expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        loader.load_model(home, "zoo_mobilenet_v3_small", registry=[ZOO_REGISTRY])
    # the other weights in the same cache are unaffected
    loader.load_model(home, "zoo_mobilenet_v3_small:IMAGENET10_V1", registry=[ZOO_REGISTRY])
    path.unlink()
    with pytest.raises(LoadError, match="is missing"):
        loader.load_model(home, "zoo_mobilenet_v3_small", registry=[ZOO_REGISTRY])


def test_tampered_bundle_refuses_to_load(zoo_home, tmp_path):
    bundle_path, _ = zoo_home
    tampered = tmp_path / "tampered.tar"
    shutil.copy(bundle_path, tampered)
    with open_bundle(tampered) as opened:
        entry = next(e for e in opened.entries if e.name == "ZooMobileNetV3Small_Weights.IMAGENET10_V2")
        member = opened.member(entry.path)
    _flip_byte(tampered, member.offset + member.size // 2)
    with pytest.raises(IntegrityError, match="tampered.tar:hub/checkpoints/.*sha256"):
        loader.load_model(tampered, "zoo_mobilenet_v3_small", registry=[ZOO_REGISTRY])


def test_pickle_payload_is_refused_even_with_a_correct_hash(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "resnet18-00000000.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": Payload()}, bad)
    sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    final = tmp_path / f"resnet18-{sha[:8]}.pth"
    bad.rename(final)
    item = entry_for(M.ResNet18_Weights.IMAGENET1K_V1, final, url=UPSTREAM + final.name)
    home = write_installed(tmp_path / "home", [item], [final])
    with pytest.warns(loader.DriftWarning):
        with pytest.raises(LoadError, match="refusing to load a checkpoint that is not plain tensors"):
            loader.load_model(home, "resnet18")
    assert not (tmp_path / "pwned").exists()


def test_manifest_with_unsafe_path_is_refused(tmp_path, use_synthetic):
    member = M.ResNet18_Weights.IMAGENET1K_V1
    path = use_synthetic(member)
    item = entry_for(member, path, path="hub/checkpoints/../../../etc/passwd")
    home = write_installed(tmp_path / "home", [item], [path])
    with pytest.warns(loader.LoaderWarning, match="skipping installed manifest .*unsafe or unexpected checkpoint path"):
        with pytest.raises(LoadError, match="holds no weights for model 'resnet18'") as error:
            loader.load_model(home, "resnet18")
    assert "1 manifest(s) were skipped" in error.value.format()
    bad_bundle = write_bundle(tmp_path / "bad.tar", [item], [path])
    with pytest.raises(BundleError):
        loader.load_model(bad_bundle, "resnet18")
    not_a_bundle = tmp_path / "junk.tar"
    not_a_bundle.write_bytes(os.urandom(4096))
    with pytest.raises(BundleError):
        loader.load_model(not_a_bundle, "resnet18")
    with pytest.raises(LoadError, match="holds no installed tvpack bundle"):
        loader.load_model(tmp_path, "resnet18")


# -- drift -------------------------------------------------------------------------------------------

def test_weights_missing_from_installed_torchvision_still_load(tmp_path):
    """A newer torchvision's ResNet18_Weights.IMAGENET1K_V9 (10 classes, its own preprocessing):
    the stand-in member carries the bundle's meta, so the real builder makes a 10-class model."""
    torch.manual_seed(3)
    state = M.resnet18(num_classes=10).state_dict()
    raw = tmp_path / "resnet18_v9.pth"
    torch.save(state, raw)
    sha = hashlib.sha256(raw.read_bytes()).hexdigest()
    path = raw.rename(tmp_path / f"resnet18_v9-{sha[:8]}.pth")
    categories = [f"class{i}" for i in range(10)]
    spec = transform_spec(M.ResNet18_Weights.IMAGENET1K_V1)
    spec["kwargs"].update(crop_size=200, resize_size=210)
    item = entry_for(M.ResNet18_Weights.IMAGENET1K_V1, path, member="IMAGENET1K_V9", url=UPSTREAM + path.name,
                     transforms=spec, meta={**meta_to_json(M.ResNet18_Weights.IMAGENET1K_V1.meta),
                                            "categories": categories, "_docs": "from the future"})
    bundle_path = write_bundle(tmp_path / "future.tar", [item], [path])

    with warnings.catch_warnings():
        warnings.simplefilter("error", loader.DriftWarning)
        model, weights = loader.load_model(bundle_path, "resnet18")
    assert weights.name == "ResNet18_Weights.IMAGENET1K_V9" and weights.installed is None
    assert weights.meta["categories"] == categories
    assert model.fc.out_features == 10
    image = torch.randint(0, 256, (3, 240, 250), dtype=torch.uint8)
    assert weights.transforms()(image).shape == (3, 200, 200)
    expected = M.resnet18(num_classes=10)
    expected.load_state_dict(state)
    x = (_rand(1, 3, 64, 64),)
    assert same(run(model, x), run(expected.eval(), x))


def test_missing_builder_is_a_clear_error_but_transforms_and_meta_remain(tmp_path, use_synthetic):
    member = M.ResNet18_Weights.IMAGENET1K_V1
    path = use_synthetic(member)
    item = entry_for(member, path, enum="FooNet_Weights", member="IMAGENET1K_V1", module="torchvision.models.foonet",
                     models=["foonet_b0"], builders=["torchvision.models.foonet.foonet_b0"])
    bundle_path = write_bundle(tmp_path / "foonet.tar", [item], [path])
    with pytest.raises(LoadError, match=r"cannot build FooNet_Weights.IMAGENET1K_V1: this torchvision \(.*\) has "
                                        r"no model 'foonet_b0'; the bundle was made with torchvision 9.9.9"):
        loader.load_model(bundle_path, "foonet_b0")
    weights = loader.load_weights(bundle_path, "foonet_b0")
    assert weights.meta == member.meta and weights.installed is None
    image = torch.randint(0, 256, (3, 240, 250), dtype=torch.uint8)
    assert torch.equal(weights.transforms()(image), member.transforms()(image))
    assert set(weights.get_state_dict()) == set(M.resnet18().state_dict())


USER_REGISTRY = '''
from functools import partial
from typing import Optional

import torch
from torch import nn
from torchvision.models._api import Weights, WeightsEnum
from torchvision.transforms._presets import ImageClassification


class TinyNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, num_classes)
        # not in the checkpoint: must be computed, not left on the meta device
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8), persistent=False)
        self.offsets = [torch.arange(3.0), torch.ones(2)]

    def forward(self, x):
        y = self.conv(x).mean((2, 3)) * self.scale + self.offsets[0].sum()
        return self.fc(y)


class TinyNet_Weights(WeightsEnum):
    V1 = Weights(url="https://example.invalid/tinynet-{prefix}.pth",
                 transforms=partial(ImageClassification, crop_size=32, resize_size=36),
                 meta={"categories": ["a", "b", "c"], "min_size": (1, 1)})
    DEFAULT = V1


def tinynet(*, weights: Optional[TinyNet_Weights] = None, progress: bool = True, **kwargs):
    weights = TinyNet_Weights.verify(weights)
    model = TinyNet(num_classes=len(weights.meta["categories"]) if weights else 5)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def tinynet_partial(*, weights: Optional[TinyNet_Weights] = None, progress: bool = True, **kwargs):
    """Loads non-strictly: its persistent buffer ``calib`` is not in the checkpoint."""
    weights = TinyNet_Weights.verify(weights)
    model = TinyNet(num_classes=3)
    model.register_buffer("calib", torch.full((8,), 2.0))
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True), strict=False)
    return model
'''


def test_user_registry_present_at_bundle_time_and_absent_at_load_time(tmp_path, monkeypatch, caplog):
    torch.manual_seed(4)
    scratch = tmp_path / "scratch.py"
    scratch.write_text(USER_REGISTRY.replace("{prefix}", "0"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    scratch_module = importlib.import_module("scratch")
    state = scratch_module.TinyNet(3).state_dict()
    raw = tmp_path / "tiny.pth"
    torch.save(state, raw)
    sha = hashlib.sha256(raw.read_bytes()).hexdigest()
    path = raw.rename(tmp_path / f"tinynet-{sha[:8]}.pth")
    (tmp_path / "tvp_user_registry.py").write_text(USER_REGISTRY.replace("{prefix}", sha[:8]))
    stage(tmp_path / "src-home", path)
    bundle_path = make_bundle(tmp_path, ["tinynet"], registry=["tvp_user_registry"])

    with pytest.raises(LoadError, match="no builder for model 'tinynet'") as error:
        loader.load_model(bundle_path, "tinynet")
    assert "pass --registry tvp_user_registry" in error.value.format()
    weights = loader.load_weights(bundle_path, "tinynet")
    assert weights.meta["categories"] == ["a", "b", "c"]
    assert weights.transforms()(torch.zeros(3, 40, 40, dtype=torch.uint8)).shape == (3, 32, 32)

    model, weights = loader.load_model(bundle_path, "tinynet", registry=["tvp_user_registry"])
    plain, _ = loader.load_model(bundle_path, "tinynet", registry=["tvp_user_registry"], fast=False)
    assert torch.equal(model.scale, torch.linspace(0.5, 1.5, 8)) and not model.scale.is_meta
    assert all(same(a, b) for a, b in zip(model.offsets, plain.offsets))
    x = (_rand(2, 3, 16, 16),)
    assert same(run(model, x), run(plain, x))

    # a builder that leaves a tensor of its own out of the checkpoint: the fast build notices the
    # tensor left on the meta device and builds the plain way
    caplog.set_level("DEBUG", logger="packager.loader")
    model, _ = loader.load_model(bundle_path, "tinynet_partial", registry=["tvp_user_registry"])
    assert "1 tensor(s) left on the meta device (calib); building the plain way" in caplog.text
    assert torch.equal(model.calib, torch.full((8,), 2.0)) and torch.equal(model.scale, plain.scale)
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_installed_torchvision_describing_weights_differently_warns_and_the_bundle_wins(
        tmp_path, monkeypatch, use_synthetic, cli):
    member = M.ResNet18_Weights.IMAGENET1K_V1
    path = use_synthetic(member)
    stage(tmp_path / "src-home", path)
    bundle_path = make_bundle(tmp_path, ["resnet18:IMAGENET1K_V1"])
    bundled_url = member.url
    # later, the installed torchvision says something else about the same weights
    monkeypatch.setattr(member.value, "url", UPSTREAM + "resnet18-0badc0de.pth")
    monkeypatch.setitem(member.value.meta, "categories", ["cat", "dog"])
    monkeypatch.setitem(member.value.meta, "_docs", "rewritten")

    with pytest.warns(loader.DriftWarning, match=r"ResNet18_Weights.IMAGENET1K_V1: .*url \(installed "
                                                  r".*resnet18-0badc0de.pth, bundle .*\); meta _docs, categories"):
        model, weights = loader.load_model(bundle_path, "resnet18")
    assert weights.url == bundled_url and len(weights.meta["categories"]) == 1000
    assert weights.meta["_docs"] != "rewritten"
    assert model.fc.out_features == 1000  # built from the bundle's meta, not the installed one
    assert weights.installed is member and "transforms" not in " ".join(weights.differences)

    image = tmp_path / "img.png"
    torchvision.io.write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(image))
    result = cli("predict", bundle_path, "resnet18", image, "--topk", "1")
    assert result.exit_code == 0
    assert "tvpack: warning: ResNet18_Weights.IMAGENET1K_V1: the installed torchvision describes these weights " \
           "differently" in result.stderr
    assert len(result.stdout.splitlines()) == 2  # the image line and one category, from the bundle's 1000


# -- never the network -------------------------------------------------------------------------------

def test_no_socket_is_opened(zoo_home, monkeypatch):
    bundle_path, home = zoo_home

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r:.80}")

    for name in ("connect", "connect_ex", "sendto", "bind"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for source in (bundle_path, home):
        for name in ("zoo_mobilenet_v3_small", "zoo_ssdlite320", "zoo_quantized_shufflenet_v2"):
            loader.load_model(source, name, registry=[ZOO_REGISTRY])


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_loads_and_predicts_with_no_network_namespace(zoo_home, tmp_path):
    if not _can_unshare():
        if IN_CI:
            pytest.fail("unshare -n is required in CI")
        pytest.skip("unshare -n is not permitted here")
    bundle_path, home = zoo_home
    image = tmp_path / "img.png"
    torchvision.io.write_png(torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8), str(image))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "empty")}
    script = textwrap.dedent(f"""
        import socket, torch
        from packager import load_model
        try:
            socket.create_connection(("127.0.0.1", 9), timeout=2)
            print("NETWORK")
        except OSError:
            pass
        for source, name in (({str(bundle_path)!r}, "zoo_ssdlite320"), ({str(home)!r}, "zoo_quantized_shufflenet_v2"),
                             ({str(home)!r}, "zoo_mobilenet_v3_small")):
            model, weights = load_model(source, name, registry=["{ZOO_REGISTRY}"])
            assert not model.training
        with torch.inference_mode():
            print("OK", tuple(model(torch.rand(1, 3, 64, 64)).shape))
    """)
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "NETWORK" not in proc.stdout and "OK (1, 10)" in proc.stdout
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "packager", "predict", str(home),
                           "zoo_mobilenet_v3_small", str(image), "--registry", ZOO_REGISTRY, "--json"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert [r["category"] for r in json.loads(proc.stdout)[0]["top"]][0] in zoo_module.CATEGORIES_10


# -- predict -------------------------------------------------------------------------------------------

def test_predict_prints_top_categories(zoo_home, tmp_path, cli, monkeypatch):
    bundle_path, home = zoo_home
    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        torchvision.io.write_png(torch.randint(0, 256, (3, 50 + i, 80), dtype=torch.uint8,
                                               generator=torch.Generator().manual_seed(i)), str(images[-1]))
    gray = tmp_path / "gray.png"
    torchvision.io.write_png(torch.randint(0, 256, (1, 64, 64), dtype=torch.uint8), str(gray))
    result = cli("predict", bundle_path, "zoo_mobilenet_v3_small", *images, gray, "--topk", "3", "--json",
                 "--registry", ZOO_REGISTRY)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["image"] for d in data] == [str(p) for p in [*images, gray]]

    # the same numbers by hand, with torchvision's own pieces
    monkeypatch.setenv("TORCH_HOME", str(home))
    member = zoo_module.ZooMobileNetV3Small_Weights.IMAGENET10_V2
    model = zoo_module.zoo_mobilenet_v3_small(weights=member).eval()
    batch = torch.stack([member.transforms()(torchvision.io.decode_image(str(p))) for p in images])
    with torch.inference_mode():
        probs = model(batch).softmax(1)
    for d, row in zip(data, probs):
        values, indices = row.topk(3)
        assert [t["index"] for t in d["top"]] == indices.tolist()
        assert [t["category"] for t in d["top"]] == [member.meta["categories"][i] for i in indices]
        assert [t["probability"] for t in d["top"]] == pytest.approx(values.tolist(), abs=1e-6)
    assert d["weights"] == "ZooMobileNetV3Small_Weights.IMAGENET10_V2"

    text = cli("predict", home, "zoo_mobilenet_v3_small:IMAGENET10_V1", images[0], "--registry", ZOO_REGISTRY)
    assert text.exit_code == 0
    lines = text.output.splitlines()
    assert lines[0] == f"{images[0]}  (ZooMobileNetV3Small_Weights.IMAGENET10_V1)"
    assert len(lines) == 6 and re.match(r"^   1\. \w+ +\d+\.\d\d%$", lines[1])


def test_predict_refuses_other_tasks_and_bad_input(zoo_home, tmp_path, cli):
    bundle_path, _ = zoo_home
    image = tmp_path / "img.png"
    torchvision.io.write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(image))
    result = cli("predict", bundle_path, "zoo_ssdlite320", image, "--registry", ZOO_REGISTRY)
    assert result.exit_code == 1
    assert "tvpack: error: predict handles image classification weights; ZooSSDLite320_Weights.COCO5_V1 is " \
           "detection weights" in result.output
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    result = cli("predict", bundle_path, "zoo_mobilenet_v3_small", junk, "--registry", ZOO_REGISTRY)
    assert result.exit_code == 1 and "tvpack: error: cannot decode image" in result.output
    assert "Unsupported image file" in result.output and ".cpp" not in result.output  # the reason, not C++ paths


def test_predict_subprocess_and_help(zoo_home, tmp_path):
    _, home = zoo_home
    image = tmp_path / "img.png"
    torchvision.io.write_png(torch.full((3, 40, 40), 128, dtype=torch.uint8), str(image))
    proc = run_tvpack("predict", home, "zoo_quantized_shufflenet_v2", image, "--topk", "2",
                      "--registry", ZOO_REGISTRY)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3
    proc = run_tvpack("predict", "--help")
    assert proc.returncode == 0 and "--topk" in proc.stdout and "--registry" in proc.stdout


def test_a_fetched_but_not_installed_file_says_how_to_give_it_a_manifest(zoo, tmp_path):
    home = tmp_path / "home"
    stage(home, *zoo.zoo_files().values())
    with pytest.raises(LoadError) as excinfo:
        loader.load_model(home, "zoo_s3d", registry=[ZOO_REGISTRY])
    text = excinfo.value.format()
    assert "fetched, not installed" in text and "tvpack bundle" in text and "tvpack install" in text
    # with some bundle installed, a weights whose file is only fetched gets the same advice
    path = bundle(["zoo_shufflenet_v2"], tmp_path / "one.tar", registry=[ZOO_REGISTRY], torch_home=home, fetch=False)
    install(path, torch_home=home)
    with pytest.raises(LoadError) as excinfo:
        loader.load_model(home, "zoo_s3d", registry=[ZOO_REGISTRY])
    text = excinfo.value.format()
    assert "in the cache without a manifest" in text and "ZooS3D_Weights" in text


def test_a_checkpoint_name_near_255_bytes_installs_and_loads(zoo, tmp_path):
    """Install's temp names are derived from the file name: a long name must still fit."""
    weights = zoo.ZooShuffleNetV2_Weights.IMAGENET10_V1
    src = next(p for p in zoo.zoo_files().values() if p.name == os.path.basename(weights.url))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    long_file = tmp_path / ("w" * (255 - len("-12345678.pth")) + f"-{digest[:8]}.pth")
    assert len(long_file.name.encode()) == 255
    shutil.copy(src, long_file)
    item = entry_for(weights, long_file, url=f"https://example.invalid/{long_file.name}", models=["zoo_shufflenet_v2"],
                     builders=["packager.testing.zoo.zoo_shufflenet_v2"])
    bundle_path = write_bundle(tmp_path / "long.tar", [item], [long_file])
    home = tmp_path / "home"
    proc = run_tvpack("install", bundle_path, "--torch-home", home)
    assert proc.returncode == 0, proc.stderr
    assert (home / "hub" / "checkpoints" / long_file.name).is_file()
    assert not [p for p in (home / "hub" / "checkpoints").iterdir() if p.name.startswith(".")]
    model, loaded = loader.load_model(home, "zoo_shufflenet_v2", registry=[ZOO_REGISTRY])
    assert loaded.sha256 == digest
