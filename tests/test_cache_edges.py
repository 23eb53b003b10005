"""Cache corners, through the real CLI: the verification index cannot be fooled by a restored
mtime; very long file names; bytes counted on resume; disk space shared by parallel transfers;
a closed stdout; torch's warnings under verify --deep; dangling symlinks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

from packager.formats.lockfile import dump_lockfile
from tests.conftest import ZOO_REGISTRY, run_tvpack, synth_refs, tvpack_command, tvpack_env, wait_for

MB = 1_000_000
PATIENT = ("--read-timeout", "3600", "--speed-limit", "0")  # no client timer fires while a test holds a stall


def _checkpoints(home):
    return home / "hub" / "checkpoints"


def _statuses(home, *extra) -> dict:
    proc = run_tvpack("cache", "ls", "--json", "--no-registry", *extra, env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return {f["file"]: f for f in json.loads(proc.stdout)["files"]}


# -- the index key ---------------------------------------------------------------------------------

def test_an_edit_that_restores_size_and_mtime_is_caught_by_ls_load_and_predict(zoo, zoo_root, tmp_path):
    import torch
    import torchvision

    import packager

    home = tmp_path / "home"
    made = packager.bundle(["zoo_mobilenet_v3_small"], tmp_path / "b.tvpack", registry=[ZOO_REGISTRY],
                           torch_home=tmp_path / "src", mirrors=[str(zoo_root)], upstream=False)
    packager.install(made, torch_home=home)
    image = tmp_path / "img.png"
    torchvision.io.write_png(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8), str(image))
    predict = ["predict", home, "zoo_mobilenet_v3_small", image, "--registry", ZOO_REGISTRY]
    (path,) = _checkpoints(home).glob("*.pth")
    assert _statuses(home)[path.name]["status"] == "verified"

    # bit rot / an edit in place, then the old mtime put back with touch -r
    reference = tmp_path / "reference"
    shutil.copy2(path, reference)  # same mtime
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))
    subprocess.run(["touch", "-r", reference, path], check=True)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (reference.stat().st_size, reference.stat().st_mtime_ns)

    entry = _statuses(home)[path.name]
    assert entry["status"] == "unverified" and entry["detail"] == "changed since verified"
    proc = run_tvpack(*predict)
    assert proc.returncode == 1 and "sha256" in proc.stderr and "the file changed after install" in proc.stderr
    proc = run_tvpack("cache", "verify", path.name, env={"TORCH_HOME": str(home)})
    assert proc.returncode == 1 and "differs from the manifest" in proc.stdout


def test_index_entries_of_older_versions_are_read_as_stale(mirror_server, tmp_path):
    home = tmp_path / "home"
    refs = synth_refs(mirror_server.root, count=2, size=10_000)
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
    assert run_tvpack("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream",
                      env={"TORCH_HOME": str(home)}).returncode == 0
    index_file = home / "hub" / "tvpack" / "index.json"
    data = json.loads(index_file.read_text())
    for entry in data["files"].values():  # as tvpack 0.1 wrote them: size and mtime only
        del entry["ctime_ns"], entry["inode"]
    index_file.write_text(json.dumps(data))
    assert {e["status"] for e in _statuses(home).values()} == {"unverified"}
    assert run_tvpack("cache", "verify", env={"TORCH_HOME": str(home)}).returncode == 0
    assert {e["status"] for e in _statuses(home).values()} == {"verified"}


# -- names near 255 bytes --------------------------------------------------------------------------

def test_a_file_name_near_255_bytes_is_fetched_resumed_and_pruned(mirror_server, tmp_path):
    home = tmp_path / "home"
    stem = "resnet_" + "ä" * 60 + "x" * 111  # 238 bytes in UTF-8: with "-<hash8>.pth", 251
    (ref,) = synth_refs(mirror_server.root, count=1, size=3 * MB, names=[stem])
    assert len(os.fsencode(ref.filename)) == 251
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    fetch = ["fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", *PATIENT]
    mirror_server.add_fault("stall", at=MB, seconds=600)
    proc = subprocess.Popen(tvpack_command(*fetch), env=tvpack_env(TORCH_HOME=home), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        parts = lambda: list(_checkpoints(home).glob("*.tvpack-part")) if _checkpoints(home).is_dir() else []  # noqa: E731
        wait_for(lambda: any(p.stat().st_size for p in parts()) or proc.poll() is not None, what="the part's bytes")
    finally:
        proc.kill()
        proc.wait()
    (part,) = parts()
    assert len(os.fsencode(part.name)) <= 200 and part.name.startswith("resnet_ää")
    assert _statuses(home)[part.name]["status"] == "partial"
    dry = json.loads(run_tvpack("cache", "prune", "--dry-run", "--json", env={"TORCH_HOME": str(home)}).stdout)
    assert str(part) in [r["path"] for r in dry["removed"]]  # recognised as an abandoned download of ours

    mirror_server.clear_faults()
    proc = run_tvpack(*fetch, env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "resumed at" in proc.stdout
    assert (_checkpoints(home) / ref.filename).stat().st_size == ref.size_hint
    assert [p.name for p in _checkpoints(home).iterdir()] == [ref.filename]


# -- bytes transferred on resume -----------------------------------------------------------------

def test_a_resumed_fetch_counts_only_the_bytes_it_received(mirror_server, tmp_path):
    from packager.fsutil import human_bytes

    home = tmp_path / "home"
    refs = synth_refs(mirror_server.root, count=2, size=3 * MB)
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
    fetch = ["fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", *PATIENT]
    mirror_server.add_fault("stall", path=f"/models/synth/{refs[0].filename}", at=MB, seconds=600)
    mirror_server.add_fault("stall", path=f"/models/synth/{refs[1].filename}", at=2 * MB, seconds=600)
    proc = subprocess.Popen(tvpack_command(*fetch), env=tvpack_env(TORCH_HOME=home), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len([p for p in _checkpoints(home).glob("*.tvpack-part") if p.stat().st_size > MB // 2])
                 == 2 if _checkpoints(home).is_dir() else False, what="two part files")
        proc.send_signal(signal.SIGINT)  # parts keep every byte received
        proc.wait(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    have = sum(p.stat().st_size for p in _checkpoints(home).glob("*.tvpack-part"))
    assert have > MB
    mirror_server.clear_faults()
    proc = run_tvpack(*fetch, env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    total = sum(r.size_hint for r in refs)
    assert f"2 weights: 2 downloaded; {human_bytes(total - have)} transferred" in proc.stdout
    proc = run_tvpack(*fetch, "--json", env={"TORCH_HOME": str(home)})
    assert [r["received"] for r in json.loads(proc.stdout)] == [0, 0]


# -- disk space and parallel transfers -------------------------------------------------------------

def test_parallel_transfers_do_not_count_the_same_free_space_twice(mirror_server, tmp_path, tiny_disk):
    refs = synth_refs(mirror_server.root, count=2, size=1_200_000)  # each fits, both do not
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
    mirror_server.add_fault("slow", rate=2 * MB)  # the two transfers overlap
    proc = run_tvpack("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", "-j", "2", "-q",
                      env={"TORCH_HOME": str(tiny_disk / "home")})
    assert proc.returncode == 1
    assert "not enough disk space" in proc.stderr and "promised to transfers in progress" in proc.stderr, proc.stderr
    assert "disk full" not in proc.stderr  # refused before writing, not run out of space midway
    assert len(list(_checkpoints(tiny_disk / "home").glob("*.pth"))) == 1


# -- output corners --------------------------------------------------------------------------------

def test_a_closed_stdout_ends_quietly(mirror_server, tmp_path):
    home = tmp_path / "home"
    lock = dump_lockfile(synth_refs(mirror_server.root, count=3, size=1000), tmp_path / "tvpack.lock")
    assert run_tvpack("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream",
                      env={"TORCH_HOME": str(home)}).returncode == 0
    for args in (["cache", "verify"], ["cache", "ls"], ["list", "--all"]):
        proc = subprocess.Popen(tvpack_command(*args), env=tvpack_env(TORCH_HOME=home), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # `| head -1` that has already exited
        err = proc.stderr.read()
        proc.wait(timeout=300)
        assert err == b"", err
        assert proc.returncode == 141  # 128 + SIGPIPE, as a tool killed by SIGPIPE


def test_verify_deep_shows_no_torch_warnings(zoo, zoo_root, tmp_path):
    home = tmp_path / "home"
    # quantized and detection checkpoints make torch.load warn (TypedStorage, quantized tensors)
    assert run_tvpack("fetch", "zoo_quantized_shufflenet_v2", "zoo_raft_small", "--registry", ZOO_REGISTRY,
                      "--mirror", zoo_root, "--no-upstream", "-q", env={"TORCH_HOME": str(home)}).returncode == 0
    proc = run_tvpack("cache", "verify", "--deep", env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.count("ok ") == 2


def test_a_dangling_symlink_is_shown_as_such(mirror_server, tmp_path):
    home = tmp_path / "home"
    lock = dump_lockfile(synth_refs(mirror_server.root, count=1, size=1000), tmp_path / "tvpack.lock")
    assert run_tvpack("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream",
                      env={"TORCH_HOME": str(home)}).returncode == 0
    link = _checkpoints(home) / "resnet50-0676ba61.pth"
    link.symlink_to("/mnt/models/resnet50-0676ba61.pth")
    entry = _statuses(home)[link.name]
    assert entry["status"] == "broken" and entry["detail"] == "dangling symlink -> /mnt/models/resnet50-0676ba61.pth"
    table = run_tvpack("cache", "ls", "--no-registry", env={"TORCH_HOME": str(home)}).stdout
    assert "broken" in table and "1 broken" in table
    for args in (["cache", "verify"], ["cache", "verify", link.name]):
        proc = run_tvpack(*args, env={"TORCH_HOME": str(home)})
        assert proc.returncode == 1
        assert f"BAD  {link.name}  dangling symlink -> /mnt/models/resnet50-0676ba61.pth" in proc.stdout
        assert "None" not in proc.stdout
