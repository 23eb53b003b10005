"""Bundles: write, inspect, verify, install; hostile archives; offline end to end; determinism.

Real bytes throughout: zoo checkpoints fetched through a directory mirror, archives read back by
GNU tar and Python's tarfile, vanilla torchvision loading the result under ``unshare -n``.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ZOO_REGISTRY, need_binary, run_tvpack, wait_for

from packager.errors import BundleError, CacheError, OfflineError
from packager.formats.archive import tar_header, tar_layout
from packager.formats.manifest import encode_manifest, manifest_path_for

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

SMALL = ["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"]
ZOO_WEIGHTS = {  # builder -> weights, every zoo family
    "zoo_mobilenet_v3_small": "ZooMobileNetV3Small_Weights.IMAGENET10_V2",
    "zoo_mobilenet_v3_large": "ZooMobileNetV3Large_Weights.IMAGENET10_V1",
    "zoo_ssdlite320": "ZooSSDLite320_Weights.COCO5_V1",
    "zoo_lraspp": "ZooLRASPP_Weights.VOC5_V1",
    "zoo_s3d": "ZooS3D_Weights.KINETICS10_V1",
    "zoo_raft_small": "ZooRaftSmall_Weights.THINGS_V1",
    "zoo_shufflenet_v2": "ZooShuffleNetV2_Weights.IMAGENET10_V1",
    "zoo_quantized_shufflenet_v2": "ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1",
}


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() or p.is_symlink())


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tvpack: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small_bundle(zoo_root, tmp_path_factory) -> Path:
    """Two small zoo checkpoints (float and quantized), bundled through a directory mirror."""
    work = tmp_path_factory.mktemp("small-bundle")
    return B.bundle(SMALL, work / "small.tvpack", registry=[ZOO_REGISTRY], torch_home=work / "home",
                    mirrors=[str(zoo_root)], upstream=False)


# -- writing and reading ----------------------------------------------------------------------------
def test_bundle_layout_manifest_and_tar_compatibility(small_bundle, zoo, zoo_root):
    with tarfile.open(small_bundle) as tf:  # an independent reader
        members = tf.getmembers()
    names = [m.name for m in members]
    assert re.fullmatch(r"hub/tvpack/manifests/[0-9a-f]{16}\.json", names[0])
    # the checkpoints by path, then the ML-BOM (formats/sbom.py)
    assert names[1:-1] == sorted(names[1:-1]) and all(n.startswith("hub/checkpoints/") for n in names[1:-1])
    assert re.fullmatch(r"hub/tvpack/sbom/[0-9a-f]{16}\.cdx\.json", names[-1])
    assert {(m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime, m.type) for m in members} == {
        (0o644, 0, 0, "", "", 0, tarfile.REGTYPE)}
    listing = subprocess.run(["tar", "-tvf", str(small_bundle)], capture_output=True, text=True, check=True)
    assert listing.stdout.count("\n") == len(names)
    with B.open_bundle(small_bundle) as opened:
        manifest = opened.manifest
        assert names[0] == f"hub/tvpack/manifests/{opened.manifest_id}.json"
    assert manifest["format"] == "tvpack-bundle" and manifest["format_version"] == 1
    assert set(manifest["created_by"]) == {"packager", "torch", "torchvision", "python"}
    assert list(manifest["members"]) == [names[-1]]
    by_name = {w["name"]: w for w in manifest["weights"]}
    assert sorted(by_name) == sorted(ZOO_WEIGHTS[m] for m in SMALL)
    q = by_name["ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1"]
    assert q["models"] == ["zoo_quantized_shufflenet_v2"]
    assert q["builders"] == ["packager.testing.zoo.zoo_quantized_shufflenet_v2"]
    assert q["module"] == "packager.testing.zoo" and q["enum"] == "ZooShuffleNetV2_QuantizedWeights"
    assert q["family"] == "quantization"
    source = zoo_root / "models/tvpack-zoo" / q["path"].rsplit("/", 1)[1]
    assert q["url"].endswith("/" + source.name)
    assert (q["size"], q["sha256"]) == (source.stat().st_size, sha256_of(source))
    assert q["transforms"]["class"] == "ImageClassification"
    assert q["meta"]["unquantized"] == {"__weights__": {
        "enum": "ZooShuffleNetV2_Weights", "member": "IMAGENET10_V1", "module": "packager.testing.zoo"}}
    # checkpoints byte-identical to the downloaded files
    with tarfile.open(small_bundle) as tf:
        assert tf.extractfile(q["path"]).read() == source.read_bytes()


def test_open_bundle_api_gives_entries_meta_transforms_and_checkpoints(small_bundle, zoo):
    with B.open_bundle(small_bundle) as opened:
        entry = opened.entry("zoo_quantized_shufflenet_v2")
        assert entry is opened.entry("ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1")
        live = zoo.ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1
        meta = opened.meta(entry.name)
        assert meta == live.meta and isinstance(meta["min_size"], tuple)
        assert meta["unquantized"] is zoo.ZooShuffleNetV2_Weights.IMAGENET10_V1
        image = torch.randint(0, 256, (3, 45, 37), dtype=torch.uint8)
        assert torch.equal(opened.transforms(entry.name)(image), live.transforms()(image))
        ref = entry.ref
        assert (ref.sha256, ref.size_hint, ref.filename) == (entry.sha256, entry.size, entry.filename)
        with opened.open_checkpoint(entry.name) as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry.sha256
        with opened.open_checkpoint("zoo_shufflenet_v2") as f:
            state = torch.load(f, weights_only=True)
        original = torch.load(zoo.zoo_files()["shufflenet_v2"], weights_only=True)
        assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
        with pytest.raises(BundleError, match="holds no weights 'resnet50'"):
            opened.entry("resnet50")


def test_tar_header_long_names_and_huge_sizes_parse_with_tarfile():
    for path, size in [("hub/checkpoints/" + "a" * 90 + ".pth", 10), ("hub/" + "d" * 120 + "/" + "f" * 99, 7),
                       ("hub/checkpoints/" + "x" * 240 + ".pth", 5), ("hub/checkpoints/big.pth", 9 << 30),
                       ("hub/checkpoints/naïve-é.pth", 3)]:
        header = tar_header(path, size, 1700000000)
        assert len(header) % 512 == 0
        info = tarfile.open(fileobj=io.BytesIO(header + bytes(1024)), mode="r:").next()
        assert (info.name, info.size, info.mtime, info.mode, info.uid, info.uname) == (
            path, size, 1700000000, 0o644, 0, "")


def test_tar_layout_is_where_tarfile_finds_every_member(tmp_path):
    """The one computation of the tar layout (headers, data offsets, padding, end blocks, record padding)
    against an independent reader, for short, long (ustar prefix) and pax names; ``start`` continues a tar."""
    members = [("hub/tvpack/manifests/0123456789abcdef.json", 700), ("hub/checkpoints/" + "a" * 90 + ".pth", 512),
               ("hub/" + "d" * 120 + "/" + "f" * 99, 0), ("hub/checkpoints/" + "x" * 240 + ".pth", 1025)]
    layout = tar_layout(members, 1700000000)
    assert [(s.path, s.size) for s in layout] == members and layout.start == 0
    assert layout.size % (20 * 512) == 0 and layout.trailer >= 1024 and layout.end == layout.spans[-1].end
    data = bytearray(layout.size)
    for span in layout:
        data[span.offset:span.data_offset] = span.header
        data[span.data_offset:span.data_offset + span.size] = bytes([len(span.path) % 251 + 1]) * span.size
        assert span.end - span.data_offset - span.size == span.padding < 512 and span.end % 512 == 0
    (tmp_path / "t.tar").write_bytes(bytes(data))
    with tarfile.open(tmp_path / "t.tar") as tf:
        assert [(m.name, m.size, m.offset_data, m.mtime) for m in tf.getmembers()] == \
            [(s.path, s.size, s.data_offset, 1700000000) for s in layout]
    more = tar_layout([("hub/tvpack/signatures/0123456789abcdef.sig", 3)], 0, start=layout.end, record=False)
    assert more.spans[0].offset == layout.end and more.size == more.end + 1024 and more.end % 512 == 0

def test_verify_accepts_a_good_bundle_api_and_cli(small_bundle, cli):
    report = B.verify_bundle(small_bundle)
    assert report.weights == 2 and report.members == 4  # the manifest, 2 checkpoints, the ML-BOM
    result = cli("verify", small_bundle)
    assert result.exit_code == 0 and result.stdout.startswith("ok: ")
    result = cli("verify", small_bundle, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True


def test_inspect_table_and_json(small_bundle, cli):
    result = cli("inspect", small_bundle)
    assert result.exit_code == 0, result.output
    assert "ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1" in result.stdout
    assert "ImageClassification resize 72 bilinear, crop 64" in result.stdout
    assert "CIFAR-10 acc@1" in result.stdout and "2 weights in 2 files" in result.stdout
    data = json.loads(cli("inspect", small_bundle, "--json").stdout)
    with tarfile.open(small_bundle) as tf:
        first = tf.getmembers()[0]
        assert data == json.loads(tf.extractfile(first).read())


def test_install_places_files_records_index_and_manifest(small_bundle, tmp_path, cli):
    from packager import cache

    home = tmp_path / "home"
    result = cli("install", small_bundle, "--torch-home", home, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [f["status"] for f in report["files"]] == ["installed", "installed"]
    with B.open_bundle(small_bundle) as opened:
        for entry in opened.entries:
            dest = home / "hub" / "checkpoints" / entry.filename
            assert sha256_of(dest) == entry.sha256
            assert cache.index_entry(dest)["sha256"] == entry.sha256
        manifest = home / "hub/tvpack/manifests" / f"{opened.manifest_id}.json"
        assert json.loads(manifest.read_text()) == opened.manifest
    assert not [p for p in files_under(home) if "tvpack-install" in p.name]
    # again: unchanged; a file whose own name's hash proves it damaged is repaired without --force
    assert [f["status"] for f in json.loads(cli("install", small_bundle, "--torch-home", home, "--json").stdout)[
        "files"]] == ["unchanged", "unchanged"]
    victim = home / "hub/checkpoints" / report["files"][0]["path"].rsplit("/", 1)[1]
    victim.write_bytes(b"something else")
    result = cli("install", small_bundle, "--torch-home", home)
    assert result.exit_code == 0 and "repaired" in result.stdout
    with B.open_bundle(small_bundle) as opened:
        expected = next(e.sha256 for e in opened.entries if e.filename == victim.name)
    assert sha256_of(victim) == expected == cache.index_entry(victim)["sha256"]


def test_tar_xf_gives_the_same_tree_as_install(small_bundle, tmp_path):
    installed, extracted = tmp_path / "installed", tmp_path / "extracted"
    B.install(small_bundle, torch_home=installed)
    extracted.mkdir()
    subprocess.run(["tar", "-xf", str(small_bundle), "-C", str(extracted)], check=True)
    # what tvpack keeps of its own work (index, locks, the install record) is not the bundle's
    rel = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in files_under(root)
                        if "index.json" not in p.name and "/locks/" not in str(p)
                        and not str(p.relative_to(root)).startswith("hub/tvpack/installed/")}
    assert rel(installed) == rel(extracted)


def test_bundle_no_fetch_lists_missing_weights(tmp_path, cli):
    result = cli("bundle", "--registry", ZOO_REGISTRY, *SMALL, "--no-fetch", "--torch-home", tmp_path / "empty",
                 "-o", tmp_path / "x.tvpack")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "ZooShuffleNetV2_Weights.IMAGENET10_V1" in line and "ZooShuffleNetV2_QuantizedWeights" in line
    assert not (tmp_path / "x.tvpack").exists() and not list(tmp_path.glob(".x.tvpack*"))
    result = cli("bundle", "--registry", ZOO_REGISTRY, "zoo_shufflenet_v2", "--offline", "--torch-home",
                 tmp_path / "empty", "-o", tmp_path / "x.tvpack")
    assert result.exit_code == 1 and "ZooShuffleNetV2_Weights.IMAGENET10_V1" in one_error_line(result)
    with pytest.raises(OfflineError):
        B.bundle(SMALL, tmp_path / "y.tvpack", registry=[ZOO_REGISTRY], torch_home=tmp_path / "empty", offline=True)


def test_bundle_cli_fetches_missing_weights_from_a_mirror(zoo_root, tmp_path, cli):
    home = tmp_path / "home"
    result = cli("bundle", "--registry", ZOO_REGISTRY, "zoo_raft_small", "--mirror", zoo_root, "--no-upstream",
                 "--torch-home", home, "-o", tmp_path / "raft.tvpack")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {tmp_path / 'raft.tvpack'}: 1 weights")
    (cached,) = (home / "hub/checkpoints").iterdir()
    assert sha256_of(cached) == sha256_of(zoo_root / "models/tvpack-zoo" / cached.name)
    assert B.verify_bundle(tmp_path / "raft.tvpack").weights == 1


def test_bundle_cli_from_cache_json(small_bundle, zoo_root, tmp_path, cli):
    home = tmp_path / "home"
    B.install(small_bundle, torch_home=home)
    result = cli("bundle", "--registry", ZOO_REGISTRY, "zoo_shufflenet_v2", "--no-fetch", "--torch-home", home,
                 "-o", tmp_path / "one.tvpack", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == ["ZooShuffleNetV2_Weights.IMAGENET10_V1"]


# -- determinism --------------------------------------------------------------------------------------
def test_bundles_are_byte_identical(small_bundle, zoo_root, tmp_path, monkeypatch):
    def make(name, selectors, home):
        return B.bundle(selectors, tmp_path / name, registry=[ZOO_REGISTRY], torch_home=tmp_path / home,
                        mirrors=[str(zoo_root)], upstream=False).read_bytes()

    first = make("a.tvpack", SMALL, "h1")
    assert first == small_bundle.read_bytes()
    assert make("b.tvpack", list(reversed(SMALL)), "h2") == first  # other order, other fetch times
    (tmp_path / "h2/hub/tvpack/index.json").unlink()  # cold: hashed while copying
    assert make("c.tvpack", SMALL, "h2") == first
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = make("d.tvpack", SMALL, "h1")
    assert dated == make("e.tvpack", SMALL, "h2") and dated != first
    with tarfile.open(tmp_path / "d.tvpack") as tf:
        assert {m.mtime for m in tf.getmembers()} == {1700000000}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(BundleError, match="SOURCE_DATE_EPOCH"):
        make("f.tvpack", SMALL, "h1")


# -- hostile and broken archives ----------------------------------------------------------------------
def tiny_checkpoint(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(6, dtype=torch.float32) + seed, "bias": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def weights_item(i: int, path: str, data: bytes, **override) -> dict:
    item = {
        "name": f"Tiny_Weights.V{i}", "enum": "Tiny_Weights", "member": f"V{i}", "module": "tiny_registry",
        "models": ["tiny"], "builders": ["tiny_registry.tiny"], "family": "classification",
        "url": f"https://example.invalid/{path.rsplit('/', 1)[1]}", "path": path, "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "transforms": {"spec_version": 1, "kind": "preset", "class": "ObjectDetection", "kwargs": {}},
        "meta": {"min_size": {"__tuple__": [1, 1]}},
    }
    item.update(override)
    return item


def write_archive(path: Path, weights: list[dict], members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A bundle written with Python's tarfile: manifest first, then ``members`` as given."""
    manifest = encode_manifest({"format": "tvpack-bundle", "format_version": 1, "created_by": {},
                                  "weights": weights, "members": {}})
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(manifest_path_for(manifest))
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest))
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


CKPT = "hub/checkpoints/tiny-weights.pth"


def good_members(data: bytes):
    return [weights_item(0, CKPT, data)], [regular(CKPT, data)]


def case_control(tmp_path, data):  # not hostile: proves the builder itself makes acceptable bundles
    return write_archive(tmp_path / "ok.tar", *good_members(data))


def case_dotdot(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights, members + [regular("hub/checkpoints/../../../evil.txt", b"x")])


def case_dotdot_leading(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights, members + [regular("../evil.txt", b"x")])


def case_absolute(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights, members + [regular(str(tmp_path / "evil.txt"), b"x")])


def case_symlink(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights,
                         members + [special("hub/checkpoints/link.pth", tarfile.SYMTYPE, "/etc/passwd")])


def case_hardlink(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights,
                         members + [special("hub/checkpoints/hard.pth", tarfile.LNKTYPE, CKPT)])


def case_device(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights, members + [special("hub/checkpoints/null", tarfile.CHRTYPE)])


def case_fifo(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights, members + [special("hub/checkpoints/pipe", tarfile.FIFOTYPE)])


def case_directory(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights, members + [special("hub/checkpoints/sub", tarfile.DIRTYPE)])


def case_duplicate(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights, members + [regular(CKPT, data)])


def case_listed_but_missing(tmp_path, data):
    other = tiny_checkpoint(1)
    weights = [weights_item(0, CKPT, data), weights_item(1, "hub/checkpoints/tiny-other.pth", other)]
    return write_archive(tmp_path / "a.tar", weights, [regular(CKPT, data)])


def case_unlisted(tmp_path, data):
    weights, members = good_members(data)
    return write_archive(tmp_path / "a.tar", weights, members + [regular("hub/checkpoints/extra.pth", data)])


def case_size_lie(tmp_path, data):
    weights, members = good_members(data)
    weights[0]["size"] += 1
    return write_archive(tmp_path / "a.tar", weights, members)


def case_hash_lie(tmp_path, data):
    weights, members = good_members(data)
    weights[0]["sha256"] = hashlib.sha256(b"other bytes").hexdigest()
    return write_archive(tmp_path / "a.tar", weights, members)


def case_truncated(tmp_path, data):
    path = write_archive(tmp_path / "a.tar", *good_members(data))
    whole = path.read_bytes()
    cut = whole.index(data) + len(data) // 2  # mid-checkpoint (a cut in the end padding loses nothing)
    path.write_bytes(whole[:cut])
    return path


def case_truncated_end_marker(tmp_path, data):
    path = write_archive(tmp_path / "a.tar", *good_members(data))
    raw = path.read_bytes().rstrip(b"\0")
    path.write_bytes(raw + bytes(-len(raw) % 512))
    return path


def case_not_tar(tmp_path, data):
    path = tmp_path / "a.tar"
    path.write_bytes(b"PK\x03\x04 this is not a tar archive at all\n" * 40)
    return path


def case_empty_file(tmp_path, data):
    path = tmp_path / "a.tar"
    path.write_bytes(b"")
    return path


def case_trailing_garbage(tmp_path, data):
    path = write_archive(tmp_path / "a.tar", *good_members(data))
    with open(path, "ab") as f:
        f.write(b"appended after the end of the archive")
    return path


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def poisoned_checkpoint(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(3), "extra": _Payload(str(marker))}, buffer)
    return buffer.getvalue()


def case_pickle_runs_code(tmp_path, data):
    poisoned = poisoned_checkpoint(tmp_path / "pwned")
    return write_archive(tmp_path / "a.tar", [weights_item(0, CKPT, poisoned)], [regular(CKPT, poisoned)])


def case_pickle_in_legacy_tar_format(tmp_path, data):
    """PyTorch's pre-2017 tar checkpoint format, whose 'pickle' member would run code."""
    import pickle

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, payload in (("storages", pickle.dumps(0)), ("tensors", pickle.dumps(0)),
                              ("pickle", pickle.dumps({"w": _Payload(str(tmp_path / "pwned"))}, protocol=2))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    legacy = buffer.getvalue()
    return write_archive(tmp_path / "a.tar", [weights_item(0, CKPT, legacy)], [regular(CKPT, legacy)])


HOSTILE = {
    "dotdot": (case_dotdot, r"'\.\.' component"),
    "dotdot_leading": (case_dotdot_leading, r"'\.\.' component"),
    "absolute": (case_absolute, "absolute path"),
    "symlink": (case_symlink, "is a symbolic link"),
    "hardlink": (case_hardlink, "is a hard link"),
    "device": (case_device, "is a character device"),
    "fifo": (case_fifo, "is a FIFO"),
    "directory": (case_directory, "is a directory"),
    "duplicate": (case_duplicate, "appears twice"),
    "listed_but_missing": (case_listed_but_missing, "the archive lacks it"),
    "unlisted": (case_unlisted, "not listed in the manifest"),
    "size_lie": (case_size_lie, r"the manifest says '.*' is \d+ bytes, the archive holds \d+"),
    "hash_lie": (case_hash_lie, "sha256 mismatch"),
    "truncated": (case_truncated, "truncated archive"),
    "truncated_end_marker": (case_truncated_end_marker, "truncated archive"),
    "not_tar": (case_not_tar, "not a tar archive"),
    "empty_file": (case_empty_file, "not a tar archive"),
    "trailing_garbage": (case_trailing_garbage, "data after the end-of-archive marker"),
    "pickle_runs_code": (case_pickle_runs_code, r"weights_only=True\): its pickle calls posix\.system"),
    "pickle_in_legacy_tar_format": (case_pickle_in_legacy_tar_format, r"legacy \.tar format"),
}


def test_control_archive_written_by_tarfile_is_accepted(tmp_path, cli):
    archive = case_control(tmp_path, tiny_checkpoint())
    assert B.verify_bundle(archive).weights == 1
    assert [p.name for p in B.install(archive, torch_home=tmp_path / "home")] == ["tiny-weights.pth"]
    assert cli("verify", archive).exit_code == 0


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(case, tmp_path, cli):
    make, message = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    archive = make(work, tiny_checkpoint())
    target = tmp_path / "target"
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(BundleError, match=message):
        B.verify_bundle(archive)
    with pytest.raises(BundleError, match=message):
        B.install(archive, torch_home=target)
    for args in (("verify", archive), ("install", archive, "--torch-home", target), ("verify", archive, "--json")):
        result = cli(*args)
        assert result.exit_code == 1, (args, result.output)
        if "--json" in args:
            assert json.loads(result.stdout)["ok"] is False
        else:
            assert re.search(message, one_error_line(result))
    # nothing written: no file in the target, nothing new anywhere else
    assert files_under(target) == [] if target.exists() else True
    after = sorted(p for p in tmp_path.rglob("*") if target not in p.parents and p != target)
    assert after == before
    assert not (work / "pwned").exists()
    if case == "pickle_runs_code":
        # the payload is real: vanilla torch.load (weights_only=False) would have run it
        code = f"import torch; torch.load({str(archive)!r}.replace('a.tar', 'p.pth'), weights_only=False)"
        with tarfile.open(archive) as tf:
            (work / "p.pth").write_bytes(tf.extractfile(CKPT).read())
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
        assert (work / "pwned").exists()


def test_manifest_edits_are_refused(tmp_path):
    data = tiny_checkpoint()
    cases = {
        "format": ({"format": "zip"}, "not a tvpack bundle manifest"),
        "newer": ({"format_version": 2}, "newer than this tvpack reads"),
        "bad_path": ({"weights": [weights_item(0, "hub/../x.pth", data)]}, "'..' component"),
        "outside_checkpoints": ({"weights": [weights_item(0, "hub/tvpack/x.pth", data)]}, "is not under"),
        "members_index": ({"members": {"hub/tvpack/index.json": {"size": 1, "sha256": "0" * 64}}},
                          "outside the places a bundle may write"),
        "bad_sha": ({"weights": [weights_item(0, CKPT, data, sha256="XYZ")]}, "64 lowercase hex"),
        "twice": ({"weights": [weights_item(0, CKPT, data), weights_item(0, CKPT, data)]}, "listed twice"),
        "name_hash": ({"weights": [weights_item(0, "hub/checkpoints/tiny-deadbeef.pth", data)]},
                      "contradicts its file name's hash"),
    }
    for name, (override, message) in cases.items():
        manifest = {"format": "tvpack-bundle", "format_version": 1, "created_by": {},
                    "weights": [weights_item(0, CKPT, data)], "members": {}}
        manifest.update(override)
        raw = encode_manifest(manifest)
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for arcname, payload in ((manifest_path_for(raw), raw), (CKPT, data)):
                info = tarfile.TarInfo(arcname)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
        with pytest.raises(BundleError, match=message):
            B.verify_bundle(path)


@pytest.mark.parametrize("seed", range(6))
def test_random_byte_flips_are_always_detected(seed, small_bundle, tmp_path):
    raw = bytearray(small_bundle.read_bytes())
    rng = random.Random(seed)
    # anywhere, plus the places a hash does not cover: headers, manifest, padding, end marker
    with B.open_bundle(small_bundle) as opened:
        manifest_end = opened.members[0].offset + opened.members[0].size
        last = opened.members[-1]
    spots = [rng.randrange(len(raw)), rng.randrange(512), rng.randrange(512, manifest_end),
             manifest_end + rng.randrange(-manifest_end % 512 or 1),
             rng.randrange(last.offset + last.size, len(raw)), last.offset - 512 + rng.randrange(512)]
    for at in spots:
        flipped = bytearray(raw)
        flipped[at] ^= rng.randrange(1, 256)
        path = tmp_path / f"flip-{at}.tvpack"
        path.write_bytes(bytes(flipped))
        with pytest.raises(BundleError):
            B.verify_bundle(path)
        path.unlink()


# -- end to end: vanilla torchvision offline ------------------------------------------------------------
REAL_MEMBER = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"

VANILLA = r'''
import json, sys
import torch, torchvision
import packager.testing.zoo as zoo
from torchvision.models import MobileNet_V3_Small_Weights

real_url = sys.argv[1]
MobileNet_V3_Small_Weights.IMAGENET1K_V1.value.url = real_url
out = {}
for builder, name in json.loads(sys.argv[2]).items():
    enum, member = name.split(".")
    weights = getattr(getattr(zoo, enum), member)
    kwargs = {"quantize": True} if "Quantized" in enum else {}
    model = getattr(zoo, builder)(weights=weights, **kwargs)
    out[name] = float(sum(t.double().sum() for t in model.state_dict().values()
                          if isinstance(t, torch.Tensor) and t.dtype.is_floating_point))
model = torchvision.models.mobilenet_v3_small(weights=MobileNet_V3_Small_Weights.IMAGENET1K_V1)
out["real"] = float(sum(t.double().sum() for t in model.state_dict().values() if t.dtype.is_floating_point))
print(json.dumps(out))
'''


def float_sum(path: Path) -> float:
    state = torch.load(path, weights_only=True)
    return float(sum(t.double().sum() for t in state.values() if t.dtype.is_floating_point))


@pytest.fixture(scope="module")
def e2e_bundle(zoo, zoo_root, tmp_path_factory):
    """Every zoo weights plus a real torchvision member (url patched to a synthesized file)."""
    from torchvision.models import MobileNet_V3_Small_Weights

    work = tmp_path_factory.mktemp("e2e")
    member = MobileNet_V3_Small_Weights.IMAGENET1K_V1
    real_file = zoo.synthesize_checkpoint(member, work / "mirror" / "models")
    real_url = f"https://download.pytorch.org/models/{real_file.name}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(member.value, "url", real_url)
        path = B.bundle(list(ZOO_WEIGHTS) + [REAL_MEMBER], work / "e2e.tvpack", registry=[ZOO_REGISTRY],
                        torch_home=work / "source", mirrors=[str(zoo_root), str(work / "mirror")], upstream=False)
    expected = {name: float_sum(work / "source/hub/checkpoints" / zoo.zoo_files()[_zoo_key(zoo, name)].name)
                for builder, name in ZOO_WEIGHTS.items() if "Quantized" not in name}
    expected["real"] = float_sum(real_file)
    return path, real_url, expected


def _zoo_key(zoo, name: str) -> str:
    enum, member = name.split(".")
    filename = os.path.basename(getattr(getattr(zoo, enum), member).url)
    return next(key for key, path in zoo.zoo_files().items() if path.name == filename)


def run_vanilla_offline(torch_home: Path, real_url: str) -> dict:
    unshare = need_binary("unshare")
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONPATH": str(ROOT)}
    env.pop("TVPACK_REGISTRY", None)
    proc = subprocess.run([unshare, "-n", sys.executable, "-c", VANILLA, real_url, json.dumps(ZOO_WEIGHTS)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_install_then_vanilla_torchvision_loads_offline(e2e_bundle, tmp_path, tvpack):
    path, real_url, expected = e2e_bundle
    home = tmp_path / "fresh-home"
    proc = tvpack("install", path, "--torch-home", home)  # a real `python -m packager` process
    assert proc.returncode == 0, proc.stderr
    assert len(list((home / "hub/checkpoints").iterdir())) == 9
    sums = run_vanilla_offline(home, real_url)
    assert set(sums) == set(ZOO_WEIGHTS.values()) | {"real"}
    for name, value in expected.items():
        assert sums[name] == pytest.approx(value, rel=1e-9), name


def dockerfile_steps(dockerfile: Path, bundle_path: Path) -> list[str]:
    """The RUN lines that act on the bundle, with the COPY destination mapped to ``bundle_path``."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    copy_dest = None
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("COPY "):
            copy_dest = line.split()[-1]
        elif line.startswith("RUN ") and copy_dest is not None:
            steps.append(line[4:].replace(copy_dest, str(bundle_path)))
    return steps


def test_dockerfile_steps_with_plain_tar_then_vanilla_torchvision_loads_offline(e2e_bundle, tmp_path):
    path, real_url, expected = e2e_bundle
    dockerfile = ROOT / "scripts" / "Dockerfile.model-cache"
    text = dockerfile.read_text()
    assert re.search(r"^ENV TORCH_HOME=", text, re.M) and "tar -xf" in text
    home = tmp_path / "image-torch-home"
    steps = dockerfile_steps(dockerfile, tmp_path / "models.tvpack")
    assert steps and any("tar -xf" in step for step in steps)
    shutil.copy(path, tmp_path / "models.tvpack")
    for step in steps:  # exactly what `docker build` would run after the COPY
        subprocess.run(["sh", "-euc", step], check=True, env={**os.environ, "TORCH_HOME": str(home)})
    assert not (tmp_path / "models.tvpack").exists()  # the image does not keep a second copy
    assert len(list((home / "hub/checkpoints").iterdir())) == 9
    sums = run_vanilla_offline(home, real_url)
    for name, value in expected.items():
        assert sums[name] == pytest.approx(value, rel=1e-9), name


def test_python_m_packager_verify_subprocess(small_bundle):
    proc = run_tvpack("verify", small_bundle)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc.stderr
    proc = run_tvpack("verify", small_bundle.parent / "missing.tvpack")
    assert proc.returncode == 1 and proc.stderr.strip() == f"tvpack: error: no such bundle: " \
                                                           f"{small_bundle.parent / 'missing.tvpack'}"


def test_compressed_bundle_is_named_as_such(small_bundle, tmp_path, cli):
    """A gzipped bundle (a common way to 'shrink' it for transfer) says what it is, not just 'not a tar'."""
    import gzip

    packed = tmp_path / "models.tvpack.tar.gz"
    packed.write_bytes(gzip.compress(small_bundle.read_bytes()[:1 << 20], compresslevel=1))
    for command in ("inspect", "verify"):
        result = cli(command, packed)
        assert result.exit_code == 1
        assert "gzip-compressed data" in result.output and "decompress it first" in result.output


# -- production hardening: crash safety, hostile input, clear refusals ------------------------------------------

def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def test_bundle_and_install_fsync_every_file_before_its_rename(small_bundle, zoo_root, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(a))), real_replace(a, b))[1])
    B.install(small_bundle, torch_home=tmp_path / "home")
    out = B.bundle(SMALL[:1], tmp_path / "again.tar", registry=[ZOO_REGISTRY], torch_home=tmp_path / "home", fetch=False)
    # (the index is a cache of hashes: losing it costs a re-hash, never a wrong answer, so it is not fsynced)
    renamed = [path for kind, path in events if kind == "rename" and ".index.json." not in path]
    assert any("tvpack-install" in p for p in renamed) and any(p.endswith(".tmp") and "again.tar" in p for p in renamed)
    for path in renamed:
        synced_before = [p for kind, p in events[:events.index(("rename", path))] if kind == "fsync"]
        assert str(Path(path).resolve()) in synced_before, f"{path} renamed before it was fsynced"
    assert out.is_file()


def test_install_refuses_at_once_when_the_disk_cannot_hold_the_files(small_bundle, tmpfs):
    disk = tmpfs("1m")
    home = disk / "home"
    proc = run_tvpack("install", small_bundle, "--torch-home", home)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not enough disk space in" in lines[0] and " free" in lines[0], proc.stderr
    assert not any(p.is_file() for p in disk.rglob("*"))


def test_a_disk_that_fills_during_install_leaves_nothing_for_load_model(small_bundle, tmpfs, monkeypatch):
    """The free-space check is made once, up front; another writer can still fill the disk afterwards."""
    disk = tmpfs("64m")
    home = disk / "home"

    def pages(n: int) -> int:
        return -(-n // 4096) * 4096

    with B.open_bundle(small_bundle) as opened:
        payload = sum(pages(m.size) for m in opened.members[1:] if m.path.startswith("hub/checkpoints/"))
        manifest = pages(opened.members[0].size)
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "tvpack" / "manifests").mkdir(parents=True)
    # room for the checkpoints (whole pages on tmpfs), one page short for the manifest staged after them
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (free - (payload + manifest - 4096)))
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=free))  # as before the filler
    with pytest.raises(CacheError, match=f"cannot write the bundle manifest {home}.*No space left on device"):
        B.install(small_bundle, torch_home=home)
    assert not any((home / "hub" / "checkpoints").iterdir())  # nothing placed, no temp left
    assert not any((home / "hub" / "tvpack" / "manifests").iterdir())


def test_bundle_refuses_to_write_into_the_cache(small_bundle, tmp_path):
    home = tmp_path / "home"
    B.install(small_bundle, torch_home=home)
    victim = next((home / "hub" / "checkpoints").iterdir())
    before = victim.read_bytes()
    for target in (victim, home / "hub" / "tvpack" / "index.json", home / "hub" / "checkpoints" / "new.tar"):
        proc = run_tvpack("bundle", SMALL[0], "--registry", ZOO_REGISTRY, "--no-fetch", "--torch-home", home,
                          "-o", target)
        assert proc.returncode == 1 and "inside the checkpoint cache" in proc.stderr, proc.stderr
    assert victim.read_bytes() == before


def test_a_killed_bundle_leaves_a_temp_that_the_next_run_removes_and_ls_does_not_list(small_bundle, tmp_path):
    home = tmp_path / "home"
    B.install(small_bundle, torch_home=home)
    out = tmp_path / "out.tar"
    dead_pid = 2 ** 22 - 7  # above the default pid_max: never a live process
    stale = tmp_path / f".out.tar.{dead_pid}.0badc0de.tmp"
    stale.write_bytes(b"x" * 1000)
    ckpt_temp = home / "hub" / "checkpoints" / f".zoo.pth.{dead_pid}.0badc0de.tvpack-install"
    ckpt_temp.write_bytes(b"half a checkpoint")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(ckpt_temp, (old, old))
    listing = json.loads(run_tvpack("cache", "ls", "--json", "--torch-home", home, check=True).stdout)
    by_name = {f["file"]: f for f in listing["files"]} if isinstance(listing, dict) else {f["file"]: f for f in listing}
    assert by_name[ckpt_temp.name]["status"] == "partial"
    B.bundle(SMALL[:1], out, registry=[ZOO_REGISTRY], torch_home=home, fetch=False)
    assert not stale.exists() and out.is_file()
    pruned = run_tvpack("cache", "prune", "--torch-home", home, check=True)
    assert not ckpt_temp.exists(), pruned.stdout


def test_special_files_are_refused_at_once(tmp_path):
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    proc = run_tvpack("inspect", fifo, timeout=300)  # opening a FIFO to read would block until a writer came
    assert proc.returncode == 1 and "is a FIFO, not a bundle file" in proc.stderr
    with open(tmp_path / "b.tar", "wb") as f:
        f.write(b"x")
    proc = subprocess.run(f"cat {tmp_path / 'b.tar'} | {sys.executable} -m packager inspect /dev/stdin", shell=True,
                          capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "is a FIFO" in proc.stderr and "Illegal seek" not in proc.stderr


def test_deeply_nested_json_is_one_line(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    lock = tmp_path / "tvpack.lock"
    lock.write_text('{"format": "tvpack-lock", "format_version": 1, "weights": ' + deep + "}")
    proc = run_tvpack("fetch", "--lock", lock, "--dry-run")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "nested too deeply" in proc.stderr and "bug" not in proc.stderr
    manifest = ('{"format": "tvpack-bundle", "format_version": 1, "weights": ' + deep + "}").encode()
    archive = tmp_path / "deep.tar"
    with open(archive, "wb") as f:
        f.write(tar_header(manifest_path_for(manifest), len(manifest), 0))
        f.write(manifest + bytes(-len(manifest) % 512) + bytes(1024))
        f.write(bytes(-f.tell() % 10240))
    for command in ("inspect", "verify", "install"):
        proc = run_tvpack(command, archive, *(["--torch-home", tmp_path / "h"] if command == "install" else []))
        assert proc.returncode == 1 and "nested too deeply" in proc.stderr and "bug" not in proc.stderr, proc.stderr
    assert not (tmp_path / "h").exists() or not any((tmp_path / "h").rglob("*.pth"))


def test_install_names_a_dangling_symlink(small_bundle, tmp_path):
    home = tmp_path / "home"
    B.install(small_bundle, torch_home=home)
    victim = next((home / "hub" / "checkpoints").iterdir())
    victim.unlink()
    victim.symlink_to(tmp_path / "gone.pth")
    proc = run_tvpack("install", small_bundle, "--torch-home", home)
    assert proc.returncode == 1 and "dangling symbolic link" in proc.stderr and "None" not in proc.stderr
    run_tvpack("install", small_bundle, "--torch-home", home, "--force", check=True)
    assert victim.is_file() and not victim.is_symlink()


def test_sigterm_during_bundle_removes_its_temp_file(tmp_path):
    """docker stop / timeout send SIGTERM: the half-written bundle must not stay behind (exit 143)."""
    home = tmp_path / "home" / "hub" / "checkpoints"
    home.mkdir(parents=True)
    sparse = home / "big.pth"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of holes: slow enough to interrupt, free on disk
    digest = subprocess.run(["sha256sum", sparse], capture_output=True, text=True, check=True).stdout.split()[0]
    name = f"big-{digest[:8]}.pth"
    os.replace(sparse, home / name)
    (tmp_path / "sigterm_weights.py").write_text(
        "from functools import partial\nfrom typing import Optional\nfrom torch import nn\n"
        "from torchvision.models._api import Weights, WeightsEnum\n"
        "from torchvision.transforms._presets import ImageClassification\n\n\n"
        "class Big_Weights(WeightsEnum):\n"
        f"    V1 = Weights(url='https://example.invalid/{name}', transforms=partial(ImageClassification, crop_size=8),"
        " meta={'categories': None})\n\n\n"
        "def big_model(*, weights: Optional[Big_Weights] = None) -> nn.Module:\n    return nn.Identity()\n")
    out = tmp_path / "out" / "big.tvpack.tar"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "TVPACK_REGISTRY": "sigterm_weights",
           "TORCH_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "packager", "bundle", "big_model", "--no-fetch", "-o", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(out.parent.iterdir()) or proc.poll() is not None, what="the bundle's temp file")
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert list(out.parent.iterdir()) == [], "the temp file of the interrupted bundle was left behind"
