"""tvpack.lock: written by `tvpack lock`, read without the registry, refusing what it cannot trust."""
from __future__ import annotations

import hashlib
import json

import pytest

from packager.errors import LockfileError
from packager.formats.lockfile import dump_lockfile, read_lockfile, select_locked
from packager.registry import WeightsRef
from tests.conftest import ZOO_REGISTRY

SHA = hashlib.sha256(b"x").hexdigest()


def ref(name="a", sha=SHA, size=1, sep="-") -> WeightsRef:
    return WeightsRef(enum=f"{name.title()}_Weights", member="V1",
                      url=f"https://download.pytorch.org/models/{name}{sep}{sha[:8]}.pth",
                      module="m", models=(name, f"{name}_big"), size_hint=size, sha256=sha)


def test_round_trip(tmp_path):
    refs = [ref("a"), ref("q", sep="_")]
    path = dump_lockfile(refs, tmp_path / "tvpack.lock")
    data = json.loads(path.read_text())
    assert data["format"] == "tvpack-lock" and data["format_version"] == 1
    assert data["torch"] and data["torchvision"] and set(data["created_by"]) >= {"packager", "torch", "python"}
    assert [w["filename"] for w in data["weights"]] == [r.filename for r in refs]
    assert read_lockfile(path) == refs


@pytest.mark.parametrize("change, message", [
    (lambda w: w.update(sha256=SHA[:8]), "64 hex digits"),
    (lambda w: w.update(sha256="0" * 64), "contradicts the hash prefix"),
    (lambda w: w.update(size="12"), "byte count"),
    (lambda w: w.pop("url"), "lacks 'url'"),
    (lambda w: w.update(filename="other.pth"), "not the url's basename"),
])
def test_refuses_bad_entries(tmp_path, change, message):
    path = dump_lockfile([ref()], tmp_path / "tvpack.lock")
    data = json.loads(path.read_text())
    change(data["weights"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(LockfileError, match=message):
        read_lockfile(path)


def test_refuses_other_documents(tmp_path):
    with pytest.raises(LockfileError, match="does not exist"):
        read_lockfile(tmp_path / "missing.lock")
    bad = tmp_path / "bad.lock"
    bad.write_text("{")
    with pytest.raises(LockfileError, match="not valid JSON"):
        read_lockfile(bad)
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(LockfileError, match="not a tvpack lockfile"):
        read_lockfile(bad)


def test_unpinned_refs_cannot_be_locked(tmp_path):
    with pytest.raises(LockfileError, match="sha256 and size are unknown"):
        dump_lockfile([WeightsRef(enum="E", member="M", url="https://x/a.pth")], tmp_path / "x.lock")


def test_select_without_registry():
    refs = [ref("a"), ref("b"), ref("c")]
    assert select_locked(refs, []) == refs
    assert select_locked(refs, ["B_Weights.V1", "a"]) == [refs[1], refs[0]]
    assert select_locked(refs, ["*_big"]) == refs
    assert select_locked(refs, [refs[2].filename]) == [refs[2]]
    with pytest.raises(LockfileError, match="matches nothing"):
        select_locked(refs, ["resnet50"])


def test_lock_command_then_fetch_from_it(zoo, zoo_server, torch_home, tmp_path, cli, monkeypatch):
    out = tmp_path / "tvpack.lock"
    result = cli("lock", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "--no-upstream",
                 "zoo_raft_small", "zoo_quantized_shufflenet_v2", "-o", out)
    assert result.exit_code == 0 and "wrote" in result.output
    refs = read_lockfile(out)
    assert [r.name for r in refs] == ["ZooRaftSmall_Weights.THINGS_V1",
                                      "ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1"]
    cached = torch_home / "hub" / "checkpoints"
    for r in refs:
        data = (cached / r.filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r.sha256 and len(data) == r.size_hint
    # another machine: an empty TORCH_HOME, the lockfile and the mirror
    other = tmp_path / "other-home"
    result = cli("fetch", "--lock", out, "--torch-home", other, "--mirror", zoo_server.url, "--no-upstream",
                 "--json")
    assert result.exit_code == 0
    assert [d["status"] for d in json.loads(result.output)] == ["downloaded", "downloaded"]
    result = cli("fetch", "--lock", out, "--torch-home", other, "--json", "zoo_raft_small")
    assert [d["status"] for d in json.loads(result.output)] == ["cached"]
    # offline lock of something not cached fails cleanly
    result = cli("lock", "--registry", ZOO_REGISTRY, "--offline", "zoo_lraspp", "-o", tmp_path / "x.lock")
    assert result.exit_code == 1 and "not cached" in result.output and not (tmp_path / "x.lock").exists()


def test_select_the_default_of_a_model_the_lockfile_holds_once():
    refs = [ref("a"), ref("b"), WeightsRef(enum="B_Weights", member="V2", url="https://x/b2-00000000.pth", module="m",
                                           models=("b",), size_hint=1, sha256=SHA)]
    assert select_locked(refs, ["a:DEFAULT"]) == [refs[0]] == select_locked(refs, ["A_Weights.DEFAULT"])
    assert select_locked(refs, ["b"]) == refs[1:]  # a bare model keeps every locked weights of it
    with pytest.raises(LockfileError, match=r"names 2 weights .*B_Weights\.V1, B_Weights\.V2"):
        select_locked(refs, ["b:DEFAULT"])


def test_fetch_lock_accepts_model_default_as_bundle_does(zoo, zoo_server, torch_home, tmp_path, cli):
    out = tmp_path / "tvpack.lock"
    assert cli("lock", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "--no-upstream", "zoo_raft_small",
               "-o", out).exit_code == 0
    for selector in ("zoo_raft_small:DEFAULT", "ZooRaftSmall_Weights.DEFAULT"):
        result = cli("fetch", "--lock", out, "--json", selector)
        assert result.exit_code == 0, result.output
        assert [(d["weights"], d["status"]) for d in json.loads(result.output)] == [
            ("ZooRaftSmall_Weights.THINGS_V1", "cached")]
    result = cli("bundle", "--registry", ZOO_REGISTRY, "--no-fetch", "zoo_raft_small:DEFAULT", "-o", tmp_path / "b.tar")
    assert result.exit_code == 0, result.output
