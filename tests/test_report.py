"""packager.report: one Reporter carries progress and notices; the library is silent unless given one."""
from __future__ import annotations

import io
import subprocess
import sys

from conftest import ROOT, synth_refs

from packager.formats.lockfile import dump_lockfile
from packager.report import SILENT, Recorder, TqdmReporter, reporter_for

MB = 1 << 20


def test_a_library_fetch_prints_nothing_and_a_reporter_hears_its_retries_and_bytes(mirror_server, tmp_path):
    """The same fetch (one 503 with Retry-After: 0 before the file) twice: without a reporter, a fresh interpreter's
    stderr stays empty; with a Recorder, the retry is a notice and the bytes are counted on the bars."""
    (ref,) = synth_refs(mirror_server.root, count=1, size=MB)
    path = f"/models/synth/{ref.filename}"
    mirror_server.add_fault("status", path=path, status=503, retry_after=0, times=1)
    lock = dump_lockfile([ref], tmp_path / "tvpack.lock")
    code = (f"import packager; packager.fetch(lock={str(lock)!r}, torch_home={str(tmp_path / 'quiet')!r}, "
            f"mirrors=[{mirror_server.url!r}], upstream=False)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    mirror_server.settle()
    assert [r.status for r in mirror_server.requests(path)] == [503, 200]

    from packager import fetch

    mirror_server.add_fault("status", path=path, status=503, retry_after=0, times=1)
    heard = Recorder()
    fetch(refs=[ref], torch_home=tmp_path / "told", mirrors=[mirror_server.url], upstream=False, reporter=heard)
    assert len(heard.notices) == 1 and "503" in heard.notices[0] and "retrying" in heard.notices[0], heard.notices
    assert not heard.notices[0].startswith("tvpack:")  # the prefix is the CLI reporter's
    total = [bar for bar in heard.bars if bar.desc == "total"]
    assert len(total) == 1 and total[0].done == MB
    assert [bar.done for bar in heard.bars if bar.desc == ref.filename] == [MB]


def test_the_tqdm_reporter_stacks_bars_in_free_rows_and_writes_notices_above_them():
    out = io.StringIO()
    reporter = TqdmReporter(stream=out)
    total = reporter.progress(3, "total", transient=False)
    first, second = reporter.progress(1, "a.pth"), reporter.progress(2, "b.pth")
    assert (total.row, first.row, second.row) == (0, 1, 2)
    first.update(1)
    first.close()
    third = reporter.progress(None, "c.pth")
    assert third.row == 1  # the row a closed bar gave back
    reporter.notice("waiting for c.pth: held by pid 1")
    for bar in (second, third, total):
        bar.close()
    assert "tvpack: waiting for c.pth: held by pid 1\n" in out.getvalue()


def test_without_bars_the_cli_reporter_still_prints_notices_and_counts_nothing():
    out = io.StringIO()
    reporter = TqdmReporter(bars=False, stream=out)
    bar = reporter.progress(10, "x")
    bar.update(10)
    bar.close()
    reporter.notice("kept 1.0 MB in x.part")
    assert out.getvalue() == "tvpack: kept 1.0 MB in x.part\n"


def test_progress_true_is_the_older_spelling_of_a_stderr_reporter():
    assert reporter_for(None, progress=False) is SILENT
    assert isinstance(reporter_for(None, progress=True), TqdmReporter)
    mine = Recorder()
    assert reporter_for(mine, progress=True) is mine
