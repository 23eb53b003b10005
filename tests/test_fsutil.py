"""packager.fsutil: the one rule for what a dead process left behind, its adoption, temp files, write-behind."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from packager.fsutil import WriteBehind, adopt, left_behind, pwrite_all, remove_stale_temps, temp_path, temps_of


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


def test_write_behind_from_several_threads_at_offsets_keeps_every_byte_and_a_refusal_costs_nothing(tmp_path):
    """Threads placing their pieces at offsets, each reporting to one WriteBehind with a small window (so the
    kernel is asked to write out many times while they write): the file holds every byte where it belongs. A
    descriptor the call refuses (/dev/null) raises nothing: write-behind only ever costs or saves time."""
    pieces = [bytes([i]) * 300_000 for i in range(8)]
    path = tmp_path / "file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        behind = WriteBehind(fd, window=64 * 1024)

        def place(i: int) -> None:
            for start in range(0, len(pieces[i]), 50_000):
                chunk = pieces[i][start:start + 50_000]
                pwrite_all(fd, chunk, i * 300_000 + start)
                behind.wrote(len(chunk))

        threads = [threading.Thread(target=place, args=(i,)) for i in reversed(range(8))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        refused = WriteBehind(null, window=1)
        for _ in range(3):
            os.write(null, b"x")
            refused.wrote(1)
    finally:
        os.close(null)


def test_temps_of_lists_every_writer_of_a_file_and_nothing_else(tmp_path):
    dest = tmp_path / "state.json"
    theirs, mine = temp_path(dest), temp_path(dest)
    for path in (theirs, mine, tmp_path / ".state.json.x.12345678.tmp", tmp_path / "other.json"):
        path.write_text("{")
    assert sorted(temps_of(dest)) == sorted([(theirs, os.getpid()), (mine, os.getpid())])
