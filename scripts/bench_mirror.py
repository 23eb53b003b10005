"""Benchmark `tvpack mirror` export against plain tools measured in the same run.

* directory export (hash while copying, fsync, rename, sidecars, index) vs ``cp`` and vs
  ``cp`` + ``sha256sum``; re-export (everything skipped) vs ``sha256sum`` of the destination;
* S3 export to moto's server on loopback (per-part SHA-256, verify, HEAD) vs boto3's own
  ``upload_file``; fetching back from the S3 mirror (tvpack's verified cache fetch) vs boto3's
  ``download_file``.

Prints ratios (tvpack time / baseline time; lower is better, 1.0 = as fast as the baseline).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the nginx, moto and registry harnesses live with the tests

from servers import MotoS3, ServerSoftwareMissing  # noqa: E402

MiB = 1 << 20
FILES = int(os.environ.get("BENCH_MIRROR_FILES", "4"))
FILE_MB = int(os.environ.get("BENCH_MIRROR_FILE_MB", "96"))


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def make_files(root: Path) -> list[tuple[Path, str]]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(FILES):
        data = os.urandom(FILE_MB * MiB)
        sha = hashlib.sha256(data).hexdigest()
        path = root / f"bench{i}-{sha[:8]}.pth"
        path.write_bytes(data)
        out.append((path, sha))
    return out


def items_for(files):
    from packager.mirror import ExportItem

    return [ExportItem((f"Bench_Weights.V{i}",), f"https://download.pytorch.org/models/{p.name}",
                       f"models/{p.name}", p.stat().st_size, sha, str(p), (lambda p=p: open(p, "rb")))
            for i, (p, sha) in enumerate(files)]


def report(label: str, ours: float, base: float, base_label: str) -> None:
    print(f"{label:<44} tvpack {ours:6.2f} s   {base_label} {base:6.2f} s   ratio {ours / base:5.2f}")


def bench_directory(tmp: Path, files) -> None:
    from packager.mirror import export_items

    items = items_for(files)
    dest = tmp / "dest"
    cp_dest = tmp / "cp"

    def ours():
        shutil.rmtree(dest, ignore_errors=True)
        export_items(items, str(dest), jobs=4)

    def cp():
        shutil.rmtree(cp_dest, ignore_errors=True)
        (cp_dest / "models").mkdir(parents=True)
        subprocess.run(["cp", *[str(p) for p, _ in files], str(cp_dest / "models")], check=True)

    def cp_sha():
        cp()
        subprocess.run(["sha256sum", *[str(cp_dest / "models" / p.name) for p, _ in files]], check=True,
                       stdout=subprocess.DEVNULL)

    t_ours, t_cp, t_cp_sha = timed(ours), timed(cp), timed(cp_sha)
    total = FILES * FILE_MB
    print(f"directory export of {FILES} x {FILE_MB} MiB ({total} MiB)")
    report("  export (hash+fsync+rename, jobs=4)", t_ours, t_cp, "cp")
    report("  export (hash+fsync+rename, jobs=4)", t_ours, t_cp_sha, "cp+sha256sum")
    t_skip = timed(lambda: export_items(items, str(dest), jobs=4))
    t_sum = timed(lambda: subprocess.run(["sha256sum", *[str(dest / "models" / p.name) for p, _ in files]],
                                         check=True, stdout=subprocess.DEVNULL))
    report("  re-export, all skipped", t_skip, t_sum, "sha256sum")


def bench_s3(tmp: Path, files, server) -> None:
    from packager import cache
    from packager.mirror import export_items

    with server:
        os.environ.update(server.env())
        client = server.client()
        client.create_bucket(Bucket="bench")
        items = items_for(files)

        def ours():
            export_items(items, "s3://bench/tvpack", jobs=4)
            for item in items:  # the next round uploads again instead of skipping
                client.delete_object(Bucket="bench", Key=f"tvpack/{item.path}")

        def boto():
            from concurrent.futures import ThreadPoolExecutor

            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(multipart_threshold=32 * MiB, multipart_chunksize=16 * MiB)
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda f: client.upload_file(str(f[0]), "bench", f"boto/{f[0].name}", Config=config),
                              files))

        t_ours, t_boto = timed(ours, 2), timed(boto, 2)
        print(f"S3 (moto on loopback) {FILES} x {FILE_MB} MiB")
        report("  export (per-part sha256, verify, jobs=4)", t_ours, t_boto, "boto3 upload_file x4")
        export_items(items, "s3://bench/tvpack", jobs=4)

        homes = iter(range(100))

        def fetch():
            home = tmp / f"home{next(homes)}"
            cache.fetch(refs=[_ref(p) for p, _ in files], mirrors=["s3://bench/tvpack"], upstream=False,
                        torch_home=home, jobs=4)
            shutil.rmtree(home)

        def boto_get():
            from concurrent.futures import ThreadPoolExecutor

            out = tmp / "boto-get"
            out.mkdir(exist_ok=True)
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda f: client.download_file("bench", f"boto/{f[0].name}", str(out / f[0].name)),
                              files))
            shutil.rmtree(out)

        t_fetch, t_get = timed(fetch, 2), timed(boto_get, 2)
        report("  fetch from s3 mirror (verified, jobs=4)", t_fetch, t_get, "boto3 download_file x4")


def _ref(path: Path):
    from packager.registry import WeightsRef

    return WeightsRef(enum="Bench_Weights", member=path.stem.split("-")[0].upper(),
                      url=f"https://download.pytorch.org/models/{path.name}", module="bench")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tvpack-bench-mirror-") as tmp:
        tmp = Path(tmp)
        files = make_files(tmp / "src")
        bench_directory(tmp, files)
        try:
            # a child process: moto must not share this interpreter's GIL with the clients measured
            server = MotoS3(in_process=False)
        except ServerSoftwareMissing as exc:
            print(f"S3: skipped ({exc.what} not installed)")
            return 0
        bench_s3(tmp, files, server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
