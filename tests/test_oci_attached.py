"""Signatures attached to a pushed image as OCI 1.1 referrers (`tvpack sign oci://...`), against Debian's real
distribution 2.8, which has no referrers API: the referrers tag schema (an index tagged sha256-<hex>); and behind a
front that adds the API (tests/referrers_registry.py), through the API. The image's
digest does not change; install, pull, verify and inspect find the signature and apply the key before any
checkpoint layer is fetched; pull writes it into the bundle."""
from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import pytest
from conftest import ZOO_REGISTRY, need_binary, run_tvpack

from packager import oci
from packager.transport.oci import Policy, RegistryClient

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

SMALL = ["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"]
FAST = Policy(retries=1, backoff=0.01, max_backoff=0.02, connect_timeout=3, read_timeout=20)


@pytest.fixture(scope="module")
def small_bundle(zoo_root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("attached-bundle")
    return B.bundle(SMALL, work / "small.tvpack", registry=[ZOO_REGISTRY], torch_home=work / "home",
                    mirrors=[str(zoo_root)], upstream=False)


@pytest.fixture(autouse=True)
def isolated(no_creds, tmp_path, monkeypatch, zoo_root):
    monkeypatch.setenv("TVPACK_ZOO_DIR", str(zoo_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(tmp_path / "no-registries.conf"))


def keypair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    openssl = need_binary("openssl")
    key, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
    subprocess.run([openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)], check=True)
    subprocess.run([openssl, "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    return key, pub


def blob_gets(reg) -> list[str]:
    return [r[1].rsplit("/", 1)[-1] for r in reg.requests() if r[0] == "GET" and "/blobs/sha256:" in r[1]]


@pytest.mark.parametrize("image_format", ["image", "modelpack"])
def test_sign_attaches_a_referrer_that_install_pull_verify_and_inspect_enforce(registry, small_bundle, tmp_path,
                                                                                image_format):
    alice, alice_pub = keypair(tmp_path, "alice")
    _other, other_pub = keypair(tmp_path, "other")
    ref = f"oci://{registry.host}/models/small:v1"
    pushed = json.loads(run_tvpack("push", small_bundle, ref, "--format", image_format, "--plain-http", "--json",
                                   "-q").stdout)
    client = RegistryClient(registry.host, plain_http=True, policy=FAST)

    # unsigned, a key is refused before any checkpoint layer is fetched
    home = tmp_path / "home"
    proc = run_tvpack("install", ref, "--key", alice_pub, "--torch-home", home, "--plain-http", "-q")
    assert proc.returncode == 1 and "signature" in proc.stderr, proc.stderr

    proc = run_tvpack("sign", ref, "--key", alice, "--plain-http", "--json")
    assert proc.returncode == 0, proc.stderr
    attached = json.loads(proc.stdout)
    hexdigest = pushed["digest"].split(":")[1]
    assert attached["via"] == f"tag sha256-{hexdigest}" and attached["reference"].endswith("@" + pushed["digest"])
    assert client.manifest_digest("models/small", "v1") == pushed["digest"]  # the image is untouched
    index = json.loads(client.get_manifest("models/small", f"sha256-{hexdigest}").data)
    (entry,) = index["manifests"]
    assert entry["artifactType"] == "application/vnd.dev.sigstore.bundle.v0.3+json" and entry["digest"] == attached["digest"]
    artifact = json.loads(client.get_manifest("models/small", attached["digest"]).data)
    assert artifact["subject"]["digest"] == pushed["digest"]
    assert artifact["layers"][0]["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    # the same name again is refused; another label is a second signature
    again = run_tvpack("sign", ref, "--key", alice, "--plain-http")
    assert again.returncode == 1 and "already has a signature" in again.stderr

    manifest = json.loads(client.get_manifest("models/small", pushed["digest"]).data)
    checkpoint_digests = {layer["digest"] for layer in manifest["layers"]
                          if "model.weight.v1" in layer["mediaType"] or "checkpoint" in json.dumps(layer)}
    gets = len(blob_gets(registry))
    proc = run_tvpack("install", ref, "--key", other_pub, "--torch-home", home, "--plain-http", "-q")
    assert proc.returncode == 1 and "signature" in proc.stderr, proc.stderr
    assert not set(blob_gets(registry)[gets:]) & checkpoint_digests  # refused before any checkpoint layer
    assert not (home / "hub/checkpoints").exists() or not list((home / "hub/checkpoints").iterdir())
    proc = run_tvpack("install", ref, "--key", alice_pub, "--torch-home", home, "--plain-http", "-q")
    assert proc.returncode == 0 and "signature valid" in proc.stdout, proc.stderr

    shown = run_tvpack("inspect", ref, "--plain-http")
    assert "signatures: 1" in shown.stdout, shown.stdout + shown.stderr
    verified = run_tvpack("verify", ref, "--key", alice_pub, "--plain-http")
    assert verified.returncode == 0 and "signed by" in verified.stdout, verified.stderr

    # pull writes the attached signature into the bundle: the offline side checks it
    out = tmp_path / "pulled.tvpack"
    assert run_tvpack("pull", ref, "-o", out, "--plain-http", "-q").returncode == 0
    with B.open_bundle(out) as opened:
        assert [m.path for m in opened.signatures] == [attached["signature"]]
    offline = run_tvpack("verify", out, "--key", alice_pub)
    assert offline.returncode == 0 and "signed by" in offline.stdout, offline.stderr
    assert oci.read_image(ref, plain_http=True).reference.digest == pushed["digest"]


def test_a_registry_with_the_referrers_api_is_asked_through_it_and_gets_no_referrers_tag(registry, small_bundle,
                                                                                         tmp_path):
    """The API path, against the real registry behind a front that adds the OCI 1.1 referrers API
    (tests/referrers_registry.py): sign attaches without a sha256-<hex> tag, install finds the signature through
    the API and applies the key before any checkpoint layer; a registry that lists another image's signature
    under this one is refused."""
    from referrers_registry import ReferrersFront

    alice, alice_pub = keypair(tmp_path, "alice")
    _other, other_pub = keypair(tmp_path, "other")
    direct = RegistryClient(registry.host, plain_http=True, policy=FAST)
    with ReferrersFront(registry.host) as front:
        ref = f"oci://{front.host}/models/small:v1"
        pushed = json.loads(run_tvpack("push", small_bundle, ref, "--plain-http", "--json", "-q").stdout)
        proc = run_tvpack("sign", ref, "--key", alice, "--plain-http", "--json")
        assert proc.returncode == 0, proc.stderr
        attached = json.loads(proc.stdout)
        assert attached["via"] == "referrers API"
        hexdigest = pushed["digest"].split(":")[1]
        assert direct.manifest_digest("models/small", f"sha256-{hexdigest}") is None  # no referrers tag
        assert [d["digest"] for d in front.referrers[("models/small", pushed["digest"])]] == [attached["digest"]]

        home = tmp_path / "home"
        gets = len(blob_gets(registry))
        refused = run_tvpack("install", ref, "--key", other_pub, "--torch-home", home, "--plain-http", "-q")
        assert refused.returncode == 1 and "signature" in refused.stderr, refused.stderr
        manifest = json.loads(direct.get_manifest("models/small", pushed["digest"]).data)
        biggest = max(manifest["layers"], key=lambda layer: layer["size"])["digest"]
        assert biggest not in blob_gets(registry)[gets:]  # refused before the checkpoint layer
        proc = run_tvpack("install", ref, "--key", alice_pub, "--torch-home", home, "--plain-http", "-q")
        assert proc.returncode == 0 and "signature valid" in proc.stdout, proc.stderr
        asked = [path for method, path, _ in front.requests if method == "GET" and "/referrers/" in path]
        assert asked and all(pushed["digest"] in path for path in asked)

        # a lying registry: the signature of v1 listed as a referrer of another image
        other = json.loads(run_tvpack("push", small_bundle, f"oci://{front.host}/models/small:mp", "--format",
                                      "modelpack", "--plain-http", "--json", "-q").stdout)
        front.forge("models/small", other["digest"], front.referrers[("models/small", pushed["digest"])][0])
        lied = run_tvpack("install", f"oci://{front.host}/models/small:mp", "--key", alice_pub, "--torch-home",
                          tmp_path / "home2", "--plain-http", "-q")
        assert lied.returncode == 1 and "its subject is another manifest" in lied.stderr, lied.stderr
        assert not (tmp_path / "home2" / "hub" / "checkpoints").exists() \
            or not list((tmp_path / "home2" / "hub" / "checkpoints").iterdir())
