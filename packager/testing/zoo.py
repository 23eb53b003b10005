"""The synthetic zoo: real torchvision architectures, randomly initialised with fixed seeds.

download.pytorch.org is out of reach here, so tests, ``make demo`` and the benchmarks use this zoo.
It is also a registry module (``tvpack --registry packager.testing.zoo``): its ``WeightsEnum``
classes and builders describe the checkpoints exactly as torchvision describes its own (meta with
categories, min_size, _metrics, num_params, _file_size; transforms from torchvision's presets;
builders that derive num_classes / backend from the weights and call ``get_state_dict``).

Importing the module builds the zoo once (file-locked, so parallel test workers wait for one
build) into :func:`zoo_dir`, laid out as a mirror root::

    <zoo_dir>/models/tvpack-zoo/<stem>-<sha256[:8]>.pth     (quantized: <stem>_<sha256[:8]>.pth)
    <zoo_dir>/zoo.json

The enums' urls point at a fake upstream (``TVPACK_ZOO_URL``, default
``https://download.pytorch.org/models/tvpack-zoo/``), so a fetch needs ``--mirror <zoo_dir or a
server over it>``. :func:`synthesize_checkpoint` writes a random checkpoint for *any* member,
torchvision's own included, by running the real builder with weight loading disabled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union
from unittest import mock

import torch
import torchvision
from filelock import FileLock
from torch import nn
from torchvision.models import detection, optical_flow, quantization, segmentation, video
from torchvision.models._api import Weights, WeightsEnum
from torchvision.models._utils import _ovewrite_named_param
from torchvision.transforms._presets import (
    ImageClassification,
    ObjectDetection,
    OpticalFlow,
    SemanticSegmentation,
    VideoClassification,
)
from torchvision.transforms.functional import InterpolationMode

from packager.fsutil import atomic_write_json

ZOO_VERSION = 1
MIRROR_SUBDIR = "models/tvpack-zoo"

CATEGORIES_10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CATEGORIES_5 = ["__background__", "person", "bicycle", "car", "dog"]


def zoo_dir() -> Path:
    """Where the zoo lives: ``$TVPACK_ZOO_DIR`` or a per-torch-version user cache directory."""
    explicit = os.environ.get("TVPACK_ZOO_DIR")
    if explicit:
        return Path(explicit).expanduser()
    tag = f"zoo-v{ZOO_VERSION}-torch{torch.__version__}-tv{torchvision.__version__}"
    return Path.home() / ".cache" / "tvpack" / tag


def zoo_url() -> str:
    return os.environ.get("TVPACK_ZOO_URL", f"https://download.pytorch.org/{MIRROR_SUBDIR}/").rstrip("/") + "/"


# -- recipes: how each zoo file is made (independent of the enums, which need its hash) -----------

def _recipes() -> dict[str, dict[str, Any]]:
    return {
        "mobilenet_v3_small_v1": dict(build=lambda: torchvision.models.mobilenet_v3_small(num_classes=10), seed=1),
        "mobilenet_v3_small_v2": dict(build=lambda: torchvision.models.mobilenet_v3_small(num_classes=10), seed=2),
        "mobilenet_v3_large": dict(build=lambda: torchvision.models.mobilenet_v3_large(num_classes=10), seed=3),
        "ssdlite320": dict(
            build=lambda: detection.ssdlite320_mobilenet_v3_large(num_classes=5, weights_backbone=None), seed=4),
        "lraspp": dict(
            build=lambda: segmentation.lraspp_mobilenet_v3_large(num_classes=5, weights_backbone=None), seed=5),
        "s3d": dict(build=lambda: video.s3d(num_classes=10), seed=6),
        "raft_small": dict(build=lambda: optical_flow.raft_small(), seed=7),
        "shufflenet_v2": dict(build=lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), seed=8),
        "shufflenet_v2_fbgemm": dict(
            build=lambda: quantization.shufflenet_v2_x0_5(quantize=True, num_classes=10), seed=9, sep="_"),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_hashed(state_dict: dict, dest_dir: Path, stem: str, sep: str = "-") -> tuple[Path, str]:
    """torch.save to ``<stem>.pth`` then rename to ``<stem><sep><sha256[:8]>.pth`` (atomic)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".zoo-") as tmp:
        tmp_path = Path(tmp) / f"{stem}.pth"  # the zip's inner prefix comes from this name
        torch.save(state_dict, tmp_path)
        sha = _sha256(tmp_path)
        final = dest_dir / f"{stem}{sep}{sha[:8]}.pth"
        os.replace(tmp_path, final)
    return final, sha


@contextmanager
def _quantizing_quietly():
    """Building an int8 model makes quantized tensors, and torch warns (a UserWarning, once per process) that
    creating them is deprecated. Here that is the point of the exercise: silence exactly that warning, here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized")
        yield


def build_zoo(root: Path | None = None) -> dict:
    """Build every zoo file under ``root`` (idempotent, locked); returns the zoo index."""
    root = Path(root) if root is not None else zoo_dir()
    index_path = root / "zoo.json"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".build.lock")):
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            if index.get("version") == ZOO_VERSION and all(
                (root / MIRROR_SUBDIR / entry["file"]).is_file() for entry in index["files"].values()
            ):
                return index
        files = {}
        for key, recipe in _recipes().items():
            torch.manual_seed(recipe["seed"])
            with _quantizing_quietly():
                model = recipe["build"]().eval()
            num_params = sum(p.numel() for p in model.parameters())
            path, sha = _save_hashed(model.state_dict(), root / MIRROR_SUBDIR, f"zoo_{key}", recipe.get("sep", "-"))
            files[key] = {"file": path.name, "sha256": sha, "size": path.stat().st_size, "num_params": num_params}
        index = {"version": ZOO_VERSION, "torch": torch.__version__, "files": files}
        atomic_write_json(index_path, index, indent=2)
        return index


def zoo_files() -> dict[str, Path]:
    """Recipe key -> path of the built file."""
    root = zoo_dir()
    return {key: root / MIRROR_SUBDIR / entry["file"] for key, entry in _INDEX["files"].items()}


# -- synthesize a checkpoint for any WeightsEnum member ---------------------------------------------

def _builder_for(member: WeightsEnum) -> Callable:
    import inspect
    import sys
    import typing

    from packager.discovery import _enums_in_annotation  # the same annotation rule as discovery

    enum = type(member)
    for name in torchvision.models.list_models():
        if torchvision.models.get_model_weights(name) is enum:
            return torchvision.models.get_model_builder(name)
    module = sys.modules[enum.__module__]
    for obj in vars(module).values():
        if inspect.isfunction(obj) and "weights" in inspect.signature(obj).parameters:
            found = _enums_in_annotation(inspect.signature(obj).parameters["weights"].annotation,
                                         {**vars(typing), **vars(module)})
            if found and found[0] is enum:
                return obj
    raise LookupError(f"no builder takes {enum.__name__}")


@contextmanager
def _weights_not_loaded():
    """Run a builder for its architecture only: no download, no state-dict loading.

    Yields a list that receives the model's own state dict at each ``load_state_dict`` call: the
    moment the checkpoint would be loaded, before builders drop parts they no longer need
    (googlenet and inception_v3 remove their aux heads after loading).
    """
    captured: list[dict] = []

    def capture(self, *args, **kwargs):
        captured.append(self.state_dict())

    with mock.patch.object(WeightsEnum, "get_state_dict", lambda self, *a, **k: {}), \
            mock.patch.object(nn.Module, "load_state_dict", capture):
        yield captured


def synthesize_checkpoint(member: WeightsEnum, dest_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint with ``member``'s architecture to ``dest_dir``.

    The real builder runs with the real member (so num_classes from categories, ViT image_size
    from min_size, quantization with the meta's backend all apply) while weight loading is
    disabled. The file is named like the member's own file with its own hash: ``<stem>-<sha8>.pth``
    (``<stem>_<sha8>.pth`` when the original uses torchvision's quantized naming).
    """
    builder = _builder_for(member)
    import inspect

    kwargs = {}
    if "quantize" in inspect.signature(builder).parameters and "backend" in member.meta:
        kwargs["quantize"] = True
    torch.manual_seed(seed)
    with _weights_not_loaded() as captured, _quantizing_quietly():
        model = builder(weights=member, progress=False, **kwargs)
    # the last load is the whole model's (torchvision loads backbones, if ever, before it)
    state_dict = captured[-1] if captured else model.state_dict()
    original = os.path.basename(member.url)
    match = re.match(r"(.+?)([-_])[0-9a-f]{6,}\.[^.]+$", original)
    stem, sep = (match.group(1), match.group(2)) if match else (Path(original).stem, "-")
    path, _ = _save_hashed(state_dict, Path(dest_dir), stem, sep)
    return path


# -- the registry: enums and builders over the zoo files --------------------------------------------

_INDEX = build_zoo()


def _url(key: str) -> str:
    return zoo_url() + _INDEX["files"][key]["file"]


def _meta(key: str, categories: list[str], **extra) -> dict:
    entry = _INDEX["files"][key]
    return {
        "categories": categories,
        # like torchvision, a quantized checkpoint reports its float model's parameter count
        "num_params": entry["num_params"] or _INDEX["files"].get(key.rsplit("_", 1)[0], entry)["num_params"],
        "_file_size": round(entry["size"] / (1024 * 1024), 3),
        "recipe": "https://github.com/pytorch/vision (synthetic: random init, seed fixed)",
        "_docs": "Synthetic tvpack zoo weights: a real architecture with random parameters.",
        **extra,
    }


_CLS = partial(ImageClassification, crop_size=64, resize_size=72)


class ZooMobileNetV3Small_Weights(WeightsEnum):
    IMAGENET10_V1 = Weights(
        url=_url("mobilenet_v3_small_v1"),
        transforms=_CLS,
        meta=_meta("mobilenet_v3_small_v1", CATEGORIES_10, min_size=(1, 1),
                   _metrics={"CIFAR-10": {"acc@1": 10.0, "acc@5": 50.0}}, _ops=0.001),
    )
    IMAGENET10_V2 = Weights(
        url=_url("mobilenet_v3_small_v2"),
        transforms=partial(ImageClassification, crop_size=64, resize_size=80,
                           interpolation=InterpolationMode.BICUBIC),
        meta=_meta("mobilenet_v3_small_v2", CATEGORIES_10, min_size=(1, 1),
                   _metrics={"CIFAR-10": {"acc@1": 11.0, "acc@5": 51.0}}, _ops=0.001),
    )
    DEFAULT = IMAGENET10_V2


class ZooMobileNetV3Large_Weights(WeightsEnum):
    IMAGENET10_V1 = Weights(
        url=_url("mobilenet_v3_large"),
        transforms=_CLS,
        meta=_meta("mobilenet_v3_large", CATEGORIES_10, min_size=(1, 1),
                   _metrics={"CIFAR-10": {"acc@1": 12.0, "acc@5": 52.0}}),
    )
    DEFAULT = IMAGENET10_V1


class ZooSSDLite320_Weights(WeightsEnum):
    COCO5_V1 = Weights(
        url=_url("ssdlite320"),
        transforms=ObjectDetection,
        meta=_meta("ssdlite320", CATEGORIES_5, min_size=(1, 1), _metrics={"COCO-val2017": {"box_map": 0.1}}),
    )
    DEFAULT = COCO5_V1


class ZooLRASPP_Weights(WeightsEnum):
    VOC5_V1 = Weights(
        url=_url("lraspp"),
        transforms=partial(SemanticSegmentation, resize_size=64),
        meta=_meta("lraspp", CATEGORIES_5, min_size=(1, 1),
                   _metrics={"COCO-val2017-VOC-labels": {"miou": 1.0, "pixel_acc": 20.0}}),
    )
    DEFAULT = VOC5_V1


class ZooS3D_Weights(WeightsEnum):
    KINETICS10_V1 = Weights(
        url=_url("s3d"),
        transforms=partial(VideoClassification, crop_size=(64, 64), resize_size=(72, 72)),
        meta=_meta("s3d", CATEGORIES_10, min_size=(32, 32), min_temporal_size=8,
                   _metrics={"Kinetics-400": {"acc@1": 10.0, "acc@5": 50.0}}),
    )
    DEFAULT = KINETICS10_V1


class ZooRaftSmall_Weights(WeightsEnum):
    THINGS_V1 = Weights(
        url=_url("raft_small"),
        transforms=OpticalFlow,
        meta={**_meta("raft_small", []), "_metrics": {"Sintel-Train-Cleanpass": {"epe": 9.9}}},
    )
    DEFAULT = THINGS_V1


class ZooShuffleNetV2_Weights(WeightsEnum):
    IMAGENET10_V1 = Weights(
        url=_url("shufflenet_v2"),
        transforms=_CLS,
        meta=_meta("shufflenet_v2", CATEGORIES_10, min_size=(1, 1),
                   _metrics={"CIFAR-10": {"acc@1": 13.0, "acc@5": 53.0}}),
    )
    DEFAULT = IMAGENET10_V1


class ZooShuffleNetV2_QuantizedWeights(WeightsEnum):
    IMAGENET10_FBGEMM_V1 = Weights(
        url=_url("shufflenet_v2_fbgemm"),
        transforms=_CLS,
        meta=_meta("shufflenet_v2_fbgemm", CATEGORIES_10, min_size=(1, 1), backend="fbgemm",
                   unquantized=ZooShuffleNetV2_Weights.IMAGENET10_V1,
                   _metrics={"CIFAR-10": {"acc@1": 12.5, "acc@5": 52.5}}),
    )
    DEFAULT = IMAGENET10_FBGEMM_V1


def _classifier(arch: Callable, enum: type[WeightsEnum], weights, progress: bool, **kwargs) -> nn.Module:
    weights = enum.verify(weights)
    if weights is not None:
        _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = arch(weights=None, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def zoo_mobilenet_v3_small(*, weights: Optional[ZooMobileNetV3Small_Weights] = None, progress: bool = True,
                           **kwargs: Any) -> nn.Module:
    """MobileNetV3-Small with synthetic 10-class weights."""
    return _classifier(torchvision.models.mobilenet_v3_small, ZooMobileNetV3Small_Weights, weights, progress,
                       **kwargs)


def zoo_mobilenet_v3_large(*, weights: Optional[ZooMobileNetV3Large_Weights] = None, progress: bool = True,
                           **kwargs: Any) -> nn.Module:
    """MobileNetV3-Large with synthetic 10-class weights (also the SSDLite zoo backbone)."""
    return _classifier(torchvision.models.mobilenet_v3_large, ZooMobileNetV3Large_Weights, weights, progress,
                       **kwargs)


def zoo_shufflenet_v2(*, weights: Optional[ZooShuffleNetV2_Weights] = None, progress: bool = True,
                      **kwargs: Any) -> nn.Module:
    """ShuffleNetV2 x0.5 with synthetic 10-class weights (the float twin of the quantized one)."""
    return _classifier(torchvision.models.shufflenet_v2_x0_5, ZooShuffleNetV2_Weights, weights, progress,
                       **kwargs)


def zoo_ssdlite320(*, weights: Optional[ZooSSDLite320_Weights] = None, progress: bool = True,
                   num_classes: Optional[int] = None,
                   weights_backbone: Optional[ZooMobileNetV3Large_Weights] = ZooMobileNetV3Large_Weights.IMAGENET10_V1,
                   **kwargs: Any) -> nn.Module:
    """SSDLite320 (MobileNetV3-Large) detector; like torchvision, trained weights drop the backbone's."""
    weights = ZooSSDLite320_Weights.verify(weights)
    weights_backbone = ZooMobileNetV3Large_Weights.verify(weights_backbone)
    if weights is not None:
        weights_backbone = None
        num_classes = _ovewrite_value_param("num_classes", num_classes, len(weights.meta["categories"]))
    elif num_classes is None:
        num_classes = 91
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes,
                                                   **kwargs)
    if weights_backbone is not None:
        # The zoo backbone is a classifier checkpoint: take its feature layers, as torchvision does.
        state = weights_backbone.get_state_dict(progress=progress, check_hash=True)
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        model.backbone.features.load_state_dict(_backbone_subset(model.backbone.features, features), strict=False)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def _backbone_subset(features: nn.Module, state: dict) -> dict:
    """Pair the classifier's feature tensors with the detector's, in order, while shapes agree.

    torchvision regroups MobileNetV3's feature layers for SSDLite (and reduces the tail when no
    backbone weights are given), but the order of the tensors is unchanged.
    """
    own = features.state_dict()
    pairs = {}
    for (key, tensor), (_, source) in zip(own.items(), state.items()):
        if tensor.shape != source.shape:
            break
        pairs[key] = source
    return pairs


def _ovewrite_value_param(name: str, actual, expected):
    if actual is not None and actual != expected:
        raise ValueError(f"The parameter '{name}' expected value {expected} but got {actual} instead.")
    return expected


def zoo_lraspp(*, weights: Optional[ZooLRASPP_Weights] = None, progress: bool = True,
               num_classes: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """LRASPP (MobileNetV3-Large) segmentation with synthetic 5-class weights."""
    weights = ZooLRASPP_Weights.verify(weights)
    if weights is not None:
        num_classes = _ovewrite_value_param("num_classes", num_classes, len(weights.meta["categories"]))
    elif num_classes is None:
        num_classes = 21
    model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes,
                                                  **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def zoo_s3d(*, weights: Optional[ZooS3D_Weights] = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """S3D video classifier with synthetic 10-class weights."""
    return _classifier(video.s3d, ZooS3D_Weights, weights, progress, **kwargs)


def zoo_raft_small(*, weights: Optional[ZooRaftSmall_Weights] = None, progress: bool = True,
                   **kwargs: Any) -> nn.Module:
    """RAFT-small optical flow with synthetic weights."""
    weights = ZooRaftSmall_Weights.verify(weights)
    model = optical_flow.raft_small(weights=None, progress=progress, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def zoo_quantized_shufflenet_v2(
    *,
    weights: Optional[Union[ZooShuffleNetV2_QuantizedWeights, ZooShuffleNetV2_Weights]] = None,
    progress: bool = True,
    quantize: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Quantizable ShuffleNetV2 x0.5; ``quantize=True`` gives the int8 (fbgemm) model."""
    weights = (ZooShuffleNetV2_QuantizedWeights if quantize else ZooShuffleNetV2_Weights).verify(weights)
    if weights is not None:
        _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
        if "backend" in weights.meta:
            _ovewrite_named_param(kwargs, "backend", weights.meta["backend"])
    backend = kwargs.pop("backend", "fbgemm")
    model = quantization.shufflenetv2.QuantizableShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 1024], **kwargs)
    quantization.utils._replace_relu(model)
    if quantize:
        quantization.utils.quantize_model(model, backend)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


ZOO_MODELS = (
    "zoo_mobilenet_v3_small", "zoo_mobilenet_v3_large", "zoo_shufflenet_v2", "zoo_ssdlite320", "zoo_lraspp",
    "zoo_s3d", "zoo_raft_small", "zoo_quantized_shufflenet_v2",
)
