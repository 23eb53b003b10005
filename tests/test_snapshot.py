"""The registry snapshot: torchvision's catalog as data, identical to live discovery, never stale,
and what lets data-only commands run without importing torch."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from packager import snapshot
from packager.discovery import get_registry, live_registry
from packager.formats.manifest import build_manifest
from packager.registry import WeightsInfo
from packager.spec import meta_to_json, transform_spec

# Runs the real CLI in a fresh interpreter, then reports whether torch or torchvision got imported.
PROBE = """
import sys
from packager.cli import main
try:
    main(sys.argv[1:], prog_name="tvpack")
    code = 0
except SystemExit as exc:
    code = exc.code or 0
print("IMPORTED:" + ",".join(m for m in ("torch", "torchvision") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def probe(*args, env: dict, cwd=ROOT) -> tuple[subprocess.CompletedProcess, str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=300)
    imported = next((line.split(":", 1)[1] for line in proc.stderr.splitlines() if line.startswith("IMPORTED:")), "?")
    return proc, imported


@pytest.fixture
def xdg(tmp_path, monkeypatch) -> Path:
    """A private XDG_CACHE_HOME: the snapshot is made there from scratch."""
    path = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


def test_list_all_json_is_identical_from_snapshot_and_live(xdg, tmp_path):
    env = {"XDG_CACHE_HOME": str(xdg), "TORCH_HOME": str(tmp_path / "th")}
    first, imported_first = probe("list", "--all", "--json", env=env)  # makes the snapshot (imports torchvision)
    assert first.returncode == 0, first.stderr
    assert "torchvision" in imported_first
    made = list((xdg / "tvpack" / "registry").glob("*.json"))
    assert len(made) == 1
    warm, imported_warm = probe("list", "--all", "--json", env=env)
    live, _ = probe("list", "--all", "--json", env={**env, "TVPACK_NO_SNAPSHOT": "1"})
    flag, _ = probe("--live-registry", "list", "--all", "--json", env=env)
    assert imported_warm == ""  # neither torch nor torchvision
    rows = json.loads(warm.stdout)
    assert len(rows) == 166
    assert warm.stdout == live.stdout == first.stdout == flag.stdout


def test_manifests_are_identical_for_all_166_weights(xdg):
    # The snapshot path: made live once, written, read back from the file as a later command would.
    made = snapshot.get_catalog(live=False)
    assert (xdg / "tvpack" / "registry").is_dir()
    from_file = snapshot._load(snapshot.snapshot_path(snapshot.source_key()))
    assert from_file is not None
    # The independent path: straight from torchvision's live members, as the manifest was written before snapshots.
    reg = get_registry(())
    refs = from_file.all_refs()
    assert len(refs) == 166
    files = {ref.name: (ref.size_hint or 1, hashlib.sha256(ref.name.encode()).hexdigest()) for ref in refs}
    direct = []
    for ref in refs:
        member = reg.weights(ref.name)
        direct.append(WeightsInfo(reg.ref(member), transform_spec(member), meta_to_json(member.meta)))
    expected = build_manifest(direct, files)
    for catalog in (from_file, made, live_registry((), torchvision=True).catalog()):
        got = build_manifest([catalog.info(ref) for ref in refs], files)
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


def _fake_torchvision(root: Path) -> Path:
    (root / "models" / "detection").mkdir(parents=True)
    (root / "transforms").mkdir()
    (root / "models" / "resnet.py").write_text("x = 1\n")
    (root / "models" / "detection" / "ssd.py").write_text("y = 2\n")
    (root / "transforms" / "_presets.py").write_text("z = 3\n")
    (root / "transforms" / "functional.py").write_text("unrelated\n")
    return root


def test_the_key_changes_with_any_source_file(tmp_path, monkeypatch):
    tv = _fake_torchvision(tmp_path / "torchvision")
    monkeypatch.setattr(snapshot, "_torchvision_dir", lambda: tv)
    keys = [snapshot.source_key()]
    (tv / "models" / "resnet.py").write_text("x = 11\n")  # size
    keys.append(snapshot.source_key())
    os.utime(tv / "models" / "detection" / "ssd.py", ns=(1, 123456789))  # mtime only
    keys.append(snapshot.source_key())
    (tv / "transforms" / "_presets.py").write_text("z = 4\n")
    keys.append(snapshot.source_key())
    (tv / "models" / "new_family.py").write_text("")  # a new module
    keys.append(snapshot.source_key())
    assert len(set(keys)) == len(keys)
    (tv / "transforms" / "functional.py").write_text("not part of the registry\n")
    assert snapshot.source_key() == keys[-1]
    monkeypatch.setattr(snapshot.metadata, "version", lambda dist: "9.9.9")
    assert snapshot.source_key() != keys[-1]  # another torchvision version


def test_a_damaged_snapshot_is_made_again(xdg):
    path = snapshot.snapshot_path(snapshot.source_key())
    path.parent.mkdir(parents=True)
    path.write_text('{"format": "tvpack-registry-snapshot", "format_version": 1, "enums": [[[[')
    catalog = snapshot.get_catalog(live=False)
    assert len(catalog.all_refs()) == 166
    assert json.loads(path.read_text())["format"] == "tvpack-registry-snapshot"


def test_an_unwritable_cache_still_works(xdg):
    xdg.mkdir()
    (xdg / "tvpack").write_text("a file where the directory would go")
    assert len(snapshot.get_catalog(live=False).all_refs()) == 166


def test_user_registries_are_always_live(xdg, tmp_path, zoo):
    env = {"XDG_CACHE_HOME": str(xdg), "TORCH_HOME": str(tmp_path / "th")}
    probe("list", "resnet18", env=env)  # warm the snapshot
    module = tmp_path / "mymods" / "site_weights.py"
    module.parent.mkdir()
    module.write_text("from packager.testing.zoo import ZooS3D_Weights, zoo_s3d  # noqa: F401\n")
    out, imported = probe("list", "zoo_s3d", "resnet18", "--json", env={**env, "PYTHONPATH": f"{ROOT}:{module.parent}",
                                                                            "TVPACK_REGISTRY": "site_weights"})
    assert out.returncode == 0, out.stderr
    assert {r["weights"] for r in json.loads(out.stdout)} >= {"ResNet18_Weights.IMAGENET1K_V1"}
    assert any(r["weights"].startswith("ZooS3D_Weights.") for r in json.loads(out.stdout))
    assert "torch" in imported  # the user's module is imported, every time
    module.write_text("")  # the module changed: no stale view of it
    out, _ = probe("list", "zoo_s3d", env={**env, "PYTHONPATH": f"{ROOT}:{module.parent}",
                                                "TVPACK_REGISTRY": "site_weights"})
    assert out.returncode != 0 and "defines no WeightsEnum" in out.stderr


def test_data_commands_never_import_torch(xdg, tmp_path):
    env = {"XDG_CACHE_HOME": str(xdg), "TORCH_HOME": str(tmp_path / "th")}
    probe("list", "resnet18", env=env)  # warm the snapshot
    for args in (["list", "resnet50"], ["fetch", "--dry-run", "resnet50", "vit_b_16"], ["--help"],
                 ["fetch", "--dry-run", "--all", "--with-backbones"]):
        proc, imported = probe(*args, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        assert imported == "", (args, imported)


def test_bundling_torchvision_weights_imports_no_torch(xdg, tmp_path):
    """The whole of `tvpack bundle` for a torchvision weights, from the snapshot: no torch on the way.

    torchvision's real checkpoint is not here, so the snapshot (plain data) is pointed at a small
    stand-in file whose name carries its own hash, as tests point a live member's url elsewhere.
    """
    env = {"XDG_CACHE_HOME": str(xdg), "TORCH_HOME": str(tmp_path / "th")}
    probe("list", "resnet18", env=env)
    path = next((xdg / "tvpack" / "registry").glob("*.json"))
    data = json.loads(path.read_text())
    payload = os.urandom(4096)
    name = f"resnet18-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    for item in data["weights"]:
        if item["ref"]["enum"] == "ResNet18_Weights":
            item["ref"]["url"] = f"https://download.pytorch.org/models/{name}"
    path.write_text(json.dumps(data))
    ckpt = tmp_path / "th" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / name).write_bytes(payload)
    out = tmp_path / "r18.tvpack.tar"
    proc, imported = probe("bundle", "resnet18", "--no-fetch", "-o", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert imported == ""
    listing = subprocess.run(["tar", "-tf", out], capture_output=True, text=True, check=True).stdout.split()
    assert f"hub/checkpoints/{name}" in listing
    proc, imported = probe("inspect", out, "--json", env=env)
    assert proc.returncode == 0 and imported == ""
    assert json.loads(proc.stdout)["weights"][0]["transforms"]["class"] == "ImageClassification"


@pytest.mark.timeout(600)
def test_a_user_module_that_repoints_torchvision_members_is_heeded_everywhere(xdg, tmp_path, mirror_server,
                                                                              monkeypatch):
    """A --registry module that points a real torchvision member at an internal mirror and re-exports its enum (the
    usual way to reroute downloads) is what list, fetch --dry-run, bundle and the loader see: with the snapshot
    warm (it holds the upstream url) and with TVPACK_NO_SNAPSHOT=1 alike."""
    import warnings

    import torchvision

    from packager.loader import DriftWarning, load_model
    from packager.testing.zoo import synthesize_checkpoint

    member = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    (mirror_server.root / "models").mkdir(parents=True)
    ckpt = synthesize_checkpoint(member, mirror_server.root / "models")
    url = f"{mirror_server.url}/models/{ckpt.name}"
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "internal_mirror.py").write_text(
        "from torchvision.models import SqueezeNet1_1_Weights, squeezenet1_1  # noqa: F401 - re-exported\n"
        f"SqueezeNet1_1_Weights.IMAGENET1K_V1.value.url = {url!r}\n")
    env = {"XDG_CACHE_HOME": str(xdg), "TORCH_HOME": str(tmp_path / "th"), "PYTHONPATH": f"{ROOT}:{mods}"}
    probe("list", "squeezenet1_1", env=env)  # the snapshot is warm, with the upstream url in it
    for live in ({}, {"TVPACK_NO_SNAPSHOT": "1"}):
        listed, _ = probe("list", "squeezenet1_1", "--registry", "internal_mirror", "--json", env={**env, **live})
        assert listed.returncode == 0, listed.stderr
        assert [(r["url"], r["filename"]) for r in json.loads(listed.stdout)] == [(url, ckpt.name)], live
        planned, _ = probe("fetch", "--dry-run", "--json", "squeezenet1_1", "--registry", "internal_mirror",
                           env={**env, **live})
        assert planned.returncode == 0, planned.stderr
        assert [r["url"] for r in json.loads(planned.stdout)] == [url], live
    out = tmp_path / "sq.tvpack.tar"
    made, _ = probe("bundle", "squeezenet1_1", "--registry", "internal_mirror", "-o", out, env=env)
    assert made.returncode == 0, made.stderr
    assert len(mirror_server.transfers(f"/models/{ckpt.name}")) == 1  # fetched from the internal mirror
    # in this process too (the member's url is put back when the test ends)
    monkeypatch.setattr(member.value, "url", member.url)
    monkeypatch.syspath_prepend(str(mods))
    monkeypatch.delitem(sys.modules, "internal_mirror", raising=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DriftWarning)  # the bundle and the live member agree
            model, weights = load_model(out, "squeezenet1_1", registry=["internal_mirror"])
        assert weights.url == url and not model.training
    finally:
        sys.modules.pop("internal_mirror", None)
