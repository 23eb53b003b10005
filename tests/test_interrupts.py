"""Stopping and waiting, with real processes: Ctrl-C / SIGTERM stop a parallel fetch at once (parts
kept for a resume, no temp files), and a fetch waiting for another's lock says who holds it and
gives up after --lock-timeout / TVPACK_LOCK_TIMEOUT (fetch, lock, bundle, mirror)."""
from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from packager.formats.lockfile import dump_lockfile
from tests.conftest import ZOO_REGISTRY, run_tvpack, synth_refs, tvpack_command, tvpack_env, wait_for

MB = 1_000_000
PATIENT = ("--read-timeout", "3600", "--speed-limit", "0")  # no client timer fires while a test holds a stall


def _parts(home, minimum: int = 1) -> list:
    folder = home / "hub" / "checkpoints"
    if not folder.is_dir():
        return []
    return [p for p in folder.glob("*.tvpack-part") if p.stat().st_size >= minimum]


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                    (signal.SIGTERM, 143, "terminated")])
def test_a_signal_stops_a_parallel_fetch_at_once_and_keeps_the_parts(mirror_server, tmp_path, sig, code, word):
    refs = synth_refs(mirror_server.root, count=2, size=3 * MB)
    lock = dump_lockfile(refs, tmp_path / "tvpack.lock")
    home = tmp_path / "home"
    mirror_server.add_fault("stall", at=MB, seconds=600)  # both transfers hang mid-body, far longer than any stop
    proc = subprocess.Popen(tvpack_command("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream",
                                           "-j", "2", *PATIENT),
                            env=tvpack_env(TORCH_HOME=home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(_parts(home, MB // 2)) == 2, what="two part files with bytes")
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=300)  # bounds a hang only
        # "at once": it stopped while both stalled answers were still being sent (the server logs a request when
        # its answer ends), not by waiting them out or for a read timeout
        stalled = [r for r in mirror_server.requests() if r.fault == "stall"]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code, err
    assert stalled == [], stalled
    assert err == f"tvpack: {word}\n"
    kept = _parts(home)
    assert sorted(p.stat().st_size for p in kept) == [MB, MB]  # every byte received is kept, to resume from
    assert not [p for p in home.rglob("*") if p.name.endswith(".tmp")]  # no temp files left behind

    mirror_server.clear_faults()
    mirror_server.clear_log()
    proc = run_tvpack("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream",
                      env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("resumed at") == 2
    # (not settle(): the stalled handlers of the first run are still asleep) each file resumed where it stopped
    resumed = wait_for(lambda: [r for r in mirror_server.transfers() if r.complete] if
                       len([r for r in mirror_server.transfers() if r.complete]) == 2 else None, what="the log")
    assert [r.range for r in resumed] == [f"bytes={MB}-"] * 2


def _holder_is_running(mirror_server, tmp_path, ref_path, command):
    """Start ``command`` (a fetch of a file whose transfer stalls) and wait until it holds the lock."""
    home = tmp_path / "home"
    mirror_server.add_fault("stall", path=ref_path, at=MB, seconds=600)
    proc = subprocess.Popen(command, env=tvpack_env(TORCH_HOME=home), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _parts(home, MB // 2), what="the holder's part file")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.send_signal(signal.SIGSTOP)  # Ctrl-Z: it holds the lock and does nothing, however long the test takes
    return proc, home


def _check_waited_and_gave_up(proc, holder, filename: str, seconds: str) -> None:
    """It said who holds the lock, then gave up after ``seconds`` (the message says so; the process ended: the
    subprocess timeout bounds a hang, no wall-clock figure is asserted)."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"tvpack: waiting for {filename}: held by pid {holder.pid} on {socket.gethostname()}"
                               " since "), lines[0]
    assert "(tvpack fetch " in lines[0]
    assert lines[1].startswith(f"tvpack: error: gave up after {seconds}s waiting for the lock on {filename}: "
                               f"held by pid {holder.pid}"), lines[1]


def test_a_fetch_waiting_for_a_lock_names_the_holder_and_gives_up_after_the_timeout(mirror_server, tmp_path):
    (ref,) = synth_refs(mirror_server.root, count=1, size=3 * MB)
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    fetch = ["fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream"]
    holder, home = _holder_is_running(mirror_server, tmp_path, f"/models/synth/{ref.filename}",
                                      tvpack_command(*fetch))
    try:
        proc = run_tvpack(*fetch, "--lock-timeout", "1", env={"TORCH_HOME": str(home)})
        _check_waited_and_gave_up(proc, holder, ref.filename, "1")
        proc = run_tvpack(*fetch, env={"TORCH_HOME": str(home), "TVPACK_LOCK_TIMEOUT": "0.5"})
        _check_waited_and_gave_up(proc, holder, ref.filename, "0.5")
        proc = run_tvpack(*fetch, env={"TORCH_HOME": str(home), "TVPACK_LOCK_TIMEOUT": "soon"})
        assert proc.returncode == 2 and "TVPACK_LOCK_TIMEOUT must be a number of seconds" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock went with it and its part is resumed
    mirror_server.clear_faults()
    proc = run_tvpack(*fetch, "--lock-timeout", "5", env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0 and "resumed at" in proc.stdout, proc.stderr


def test_lock_bundle_and_mirror_honour_the_lock_timeout(zoo, zoo_server, tmp_path):
    filename = zoo.ZooRaftSmall_Weights.THINGS_V1.url.rsplit("/", 1)[1]
    common = ["--registry", ZOO_REGISTRY, "--mirror", zoo_server.url, "--no-upstream"]
    holder, home = _holder_is_running(zoo_server, tmp_path, f"/models/tvpack-zoo/{filename}",
                                      tvpack_command("fetch", "zoo_raft_small", *common))
    try:
        for command in (["lock", "-o", tmp_path / "tvpack.lock"], ["bundle", "-o", tmp_path / "b.tvpack"],
                        ["mirror", "--to", tmp_path / "exported"]):
            proc = run_tvpack(*command, "zoo_raft_small", *common, "--lock-timeout", "1",
                              env={"TORCH_HOME": str(home)})
            _check_waited_and_gave_up(proc, holder, filename, "1")
    finally:
        holder.kill()
        holder.wait()
