"""Installed state read once (``packager.cache.scan_hub``): which installed manifest is current for each weights,
through the real CLI (``install``, ``cache ls``, ``inspect TORCH_HOME``) and ``load_model``.

Release bundles are made here from a real zoo bundle by putting a release into its manifest (what
``tvpack bundle --channel`` writes) and, for a second release, a different checkpoint for the same weights.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ZOO_REGISTRY, tvpack_env

from packager import loader, signing
from packager.cache import HubLayout, scan_hub
from packager.errors import LoadError
from packager.formats.manifest import decode_manifest, encode_manifest, manifest_path_for

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

# the variants' urls differ from the zoo's own: the loader says so, and uses the bundle's description
pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::packager.loader.DriftWarning")]

SHUFFLE = "ZooShuffleNetV2_Weights.IMAGENET10_V1"
REG = [ZOO_REGISTRY]


@pytest.fixture(scope="module")
def base(zoo_root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("installed-base")
    return B.bundle(["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"], work / "base.tvpack", registry=REG,
                    torch_home=work / "home",
                    mirrors=[str(zoo_root)], upstream=False)


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("key")
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", "k.pem"], cwd=folder,
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ec", "-in", "k.pem", "-pubout", "-out", "k.pub"], cwd=folder, check=True,
                   capture_output=True)
    return folder


def variant(base: Path, out: Path, *, release: dict | None = None, bump: float = 0.0, key: Path | None = None):
    """``base`` with ``release`` in its manifest and, with ``bump``, another checkpoint for SHUFFLE; signed with
    ``key``. Returns (bundle path, manifest id, SHUFFLE's sha256)."""
    import torch

    with tarfile.open(base) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    document = decode_manifest(members[0][1])
    checkpoints = dict((n, d) for n, d in members[1:] if n.startswith("hub/checkpoints/"))
    item = next(w for w in document["weights"] if w["name"] == SHUFFLE)
    if bump:
        state = torch.load(io.BytesIO(checkpoints.pop(item["path"])), weights_only=True)
        first = next(k for k, v in state.items() if v.is_floating_point())
        state[first] = state[first] + bump
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        name = f"zoo_shufflenet_v2-{sha[:8]}.pth"
        item.update(path=f"hub/checkpoints/{name}", url=item["url"].rsplit("/", 1)[0] + "/" + name, size=len(data),
                    sha256=sha)
        checkpoints[item["path"]] = data
    if release is not None:
        document["release"] = release
    document["members"] = {}  # the ML-BOM describes the base's checkpoints: a variant carries none
    manifest = encode_manifest(document)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [(manifest_path_for(manifest), manifest), *sorted(checkpoints.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    if key is not None:
        signing.sign_bundle(out, signing.Signer.load(key / "k.pem"))
    return out, manifest_path_for(manifest).rsplit("/", 1)[1][:16], item["sha256"]


def laid_down(bundle: Path, home: Path) -> None:
    """``tar -xf`` into a TORCH_HOME: no install record."""
    home.mkdir(exist_ok=True)
    subprocess.run(["tar", "-xf", str(bundle), "-C", str(home)], check=True)


def ls_installed(cli, home: Path) -> dict[str, dict]:
    result = cli("cache", "ls", "--json", "--no-registry", "--torch-home", home)
    assert result.exit_code == 0, result.output
    return {w["weights"]: w for w in json.loads(result.output)["installed"]}


def test_a_replayed_older_release_does_not_become_current(base, key, tmp_path, cli):
    release2, id2, sha2 = variant(base, tmp_path / "r2.tvpack", release={"channel": "prod", "sequence": 2}, bump=1.0,
                                  key=key)
    release1, id1, sha1 = variant(base, tmp_path / "r1.tvpack", release={"channel": "prod", "sequence": 1}, bump=2.0,
                                  key=key)
    home = tmp_path / "home"
    trust = ["--key", key / "k.pub", "--torch-home", home]
    assert cli("install", release2, *trust).exit_code == 0
    # the releases work refuses a rollback unless overridden: the override is what a replay needs to get this far
    override = ["--allow-rollback"] if "--allow-rollback" in cli("install", "--help").output else []
    result = cli("install", release1, *trust, *override)
    assert result.exit_code == 0, result.output
    model, weights = loader.load_model(home, SHUFFLE, registry=REG, trusted_keys=[key / "k.pub"], require_signed=True)
    assert weights.entry.sha256 == sha2 and weights.entry.manifest.endswith(f"{id2}.json")
    current = ls_installed(cli, home)[SHUFFLE]
    assert (current["current"], current["reason"], sorted(current["manifests"])) == (id2, "release", sorted([id1, id2]))
    text = cli("inspect", home).output
    assert SHUFFLE in text and id2 in text and "highest: release 2 of prod" in text
    # tar -xf of both releases (an image volume, say): no install record, the release still orders them
    bare = tmp_path / "bare"
    laid_down(release2, bare)
    laid_down(release1, bare)
    assert loader.open_source(bare).find(SHUFFLE)[0].sha256 == sha2


def test_reinstalling_a_bundle_makes_it_current_again(base, tmp_path, cli):
    first, id_a, sha_a = variant(base, tmp_path / "a.tvpack", bump=1.0)
    second, id_b, sha_b = variant(base, tmp_path / "b.tvpack", bump=2.0)
    home = tmp_path / "home"
    for path, manifest_id, sha, reason in [(first, id_a, sha_a, "only"), (second, id_b, sha_b, "installed"),
                                           (first, id_a, sha_a, "installed")]:
        result = cli("install", path, "--torch-home", home)
        assert result.exit_code == 0, result.output
        _model, weights = loader.load_model(home, SHUFFLE, registry=REG)
        assert weights.entry.sha256 == sha
        installed = ls_installed(cli, home)[SHUFFLE]
        assert (installed["current"], installed["reason"]) == (manifest_id, reason)
    assert "1 unchanged" in result.output or "unchanged" in result.output  # the last install rewrote no file
    records = sorted(p.name for p in HubLayout(home / "hub").installed.iterdir())
    assert records == sorted([f"{id_a}.json", f"{id_b}.json"])


def test_two_bundles_laid_down_by_hand_are_refused_in_one_line(base, tmp_path, cli):
    first, id_a, _ = variant(base, tmp_path / "a.tvpack", bump=1.0)
    second, id_b, _ = variant(base, tmp_path / "b.tvpack", bump=2.0)
    home = tmp_path / "home"
    laid_down(first, home)
    laid_down(second, home)
    with pytest.raises(LoadError) as error:
        loader.load_model(home, "zoo_shufflenet_v2", registry=REG)
    message = error.value.format()
    assert "\n" not in message and id_a in message and id_b in message and "nothing says which is current" in message
    installed = ls_installed(cli, home)[SHUFFLE]
    assert installed["current"] is None and installed["reason"] == "ambiguous"
    assert "AMBIGUOUS" in cli("cache", "ls", "--no-registry", "--torch-home", home).output
    # a weights both describe alike is not ambiguous: the quantized one is the same in both bundles
    assert loader.open_source(home).find("ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1", registry=REG)
    # installing one of them settles it
    assert cli("install", second, "--torch-home", home).exit_code == 0
    assert ls_installed(cli, home)[SHUFFLE]["current"] == id_b


def test_a_read_only_torch_home_loads_and_nothing_is_written(base, tmp_path, cli):
    first, _id_a, _ = variant(base, tmp_path / "a.tvpack", bump=1.0)
    second, id_b, sha_b = variant(base, tmp_path / "b.tvpack", bump=2.0)
    src = tmp_path / "src"
    for path in (first, second):
        assert cli("install", path, "--torch-home", src).exit_code == 0
    ro = tmp_path / "ro"
    ro.mkdir()
    code = (f"from packager import loader; m, w = loader.load_model({str(ro)!r}, {SHUFFLE!r}, registry={REG!r});"
            " print(w.entry.sha256)")
    script = 'mount --bind "$1" "$2" && mount -o remount,ro,bind "$2" && shift 2 && exec "$@"'
    before = sorted((str(p.relative_to(src)), p.stat().st_mtime_ns) for p in src.rglob("*"))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", src, ro, sys.executable, "-c", code],
                          capture_output=True, text=True, env=tvpack_env(), timeout=300)
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [sha_b]
    assert sorted((str(p.relative_to(src)), p.stat().st_mtime_ns) for p in src.rglob("*")) == before
    info = scan_hub(HubLayout(src / "hub"), checkpoints=False)
    assert info.weights[SHUFFLE].current == id_b and all(m.record is not None for m in info.manifests)
