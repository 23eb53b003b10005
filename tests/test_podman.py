"""A pushed tvpack image in a real container runtime (podman with runc), as a cluster consumes it.

What an image volume (Kubernetes ``image`` volumes, CRI-O, containerd 2.1+) or a model-cache Dockerfile
does, podman does here: ``podman pull`` from the real distribution registry, ``podman image mount`` used
as a read-only TORCH_HOME (tvpack predict, load_model and vanilla torchvision under ``unshare -n``, with
nothing written there), ``podman run --mount type=image`` and ``podman build`` with ``COPY --from``.
docs/runtimes.md shows the same commands next to the pod spec and the Dockerfile.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ZOO_REGISTRY, need_binary
from podman import podman, podman_session  # noqa: F401  (fixtures)

from packager import oci

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(600)

SMALL = ["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"]
WEIGHTS = {"zoo_shufflenet_v2": "ZooShuffleNetV2_Weights.IMAGENET10_V1",
           "zoo_quantized_shufflenet_v2": "ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1"}


@pytest.fixture(scope="module")
def small_bundle(zoo_root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("podman-bundle")
    return B.bundle(SMALL, work / "small.tvpack", registry=[ZOO_REGISTRY], torch_home=work / "home",
                    mirrors=[str(zoo_root)], upstream=False)


@pytest.fixture
def pushed(registry, small_bundle, zoo_root, monkeypatch, tmp_path):
    """The bundle pushed as an image; returns (podman's name for it, manifest digest, {checkpoint path: sha256})."""
    monkeypatch.setenv("TVPACK_ZOO_DIR", str(zoo_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    report = oci.push_bundle(small_bundle, f"oci://{registry.host}/models/small:v1", plain_http=True)
    with B.open_bundle(small_bundle) as opened:
        shas = {path: sha for path, (_size, sha) in opened.files.items()}  # checkpoints and the ML-BOM
        shas[opened.manifest_path] = None
    return f"{registry.host}/models/small:v1", report.digest, shas


def tree(root: Path) -> dict:
    """Every path under ``root`` with its size, mode and mtime: what a write anywhere would change."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def read_only_view(tmp_path):
    """``view(path)``: ``path`` bind-mounted at a new directory and remounted read-only, as an image volume
    is mounted into a pod; unmounted when the test ends."""
    made = []

    def view(path: Path) -> Path:
        target = tmp_path / f"ro-{len(made)}"
        target.mkdir()
        subprocess.run(["mount", "--bind", str(path), str(target)], check=True, capture_output=True)
        made.append(target)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True, capture_output=True)
        return target

    yield view
    for target in reversed(made):
        subprocess.run(["umount", str(target)], check=False, capture_output=True)


OFFLINE_LOAD = r'''
import json, sys, warnings, torch
import packager.testing.zoo as zoo
from packager import load_model
from packager.loader import LoaderWarning

warnings.simplefilter("error", LoaderWarning)  # a drift or cache warning would fail the load

def total(model):
    return float(sum(t.double().sum() for t in model.state_dict().values()
                     if isinstance(t, torch.Tensor) and t.dtype.is_floating_point))

out = {}
source = sys.argv[2]
for builder, name in json.loads(sys.argv[1]).items():
    enum, member = name.split(".")
    kwargs = {"quantize": True} if "Quantized" in enum else {}
    vanilla = getattr(zoo, builder)(weights=getattr(getattr(zoo, enum), member), **kwargs)
    model, weights = load_model(source, name, registry=["packager.testing.zoo"])
    out[name] = [total(vanilla), total(model), weights.name]
print(json.dumps(out))
'''


def offline(*command, torch_home: Path) -> subprocess.CompletedProcess:
    """``command`` under ``unshare -n`` with TORCH_HOME set and this worktree importable."""
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONPATH": str(ROOT)}
    env.pop("XDG_CACHE_HOME", None)
    return subprocess.run([need_binary("unshare"), "-n", *map(str, command)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_podman_pulls_the_image_and_its_mount_is_a_read_only_torch_home(podman, pushed, read_only_view, tmp_path):  # noqa: F811 (the fixture)
    name, digest, shas = pushed
    podman("pull", "--tls-verify=false", name)
    assert podman("image", "inspect", "--format", "{{.Digest}}", name).stdout.strip() == digest

    home = read_only_view(podman.mount(name))
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()) == sorted(shas)
    for path, sha in shas.items():
        if sha:
            assert hashlib.sha256((home / path).read_bytes()).hexdigest() == sha
    before = tree(home)

    # vanilla torchvision builders and load_model from the read-only TORCH_HOME, offline: the same weights
    proc = offline(sys.executable, "-c", OFFLINE_LOAD, json.dumps(WEIGHTS), home, torch_home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(loaded) == sorted(WEIGHTS.values())
    for name_, (vanilla, ours, weights) in loaded.items():
        assert vanilla == ours and weights == name_

    # tvpack predict reads it as its source and as TORCH_HOME
    import torch
    import torchvision

    image = tmp_path / "img.png"
    torchvision.io.write_png(torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                             str(image))
    proc = offline(sys.executable, "-m", "packager", "predict", home, "zoo_shufflenet_v2", image, "--registry",
                   ZOO_REGISTRY, "--json", torch_home=home)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout)[0]["weights"] == WEIGHTS["zoo_shufflenet_v2"]
    # the cache commands that only read: ls and verify (whose index of verified hashes cannot be written)
    for command in (["cache", "ls", "--json"], ["cache", "verify"]):
        proc = offline(sys.executable, "-m", "packager", *command, "--registry", ZOO_REGISTRY, torch_home=home)
        assert proc.returncode == 0, proc.stderr
    assert tree(home) == before  # nothing written: no index, no lock, no state


def test_podman_run_with_the_image_mounted_sees_every_checkpoint_with_its_sha256(podman, pushed):  # noqa: F811 (the fixture)
    name, _digest, shas = pushed
    base = podman.base_image()
    podman("pull", "--tls-verify=false", name)
    proc = podman.run(base, "/bin/busybox", "sh", "-c", "cd /models && /bin/busybox sha256sum hub/checkpoints/*",
                      mounts=[f"type=image,source={name},target=/models"])
    seen = dict(reversed(line.split()) for line in proc.stdout.strip().splitlines())
    assert seen == {path: sha for path, sha in shas.items() if path.startswith("hub/checkpoints/")}
    proc = podman.run(base, "/bin/busybox", "find", "/models", "-type", "f",
                      mounts=[f"type=image,source={name},target=/models"])
    assert sorted(proc.stdout.split()) == sorted(f"/models/{path}" for path in shas)


def test_podman_build_copy_from_the_image_makes_a_model_cache_image(podman, pushed, read_only_view):  # noqa: F811 (the fixture)
    name, _digest, shas = pushed
    base = podman.base_image()
    podman("pull", "--tls-verify=false", name)
    tag = "localhost/tvpack-test/model-cache:v1"
    podman.build(tag, f"FROM {base}\nCOPY --from={name} /hub /opt/torch/hub\nENV TORCH_HOME=/opt/torch\n")
    proc = podman.run(tag, "/bin/busybox", "sh", "-c", "cd /opt/torch && /bin/busybox sha256sum hub/checkpoints/*")
    seen = dict(reversed(line.split()) for line in proc.stdout.strip().splitlines())
    assert seen == {path: sha for path, sha in shas.items() if path.startswith("hub/checkpoints/")}
    assert podman.run(tag, "/bin/busybox", "sh", "-c", "echo $TORCH_HOME").stdout.strip() == "/opt/torch"
    # the model-cache image's /opt/torch is a TORCH_HOME vanilla torchvision loads from, offline
    home = read_only_view(podman.mount(tag) / "opt/torch")
    proc = offline(sys.executable, "-c", OFFLINE_LOAD, json.dumps(WEIGHTS), home, torch_home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(v == o for v, o, _ in json.loads(proc.stdout.strip().splitlines()[-1]).values())
