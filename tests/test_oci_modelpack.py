"""Bundles as CNCF ModelPack artifacts against the real distribution registry: push --format modelpack (and
bundle -o oci:// --format modelpack), then pull (byte-identical), install, inspect and verify reading them;
the config checked against the spec's own schema; a corrupted raw layer refused."""
from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ZOO_REGISTRY, need_binary, run_tvpack

from packager import signing
from packager.transport.oci import Policy, RegistryClient

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

SMALL = ["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"]
SCHEMA = Path(__file__).parent / "data" / "modelpack" / "config-schema.json"
FAST = Policy(retries=1, backoff=0.01, max_backoff=0.02, connect_timeout=3, read_timeout=20)


@pytest.fixture(scope="module")
def made(zoo_root, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("modelpack-bundles")
    home = work / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", "1700000000")
        path = B.bundle(SMALL, work / "small.tvpack", registry=[ZOO_REGISTRY], torch_home=home,
                        mirrors=[str(zoo_root)], upstream=False)
    return {"home": home, "small": path}


@pytest.fixture(autouse=True)
def isolated(no_creds, tmp_path, monkeypatch, zoo_root):
    monkeypatch.setenv("TVPACK_ZOO_DIR", str(zoo_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(tmp_path / "no-registries.conf"))


def fetch(registry, repo: str, ref: str) -> tuple[dict, RegistryClient]:
    client = RegistryClient(registry.host, plain_http=True, policy=FAST)
    return json.loads(client.get_manifest(repo, ref).data), client


def blob(client, repo: str, digest: str, tmp_path: Path) -> bytes:
    out = tmp_path / digest.replace(":", "-")
    client.pull_blob(repo, digest, out)
    return out.read_bytes()


def test_push_modelpack_then_pull_install_inspect(registry, made, tmp_path):
    ref = f"oci://{registry.host}/models/small:mp"
    proc = run_tvpack("push", made["small"], ref, "--format", "modelpack", "--plain-http", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "pushed"

    manifest, client = fetch(registry, "models/small", "mp")
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    with B.open_bundle(made["small"]) as opened:
        shas = {e.path: e.sha256 for e in opened.entries}
        manifest_path = opened.manifest_path
    weights = [layer for layer in manifest["layers"] if layer["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"]
    # one raw layer per checkpoint: its digest is the checkpoint's sha256, its bytes the checkpoint
    assert {layer["annotations"]["org.cncf.model.filepath"]: layer["digest"] for layer in weights} == {
        path: f"sha256:{sha}" for path, sha in shas.items()}
    for layer in weights:
        data = blob(client, "models/small", layer["digest"], tmp_path)
        assert data == (made["home"] / layer["annotations"]["org.cncf.model.filepath"]).read_bytes()
    (config_layer,) = [layer for layer in manifest["layers"] if layer not in weights]
    assert config_layer["mediaType"] == "application/vnd.cncf.model.weight.config.v1.raw"
    assert config_layer["annotations"]["org.cncf.model.filepath"] == manifest_path
    config = json.loads(blob(client, "models/small", manifest["config"]["digest"], tmp_path))
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(config)
    assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in manifest["layers"]]
    assert config["descriptor"]["createdAt"] == "2023-11-14T22:13:20Z"  # the bundle's SOURCE_DATE_EPOCH

    out = tmp_path / "pulled.tvpack"
    proc = run_tvpack("pull", ref, "-o", out, "--plain-http", "-q")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == made["small"].read_bytes()  # the same bundle, byte for byte

    home = tmp_path / "fresh"
    proc = run_tvpack("install", ref, "--torch-home", home, "--plain-http", "-q")
    assert proc.returncode == 0, proc.stderr
    for path in shas:
        assert (home / path).read_bytes() == (made["home"] / path).read_bytes()
    assert (home / manifest_path).is_file()

    proc = run_tvpack("inspect", ref, "--plain-http", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "ZooShuffleNetV2_Weights.IMAGENET10_V1" in proc.stdout

    # a re-push changes nothing; the image format of the same bundle is another artifact
    again = json.loads(run_tvpack("push", made["small"], ref, "--format", "modelpack", "--plain-http", "--json",
                                  "-q").stdout)
    assert again["status"] == "unchanged" and again["digest"] == report["digest"]
    image = json.loads(run_tvpack("push", made["small"], f"oci://{registry.host}/models/small:img", "--plain-http",
                                  "--json", "-q").stdout)
    assert image["digest"] != report["digest"]


def test_bundle_straight_to_modelpack_is_the_same_artifact(registry, made, tmp_path, zoo_root):
    pushed = run_tvpack("push", made["small"], f"oci://{registry.host}/models/a:v1", "--format", "modelpack",
                        "--plain-http", "--json", "-q")
    assert pushed.returncode == 0, pushed.stderr
    proc = run_tvpack("bundle", *SMALL, "--registry", ZOO_REGISTRY, "--torch-home", made["home"], "--no-fetch",
                      "-o", f"oci://{registry.host}/models/b:v1", "--format", "modelpack", "--plain-http", "--json",
                      env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == json.loads(pushed.stdout)["digest"]
    proc = run_tvpack("bundle", *SMALL, "--registry", ZOO_REGISTRY, "-o", tmp_path / "x.tvpack", "--format", "modelpack")
    assert proc.returncode == 2 and "--format is the layout of an image" in proc.stderr


def test_a_corrupted_raw_layer_is_refused_and_nothing_is_installed(registry, made, tmp_path):
    ref = f"oci://{registry.host}/models/small:mp"
    assert run_tvpack("push", made["small"], ref, "--format", "modelpack", "--plain-http", "-q").returncode == 0
    manifest, _client = fetch(registry, "models/small", "mp")
    victim = registry.blob_path(manifest["layers"][0]["digest"])
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    home = tmp_path / "home"
    proc = run_tvpack("install", ref, "--torch-home", home, "--plain-http", "-q")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("tvpack: error: "), proc.stderr
    assert not (home / "hub/checkpoints").exists() or not any((home / "hub/checkpoints").iterdir())
    out = tmp_path / "pulled.tvpack"
    proc = run_tvpack("pull", ref, "-o", out, "--plain-http", "-q")
    assert proc.returncode == 1 and not out.exists() and list(tmp_path.glob(".pulled*")) == []


def test_signatures_inside_the_bundle_travel_in_a_modelpack_artifact(registry, made, tmp_path, monkeypatch):
    openssl = need_binary("openssl")
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    subprocess.run([openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)], check=True)
    subprocess.run([openssl, "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    signed = tmp_path / "signed.tvpack"
    shutil.copy(made["small"], signed)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the bundle's mtime: every member has one
    signing.sign_bundle(signed, signing.Signer.load(key))
    ref = f"oci://{registry.host}/models/signed:mp"
    assert run_tvpack("push", signed, ref, "--format", "modelpack", "--plain-http", "-q").returncode == 0
    out = tmp_path / "pulled.tvpack"
    assert run_tvpack("pull", ref, "-o", out, "--plain-http", "-q").returncode == 0
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(signed.read_bytes()).digest()
    proc = run_tvpack("install", ref, "--key", pub, "--torch-home", tmp_path / "h", "--plain-http", "-q")
    assert proc.returncode == 0 and "signature valid" in proc.stdout, proc.stderr
