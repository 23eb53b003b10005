"""The CycloneDX ML-BOM every bundle carries: content, strict schema validation with cyclonedx-python-lib's own
validator, covered by signatures (an edit fails verify), ``tvpack sbom`` over a bundle, a TORCH_HOME and oci://,
and nothing of it imported by ``list`` / ``fetch --dry-run``."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, ZOO_REGISTRY, need_binary, run_tvpack

from packager.formats.manifest import build_manifest
from packager.formats.sbom import SBOM_DIR, bom_of, build_bom, sbom_path
from packager.snapshot import describe, resolve

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

SELECTION = ["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"]


def validate(data: bytes) -> dict:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(data.decode("utf-8"))
    assert error is None, error
    return json.loads(data)


@pytest.fixture(scope="module")
def signed(zoo_root, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("sbom")
    openssl = need_binary("openssl")
    subprocess.run([openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(work / "k.pem")],
                   check=True)
    subprocess.run([openssl, "ec", "-in", str(work / "k.pem"), "-pubout", "-out", str(work / "k.pub")], check=True,
                   capture_output=True)
    out = work / "rel.tvpack"
    run_tvpack("bundle", *SELECTION, "-o", out, "--registry", ZOO_REGISTRY, "--mirror", zoo_root, "--no-upstream",
               "--torch-home", work / "producer", "--sign-key", work / "k.pem", "-q", "--channel", "prod",
               "--sequence", "3", "--expires", "2030-01-01", "--revoke", "ab" * 32 + "=bad", check=True)
    return {"bundle": out, "key": work / "k.pub", "work": work}


def test_every_bundle_carries_a_strictly_valid_ml_bom_listed_in_its_manifest(signed):
    with B.open_bundle(signed["bundle"]) as opened:
        path = bom_of(opened.files)
        assert path is not None and path.startswith(SBOM_DIR + "/")
        with opened.open_member(path) as f:
            data = f.read()
        assert opened.manifest["members"][path]["size"] == len(data)
        names = sorted(e.name for e in opened.entries)
        shas = {e.name: e.sha256 for e in opened.entries}
    assert path == sbom_path(data)  # named by its own content
    bom = validate(data)
    assert bom["specVersion"] == "1.6"
    assert sorted(c["name"] for c in bom["components"]) == names
    for component in bom["components"]:
        assert component["type"] == "machine-learning-model"
        assert component["hashes"] == [{"alg": "SHA-256", "content": shas[component["name"]]}]
        assert any(r["type"] == "distribution" and r["url"].endswith(".pth") for r in component["externalReferences"])
        params = component["modelCard"]["modelParameters"]
        assert params["task"] == "image-classification" and params["modelArchitecture"].startswith("packager.testing")
        assert params["datasets"] == [{"type": "dataset", "name": "CIFAR-10"}]
        metrics = component["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]
        assert {m["type"] for m in metrics} == {"acc@1", "acc@5"}
    tools = {c["name"]: c["version"] for c in bom["metadata"]["tools"]["components"]}
    assert set(tools) == {"tvpack", "torch", "torchvision"}
    props = {p["name"]: p["value"] for p in bom["metadata"]["properties"]}
    assert props["tvpack:release:channel"] == "prod" and props["tvpack:release:sequence"] == "3"
    assert props["tvpack:release:expires"] == "2030-01-01T00:00:00Z"
    assert props["tvpack:release:revokes"] == "ab" * 32 + " bad"
    # tvpack sbom prints exactly that member, or writes it to a file
    assert run_tvpack("sbom", signed["bundle"], check=True).stdout.encode() == data
    out = signed["work"] / "out.cdx.json"
    run_tvpack("sbom", signed["bundle"], "-o", out, check=True)
    assert out.read_bytes() == data


def test_the_bom_is_deterministic(signed, zoo_root, tmp_path):
    again = tmp_path / "again.tvpack"
    B.bundle(SELECTION, again, registry=[ZOO_REGISTRY], torch_home=signed["work"] / "producer", fetch=False)
    twice = tmp_path / "twice.tvpack"
    B.bundle(SELECTION, twice, registry=[ZOO_REGISTRY], torch_home=signed["work"] / "producer", fetch=False)
    assert again.read_bytes() == twice.read_bytes()


def test_editing_the_bom_fails_verify_in_the_bundle_and_installed(signed, tmp_path):
    edited = tmp_path / "edited.tvpack"
    shutil.copy(signed["bundle"], edited)
    with B.open_bundle(edited) as opened:
        member = opened.member(bom_of(opened.files))
    raw = bytearray(edited.read_bytes())
    at = raw.index(b'"machine-learning-model"', member.offset)
    raw[at + 1:at + 8] = b"MACHINE"  # same length: only the hash can tell
    edited.write_bytes(bytes(raw))
    proc = run_tvpack("verify", edited, "--key", signed["key"])
    assert proc.returncode == 1 and "sha256 mismatch" in proc.stderr and ".cdx.json" in proc.stderr
    # installed: the BOM sits under hub/tvpack/sbom/, and cache verify --signatures notices an edit
    home = tmp_path / "home"
    run_tvpack("install", signed["bundle"], "--torch-home", home, "--key", signed["key"], "-q", check=True)
    [installed] = (home / "hub" / "tvpack" / "sbom").glob("*.cdx.json")
    run_tvpack("cache", "verify", "--signatures", "--key", signed["key"], "--torch-home", home, check=True)
    installed.write_bytes(installed.read_bytes().replace(b"machine-learning-model", b"MACHINE-learning-model"))
    proc = run_tvpack("cache", "verify", "--signatures", "--key", signed["key"], "--torch-home", home)
    assert proc.returncode == 1 and installed.name in proc.stdout + proc.stderr


def test_sbom_of_a_torch_home_and_of_an_oci_image(signed, tmp_path, registry):
    home = tmp_path / "home"
    run_tvpack("install", signed["bundle"], "--torch-home", home, "--key", signed["key"], "-q", check=True)
    bom = validate(run_tvpack("sbom", home, check=True).stdout.encode())
    assert len(bom["components"]) == len(SELECTION)
    ref = f"oci://{registry.host}/models/rel:v1"
    run_tvpack("push", signed["bundle"], ref, "--plain-http", check=True)
    pulled = run_tvpack("sbom", ref, "--plain-http", check=True).stdout
    assert pulled == run_tvpack("sbom", signed["bundle"], check=True).stdout


def test_swag_weights_carry_their_licence_and_torchvision_docs():
    refs = resolve(["vit_b_16:IMAGENET1K_SWAG_E2E_V1", "resnet50:IMAGENET1K_V2"])
    infos = describe(refs)
    manifest = build_manifest(infos, {r.name: (r.size_hint or 1, "0" * 64) for r in refs})
    bom = validate(build_bom(manifest["weights"], created_by=manifest["created_by"]))
    by_name = {c["name"]: c for c in bom["components"]}
    swag = by_name["ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1"]
    assert "SWAG" in swag["licenses"][0]["license"]["url"]
    assert {r["type"] for r in swag["externalReferences"]} >= {"distribution", "documentation"}
    resnet = by_name["ResNet50_Weights.IMAGENET1K_V2"]
    assert "licenses" not in resnet
    assert resnet["modelCard"]["modelParameters"]["modelArchitecture"] == "torchvision.models.resnet.resnet50"
    assert resnet["modelCard"]["modelParameters"]["datasets"] == [{"type": "dataset", "name": "ImageNet-1K"}]
    assert any(r["type"] == "build-meta" for r in resnet["externalReferences"])


def test_list_and_fetch_dry_run_import_neither_torch_nor_cyclonedx(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    # the first command of a fresh install writes the registry snapshot (that one imports torch); then none does
    warm = subprocess.run([sys.executable, "-m", "packager", "list", "resnet50"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)
    assert warm.returncode == 0, warm.stderr
    for args in (["list", "resnet50"], ["fetch", "--dry-run", "resnet50"]):
        code = ("import sys, runpy; sys.argv = ['tvpack', *%r]\n"
                "try:\n    runpy.run_module('packager', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'cyclonedx'}))" % args)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
        assert "LOADED []" in proc.stdout, proc.stdout + proc.stderr
