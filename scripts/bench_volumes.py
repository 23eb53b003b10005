"""Split volumes against coreutils, and reading in place against one file.

* ``split_file`` (hash + copy_file_range, fsync) vs ``split -b`` + ``sha256sum`` (no fsync), and vs
  the same plus ``sync``; also split_file with the kernel copy turned off (read + write).
* reading the bundle through ``Volumes`` (4 parts) vs one ``FileSource``, ``readinto_at`` in 8 MiB
  chunks, page cache warm (the install case: the data is read once).

``TVPACK_BENCH_MB`` sets the size (default 1024). Timings are best of ``TVPACK_BENCH_RUNS`` (3).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packager.formats import volumes  # noqa: E402
from packager.formats.volumes import FileSource, open_volumes, split_file  # noqa: E402

MB = int(os.environ.get("TVPACK_BENCH_MB", "1024"))
RUNS = int(os.environ.get("TVPACK_BENCH_RUNS", "3"))
CHUNK = 8 << 20


def best(fn, setup=None) -> float:
    times = []
    for _ in range(RUNS):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_all(source) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while offset < source.size:
        offset += source.readinto_at(view, offset)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="tvpack-bench-volumes-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        src = work / "bundle.tar"
        with open(src, "wb") as f:
            block = os.urandom(CHUNK)
            for _ in range(MB // 8):
                f.write(block[:-1] + os.urandom(1))  # not all-identical blocks, cheap to make
        size = src.stat().st_size
        part = -(-size // 4)  # four parts
        src.read_bytes()  # warm the page cache for every contender alike
        out = work / "out"

        def fresh():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()

        ours = best(lambda: split_file(src, part, output=out / "bundle.tar"), fresh)

        def no_kernel_copy():
            original = volumes.SplitWriter.__init__

            def init(self, *a, **k):
                original(self, *a, **k)
                self._kernel_copy = False
            volumes.SplitWriter.__init__ = init
            try:
                split_file(src, part, output=out / "bundle.tar")
            finally:
                volumes.SplitWriter.__init__ = original

        ours_write = best(no_kernel_copy, fresh)
        coreutils = ("split -b {part} -d -a 3 {src} bundle.tar. && sha256sum bundle.tar.0* > bundle.tar.sha256"
                     .format(part=part, src=src))
        base = best(lambda: subprocess.run(coreutils, shell=True, cwd=out, check=True), fresh)
        base_sync = best(lambda: subprocess.run(coreutils + " && sync -f bundle.tar.sha256", shell=True, cwd=out,
                                                check=True), fresh)
        subprocess.run(["sha256sum", "-c", "--quiet", "bundle.tar.sha256"], cwd=out, check=True)

        split_file(src, part, output=out / "bundle.tar")
        with open_volumes(out / "bundle.tar.000") as vols, FileSource(src) as single:
            assert len(vols.parts) == 4 and vols.size == single.size
            read_all(vols), read_all(single)  # warm
            t_vols = best(lambda: read_all(vols))
            t_single = best(lambda: read_all(single))
            t_diag = best(lambda: vols.diagnose())

        gb = size / 1e9
        print(f"size {size / 2**20:.0f} MiB, 4 parts of {part / 2**20:.0f} MiB, best of {RUNS}")
        print(f"split_file (copy_file_range + fsync)   {ours:6.2f} s  {gb / ours:5.2f} GB/s")
        print(f"split_file (read + write + fsync)      {ours_write:6.2f} s  {gb / ours_write:5.2f} GB/s")
        print(f"split -b + sha256sum                   {base:6.2f} s  -> ours / coreutils = {ours / base:.2f}x")
        print(f"split -b + sha256sum + sync            {base_sync:6.2f} s  -> ours / coreutils+sync = "
              f"{ours / base_sync:.2f}x")
        print(f"read via FileSource (8 MiB preadv)     {t_single:6.3f} s  {gb / t_single:5.2f} GB/s")
        print(f"read via Volumes, 4 parts              {t_vols:6.3f} s  -> Volumes / FileSource = "
              f"{t_vols / t_single:.3f}x")
        print(f"Volumes.diagnose (hash every part)     {t_diag:6.2f} s  {gb / t_diag:5.2f} GB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
