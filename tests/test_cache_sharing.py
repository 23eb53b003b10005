"""Caches used by more than one party, for real: a read-only bind mount, a team's group-shared
directory used by two Unix users with different umasks, and a download running in another pid
namespace while ``cache prune`` runs (root only: mounts, users, namespaces; cleaned up after)."""
from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from packager import cache
from packager.formats.lockfile import dump_lockfile
from tests.conftest import ROOT, ZOO_REGISTRY, run_tvpack, synth_refs, tvpack_command, tvpack_env, wait_for

MB = 1_000_000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bind mounts, users, pid namespaces)")


def _checkpoints(home: Path) -> Path:
    return home / "hub" / "checkpoints"


# -- a read-only cache ------------------------------------------------------------------------------

def test_a_read_only_cache_serves_what_it_holds_and_refuses_only_writes(zoo, zoo_root, tmp_path):
    from packager import cache

    src = tmp_path / "src"
    names = ["zoo_raft_small", "zoo_shufflenet_v2"]
    out = tmp_path / "out"
    out.mkdir()
    pinned = cache.write_lockfile(names, out / "pinned.lock", registry=[ZOO_REGISTRY], torch_home=src,
                                  mirrors=[zoo_root], upstream=False)
    (src / "hub" / "tvpack" / "index.json").unlink()  # nothing verified on record: it must hash, and cannot record
    missing = dump_lockfile(synth_refs(tmp_path / "m", count=1, size=1000), out / "missing.lock")
    ro = tmp_path / "ro"
    ro.mkdir()

    def read_only(*args):
        """tvpack ARGS with TORCH_HOME a read-only bind mount of ``src`` (in a private mount namespace,
        so nothing is left mounted)."""
        script = 'mount --bind "$1" "$2" && mount -o remount,ro,bind "$2" && shift 2 && exec "$@"'
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", src, ro, *tvpack_command(*args)],
                              capture_output=True, text=True, env=tvpack_env(TORCH_HOME=ro), cwd=out, timeout=300)

    probe = read_only("cache", "ls", "--json", "--no-registry")
    if probe.returncode != 0 and "mount" in probe.stderr:
        pytest.skip(f"cannot bind-mount here: {probe.stderr.strip()}")
    before = sorted((str(p.relative_to(src)), p.stat().st_mtime_ns) for p in src.rglob("*"))
    proc = read_only("fetch", "--lock", pinned, "--mirror", zoo_root, "--no-upstream")
    assert proc.returncode == 0, proc.stderr
    assert "2 weights: 2 cached; 0 B transferred" in proc.stdout
    common = ["--registry", ZOO_REGISTRY, "--mirror", zoo_root, "--no-upstream"]
    proc = read_only("lock", *names, *common, "-o", out / "tvpack.lock")
    assert proc.returncode == 0, proc.stderr
    proc = read_only("bundle", *names, *common, "-o", out / "b.tvpack")
    assert proc.returncode == 0, proc.stderr
    assert sorted((str(p.relative_to(src)), p.stat().st_mtime_ns) for p in src.rglob("*")) == before
    # something that must be written: one line, saying why
    proc = read_only("fetch", "--lock", missing, "--mirror", tmp_path / "m", "--no-upstream")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "read-only file system" in proc.stderr, proc.stderr
    assert "cannot write to the cache" in proc.stderr


# -- a team's shared cache: two users -------------------------------------------------------------

def _run(*command):
    subprocess.run(list(map(str, command)), check=True, capture_output=True)


@contextmanager
def _team():
    """A group and two users in it (each with their own primary group, as useradd makes them)."""
    if not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("needs useradd and setpriv")
    tag = f"{os.getpid() % 100000}"
    team, users = f"tvteam{tag}", [f"tva{tag}", f"tvb{tag}"]
    _run("groupadd", team)
    made = []
    try:
        for user in users:
            _run("useradd", "--no-create-home", "--user-group", "--groups", team, "--shell", "/usr/sbin/nologin", user)
            made.append(user)
        yield team, users
    finally:
        for user in made:
            subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", team], capture_output=True)


@contextmanager
def _search_permission_lent(*paths):
    """``chmod o+x`` on every directory on the way to ``paths`` that lacks it (the Python here lives
    under /root), restored afterwards."""
    changed = []
    try:
        for path in paths:
            for directory in [Path(path).resolve(), *Path(path).resolve().parents]:
                if not directory.is_dir():
                    continue
                mode = stat.S_IMODE(directory.stat().st_mode)
                if not mode & stat.S_IXOTH and directory not in dict(changed):
                    os.chmod(directory, mode | stat.S_IXOTH)
                    changed.append((directory, mode))
        yield
    finally:
        for directory, mode in reversed(changed):
            os.chmod(directory, mode)


def test_a_group_shared_cache_stays_usable_by_every_member_whatever_their_umask(mirror_server):
    refs = synth_refs(mirror_server.root, count=4, size=3 * MB)
    with _team() as (team, (alice, bob)), \
            _search_permission_lent(sys.executable, os.path.realpath(sys.executable), sys.prefix, ROOT):
        base = Path(tempfile.mkdtemp(prefix="tvpack-team-", dir="/tmp"))
        try:
            os.chmod(base, 0o755)
            shared = base / "torch"  # the team's setup: chgrp TEAM DIR; chmod 2775 DIR; TORCH_HOME=DIR
            shared.mkdir()
            os.chown(shared, 0, grp.getgrnam(team).gr_gid)
            os.chmod(shared, 0o2775)
            locks = {}
            for name, chosen in (("one", refs[:1]), ("two", refs[:2]), ("three", refs[2:3]), ("four", refs[3:])):
                locks[name] = dump_lockfile(chosen, base / f"{name}.lock")
                os.chmod(locks[name], 0o644)

            def as_user(user, umask, *args, popen=False):
                command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
                           "sh", "-c", f'umask {umask} && exec "$@"', "sh", *tvpack_command(*args)]
                env = tvpack_env(TORCH_HOME=shared, HOME=base)
                if popen:
                    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            cwd=base)
                return subprocess.run(command, env=env, capture_output=True, text=True, cwd=base, timeout=120)

            fetch = ["--mirror", mirror_server.url, "--no-upstream"]
            proc = as_user(alice, "022", "fetch", "--lock", locks["one"], *fetch)
            assert proc.returncode == 0, proc.stderr
            proc = as_user(bob, "022", "fetch", "--lock", locks["two"], *fetch)  # alice's dirs, locks and index
            assert proc.returncode == 0, proc.stderr
            assert "1 cached, 1 downloaded" in proc.stdout

            # alice (umask 077) is killed mid-transfer; bob takes her part file over and resumes it
            mirror_server.add_fault("stall", at=MB, seconds=600)  # until cleared: never ends by the clock
            killed = as_user(alice, "077", "fetch", "--lock", locks["three"], *fetch, popen=True)
            try:
                wait_for(lambda: [p for p in _checkpoints(shared).glob("*.tvpack-part") if p.stat().st_size],
                         what="alice's part file")
            finally:
                killed.send_signal(signal.SIGKILL)  # setpriv execs sh, which execs python: this is the fetch
                killed.wait()
            left = [p for p in _checkpoints(shared).iterdir() if ".tvpack-part" in p.name]
            assert len(left) == 2  # the part and its .json, made under umask 077, yet group read-write
            assert all(stat.S_IMODE(p.stat().st_mode) & 0o060 == 0o060 for p in left), left
            mirror_server.clear_faults()
            proc = as_user(bob, "022", "fetch", "--lock", locks["three"], *fetch)
            assert proc.returncode == 0, proc.stderr
            assert "resumed at" in proc.stdout

            gid = grp.getgrnam(team).gr_gid
            for path in [shared, *shared.rglob("*")]:
                st = path.lstat()
                mode = stat.S_IMODE(st.st_mode)
                assert st.st_gid == gid, path
                if path.is_dir():
                    assert mode & 0o2070 == 0o2070, f"{path}: {oct(mode)}"
                else:
                    assert mode & 0o060 == 0o060, f"{path}: {oct(mode)}"
            index = json.loads((shared / "hub" / "tvpack" / "index.json").read_text())["files"]
            assert set(index) == {r.filename for r in refs[:3]}  # nobody's index update was lost
            proc = as_user(alice, "022", "cache", "ls", "--json", "--no-registry")
            assert proc.returncode == 0, proc.stderr
            assert {f["file"]: f["status"] for f in json.loads(proc.stdout)["files"]} == \
                {r.filename: "verified" for r in refs[:3]}

            # a part file from before sharing was set up (alice's, 0600) cannot block bob: ignored, said so
            dead = subprocess.Popen(["true"])
            dead.wait()
            legacy = _checkpoints(shared) / f"{refs[3].filename}.{cache._HOST}.{dead.pid}.0badc0de.tvpack-part"
            legacy.write_bytes(b"x" * 1000)
            os.chown(legacy, pwd.getpwnam(alice).pw_uid, gid)
            os.chmod(legacy, 0o600)
            proc = as_user(bob, "022", "fetch", "--lock", locks["four"], *fetch)
            assert proc.returncode == 0, proc.stderr
            assert f"tvpack: ignoring {legacy.name}: a partial download left by another user that you cannot write" \
                in proc.stderr
        finally:
            shutil.rmtree(base, ignore_errors=True)


# -- prune and a download in another pid namespace ----------------------------------------------------

def _free_pid_slot() -> int:
    """How many processes to start in a new pid namespace before the fetch, so that the fetch's pid
    there names no process here (else the pid check alone would spare it, proving nothing)."""
    for skip in range(60, 5000):
        pid = skip + 2  # pid 1 is the shell, then `skip` short-lived processes, then the fetch
        if not any(os.path.exists(f"/proc/{p}") for p in range(pid - 2, pid + 3)):
            return skip
    pytest.skip("no free pid slot")


def test_prune_never_removes_a_download_running_in_another_pid_namespace(mirror_server, tmp_path):
    if subprocess.run(["unshare", "-p", "--fork", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -p is not permitted here")
    (ref,) = synth_refs(mirror_server.root, count=1, size=3 * MB)
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    home = tmp_path / "home"
    mirror_server.add_fault("stall", at=MB, seconds=600)
    skip = _free_pid_slot()
    script = f'i=0; while [ $i -lt {skip} ]; do /bin/true; i=$((i+1)); done; "$@"'
    container = subprocess.Popen(["unshare", "-p", "--fork", "--kill-child", "sh", "-c", script, "sh",
                                  *tvpack_command("fetch", "--lock", lock, "--mirror", mirror_server.url, "--no-upstream")],
                                 env=tvpack_env(TORCH_HOME=home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (part,) = wait_for(lambda: list(_checkpoints(home).glob("*.tvpack-part")) if _checkpoints(home).is_dir()
                           else [], what="the part file")
        pid = int(part.name.split(".")[-3])
        if os.path.exists(f"/proc/{pid}"):
            pytest.skip(f"pid {pid} of the namespace also names a process here")
        for args in (["cache", "prune", "--dry-run", "--json"], ["cache", "prune", "--json"]):
            proc = run_tvpack(*args, env={"TORCH_HOME": str(home)})
            assert proc.returncode == 0, proc.stderr
            assert str(part) not in [r["path"] for r in json.loads(proc.stdout)["removed"]]
            assert part.exists()
    finally:
        container.kill()  # --kill-child: the namespace goes with it
        container.wait()
    wait_for(lambda: run_tvpack("cache", "prune", "--json", env={"TORCH_HOME": str(home)}).returncode == 0
             and not part.exists(), what="prune to remove the part of the dead download")
