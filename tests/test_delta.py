"""Delta bundles and split volumes, end to end through the real CLI and the library, on the zoo.

A site holding half of a selection gives an inventory; the connected side bundles the selection for
it and carries exactly the other half; installing that on the site makes every weights loadable
(tvpack and vanilla torchvision, with no network). Split bundles: part sizes, coreutils, byte
identity with the unsplit bundle, reading in place, and every damaged copy named.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, ZOO_REGISTRY, need_binary, run_tvpack
from test_signature import pki  # noqa: F401 - a fixture

from packager import delta
from packager.errors import BundleError, LoadError, VolumeError
from packager.formats import inventory as inv
from packager.formats.archive import BLOCK
from packager.formats.manifest import decode_manifest, parse_manifest

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

# every zoo family; the first half is what the site already has
SELECTION = [
    "ZooMobileNetV3Small_Weights.IMAGENET10_V2",
    "ZooMobileNetV3Large_Weights.IMAGENET10_V1",
    "ZooShuffleNetV2_Weights.IMAGENET10_V1",
    "ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1",
    "ZooSSDLite320_Weights.COCO5_V1",
    "ZooLRASPP_Weights.VOC5_V1",
    "ZooS3D_Weights.KINETICS10_V1",
    "ZooRaftSmall_Weights.THINGS_V1",
]
HALF, OTHER = SELECTION[:4], SELECTION[4:]
SMALL = ["ZooShuffleNetV2_Weights.IMAGENET10_V1", "ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1"]


def file_of(zoo, name: str) -> str:
    enum, member = name.split(".")
    return os.path.basename(getattr(getattr(zoo, enum), member).url)


def checkpoint_names(home: Path) -> list[str]:
    directory = home / "hub" / "checkpoints"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvpack: error: "), output
    return lines[0]


def members_of(path: Path) -> list[str]:
    with tarfile.open(path) as tf:  # an independent reader
        return [m.name for m in tf.getmembers()]


@pytest.fixture(scope="module")
def connected(zoo_root, tmp_path_factory) -> Path:
    """The connected side's TORCH_HOME, holding every selected checkpoint (fetched from the zoo mirror)."""
    home = tmp_path_factory.mktemp("connected")
    B.bundle(SELECTION, home / "warm.tar", registry=[ZOO_REGISTRY], torch_home=home, mirrors=[str(zoo_root)],
             upstream=False)
    return home


@pytest.fixture(scope="module")
def half_site(connected, tmp_path_factory) -> Path:
    """A site where a bundle of HALF was installed earlier (a template: copy it before changing it)."""
    work = tmp_path_factory.mktemp("half-site")
    B.bundle(HALF, work / "half.tar", registry=[ZOO_REGISTRY], torch_home=connected, fetch=False)
    B.install_bundle(work / "half.tar", torch_home=work / "site")
    return work / "site"


@pytest.fixture(scope="module")
def update(connected, half_site, tmp_path_factory):
    """(SITE.json from the real `tvpack inventory` of the half site, the delta bundle for it from `tvpack bundle --for`)."""
    work = tmp_path_factory.mktemp("update")
    site_json = work / "SITE.json"
    proc = run_tvpack("inventory", "--torch-home", half_site, "-o", site_json)
    assert proc.returncode == 0, proc.stderr
    proc = run_tvpack("bundle", *SELECTION, "--registry", ZOO_REGISTRY, "--torch-home", connected, "--no-fetch",
                      "--for", site_json, "-o", work / "update.tar", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "4 checkpoint files carried, 4 expected at the site" in proc.stdout
    return site_json, work / "update.tar"


# -- inventory ---------------------------------------------------------------------------------------
def test_inventory_lists_the_site(update, half_site, zoo):
    site_json, _update = update
    site = inv.parse(site_json.read_bytes())
    assert [c.file for c in site.checkpoints] == sorted(file_of(zoo, name) for name in HALF)
    for c in site.checkpoints:
        path = half_site / "hub" / "checkpoints" / c.file
        assert (c.size, c.sha256) == (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(site.manifests) == 1 and site.manifests[0].weights == tuple(sorted(HALF))
    assert site.torch_home == str(half_site)
    assert site.versions.torch and site.versions.torchvision and site.versions.tvpack


def test_inventory_to_stdout_skips_temp_files_and_does_not_import_torch(half_site, tmp_path, tvpack):
    site = tmp_path / "site"
    shutil.copytree(half_site, site)
    ckpt = site / "hub" / "checkpoints"
    (ckpt / ".x.pth.123.abcd0123.tvpack-install").write_bytes(b"temp")
    (ckpt / "y.pth.host.1.ab.tvpack-part").write_bytes(b"part")
    (ckpt / "subdir").mkdir()
    proc = tvpack("inventory", "--torch-home", site, "-o", "-")
    assert proc.returncode == 0, proc.stderr
    assert inv.parse(proc.stdout.encode()) == delta.inventory(torch_home=site)
    assert len(inv.parse(proc.stdout.encode()).checkpoints) == 4
    check = subprocess.run([sys.executable, "-c", "import sys; from packager.cli import main; import packager.delta;"
                            f"packager.delta.inventory(torch_home={str(site)!r}); print('torch' in sys.modules)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert check.stdout.strip() == "False", check.stderr


def test_inventory_deep_hashes_again(half_site, tmp_path, cli):
    """A file changed behind the index's back (bit rot: no metadata changes): only --deep sees it."""
    from packager import cache

    site = tmp_path / "site"
    shutil.copytree(half_site, site)
    victim = sorted((site / "hub" / "checkpoints").iterdir())[0]
    recorded = cache.file_sha256(victim)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    # an edit changes ctime, which the index would notice; rot on the disk changes nothing: the
    # index still vouches for the old hash
    cache.record_verified(victim, recorded)
    quick = delta.inventory(torch_home=site).checkpoint(victim.name)
    deep = delta.inventory(torch_home=site, deep=True).checkpoint(victim.name)
    assert deep.sha256 == hashlib.sha256(bytes(data)).hexdigest() != quick.sha256
    assert cli("inventory", "--torch-home", site, "--deep", "-o", tmp_path / "SITE.json").exit_code == 0
    assert inv.parse((tmp_path / "SITE.json").read_bytes()).checkpoint(victim.name) == deep


def test_inventory_of_a_missing_torch_home_is_an_error_unless_allow_empty(tmp_path, cli):
    """A mistyped --torch-home used to give an empty inventory, and so a full bundle where a delta was meant."""
    typo, site_json = tmp_path / "nothing", tmp_path / "SITE.json"
    proc = run_tvpack("inventory", "--torch-home", typo, "-o", site_json)
    assert proc.returncode == 1 and not site_json.exists()
    assert proc.stderr.strip() == (f"tvpack: error: {typo} does not exist: check the path, or pass --allow-empty "
                                   "(allow_empty=True) to describe a site that holds nothing yet")
    with pytest.raises(BundleError, match="does not exist"):
        delta.inventory(torch_home=typo)
    (tmp_path / "no-hub").mkdir()
    with pytest.raises(BundleError, match="holds no torch.hub cache"):
        delta.inventory(torch_home=tmp_path / "no-hub")
    assert not typo.exists()

    result = cli("inventory", "--torch-home", typo, "--allow-empty", "-o", site_json)
    assert result.exit_code == 0 and "0 checkpoints" in result.output
    assert inv.parse(site_json.read_bytes()).checkpoints == ()
    assert delta.inventory(torch_home=typo, allow_empty=True).checkpoints == ()
    (typo / "hub").mkdir(parents=True)  # a cache that holds nothing yet is a site, not a typo
    assert delta.inventory(torch_home=typo).checkpoints == ()


# -- the delta bundle ----------------------------------------------------------------------------------
def test_delta_bundle_carries_exactly_the_other_half(update, zoo):
    _site, path = update
    names = [n for n in members_of(path) if not n.startswith("hub/tvpack/sbom/")]  # every bundle has its ML-BOM
    assert sorted(names[1:]) == sorted(f"hub/checkpoints/{file_of(zoo, n)}" for n in OTHER)
    with B.open_bundle(path) as opened:
        assert sorted(e.name for e in opened.entries) == sorted(SELECTION)
        assert sorted(e.name for e in opened.entries if e.at_site) == sorted(HALF)
        assert list(opened.site_files) == sorted(f"hub/checkpoints/{file_of(zoo, n)}" for n in HALF)
        assert opened.manifest["at_site"] == list(opened.site_files)
    report = B.verify_bundle(path)
    assert report.at_site == 4 and report.members == 6  # the manifest, 4 checkpoints, the ML-BOM


def test_inspect_and_verify_show_carried_and_expected(update, zoo, cli):
    _site, path = update
    result = cli("inspect", path)
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("Zoo")}
    assert all(" at site " in lines[name] for name in HALF) and all(" carried " in lines[name] for name in OTHER)
    saved = sum((Path(zoo.zoo_dir()) / "models/tvpack-zoo" / file_of(zoo, n)).stat().st_size for n in HALF)
    from packager.fsutil import human_bytes

    assert "4 files carried" in result.output and f"4 expected at the site ({human_bytes(saved)} saved)" in result.output
    result = cli("verify", path)
    assert result.exit_code == 0 and "4 files expected at the site are checked by install" in result.output


VANILLA_AND_TVPACK = r'''
import json, socket, sys
import torch
import packager.testing.zoo as zoo
from packager import load_model
try:
    socket.create_connection(("127.0.0.1", 9), timeout=2)
    print("NETWORK")
except OSError:
    pass
home, names = sys.argv[1], json.loads(sys.argv[2])
def total(model):
    return float(sum(t.double().sum() for t in model.state_dict().values()
                     if isinstance(t, torch.Tensor) and t.dtype.is_floating_point))
out = {}
for name, builder in names.items():
    enum, member = name.split(".")
    weights = getattr(getattr(zoo, enum), member)
    kwargs = {"quantize": True} if "Quantized" in enum else {}
    vanilla = getattr(zoo, builder)(weights=weights, **kwargs)          # torch.hub's cache, as torchvision does
    ours, _w = load_model(home, name, registry=["packager.testing.zoo"])  # tvpack's loader
    out[name] = [total(vanilla), total(ours)]
print(json.dumps(out))
'''

BUILDERS = {
    "ZooMobileNetV3Small_Weights.IMAGENET10_V2": "zoo_mobilenet_v3_small",
    "ZooMobileNetV3Large_Weights.IMAGENET10_V1": "zoo_mobilenet_v3_large",
    "ZooShuffleNetV2_Weights.IMAGENET10_V1": "zoo_shufflenet_v2",
    "ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1": "zoo_quantized_shufflenet_v2",
    "ZooSSDLite320_Weights.COCO5_V1": "zoo_ssdlite320",
    "ZooLRASPP_Weights.VOC5_V1": "zoo_lraspp",
    "ZooS3D_Weights.KINETICS10_V1": "zoo_s3d",
    "ZooRaftSmall_Weights.THINGS_V1": "zoo_raft_small",
}


def load_everything_offline(home: Path) -> dict:
    unshare = need_binary("unshare")
    env = {**os.environ, "TORCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([unshare, "-n", sys.executable, "-c", VANILLA_AND_TVPACK, str(home), json.dumps(BUILDERS)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NETWORK" not in proc.stdout
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_install_on_the_site_makes_every_weights_loadable_offline(update, half_site, tmp_path, tvpack, zoo):
    _site, path = update
    site = tmp_path / "site"
    shutil.copytree(half_site, site)
    proc = tvpack("install", path, "--torch-home", site)
    assert proc.returncode == 0, proc.stderr
    assert "4 installed, 4 already at the site as expected" in proc.stdout
    assert checkpoint_names(site) == sorted(file_of(zoo, n) for n in SELECTION)
    sums = load_everything_offline(site)
    assert sorted(sums) == sorted(SELECTION)
    for name, (vanilla, ours) in sums.items():
        assert vanilla == ours, name


def test_install_on_an_empty_site_is_refused_and_writes_nothing(update, tmp_path, tvpack, zoo):
    _site, path = update
    site = tmp_path / "empty"
    site.mkdir()
    proc = tvpack("install", path, "--torch-home", site)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "4 of the 4 checkpoints it expects at the site are missing" in line
    for name in HALF:
        assert f"{file_of(zoo, name)} (missing)" in line
    assert list(site.iterdir()) == []


def test_install_where_an_expected_file_differs_is_refused_naming_it(update, half_site, tmp_path, tvpack, zoo):
    _site, path = update
    site = tmp_path / "site"
    shutil.copytree(half_site, site)
    victim = site / "hub" / "checkpoints" / file_of(zoo, HALF[1])
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0x01
    victim.write_bytes(bytes(data))  # same size, other bytes: only the sha256 tells
    before = tree(site)
    proc = tvpack("install", path, "--torch-home", site, "--force")  # --force replaces carried files, never this
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "1 of the 4 checkpoints" in line and f"{victim.name} (different: sha256" in line
    assert all(file_of(zoo, n) not in line for n in HALF if n != HALF[1])
    assert tree(site) == before


def test_for_takes_an_earlier_bundle_a_manifest_or_a_lockfile(connected, half_site, tmp_path, cli, zoo):
    from packager.cache import write_lockfile

    half_bundle = tmp_path / "half.tar"
    B.bundle(HALF, half_bundle, registry=[ZOO_REGISTRY], torch_home=connected, fetch=False)
    lock = write_lockfile(HALF, tmp_path / "tvpack.lock", registry=[ZOO_REGISTRY], torch_home=connected,
                          offline=True)
    manifest = next((half_site / "hub/tvpack/manifests").iterdir())
    B.bundle(HALF, tmp_path / "split-half", registry=[ZOO_REGISTRY], torch_home=connected, fetch=False,
             split=4 << 20)
    expected = sorted(f"hub/checkpoints/{file_of(zoo, n)}" for n in HALF)
    for source in (half_bundle, lock, manifest, tmp_path / "split-half.sha256", tmp_path / "split-half"):
        out = tmp_path / f"for-{source.name}.tar"
        result = cli("bundle", *SELECTION, "--registry", ZOO_REGISTRY, "--torch-home", connected, "--no-fetch",
                     "--for", source, "-o", out)
        assert result.exit_code == 0, result.output
        with B.open_bundle(out) as opened:
            assert list(opened.site_files) == expected, source
    # a site holding a same-named file with other bytes does not count as having it
    site = delta.read_site(lock)
    other = inv.Inventory(checkpoints=tuple(inv.Checkpoint(c.file, c.size, "0" * 64) for c in site.checkpoints))
    path = B.bundle(SELECTION, tmp_path / "full.tar", registry=[ZOO_REGISTRY], torch_home=connected, fetch=False,
                    site=other)
    with B.open_bundle(path) as opened:
        assert opened.site_files == {} and "at_site" not in opened.manifest


def test_for_refusals_are_one_line(connected, tmp_path, cli):
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    (tmp_path / "bad-site.json").write_text('{"format": "tvpack-inventory", "format_version": 1}')
    cases = {tmp_path / "missing.json": "no such file", tmp_path / "other.json": "neither a site inventory",
             tmp_path / "bad-site.json": "lacks checkpoints"}
    for path, words in cases.items():
        result = cli("bundle", SMALL[0], "--registry", ZOO_REGISTRY, "--torch-home", connected, "--no-fetch",
                     "--for", path, "-o", tmp_path / "x.tar")
        assert result.exit_code == 1 and words in one_error_line(result.output), result.output
        assert not (tmp_path / "x.tar").exists()


def test_loading_from_the_delta_bundle_file_names_what_lives_at_the_site(update, zoo):
    from packager import loader

    _site, path = update
    model, _weights = loader.load_model(path, OTHER[3], registry=[ZOO_REGISTRY])  # carried: loads from the file
    assert not model.training
    with pytest.raises(LoadError) as info:
        loader.load_model(path, HALF[2], registry=[ZOO_REGISTRY])
    message = info.value.format()
    assert "is a delta bundle and does not carry" in message and "tvpack install" in message
    assert all(file_of(zoo, n) in message for n in HALF)
    weights = loader.load_weights(path, HALF[2], registry=[ZOO_REGISTRY])  # transforms and meta still there
    assert weights.meta["categories"]


def test_an_installed_delta_manifest_is_read_by_the_loader_and_cache(update, half_site, tmp_path):
    from packager import loader
    from packager.cache import scan_cache

    _site, path = update
    site = tmp_path / "site"
    shutil.copytree(half_site, site)
    B.install_bundle(path, torch_home=site)
    assert sorted(e.name for e in loader.list_entries(site)) == sorted(SELECTION)
    assert {f.status for f in scan_cache(torch_home=site, use_registry=False).files} == {"verified"}


# -- the manifest's "at_site" list -------------------------------------------------------------------
def _manifest(update) -> dict:
    _site, path = update
    with B.open_bundle(path) as opened:
        return json.loads(json.dumps(opened.manifest))


@pytest.mark.parametrize("change, words", [
    (lambda m: m.__setitem__("at_site", "hub/checkpoints/x.pth"), "not a list of checkpoint paths"),
    (lambda m: m.__setitem__("at_site", [1]), "not a list of checkpoint paths"),
    (lambda m: m["at_site"].append("hub/checkpoints/unknown-12345678.pth"), "not the checkpoint of any weights"),
    (lambda m: m["at_site"].append(m["at_site"][0]), "twice"),
    (lambda m: m["at_site"].append("hub/tvpack/../x"), "not the checkpoint of any weights"),
])
def test_at_site_is_parsed_strictly(update, change, words):
    manifest = _manifest(update)
    change(manifest)
    with pytest.raises(BundleError, match=words):
        parse_manifest(manifest)


def test_at_site_files_are_listed_but_not_members(update):
    """The manifest lists every file (a signature covers them all); the archive holds only those carried."""
    _site, path = update
    manifest = _manifest(update)
    entries, files = parse_manifest(manifest)
    assert set(manifest["at_site"]) < set(files) and len(files) == len(SELECTION) + 1  # + the ML-BOM
    assert {e.path for e in entries if e.at_site} == set(manifest["at_site"])
    with B.open_bundle(path) as opened:
        assert {m.path for m in opened.members[1:]} == set(files) - set(manifest["at_site"])
        assert opened.files == files
    del manifest["at_site"]  # an old-style manifest: the same files, every one a member
    entries, again = parse_manifest(manifest)
    assert not any(e.at_site for e in entries) and again == files


def test_a_carried_member_listed_at_site_is_refused(update, tmp_path):
    """An archive holding a checkpoint its manifest says is at the site: an unlisted member."""
    from packager.formats.archive import tar_header
    from packager.formats.manifest import encode_manifest, manifest_path_for

    _site, path = update
    with B.open_bundle(path) as opened:
        manifest = json.loads(json.dumps(opened.manifest))
        carried = [(m.path, opened.open_member(m.path).read()) for m in opened.members[1:]]
    manifest["at_site"] = sorted(manifest["at_site"] + [carried[0][0]])
    data = encode_manifest(manifest)
    out = tmp_path / "hostile.tar"
    with open(out, "wb") as f:
        for name, payload in [(manifest_path_for(data), data), *carried]:
            f.write(tar_header(name, len(payload), 0) + payload + bytes(-len(payload) % 512))
        f.write(bytes(10240 - f.tell() % 10240 if f.tell() % 10240 else 0) + bytes(10240))
    with pytest.raises(BundleError, match="is not listed in the manifest"):
        B.open_bundle(out)
    assert decode_manifest(data)["at_site"][0].startswith("hub/checkpoints/")


# -- split volumes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_full(connected, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("small-full")
    return B.bundle(SMALL, work / "small.tar", registry=[ZOO_REGISTRY], torch_home=connected, fetch=False)


def _part_files(directory: Path, name: str) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(name + ".") and p.name[len(name) + 1:].isdigit())


@pytest.mark.parametrize("size_text, size", [("200K", 200 << 10), ("1000000", 10**6), ("exact", None)])
def test_bundle_split_parts_sha256sum_and_cat(connected, small_full, tmp_path, cli, size_text, size):
    """SIZE smaller than any checkpoint (the smallest is ~540 KB), a decimal size, and an exact divisor."""
    total = small_full.stat().st_size
    if size is None:  # the archive is a whole number of 10 KiB records: half of it is a whole number too
        size, size_text = total // 2, str(total // 2)
    out = tmp_path / "media" / "small.tar"
    result = cli("bundle", *SMALL, "--registry", ZOO_REGISTRY, "--torch-home", connected, "--no-fetch",
                 "--split", size_text, "-o", out)
    assert result.exit_code == 0, result.output
    parts = _part_files(out.parent, "small.tar")
    sizes = [p.stat().st_size for p in parts]
    assert all(s == size for s in sizes[:-1]) and 0 < sizes[-1] <= size and sum(sizes) == total
    assert len(parts) == -(-total // size) and [p.name for p in parts] == [f"small.tar.{i:03d}" for i in range(len(parts))]
    assert sorted(p.name for p in out.parent.iterdir()) == [p.name for p in parts] + ["small.tar.sha256"]
    if size == total // 2:
        assert sizes == [size, size]
    sha256sum = need_binary("sha256sum")
    check = subprocess.run([sha256sum, "-c", "small.tar.sha256"], cwd=out.parent, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(parts), check.stdout + check.stderr
    joined = subprocess.run(["sh", "-c", "cat small.tar.0*"], cwd=out.parent, capture_output=True, check=True).stdout
    assert joined == small_full.read_bytes()
    # tvpack split of the unsplit bundle gives the very same parts and listing
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(small_full, again / "small.tar")
    assert cli("split", again / "small.tar", "--size", size_text).exit_code == 0
    for p in [*parts, out.parent / "small.tar.sha256"]:
        assert (again / p.name).read_bytes() == p.read_bytes()


def test_the_split_hint_is_a_command_that_runs_where_paths_have_spaces(small_full, tmp_path, cli):
    """The printed `cd DIR && sha256sum -c NAME.sha256` is quoted for the shell: pasted, it checks the copy."""
    need_binary("sha256sum")
    media = tmp_path / "USB stick (1)"
    media.mkdir()
    shutil.copy(small_full, media / "my bundle.tar")
    result = cli("split", media / "my bundle.tar", "--size", "1M")
    assert result.exit_code == 0, result.output
    hint = result.output.strip().splitlines()[-1].split("check a copy with: ", 1)[1]
    check = subprocess.run(["sh", "-c", hint], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, (hint, check.stderr)
    assert check.stdout.count(": OK") == len(list(media.glob("my bundle.tar.0*"))) > 1


def test_split_refusals(small_full, tmp_path, cli):
    media = tmp_path / "m"
    media.mkdir()
    shutil.copy(small_full, media / "b.tar")
    assert cli("split", media / "b.tar", "--size", "1M").exit_code == 0
    result = cli("split", media / "b.tar.000", "--size", "2M")
    assert result.exit_code == 1 and "already split" in one_error_line(result.output)
    (tmp_path / "garbage").write_bytes(b"not a tar" * 100)
    result = cli("split", tmp_path / "garbage", "--size", "1K")
    assert result.exit_code == 1 and "not a tar archive" in one_error_line(result.output)
    assert not list(tmp_path.glob("garbage.*"))
    result = cli("split", media / "b.tar", "--size", "1.5G")
    assert result.exit_code == 2 and "invalid size" in result.output
    result = cli("split", media / "b.tar", "--size", "1")
    assert result.exit_code == 2 and "more than 1000" in result.output


@pytest.fixture
def media(connected, tmp_path) -> Path:
    """SMALL split into 512 KiB parts; returns NAME.000."""
    out = tmp_path / "media" / "small.tar"
    B.bundle(SMALL, out, registry=[ZOO_REGISTRY], torch_home=connected, fetch=False, split=512 << 10)
    assert len(_part_files(out.parent, "small.tar")) == 5
    return out.with_name("small.tar.000")


@pytest.mark.parametrize("given", ["small.tar.000", "small.tar.sha256"])
def test_verify_inspect_install_and_load_read_parts_in_place(media, tmp_path, cli, small_full, given):
    from packager import loader

    first = media.with_name(given)
    result = cli("verify", first)
    assert result.exit_code == 0 and result.output.startswith("ok: "), result.output
    result = cli("inspect", first)
    assert result.exit_code == 0 and "in 5 parts small.tar.000 .. small.tar.004" in result.output
    home = tmp_path / "home"
    result = cli("install", first, "--torch-home", home)
    assert result.exit_code == 0, result.output
    with B.open_bundle(small_full) as full:
        for entry in full.entries:
            assert (home / "hub/checkpoints" / entry.filename).read_bytes() == full.open_checkpoint(entry.name).read()
    for source in (first, media.with_name("small.tar")):
        model, _w = loader.load_model(source, SMALL[0], registry=[ZOO_REGISTRY])
        assert not model.training


def _damage(media: Path, how: str) -> str:
    """Damage the copy on the 'stick'; returns the words the refusal must hold."""
    d = media.parent
    if how == "missing":
        (d / "small.tar.002").unlink()
        return "part 3 of 5, small.tar.002, is missing: copy it again"
    if how == "truncated":
        with open(d / "small.tar.001", "r+b") as f:
            f.truncate(1000)
        return "part 2 of 5, small.tar.001, is short"
    if how == "corrupt":
        data = bytearray((d / "small.tar.003").read_bytes())
        data[len(data) // 2] ^= 0x40
        (d / "small.tar.003").write_bytes(bytes(data))
        return "part 4 of 5, small.tar.003, is corrupt: copy it again"
    if how == "reordered":
        os.rename(d / "small.tar.001", d / "tmp")
        os.rename(d / "small.tar.002", d / "small.tar.001")
        os.rename(d / "tmp", d / "small.tar.002")
        return "part 2 of 5, small.tar.001, is corrupt: it holds the bytes of part 3 of 5, small.tar.002"
    if how == "extra":
        shutil.copy(d / "small.tar.004", d / "small.tar.005")
        return "small.tar.005 is not listed in small.tar.sha256"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "truncated", "corrupt", "reordered", "extra"])
def test_damaged_copies_are_named_and_refused(media, tmp_path, cli, tvpack, how):
    words = _damage(media, how)
    home = tmp_path / "home"
    for command in (["verify", media], ["install", media.with_name("small.tar.sha256"), "--torch-home", home]):
        result = cli(*command)
        assert result.exit_code == 1, result.output
        assert words in one_error_line(result.output), result.output
    assert checkpoint_names(home) == []
    proc = tvpack("verify", media)  # the real process: one line, no traceback
    assert proc.returncode == 1 and words in one_error_line(proc.stderr)


def test_a_part_of_another_split_with_its_line_rewritten_is_named(media, connected, small_full, tmp_path, cli, tvpack):
    """The part that holds a tar header taken from another bundle split alike, its line in small.tar.sha256
    rewritten to match: every part matches the listing, so the archive breaks inside that part; the refusal names
    it and says it is not this bundle's (not the symptom, "non-zero padding after byte N")."""
    part_size = 512 << 10
    with B.open_bundle(small_full) as opened:
        index = (opened.members[-1].offset - BLOCK) // part_size  # where the last member's header is
    assert index > 0
    other = tmp_path / "other" / "other.tar"
    B.bundle(OTHER, other, registry=[ZOO_REGISTRY], torch_home=connected, fetch=False, split=part_size)
    foreign = other.with_name(f"other.tar.{index:03d}").read_bytes()
    (media.parent / f"small.tar.{index:03d}").write_bytes(foreign)
    listing = media.with_name("small.tar.sha256")
    lines = listing.read_text().splitlines()
    lines[index] = f"{hashlib.sha256(foreign).hexdigest()}  small.tar.{index:03d}"
    listing.write_text("\n".join(lines) + "\n")
    words = (f"part {index + 1} of 5, small.tar.{index:03d}, does not belong to this bundle: the archive breaks "
             "inside, although it matches its line in small.tar.sha256")
    home = tmp_path / "home"
    for command in (["verify", media], ["install", listing, "--torch-home", home]):
        result = cli(*command)
        assert result.exit_code == 1, result.output
        line = one_error_line(result.output)
        assert words in line and "copy the parts and small.tar.sha256 of one split again" in line, line
    assert checkpoint_names(home) == []
    proc = tvpack("verify", media)
    assert proc.returncode == 1 and words in one_error_line(proc.stderr)


def test_a_first_part_copied_alone_says_what_is_missing(media, tmp_path, cli, tvpack):
    """Only NAME.000 copied: not "truncated archive", but which files are missing beside it."""
    alone = tmp_path / "stick"
    alone.mkdir()
    shutil.copy(media, alone / media.name)
    words = ("small.tar.000 is the first part of a split bundle, not a whole bundle: the other parts (small.tar.001, "
             f"small.tar.002, ...) and small.tar.sha256 are missing beside it: copy them all into {alone}")
    home = tmp_path / "home"
    for command in (["verify", alone / media.name], ["install", alone / media.name, "--torch-home", home],
                    ["inspect", alone / media.name]):
        result = cli(*command)
        assert result.exit_code == 1, result.output
        assert one_error_line(result.output) == f"tvpack: error: {words}"
    assert checkpoint_names(home) == []
    proc = tvpack("verify", alone / media.name)
    assert proc.returncode == 1 and proc.stderr == f"tvpack: error: {words}\n"


def test_loading_from_a_corrupt_part_names_it(media):
    from packager import loader

    _damage(media, "corrupt")
    with B.open_bundle(media) as opened:  # which weights lives in part 4?
        member = next(m for m in opened.members[1:] if m.offset <= 3 * (512 << 10) + (256 << 10) < m.offset + m.size)
        name = next(e.name for e in opened.entries if e.path == member.path)
    with pytest.raises(VolumeError, match="part 4 of 5, small.tar.003, is corrupt"):
        loader.load_model(media, name, registry=[ZOO_REGISTRY])


def test_a_delta_bundle_can_be_split_and_installed_from_its_parts(connected, update, half_site, tmp_path, cli, zoo):
    site_json, unsplit = update
    out = tmp_path / "stick" / "update.tar"
    result = cli("bundle", *SELECTION, "--registry", ZOO_REGISTRY, "--torch-home", connected, "--no-fetch",
                 "--for", site_json, "--split", "4M", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["parts"]) > 1 and report["carried"] == 4 and len(report["at_site"]) == 4
    joined = b"".join(Path(p).read_bytes() for p in report["parts"])
    assert joined == unsplit.read_bytes()
    site = tmp_path / "site"
    shutil.copytree(half_site, site)
    result = cli("install", out.with_name("update.tar.000"), "--torch-home", site)
    assert result.exit_code == 0, result.output
    assert checkpoint_names(site) == sorted(file_of(zoo, n) for n in SELECTION)
    result = cli("install", out.with_name("update.tar.000"), "--torch-home", tmp_path / "empty")
    assert result.exit_code == 1 and "missing" in one_error_line(result.output)
    assert not (tmp_path / "empty").exists()


def test_a_failed_split_bundle_leaves_no_parts(connected, tmp_path, monkeypatch):
    """A failure after some parts were written (here: the second checkpoint): no part, temp file or listing remains."""
    writer = importlib.import_module("packager.bundle_write")  # where the archive is written
    real, calls = writer._write_checkpoint, []

    def failing_second(sink, *args):
        calls.append(args[0])
        if len(calls) == 2:
            raise BundleError("injected failure")
        real(sink, *args)

    monkeypatch.setattr(writer, "_write_checkpoint", failing_second)
    out = tmp_path / "out" / "b.tar"
    with pytest.raises(BundleError, match="injected failure"):
        B.bundle(SMALL, out, registry=[ZOO_REGISTRY], torch_home=connected, fetch=False, split=256 << 10)
    assert len(calls) == 2 and list(out.parent.iterdir()) == []


def test_too_many_parts_refused_before_writing(connected, tmp_path):
    from packager.errors import UsageError

    with pytest.raises(UsageError, match="more than 1000"):
        B.bundle(SMALL, tmp_path / "b.tar", registry=[ZOO_REGISTRY], torch_home=connected, fetch=False, split=1024)
    assert list(tmp_path.iterdir()) == []


def test_a_delta_bundle_is_not_published_as_a_mirror(update, tmp_path, cli):
    _site, path = update
    result = cli("mirror", "--from-bundle", path, "--to", tmp_path / "mirror")
    assert result.exit_code == 1 and "is a delta bundle" in one_error_line(result.output)
    assert not (tmp_path / "mirror").exists() or not any((tmp_path / "mirror").rglob("*.pth"))


def test_bundle_for_notes_other_torchvision_at_the_site(connected, tmp_path, cli):
    site = inv.make_inventory([], versions=inv.Versions(tvpack="0.1.0", torch="2.0.0", torchvision="0.15.0"))
    delta.write_inventory(site, tmp_path / "SITE.json")
    result = cli("bundle", SMALL[0], "--registry", ZOO_REGISTRY, "--torch-home", connected, "--no-fetch",
                 "--for", tmp_path / "SITE.json", "-o", tmp_path / "b.tar")
    assert result.exit_code == 0, result.output
    assert "note: the site has torch 2.0.0" in result.stderr and "torchvision 0.15.0" in result.stderr
    assert "0 expected at the site" in result.stdout


def test_a_signed_delta_bundle_covers_the_files_expected_at_the_site(connected, pki, tmp_path, cli,  # noqa: F811
                                                                     zoo):
    """Signed as it is written (and split): the signature lists every file the manifest describes, so install under
    the key, `cache verify --signatures` and the loader with trusted keys accept the whole set afterwards."""
    from packager import loader, signing
    from packager.formats import signature as sigfmt

    keys = Path(pki["dir"].decode())
    signer = signing.Signer.load(keys / "p256.key")
    site = tmp_path / "site"
    B.bundle(HALF, tmp_path / "half.tar", registry=[ZOO_REGISTRY], torch_home=connected, fetch=False,
             sign=signer.members)
    B.install_bundle(tmp_path / "half.tar", torch_home=site)
    delta.write_inventory(delta.inventory(torch_home=site), tmp_path / "SITE.json")
    out = tmp_path / "stick" / "update.tar"
    result = cli("bundle", *SELECTION, "--registry", ZOO_REGISTRY, "--torch-home", connected, "--no-fetch",
                 "--for", tmp_path / "SITE.json", "--split", "8M", "--sign-key", keys / "p256.key", "-o", out)
    assert result.exit_code == 0 and "signed by" in result.output, result.output
    first = out.with_name("update.tar.000")
    with B.open_bundle(first) as opened:
        assert len(opened.signatures) == 1 and len(opened.site_files) == 4 and len(opened.files) == 9  # + ML-BOM
        info = sigfmt.describe(opened.open_member(opened.signatures[0].path).read())
        assert {p for p in info.resources if not p.startswith("hub/tvpack/manifests/")} == set(opened.files)
        delta_id = opened.manifest_id
    assert cli("verify", first, "--key", keys / "p256.pub").exit_code == 0
    assert cli("verify", first, "--key", keys / "other.pub").exit_code == 1
    result = cli("install", out.with_name("update.tar.sha256"), "--torch-home", site, "--key", keys / "p256.pub")
    assert result.exit_code == 0 and "signature valid" in result.output, result.output
    result = cli("cache", "verify", "--signatures", "--torch-home", site, "--key", keys / "p256.pub", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["ok"], result.output
    signed_in = {f["file"]: f["signed_in"] for f in report["files"]}
    assert all(delta_id in signed_in[file_of(zoo, n)] for n in SELECTION)  # the files it did not carry too
    model, _w = loader.load_model(site, HALF[2], registry=[ZOO_REGISTRY], trusted_keys=[keys / "p256.pub"])
    assert not model.training
