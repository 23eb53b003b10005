"""The cache manager end to end: fetch (API and CLI) through loopback mirrors, concurrency, kills,
faults, no-op locks, offline, dry-run, and the cache ls / verify / prune / rm commands."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from packager import cache
from packager.errors import CacheError, DownloadError, IntegrityError, OfflineError
from packager.formats.lockfile import dump_lockfile, read_lockfile
from packager.registry import WeightsRef
from packager.transport import Policy
from packager.transport.stream import MiB
from tests.conftest import ROOT, ZOO_REGISTRY, wait_for

FAST = Policy(connect_timeout=2, read_timeout=5, retries=3, backoff=0.01, max_backoff=0.05)
UPSTREAM = "https://download.pytorch.org/models/synth/"


def synth_refs(root: Path, count: int = 3, size: int = MiB, sep: str = "-", stem: str = "synth") -> list[WeightsRef]:
    """Random files in a mirror layout under ``root`` and pinned refs for them (upstream urls)."""
    refs = []
    folder = root / "models" / "synth"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data = random.Random(f"{stem}{i}{size}").randbytes(size + i)
        sha = hashlib.sha256(data).hexdigest()
        name = f"{stem}{i}{sep}{sha[:8]}.pth"
        (folder / name).write_bytes(data)
        refs.append(WeightsRef(enum=f"Synth{i}_Weights", member="V1", url=UPSTREAM + name, module="synth",
                               models=(f"{stem}{i}",), size_hint=len(data), sha256=sha))
    return refs


def unpinned(ref: WeightsRef) -> WeightsRef:
    return WeightsRef(enum=ref.enum, member=ref.member, url=ref.url, models=ref.models)


def ckpt(home: Path) -> Path:
    return home / "hub" / "checkpoints"


# -- fetch through the API -----------------------------------------------------------------------

def test_zoo_fetch_lands_in_the_torch_hub_layout(zoo, zoo_server, torch_home):
    paths = cache.fetch(["zoo_mobilenet_v3_small:all", "zoo_quantized_shufflenet_v2"], registry=[ZOO_REGISTRY],
                        mirrors=[zoo_server.url], upstream=False, torch_home=torch_home)
    names = [p.name for p in paths]
    assert names == [zoo.ZooMobileNetV3Small_Weights.IMAGENET10_V1.url.rsplit("/", 1)[1],
                     zoo.ZooMobileNetV3Small_Weights.IMAGENET10_V2.url.rsplit("/", 1)[1],
                     zoo.ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1.url.rsplit("/", 1)[1]]
    assert all(p.parent == ckpt(torch_home) for p in paths)
    # torchvision's own path finds the files (with its hash check) and never downloads.
    import torch

    member = zoo.ZooMobileNetV3Small_Weights.IMAGENET10_V2
    state = torch.hub.load_state_dict_from_url(member.url, check_hash=True)
    assert set(state) == set(torch.load(paths[1], weights_only=True))
    # a second fetch is all cached, with no request
    zoo_server.settle()
    before = len(zoo_server.requests())
    results = cache.fetch_results(["zoo_mobilenet_v3_small:all"], registry=[ZOO_REGISTRY],
                                  mirrors=[zoo_server.url], upstream=False, torch_home=torch_home)
    assert [r.status for r in results] == ["cached", "cached"]
    assert len(zoo_server.requests()) == before
    # the index knows them, so nothing is hashed again
    entry = cache.index_entry(paths[0])
    assert entry["sha256"].startswith(paths[0].stem.rsplit("-", 1)[1]) and entry["size"] == paths[0].stat().st_size
    assert entry["weights"] == "ZooMobileNetV3Small_Weights.IMAGENET10_V1"


def test_index_api(tmp_path):
    hub = tmp_path / "hub"
    f = hub / "checkpoints" / "x-00000000.pth"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"abc")
    sha = hashlib.sha256(b"abc").hexdigest()
    assert cache.index_entry(f) is None
    assert cache.file_sha256(f) == sha
    assert cache.index_entry(f)["sha256"] == sha
    cache.record_verified(f, "f" * 64)  # the index is believed while the file is unchanged...
    assert cache.file_sha256(f) == "f" * 64
    f.write_bytes(b"abcd")  # ...and not after
    assert cache.index_entry(f) is None
    assert cache.file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()
    data = json.loads((hub / "tvpack" / "index.json").read_text())
    assert data["version"] == 1 and "x-00000000.pth" in data["files"]


def test_user_registry_module_with_its_own_urls(mirror_server, torch_home, tmp_path, monkeypatch):
    """The general case: a user's WeightsEnum whose urls point at some server (no mirror)."""
    refs = synth_refs(mirror_server.root, count=2, size=200_000, stem="userreg")
    module = tmp_path / "userreg_weights.py"
    urls = [f"{mirror_server.url}/models/synth/{r.filename}" for r in refs]
    module.write_text(textwrap.dedent(f"""
        from functools import partial
        from typing import Optional
        from torchvision.models._api import Weights, WeightsEnum
        from torchvision.transforms._presets import ImageClassification
        import torch

        class Tiny_Weights(WeightsEnum):
            V1 = Weights(url={urls[0]!r}, transforms=partial(ImageClassification, crop_size=8),
                         meta={{"categories": ["a", "b"]}})
            V2 = Weights(url={urls[1]!r}, transforms=partial(ImageClassification, crop_size=8),
                         meta={{"categories": ["a", "b"]}})
            DEFAULT = V2

        def tiny(*, weights: Optional[Tiny_Weights] = None, progress: bool = True):
            return torch.nn.Linear(2, 2)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    results = cache.fetch_results(["tiny:all"], registry=["userreg_weights"], torch_home=torch_home, mirrors=[])
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    assert [r.source for r in results] == urls
    assert [r.path.read_bytes() for r in results] == [(mirror_server.root / "models/synth" / r.filename).read_bytes()
                                                      for r in refs]


def test_hash_prefix_rules_for_dash_and_quantized_underscore_names(mirror_server, torch_home):
    for sep in ("-", "_"):
        (ref,) = synth_refs(mirror_server.root, count=1, size=300_000, sep=sep, stem=f"q{sep == '_'}")
        assert ref.hash_prefix == ref.sha256[:8]
        mirror_server.add_fault("flip", path=f"/models/synth/{ref.filename}")
        with pytest.raises(IntegrityError, match=f"prefix mismatch: expected {ref.sha256[:8]}, got"):
            cache.fetch(refs=[unpinned(ref)], torch_home=torch_home, mirrors=[mirror_server.url], upstream=False,
                        policy=FAST)
        assert not (ckpt(torch_home) / ref.filename).exists()
        assert not [p for p in ckpt(torch_home).iterdir() if ref.filename in p.name]  # no part left either
        mirror_server.clear_faults()
        (path,) = cache.fetch(refs=[unpinned(ref)], torch_home=torch_home, mirrors=[mirror_server.url],
                              upstream=False, policy=FAST)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256


def test_a_corrupt_cached_file_is_replaced(mirror_server, torch_home):
    (ref,) = synth_refs(mirror_server.root, count=1, size=100_000)
    final = ckpt(torch_home) / ref.filename
    final.parent.mkdir(parents=True)
    final.write_bytes(b"not the checkpoint")
    result, = cache.fetch_results(refs=[unpinned(ref)], torch_home=torch_home, mirrors=[mirror_server.url],
                                  upstream=False)
    assert result.status == "downloaded" and hashlib.sha256(final.read_bytes()).hexdigest() == ref.sha256


def test_mirrors_in_order_then_upstream(tmp_path, torch_home):
    from packager.testing.server import MirrorServer

    with MirrorServer(tmp_path / "m1") as bad, MirrorServer(tmp_path / "m2") as good, \
            MirrorServer(tmp_path / "up") as upstream:
        refs = synth_refs(good.root, count=1, size=100_000)
        synth_refs(bad.root, count=1, size=100_000)
        synth_refs(upstream.root, count=1, size=100_000)
        bad.add_fault("flip")
        direct = WeightsRef(enum="D", member="V1", url=f"{upstream.url}/models/synth/{refs[0].filename}")
        (r,) = cache.fetch_results(refs=[unpinned(refs[0])], torch_home=torch_home,
                                   mirrors=[bad.url, good.url], upstream=False, policy=FAST)
        assert r.source.startswith(good.url)
        # a 404 at the mirror falls through to the weights' own url
        (tmp_path / "empty").mkdir()  # a directory mirror must exist (a missing one is a usage error)
        (r,) = cache.fetch_results(refs=[direct], torch_home=tmp_path / "home2", mirrors=[tmp_path / "empty"],
                                   policy=FAST)
        assert r.source == direct.url
        with pytest.raises(DownloadError, match="no mirror given and upstream disabled"):
            cache.fetch(refs=[direct], torch_home=tmp_path / "home3", mirrors=[], upstream=False)
        with pytest.raises(DownloadError, match="every source failed"):
            cache.fetch(refs=[unpinned(refs[0])], torch_home=tmp_path / "home4",
                        mirrors=[tmp_path / "empty", bad.url], upstream=False, policy=FAST)


def test_threads_share_one_transfer_per_file(mirror_server, torch_home):
    refs = synth_refs(mirror_server.root, count=2, size=2 * MiB)
    mirror_server.add_fault("slow", rate=8 * MiB)  # transfers overlap for real
    errors, paths = [], []

    def worker():
        try:
            paths.append(cache.fetch(refs=refs, torch_home=torch_home, mirrors=[mirror_server.url],
                                     upstream=False, jobs=2))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(paths) == 6
    mirror_server.settle()
    for ref in refs:
        assert len(mirror_server.transfers(f"/models/synth/{ref.filename}")) == 1


def test_a_lock_that_does_nothing_never_leaves_a_wrong_file(mirror_server, torch_home, monkeypatch):
    class NoLock:
        def __init__(self, *args, **kwargs):
            pass

        def acquire(self, *args, **kwargs):
            return self

        def release(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cache.layout, "FileLock", NoLock)
    (ref,) = synth_refs(mirror_server.root, count=1, size=2 * MiB)
    mirror_server.add_fault("flip", times=3, at=MiB + 17)  # the first three transfers carry a bad byte
    mirror_server.add_fault("slow", rate=16 * MiB)
    final = ckpt(torch_home) / ref.filename
    outcomes, seen_wrong = [], []
    stop = threading.Event()

    def watch():  # the final name only ever holds the right bytes
        while not stop.is_set():
            try:
                data = final.read_bytes()
            except FileNotFoundError:
                continue
            if hashlib.sha256(data).hexdigest() != ref.sha256:
                seen_wrong.append(len(data))

    def worker():
        try:
            cache.fetch(refs=[unpinned(ref)], torch_home=torch_home, mirrors=[mirror_server.url],
                        upstream=False, policy=FAST)
            outcomes.append("ok")
        except IntegrityError:
            outcomes.append("refused")
        except Exception as exc:  # noqa: BLE001 - shows up in the assertion below
            outcomes.append(repr(exc))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    mirror_server.settle()
    assert len(mirror_server.transfers()) > 1  # the lock really did nothing
    assert not seen_wrong
    assert len(outcomes) == 8 and set(outcomes) <= {"ok", "refused"}, outcomes
    assert outcomes.count("refused") <= 3 and "ok" in outcomes
    assert hashlib.sha256(final.read_bytes()).hexdigest() == ref.sha256
    assert not [p for p in final.parent.iterdir() if p.name != final.name]  # no part files left


def test_a_lock_never_released_does_not_hang_fetch(mirror_server, torch_home, monkeypatch):
    from filelock import FileLock

    (ref,) = synth_refs(mirror_server.root, count=1, size=10_000)
    locks = torch_home / "hub" / "tvpack" / "locks"
    locks.mkdir(parents=True)
    held = FileLock(str(locks / f"{ref.filename}.lock"))
    monkeypatch.setattr(cache.fetching, "LOCK_WAIT", 0.3)
    done = []
    thread = threading.Thread(target=lambda: held.acquire())  # held by another thread for good
    thread.start()
    thread.join()
    try:
        worker = threading.Thread(target=lambda: done.append(cache.fetch(
            refs=[ref], mirrors=[mirror_server.url], upstream=False)))
        worker.start()
        worker.join(timeout=180)
        assert done and hashlib.sha256(done[0][0].read_bytes()).hexdigest() == ref.sha256
    finally:
        held.release(force=True)


def test_unwritable_torch_home_is_one_clear_line(tmp_path, mirror_server, tvpack):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CacheError, match="cannot create directory"):
        cache.fetch(refs=synth_refs(mirror_server.root, count=1, size=1000), torch_home=blocker / "home",
                    mirrors=[mirror_server.url])
    lock = dump_lockfile(synth_refs(mirror_server.root, count=1, size=1000), tmp_path / "tvpack.lock")
    proc = tvpack("fetch", "--lock", lock, "--torch-home", blocker / "home", "--mirror", mirror_server.url)
    assert proc.returncode == 1
    assert proc.stderr.startswith("tvpack: error: cannot create directory") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    if os.geteuid() != 0:  # root ignores permission bits
        home = tmp_path / "ro"
        home.mkdir(mode=0o500)
        proc = tvpack("fetch", "--lock", lock, "--torch-home", home, "--mirror", mirror_server.url)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1


def test_server_gone_is_one_clear_line(tmp_path, cli, torch_home):
    from servers import free_port

    lock = dump_lockfile(synth_refs(tmp_path / "m", count=1, size=1000), tmp_path / "tvpack.lock")
    result = cli("fetch", "--lock", lock, "--mirror", f"http://127.0.0.1:{free_port()}", "--no-upstream",
                 "--retries", "1", "--connect-timeout", "1", "-q")
    assert result.exit_code == 1
    assert "connection refused" in result.output or "connection error" in result.output
    assert not list(ckpt(torch_home).glob("*.pth"))


# -- processes: 8 at once, and kill -9 ------------------------------------------------------------

def test_eight_processes_fetch_the_same_weights(mirror_server, tmp_path, torch_home):
    refs = synth_refs(mirror_server.root, count=3, size=2 * MiB)
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
    mirror_server.add_fault("slow", rate=12 * MiB)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(torch_home)}
    procs = [subprocess.Popen([sys.executable, "-m", "packager", "fetch", "--lock", str(lock), "--mirror",
                               mirror_server.url, "--no-upstream", "-q"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, outs
    mirror_server.settle()
    for ref in refs:
        assert len(mirror_server.transfers(f"/models/synth/{ref.filename}")) == 1
        assert hashlib.sha256((ckpt(torch_home) / ref.filename).read_bytes()).hexdigest() == ref.sha256


def test_kill_9_at_random_points_then_resume(mirror_server, tmp_path, torch_home):
    (ref,) = synth_refs(mirror_server.root, count=1, size=40 * MiB)
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    final = ckpt(torch_home) / ref.filename
    path = f"/models/synth/{ref.filename}"
    mirror_server.add_fault("slow", rate=8 * MiB)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(torch_home)}
    cmd = [sys.executable, "-m", "packager", "fetch", "--lock", str(lock), "--mirror", mirror_server.url,
           "--no-upstream", "-q"]
    rng = random.Random(1234)

    def part_size() -> int:
        return sum(p.stat().st_size for p in final.parent.glob("*" + cache.PART_SUFFIX)) if final.parent.exists() else 0

    for _ in range(3):
        before = part_size()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill at a random point in the byte stream (seeded: the same points every run), not after a random sleep
        target = before + rng.randint(1, 4 * MiB)
        wait_for(lambda target=target, proc=proc: part_size() >= target or proc.poll() is not None, what="new bytes on disk")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not final.exists() or hashlib.sha256(final.read_bytes()).hexdigest() == ref.sha256
    mirror_server.settle()
    assert not final.exists()
    parts = [p for p in final.parent.iterdir() if p.name.endswith(cache.PART_SUFFIX)]
    assert len(parts) == 1 and parts[0].stat().st_size > 0  # each run took over the previous part
    have = parts[0].stat().st_size
    mirror_server.clear_faults()
    mirror_server.clear_log()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(final.read_bytes()).hexdigest() == ref.sha256
    mirror_server.settle()
    (record,) = mirror_server.transfers(path)
    assert record.status == 206 and record.range == f"bytes={have}-" and record.bytes_sent == ref.size_hint - have
    assert [p.name for p in final.parent.iterdir()] == [final.name]
    # each killed run left the in-use mark of its part (the part itself was taken over): prune removes them
    locks = torch_home / "hub" / "tvpack" / "locks"
    marks = sorted(locks.glob("*.inuse"))
    assert len(marks) == 3
    removed = cache.prune_cache(torch_home=torch_home)
    assert sorted(r.path for r in removed if r.path.name.endswith(".inuse")) == marks
    assert not list(locks.glob("*.inuse"))


# -- lockfile refusal ------------------------------------------------------------------------------

def test_lockfile_full_sha256_refusal(mirror_server, tmp_path, torch_home, cli):
    (ref,) = synth_refs(mirror_server.root, count=1, size=100_000)
    # the same name (so the same prefix), another full hash: what a tampered or rebuilt file looks like
    wrong = WeightsRef(**{**ref.__dict__, "sha256": ref.sha256[:8] + "0" * 56})
    lock = dump_lockfile([wrong], tmp_path / "tvpack.lock")
    result = cli("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", "-q")
    assert result.exit_code == 1 and "sha256 mismatch" in result.output and wrong.sha256 in result.output
    assert not (ckpt(torch_home) / ref.filename).exists()
    # once cached (by name and prefix it is fine), the lock still refuses it
    cache.fetch(refs=[unpinned(ref)], mirrors=[mirror_server.url], upstream=False)
    result = cli("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", "-q")
    assert result.exit_code == 1 and "does not match the lockfile" in result.output
    good = dump_lockfile([ref], tmp_path / "good.lock")
    assert cli("fetch", "--lock", good, "--offline", "-q").exit_code == 0


# -- CLI: offline, dry-run, json ------------------------------------------------------------------

def test_offline_verifies_cached_and_lists_missing(zoo, zoo_server, torch_home, cli, monkeypatch):
    cli("fetch", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "--no-upstream", "-q", "zoo_raft_small")
    zoo_server.settle()
    zoo_server.clear_log()
    result = cli("fetch", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "--offline",
                 "zoo_raft_small", "zoo_shufflenet_v2")
    assert result.exit_code == 1
    assert "cached      ZooRaftSmall_Weights.THINGS_V1" in result.output
    assert "not cached: ZooShuffleNetV2_Weights.IMAGENET10_V1" in result.output
    monkeypatch.setenv("TVPACK_OFFLINE", "1")
    assert cli("fetch", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "zoo_raft_small").exit_code == 0
    from packager.snapshot import resolve

    refs = resolve(["zoo_raft_small", "zoo_shufflenet_v2"], registry=[ZOO_REGISTRY])
    with pytest.raises(OfflineError, match="1 of 2 weights not cached: ZooShuffleNetV2_Weights.IMAGENET10_V1"):
        cache.ensure_cached(refs, mirrors=[zoo_server.url])
    assert list(cache.ensure_cached(refs[:1])) == ["ZooRaftSmall_Weights.THINGS_V1"]
    zoo_server.settle()
    assert zoo_server.requests() == []  # offline means no network at all


def test_dry_run_plans_without_transferring(zoo, zoo_server, torch_home, cli):
    cli("fetch", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "-q", "zoo_raft_small")
    zoo_server.settle()
    zoo_server.clear_log()
    result = cli("fetch", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "--dry-run",
                 "zoo_raft_small", "zoo_lraspp")
    assert result.exit_code == 0
    assert "1 cached, 1 to download" in result.output
    result = cli("fetch", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "--dry-run", "--json",
                 "zoo_raft_small", "zoo_lraspp")
    plan = json.loads(result.output)
    assert [p["status"] for p in plan] == ["cached", "would-download"]
    assert plan[1]["size"] > 0
    zoo_server.settle()
    assert zoo_server.requests() == []
    assert not (ckpt(torch_home) / zoo.ZooLRASPP_Weights.VOC5_V1.url.rsplit("/", 1)[1]).exists()


def test_fetch_json_and_with_backbones(zoo, zoo_server, torch_home, cli):
    result = cli("fetch", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "--no-upstream", "--json",
                 "--with-backbones", "zoo_ssdlite320")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert [d["weights"] for d in data] == ["ZooSSDLite320_Weights.COCO5_V1",
                                            "ZooMobileNetV3Large_Weights.IMAGENET10_V1"]
    assert all(d["status"] == "downloaded" and Path(d["path"]).is_file() for d in data)


# -- cache ls / verify / prune / rm ---------------------------------------------------------------

def test_cache_commands(mirror_server, tmp_path, torch_home, cli):
    refs = synth_refs(mirror_server.root, count=3, size=200_000)
    cache.fetch(refs=refs, mirrors=[mirror_server.url], upstream=False)
    folder = ckpt(torch_home)
    # a stray file, a partial of a dead process, a torch.hub temp file
    (folder / "notes.txt").write_text("hello")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    part = folder / f"{refs[0].filename}.{cache._HOST}.{dead.pid}.abcd1234{cache.PART_SUFFIX}"
    part.write_bytes(b"x" * 1000)
    live_part = folder / f"{refs[0].filename}.{cache._HOST}.{os.getppid()}.abcd1235{cache.PART_SUFFIX}"
    live_part.write_bytes(b"y" * 10)
    # one file rots in place
    rotten = folder / refs[1].filename
    data = bytearray(rotten.read_bytes())
    data[100] ^= 1
    rotten.write_bytes(bytes(data))

    result = cli("cache", "ls", "--json", "--no-registry")
    info = json.loads(result.output)
    status = {f["file"]: f["status"] for f in info["files"]}
    assert status[refs[0].filename] == "verified" and status[refs[2].filename] == "verified"
    assert status[refs[1].filename] == "unverified"
    assert status["notes.txt"] == "unknown" and status[part.name] == "partial"
    weights = {f["file"]: f["weights"] for f in info["files"]}
    assert weights[refs[0].filename] == [refs[0].name]
    assert info["total_size"] == sum(p.stat().st_size for p in folder.iterdir())
    table = cli("cache", "ls", "--no-registry").output
    assert refs[0].filename in table and "partial" in table and "files," in table

    result = cli("cache", "verify")
    assert result.exit_code == 1
    assert f"BAD  {refs[1].filename}" in result.output and f"ok   {refs[0].filename}" in result.output
    status = {f["file"]: f["status"] for f in json.loads(cli("cache", "ls", "--json", "--no-registry").output)["files"]}
    assert status[refs[1].filename] == "corrupt"
    assert cli("cache", "verify", refs[0].filename, refs[2].filename).exit_code == 0

    dry = json.loads(cli("cache", "prune", "--dry-run", "--json").output)
    assert part.exists() and str(part) in [r["path"] for r in dry["removed"]]
    assert str(live_part) not in [r["path"] for r in dry["removed"]]  # its owner (our parent) is alive
    result = cli("cache", "prune")
    assert result.exit_code == 0 and "freed" in result.output and not part.exists() and live_part.exists()
    assert dry["bytes"] >= 1000

    result = cli("cache", "rm", refs[1].filename)
    assert result.exit_code == 0 and not rotten.exists()
    assert refs[1].filename not in json.loads((torch_home / "hub/tvpack/index.json").read_text())["files"]
    # fetch repairs what rm removed
    cache.fetch(refs=refs, mirrors=[mirror_server.url], upstream=False)
    assert hashlib.sha256(rotten.read_bytes()).hexdigest() == refs[1].sha256


def test_cache_rm_and_verify_by_selector_and_deep(zoo, zoo_server, torch_home, cli):
    cli("fetch", "--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "-q", "zoo_raft_small", "zoo_shufflenet_v2")
    result = cli("cache", "verify", "--deep", "--registry", ZOO_REGISTRY, "zoo_raft_small")
    assert result.exit_code == 0 and "1 file," in result.output
    result = cli("cache", "ls", "--registry", ZOO_REGISTRY)
    assert "ZooRaftSmall_Weights.THINGS_V1" in result.output
    result = cli("cache", "rm", "--registry", ZOO_REGISTRY, "--dry-run", "zoo_raft_small")
    assert "would remove" in result.output
    assert cli("cache", "rm", "--registry", ZOO_REGISTRY, "zoo_raft_small").exit_code == 0
    names = [p.name for p in ckpt(torch_home).iterdir()]
    assert names == [zoo.ZooShuffleNetV2_Weights.IMAGENET10_V1.url.rsplit("/", 1)[1]]
    # --deep catches bytes that hash correctly by name but are no checkpoint at all
    junk = os.urandom(5000)
    name = f"junk-{hashlib.sha256(junk).hexdigest()[:8]}.pth"
    (ckpt(torch_home) / name).write_bytes(junk)
    assert cli("cache", "verify", name).exit_code == 0
    result = cli("cache", "verify", "--deep", name)
    assert result.exit_code == 1 and "torch.load(weights_only=True) failed" in result.output


def test_fetch_lock_does_not_import_torch(mirror_server, tmp_path, torch_home):
    lock = dump_lockfile(synth_refs(mirror_server.root, count=2, size=1000), tmp_path / "tvpack.lock")
    code = textwrap.dedent(f"""
        import sys
        from packager.cli import main
        try:
            main(["fetch", "--lock", {str(lock)!r}, "--mirror", {mirror_server.url!r}, "-q"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        assert "torch" not in sys.modules and "torchvision" not in sys.modules, "torch was imported"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(torch_home)})
    assert proc.returncode == 0, proc.stderr
    assert len(list(ckpt(torch_home).glob("*.pth"))) == 2
    assert read_lockfile(lock)[0].sha256


def test_disk_full_is_one_clear_line_and_leaves_nothing(mirror_server, tmp_path, tiny_disk, cli):
    refs = synth_refs(mirror_server.root, count=2, size=1_500_000)
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
    result = cli("fetch", "--lock", lock, "--torch-home", tiny_disk / "home", "--mirror", mirror_server.url,
                 "--no-upstream", "--jobs", "2", "-q")
    assert result.exit_code == 1
    assert "disk full" in result.output or "not enough disk space" in result.output
    folder = tiny_disk / "home" / "hub" / "checkpoints"
    for ref in refs:  # whatever landed is whole; nothing half-written at a final name or left as a part
        path = folder / ref.filename
        assert not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256
    assert not list(folder.glob("*" + cache.PART_SUFFIX))
    # too large for the disk from the start: refused before any byte is written
    (big,) = synth_refs(mirror_server.root, count=1, size=3_000_000, stem="big")
    with pytest.raises(CacheError, match="not enough disk space"):
        cache.fetch(refs=[unpinned(big)], torch_home=tiny_disk / "home2", mirrors=[mirror_server.url],
                    upstream=False)


def test_mirror_from_the_environment_and_manifest_pins(mirror_server, torch_home, cli, monkeypatch):
    refs = synth_refs(mirror_server.root, count=2, size=50_000)
    lock = dump_lockfile(refs, torch_home / "tvpack.lock")
    monkeypatch.setenv("TVPACK_MIRROR", f"http://127.0.0.1:1,{mirror_server.url}")  # the first one is down
    result = cli("fetch", "--lock", lock, "--no-upstream", "--retries", "0", "--json")
    assert result.exit_code == 0, result.output
    assert all(d["source"].startswith(mirror_server.url) for d in json.loads(result.output))
    # an installed bundle manifest names the weights and pins a sha256 (here: a different one)
    # (a valid manifest: installed state is read through parse_manifest only)
    from packager.formats.manifest import encode_manifest, manifest_path_for

    def item(enum, ref, sha):
        return {"name": f"{enum}.V1", "enum": enum, "member": "V1", "module": "synth", "models": [], "builders": [],
                "family": "", "url": ref.url, "path": f"hub/checkpoints/{ref.filename}", "size": ref.size_hint,
                "sha256": sha, "transforms": {}, "meta": {}}

    # a file whose name promises no hash (a manifest pinning another sha256 than its name's is refused as a whole)
    other = WeightsRef(enum="Other_Weights", member="V1", url="https://example.invalid/other.pth", size_hint=1000)
    (ckpt(torch_home) / "other.pth").write_bytes(b"x" * 1000)
    cache.file_sha256(ckpt(torch_home) / "other.pth")  # hashed and recorded: the index vouches for what it is
    data = encode_manifest({"format": "tvpack-bundle", "format_version": 1, "created_by": {}, "members": {},
                            "weights": [item("Bundled_Weights", refs[0], refs[0].sha256),
                                        item("Other_Weights", other, "0" * 64)]})
    (torch_home / manifest_path_for(data)).parent.mkdir(parents=True)
    (torch_home / manifest_path_for(data)).write_bytes(data)
    files = {f["file"]: f for f in json.loads(cli("cache", "ls", "--json", "--no-registry").output)["files"]}
    assert files[refs[0].filename]["status"] == "verified"
    assert set(files[refs[0].filename]["weights"]) == {refs[0].name, "Bundled_Weights.V1"}
    assert files["other.pth"]["status"] == "corrupt" and files["other.pth"]["expected"] == "0" * 64
    result = cli("cache", "verify", "other.pth")
    assert result.exit_code == 1 and "differs from the manifest" in result.output


def test_cache_rm_and_verify_of_a_file_name_not_cached_says_so(torch_home, cli):
    """A file name that is not in checkpoints/ is reported as such, not parsed as an enum name."""
    for command in ("rm", "verify"):
        result = cli("cache", command, "resnet50-00000000.pth")
        assert result.exit_code == 1
        assert result.output.startswith("tvpack: error: not in the cache: resnet50-00000000.pth (no such file in ")
        assert "enum" not in result.output


def test_prune_removes_install_temp_files_of_a_killed_process(torch_home, cli):
    """A SIGTERM'd `tvpack install` leaves .<file>.<pid>.<hex>.tvpack-install files that prune used
    to skip forever; a live process's fresh temp file is still left alone."""
    ckpt_dir = torch_home / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = ckpt_dir / f".resnet50-11ad3fa6.pth.{dead.pid}.0a1b2c3d.tvpack-install"
    orphan.write_bytes(b"x" * 100)
    old = time.time() - 120
    os.utime(orphan, (old, old))
    live = ckpt_dir / f".resnet18-f37072fd.pth.{os.getpid()}.deadbeef.tvpack-install"
    live.write_bytes(b"y")
    result = cli("cache", "prune", "--json")
    assert result.exit_code == 0
    assert orphan.name in result.output and not orphan.exists()
    assert live.exists()


def test_damaged_index_and_manifest_entries_are_ignored_not_a_crash(torch_home, cli):
    """Hand-edited or damaged JSON of the right outer shape used to end in 'unexpected TypeError /
    AttributeError (this is a bug)' in `cache ls` and `cache verify`."""
    data = b"not really a checkpoint"
    name = f"thing-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    hub = torch_home / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / name).write_bytes(data)
    (hub / "tvpack" / "manifests").mkdir(parents=True)
    (hub / "tvpack" / "index.json").write_text(json.dumps({"files": {name: 5}}))
    (hub / "tvpack" / "manifests" / "0123456789abcdef.json").write_text(
        json.dumps({"format": "tvpack-bundle", "weights": 5}))
    (hub / "tvpack" / "manifests" / "fedcba9876543210.json").write_text(
        json.dumps({"format": "tvpack-bundle", "weights": [{"path": 5}]}))
    for args in (("cache", "ls", "--no-registry"), ("cache", "verify")):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert name in result.output and "bug" not in result.output


# -- mirrors in order ------------------------------------------------------------------------------

def test_an_s3_mirror_without_credentials_falls_through_to_a_directory_mirror(tmp_path, torch_home, cli, monkeypatch,
                                                                             no_creds):
    """``--mirror s3://... --mirror DIR`` with no S3 credentials at all: the directory serves every file."""
    from servers import MotoS3

    from tests.conftest import need_server

    server = need_server(MotoS3).start()
    try:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {"AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(name, value)
        refs = synth_refs(tmp_path / "dir-mirror", count=2, size=10_000)
        lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
        result = cli("fetch", "--lock", lock, "--mirror", "s3://models/torchvision", "--mirror", tmp_path / "dir-mirror",
                     "--no-upstream", "--json")
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    fetched = json.loads(result.output)
    assert [d["status"] for d in fetched] == ["downloaded", "downloaded"]
    assert all("dir-mirror" in d["source"] for d in fetched)
    assert [hashlib.sha256((ckpt(torch_home) / r.filename).read_bytes()).hexdigest() for r in refs] == \
        [r.sha256 for r in refs]


def test_prune_tells_the_lock_file_of_a_finished_run_from_a_stale_one(mirror_server, torch_home, tmp_path, cli):
    refs = synth_refs(mirror_server.root, count=2, size=1000)
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
    assert cli("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", "-q").exit_code == 0
    locks = torch_home / "hub" / "tvpack" / "locks"
    finished = sorted(locks.glob("*.lock"))
    assert finished  # a clean fetch leaves its free lock files, for the next run to reuse
    dry = json.loads(cli("cache", "prune", "--dry-run", "--json").output)
    assert dry["removed"] == []
    # a run killed while holding a lock leaves its note in the lock file
    victim = locks / f"{refs[0].filename}.lock"
    code = f"from packager.locking import FileLock; import os; FileLock({str(victim)!r}).acquire(); os._exit(0)"
    dead = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert dead.returncode == 0 and victim.stat().st_size > 0
    dry = json.loads(cli("cache", "prune", "--dry-run", "--json").output)
    assert [(r["path"], r["reason"].split(":")[0]) for r in dry["removed"]] == [(str(victim), "stale lock file")]
    assert "died holding it" in dry["removed"][0]["reason"]
    result = cli("cache", "prune")
    assert result.exit_code == 0 and "stale lock file" in result.output
    assert sorted(locks.glob("*.lock")) == [p for p in finished if p != victim]


def test_a_fetch_that_failed_in_this_process_is_resumed_by_the_next_one_in_it(mirror_server, torch_home):
    """No process-wide record of released parts: the file's lock and the part's own flock say it is free."""
    (ref,) = synth_refs(mirror_server.root, count=1, size=2 * MiB)
    mirror_server.add_fault("truncate", at=MiB)
    with pytest.raises(DownloadError):
        cache.fetch(refs=[ref], torch_home=torch_home, mirrors=[mirror_server.url], upstream=False,
                    policy=Policy(retries=0))
    (part,) = [p for p in ckpt(torch_home).iterdir() if p.name.endswith(".tvpack-part")]
    assert part.stat().st_size == MiB
    mirror_server.clear_faults()
    (result,) = cache.fetch_results(refs=[ref], torch_home=torch_home, mirrors=[mirror_server.url], upstream=False)
    assert result.status == "downloaded" and result.resumed_from == MiB
    assert sorted(p.name for p in ckpt(torch_home).iterdir()) == [ref.filename]
