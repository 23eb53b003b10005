"""packager.fsutil: the one rule for what a dead process left behind, and its adoption."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from packager.fsutil import adopt, left_behind, remove_stale_temps, temp_path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_left_behind_means_its_process_is_gone_and_with_quiet_that_it_stopped_changing(tmp_path):
    thing = tmp_path / "x.part"
    thing.write_bytes(b"data")
    dead = _dead_pid()
    assert left_behind(dead, thing)
    assert not left_behind(os.getpid(), thing)  # ours, unless the caller knows none of its work uses it
    assert left_behind(os.getpid(), thing, ours=True)
    assert not left_behind(dead, thing, quiet=60)  # just written: a pid of another namespace may look dead
    old = time.time() - 120
    os.utime(thing, (old, old))
    assert left_behind(dead, thing, quiet=60)
    folder = tmp_path / "staging"
    folder.mkdir()
    (folder / "layer.tar").write_bytes(b"x")  # a directory counts as changed when anything in it changed
    os.utime(folder, (old, old))
    assert not left_behind(dead, folder, quiet=60)


def test_of_two_adopters_one_wins_and_stale_temps_follow_the_same_rule(tmp_path):
    old = tmp_path / "left.part"
    old.write_bytes(b"partial")
    first, second = tmp_path / "mine.1", tmp_path / "mine.2"
    assert adopt(old, first) and not adopt(old, second)
    assert first.read_bytes() == b"partial" and not second.exists()
    dest = tmp_path / "out.bin"
    stale = temp_path(dest).with_name(f".{dest.name}.{_dead_pid()}.abcdef12.tmp")
    stale.write_bytes(b"half")
    mine = temp_path(dest)
    mine.write_bytes(b"live")
    long_ago = time.time() - 3600
    for path in (stale, mine):
        os.utime(path, (long_ago, long_ago))
    assert remove_stale_temps(dest) == [stale]
    assert mine.exists()
