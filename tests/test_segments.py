"""Segmented downloads (packager/transport/engine.py, transport/segments.py): a large object as ranges over
several connections, written into the one part file, resumed per range; against the loopback fault server
(packager/testing/server.py), real nginx, moto's S3 and the distribution registry, through the library and the
real CLI."""
from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import need_server, synth_refs, tvpack_command, tvpack_env, wait_for

from packager import cache
from packager.formats.lockfile import dump_lockfile
from packager.testing.server import MirrorServer
from packager.transport import Cancel, Cancelled, Connections, Policy, Verifier, fetch, source_of
from packager.transport.stream import read_state

KiB, MiB = 1 << 10, 1 << 20
SEG = 256 * KiB
SEGMENTED = Policy(connect_timeout=5, read_timeout=30, retries=3, backoff=0.01, max_backoff=0.05, chunk_size=64 * KiB,
                   connections=4, segment_size=SEG, segment_threshold=1 * MiB)


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def verifier_for(data: bytes) -> Verifier:
    return Verifier("blob", sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def serve(root: Path, data: bytes, name: str = "blob") -> str:
    (root / name).write_bytes(data)
    return "/" + name


def ranges_asked(server: MirrorServer, path: str) -> list[str | None]:
    server.settle()
    return [r.range for r in server.transfers(path)]


# -- the loopback fault server ---------------------------------------------------------------------------

def test_ranges_over_several_connections_are_reassembled_byte_exact(tmp_path):
    data = data_of(3 * MiB + 12345)
    notices: list[str] = []
    with MirrorServer(tmp_path / "root") as server:
        path = serve(server.root, data)
        part = tmp_path / "blob.part"
        result = fetch(source_of(server.url + path), part, verifier_for(data), SEGMENTED, notify=notices.append)
        asked = ranges_asked(server, path)
    assert part.read_bytes() == data and result.sha256 == hashlib.sha256(data).hexdigest() and not notices
    ranged = [r for r in asked if r is not None]
    starts = sorted(int(r[6:].split("-")[0]) for r in ranged)
    assert asked[0] is None and len(ranged) >= 3  # the first answer tells the size; the rest come in ranges
    assert len(starts) == len(set(starts))  # no range fetched twice
    assert all(start % SEG == 0 for start in starts) and starts[-1] == (len(data) - 1) // SEG * SEG
    assert not Path(str(part) + ".json").exists() or "ranges" in read_state(part)


def test_a_small_file_and_one_connection_stay_one_stream(tmp_path):
    data = data_of(3 * MiB)
    with MirrorServer(tmp_path / "root") as server:
        path = serve(server.root, data)
        for policy in (Policy(**{**SEGMENTED.__dict__, "segment_threshold": 4 * MiB}),
                       Policy(**{**SEGMENTED.__dict__, "connections": 1})):
            server.clear_log()
            part = tmp_path / "blob.part"
            fetch(source_of(server.url + path), part, verifier_for(data), policy)
            assert part.read_bytes() == data and ranges_asked(server, path) == [None]
            part.unlink()


def test_a_server_that_ignores_range_gets_one_stream_and_one_notice(tmp_path):
    data = data_of(2 * MiB + 7)
    notices: list[str] = []
    with MirrorServer(tmp_path / "root") as server:
        path = serve(server.root, data)
        server.ignore_ranges = True
        part = tmp_path / "blob.part"
        result = fetch(source_of(server.url + path), part, verifier_for(data), SEGMENTED, notify=notices.append)
        server.settle()
        statuses = {r.status for r in server.transfers(path)}
    assert part.read_bytes() == data and result.size == len(data)
    assert statuses == {200}
    assert len(notices) == 1 and "ignores Range" in notices[0] and "one connection" in notices[0]


def test_a_file_that_changes_between_ranges_is_fetched_again_and_said_so(tmp_path):
    old, new = data_of(2 * MiB, seed=2), data_of(2 * MiB, seed=3)
    notices: list[str] = []
    with MirrorServer(tmp_path / "root") as server:
        path = serve(server.root, old)
        server.add_fault("replace", path=path, times=1, data=new, range_from=1)  # the first ranged request
        part = tmp_path / "blob.part"
        result = fetch(source_of(server.url + path), part, verifier_for(new), SEGMENTED, notify=notices.append)
        asked = ranges_asked(server, path)
    assert part.read_bytes() == new and result.sha256 == hashlib.sha256(new).hexdigest()
    assert len(notices) == 1 and "changed on the server" in notices[0] and "starting over" in notices[0]
    assert asked.count(None) == 2  # the first answer, and the first answer again after the change


def test_a_range_that_fails_is_retried_alone_from_where_it_stopped(tmp_path):
    data = data_of(2 * MiB)
    notices: list[str] = []
    with MirrorServer(tmp_path / "root") as server:
        path = serve(server.root, data)
        server.add_fault("truncate", path=path, times=1, at=1000, range_from=3 * SEG)
        server.add_fault("status", path=path, times=1, status=503, retry_after=0, range_from=5 * SEG)
        part = tmp_path / "blob.part"
        result = fetch(source_of(server.url + path), part, verifier_for(data), SEGMENTED, notify=notices.append)
        server.settle()
        records = server.transfers(path)
        failed = [r for r in server.requests(path) if r.fault]
    assert part.read_bytes() == data and result.size == len(data)
    assert [r.fault for r in failed] == ["truncate", "status"]
    reset = failed[0]
    starts = [r.start for r in records]
    again = [r for r in records if reset.start < r.start < reset.start + SEG]
    assert len(again) == 1 and again[0].start >= reset.start + reset.bytes_sent  # only what was missing
    assert starts.count(reset.start) == 1 and len(starts) == len(set(starts))
    assert len(notices) == 2 and all("retrying" in n for n in notices)


def test_a_cancelled_fetch_keeps_its_ranges_and_resumes_only_the_missing_ones(tmp_path):
    data = data_of(2 * MiB)
    cancel = Cancel()
    with MirrorServer(tmp_path / "root") as server:
        path = serve(server.root, data)
        server.add_fault("hold", path=path, range_from=4 * SEG)  # the second half waits for release()
        server.add_fault("hold", path=path, at=4 * SEG)  # and so does a body from byte 0 that runs on
        part = tmp_path / "blob.part"
        done = []

        def on_bytes(n: int) -> None:
            done.append(n)
            if sum(done) >= 4 * SEG:
                cancel.cancel()
        with pytest.raises(Cancelled):
            fetch(source_of(server.url + path), part, verifier_for(data), SEGMENTED, cancel=cancel,
                  on_bytes=on_bytes)
        kept = read_state(part)["ranges"]
        assert kept == [[0, 4 * SEG]]
        server.clear_faults()
        server.release()
        server.settle()
        server.clear_log()
        result = fetch(source_of(server.url + path), part, verifier_for(data), SEGMENTED)
        server.settle()
        records = server.transfers(path)
    assert part.read_bytes() == data and result.resumed_from == 4 * SEG
    assert sum(r.bytes_sent for r in records) == len(data) - 4 * SEG and min(r.start for r in records) == 4 * SEG


def test_the_run_bounds_the_connections_of_its_files(tmp_path):
    import threading

    data = [data_of(2 * MiB, seed=5), data_of(2 * MiB, seed=6)]
    with MirrorServer(tmp_path / "root") as server:
        paths = [serve(server.root, d, f"blob{i}") for i, d in enumerate(data)]
        server.add_fault("hold", range_from=1)  # every range waits at its first byte,
        server.add_fault("hold", at=SEG)  # and a body from byte 0 after its first range
        connections = Connections(1)  # the run's: one beyond each file's own
        errors = []

        def one(i: int) -> None:
            try:
                fetch(source_of(server.url + paths[i]), tmp_path / f"{i}.part", verifier_for(data[i]), SEGMENTED,
                      connections=connections)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        workers = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for worker in workers:
            worker.start()
        # every connection now waits on the server: each file's own, and the one extra connection
        settled = server.wait_for(lambda s: s.active == 3 and any(r.range is None for r in s.requests()), timeout=120)
        held = server.active
        server.clear_faults()
        server.release()
        for worker in workers:
            worker.join()
    assert settled and held == 3
    assert not errors and [(tmp_path / f"{i}.part").read_bytes() for i in range(2)] == data


# -- the real CLI: kill -9 and Ctrl-C ----------------------------------------------------------------------

CLI_SEGMENTS = ["--connections", "4", "--segment-size", "1M", "--segment-threshold", "1M", "--speed-limit", "0",
                "--read-timeout", "600"]


def _part_state(folder: Path) -> dict:
    states = list(folder.glob("*" + cache.PART_SUFFIX + ".json")) if folder.exists() else []
    try:
        return json.loads(states[0].read_text()) if states else {}
    except ValueError:  # being replaced: read it again
        return {}


def _killed_while_recording(folder, pid: int) -> None:
    """What a SIGKILL during a write of the part's record of ranges leaves (the kill may land there, or not: the
    tests make sure it did): the record's temp file, named for the killed process."""
    (part,) = [p for p in folder.iterdir() if p.name.endswith(cache.PART_SUFFIX)]
    (folder / f".{part.name}.json.{pid}.0123abcd.tmp").write_text('{"ranges": [[0, ')


def test_kill_9_mid_way_then_the_next_run_fetches_only_the_missing_ranges(mirror_server, tmp_path, torch_home):
    (ref,) = synth_refs(mirror_server.root, count=1, size=8 * MiB)
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    path = f"/models/synth/{ref.filename}"
    folder = torch_home / "hub" / "checkpoints"
    mirror_server.add_fault("hold", path=path, range_from=4 * MiB)  # the server stops sending at 4 MiB:
    mirror_server.add_fault("hold", path=path, at=4 * MiB)  # ranges from there on, and a body that runs on
    cmd = tvpack_command("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", *CLI_SEGMENTS)
    env = tvpack_env(TORCH_HOME=torch_home)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _part_state(folder).get("ranges") == [[0, 4 * MiB]], what="the first 4 MiB recorded")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _killed_while_recording(folder, proc.pid)
    mirror_server.clear_faults()
    mirror_server.release()
    mirror_server.settle()
    mirror_server.clear_log()
    listed = subprocess.run(tvpack_command("cache", "ls", "--no-registry"), env=env, capture_output=True, text=True)
    assert cache.PART_SUFFIX in listed.stdout or "partial" in listed.stdout, listed.stdout
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    mirror_server.settle()
    records = mirror_server.transfers(path)
    assert hashlib.sha256((folder / ref.filename).read_bytes()).hexdigest() == ref.sha256
    assert sum(r.bytes_sent for r in records) == ref.size_hint - 4 * MiB  # counted by the server
    assert min(r.start for r in records) == 4 * MiB and all(r.status == 206 for r in records)
    assert "resumed at 4.2 MB" in done.stdout and "4.2 MB transferred" in done.stdout  # 4 MiB: what was missing
    assert sorted(p.name for p in folder.iterdir()) == [ref.filename]


def test_cache_prune_removes_an_abandoned_part_and_its_record_of_ranges(mirror_server, tmp_path, torch_home):
    (ref,) = synth_refs(mirror_server.root, count=1, size=4 * MiB)
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    path = f"/models/synth/{ref.filename}"
    folder = torch_home / "hub" / "checkpoints"
    mirror_server.add_fault("hold", path=path, range_from=2 * MiB)
    mirror_server.add_fault("hold", path=path, at=2 * MiB)
    env = tvpack_env(TORCH_HOME=torch_home)
    cmd = tvpack_command("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", *CLI_SEGMENTS)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _part_state(folder).get("ranges") == [[0, 2 * MiB]], what="the first 2 MiB recorded")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _killed_while_recording(folder, proc.pid)
    mirror_server.release()
    assert any(p.name.endswith(cache.PART_SUFFIX) for p in folder.iterdir())
    pruned = subprocess.run(tvpack_command("cache", "prune"), env=env, capture_output=True, text=True)
    assert pruned.returncode == 0, pruned.stderr
    assert [p.name for p in folder.iterdir()] == []  # the part and its record of ranges


def test_ctrl_c_stops_every_connection(mirror_server, tmp_path, torch_home):
    (ref,) = synth_refs(mirror_server.root, count=1, size=8 * MiB)
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    path = f"/models/synth/{ref.filename}"
    folder = torch_home / "hub" / "checkpoints"
    mirror_server.add_fault("slow", path=path, rate=64 * KiB)
    cmd = tvpack_command("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream", *CLI_SEGMENTS)
    proc = subprocess.Popen(cmd, env=tvpack_env(TORCH_HOME=torch_home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert mirror_server.wait_for(lambda s: s.active >= 4, timeout=180), "four connections never opened"
        proc.send_signal(signal.SIGINT)
        # every connection closed by the client: the server sees no request in flight (a generous bound on a hang)
        assert mirror_server.wait_for(lambda s: s.active == 0, timeout=60)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "Traceback" not in stderr
    assert _part_state(folder).get("ranges") is not None  # kept for the next run


# -- real servers: nginx, S3 (moto), the distribution registry ------------------------------------------

def test_nginx_serves_the_ranges(tmp_path):
    from servers import Nginx

    data = data_of(3 * MiB)
    root = tmp_path / "www"
    root.mkdir()
    serve(root, data)
    with need_server(Nginx, root, tmp_path / "nginx") as nginx:
        part = tmp_path / "blob.part"
        fetch(source_of(nginx.url + "/blob"), part, verifier_for(data), SEGMENTED)
        lines = wait_for(lambda: [r for r in nginx.requests() if r[1] == "/blob"] or None, what="nginx's log")
        lines = nginx.requests()
    assert part.read_bytes() == data
    statuses = [status for _m, p, status, _n in lines if p == "/blob"]
    assert statuses[0] == 200 and statuses.count(206) >= 3


def test_s3_objects_come_in_ranged_gets(tmp_path, monkeypatch):
    from servers import MotoS3

    from packager.transport.s3 import S3Source

    data = data_of(2 * MiB + 99)
    with need_server(MotoS3) as moto:
        for key, value in moto.env().items():
            monkeypatch.setenv(key, value)
        s3 = moto.client()
        s3.create_bucket(Bucket="weights")
        s3.put_object(Bucket="weights", Key="models/blob", Body=data)
        ends = []

        class Counted(S3Source):  # the real source; only the ranges it is asked for are noted
            def open(self, offset, validator, timeout, end=None):
                ends.append((offset, end))
                return super().open(offset, validator, timeout, end=end)

        part = tmp_path / "blob.part"
        result = fetch(Counted("s3://weights/models/blob", SEGMENTED, moto.endpoint), part, verifier_for(data),
                       SEGMENTED)
    assert part.read_bytes() == data and result.size == len(data)
    assert ends[0] == (0, None) and len(ends) >= 3
    assert all(start % SEG == 0 and end == min(start + SEG, len(data)) for start, end in ends[1:])


def test_oci_blobs_come_in_ranges_from_the_registry(registry, tmp_path):
    from registry_server import sha256_digest

    from packager.transport.oci import Policy as ClientPolicy
    from packager.transport.oci import RegistryClient

    data = data_of(3 * MiB)
    digest = sha256_digest(data)
    policy = ClientPolicy(retries=2, connections=4, segment_size=SEG, segment_threshold=1 * MiB)
    client = RegistryClient(registry.host, plain_http=True, policy=policy)
    client.push_blob("models/x", data, size=len(data), digest=digest)
    dest = tmp_path / "blob.tar"
    assert client.pull_blob("models/x", digest, dest, size=len(data)) == len(data)
    assert dest.read_bytes() == data
    gets = [r for r in registry.requests() if r[0] == "GET" and digest in r[1]]
    assert len(gets) >= 3 and {r[2] for r in gets} <= {200, 206} and 206 in {r[2] for r in gets}


def _blob_statuses(registry, since: int, until: int | None = None) -> dict[str, list[int]]:
    """Status codes of the blob GETs from request ``since`` to ``until``, per blob."""
    out: dict[str, list[int]] = {}
    for method, path, status, _ in registry.requests()[since:until]:
        if method == "GET" and "/blobs/sha256:" in path:
            out.setdefault(path.rsplit("/", 1)[-1], []).append(status)
    return out


@pytest.mark.parametrize("fmt", ["image", "modelpack"])
def test_install_and_pull_from_a_registry_fetch_big_layers_in_ranges(registry, zoo_root, tmp_path, monkeypatch, fmt):
    import importlib

    from conftest import ZOO_REGISTRY, run_tvpack

    bundle = importlib.import_module("packager.bundle").bundle
    monkeypatch.setenv("TVPACK_ZOO_DIR", str(zoo_root))
    made = bundle(["zoo_shufflenet_v2", "zoo_mobilenet_v3_small"], tmp_path / "b.tvpack", registry=[ZOO_REGISTRY],
                  torch_home=tmp_path / "src", mirrors=[str(zoo_root)], upstream=False)
    ref = f"oci://{registry.host}/models/seg:{fmt}"
    pushed = run_tvpack("push", made, ref, "--plain-http", "--format", fmt, "-q")
    assert pushed.returncode == 0, pushed.stderr
    ranges = ["--connections", "4", "--segment-size", "1M", "--segment-threshold", "2M"]
    before = len(registry.requests())
    home = tmp_path / "site"
    installed = run_tvpack("install", ref, "--plain-http", "--jobs", "2", *ranges, "--torch-home", home)
    assert installed.returncode == 0, installed.stderr
    placed = sorted((home / "hub" / "checkpoints").glob("*.pth"))
    assert len(placed) == 2
    for path in placed:
        assert path.read_bytes() == (zoo_root / "models" / "tvpack-zoo" / path.name).read_bytes()
    before_pull = len(registry.requests())
    pulled = run_tvpack("pull", ref, "-o", tmp_path / "pulled.tvpack", "--plain-http", *ranges)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pulled.tvpack").read_bytes() == made.read_bytes()
    # the 6 MB layer in ranges (install: after a first answer that tells the size; pull knows it from the
    # manifest), the 1.5 MB one and the small blobs whole
    for since, until, first in ((before, before_pull, [200]), (before_pull, None, [])):
        by_blob = _blob_statuses(registry, since, until)
        big = [statuses for statuses in by_blob.values() if 206 in statuses]
        assert len(big) == 1 and len(big[0]) >= 4  # (logged as each request ends)
        assert sorted(big[0]) == first + [206] * (len(big[0]) - len(first))
        assert all(statuses == [200] for statuses in by_blob.values() if 206 not in statuses)
