#!/usr/bin/env python
"""Segmented downloads over capped links: tvpack against curl and aria2c, measured in one run.

    python scripts/bench_segments.py [--mb 1200] [--rate 40m] [--repeat 1] [--keep]

nginx (started here, its config in a temp dir) serves one synthetic checkpoint (random bytes named with its
sha256 prefix, in the download.pytorch.org layout; a lockfile pins it, so ``tvpack fetch --lock`` imports no
torch) twice on loopback: capped at ``limit_rate`` per connection (as CDNs and proxies shape each flow), and
uncapped. Each tool stores the file durably and verified, as tvpack does:

  1. capped: ``tvpack fetch --lock`` (whole process, 8 connections by default) vs ``curl -o && sync`` (target:
     tvpack at least 3x faster) and vs ``aria2c -x16 -s16 -k8M && sync && sha256sum -c`` (target: within 1.1x);
  2. uncapped: ``tvpack fetch --lock`` vs ``curl -o && sync`` (target: within 1.15x).

Best of ``--repeat`` runs each, the source file warm in the page cache; the temporary files are removed at the
end (unless --keep). Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "tests"))  # the nginx harness lives with the tests

from servers import Nginx  # noqa: E402

from packager.formats.lockfile import dump_lockfile  # noqa: E402
from packager.registry import WeightsRef  # noqa: E402

MiB = 1 << 20


def write_random(path: Path, size: int) -> str:
    """``size`` bytes that do not compress (a fresh random block, varied per block) -> sha256."""
    digest = hashlib.sha256()
    block = bytearray(os.urandom(8 * MiB))
    with open(path, "wb") as f:
        left, i = size, 0
        while left:
            block[:8] = i.to_bytes(8, "little")
            chunk = memoryview(block)[:min(left, len(block))]
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
            i += 1
    return digest.hexdigest()


def timed(argv: list[str], *, env: dict | None = None, shell: bool = False) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, shell=shell, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv if not shell else argv!s} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def best(runs: int, once) -> float:
    return min(once() for _ in range(runs))


def race(work: Path, url_base: str, lock: Path, name: str, sha: str, runs: int, tools: list[str]) -> dict:
    """Seconds of each tool fetching ``name`` from ``url_base`` into a fresh place (best of ``runs``)."""
    out: dict[str, float] = {}
    url = f"{url_base}/models/bench/{name}"
    dest = work / "dest"

    def fresh() -> Path:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        return dest

    def tvpack() -> float:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(fresh() / "home")}
        return timed([sys.executable, "-m", "packager", "fetch", "--lock", str(lock), "--mirror", url_base,
                      "--no-upstream", "-q"], env=env)

    def curl() -> float:
        return timed(f"curl -sS -f -o {fresh() / name} {url} && sync", shell=True)

    def aria2c() -> float:
        (fresh() / "SHA256SUMS").write_text(f"{sha}  {name}\n")
        return timed(f"aria2c -q -x16 -s16 -k8M --file-allocation=none --allow-overwrite=true -d {dest} -o {name} "
                     f"{url} && sync && cd {dest} && sha256sum -c --quiet SHA256SUMS", shell=True)

    for tool in tools:
        out[tool] = best(runs, {"tvpack": tvpack, "curl": curl, "aria2c": aria2c}[tool])
        print(f"  {tool:<7} {out[tool]:7.2f} s", flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1200, help="size of the synthetic checkpoint in MiB")
    parser.add_argument("--rate", default="40m", help="nginx limit_rate per connection on the capped port")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool (the best is reported)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    for tool in ("nginx", "curl", "aria2c", "sha256sum"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            print(f"{tool} not found (make bench installs aria2 and nginx)", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="tvpack-bench-segments-"))
    servers: list[Nginx] = []
    try:
        folder = work / "www" / "models" / "bench"
        folder.mkdir(parents=True)
        tmp = folder / "synth.tmp"
        sha = write_random(tmp, args.mb * MiB)
        name = f"synth_{args.mb}mb-{sha[:8]}.pth"
        tmp.rename(folder / name)
        ref = WeightsRef(enum="Bench_Weights", member="V1", url=f"https://download.pytorch.org/models/bench/{name}",
                         module="bench", models=("bench",), size_hint=args.mb * MiB, sha256=sha)
        lock = dump_lockfile([ref], work / "tvpack.lock")
        for label, rate in (("capped", args.rate), ("uncapped", None)):
            servers.append(Nginx(work / "www", work / f"nginx-{label}", limit_rate=rate, workers=2).start())
        print(f"{args.mb} MiB over nginx limit_rate {args.rate} per connection (capped):", flush=True)
        capped = race(work, servers[0].url, lock, name, sha, args.repeat, ["tvpack", "curl", "aria2c"])
        print(f"{args.mb} MiB over loopback, uncapped:", flush=True)
        uncapped = race(work, servers[1].url, lock, name, sha, args.repeat, ["tvpack", "curl"])
        print(f"capped:   tvpack is {capped['curl'] / capped['tvpack']:.2f}x faster than curl (target >= 3x); "
              f"{capped['tvpack'] / capped['aria2c']:.2f}x aria2c's time (target <= 1.1x)")
        print(f"uncapped: tvpack takes {uncapped['tvpack'] / uncapped['curl']:.2f}x curl's time (target <= 1.15x)")
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
