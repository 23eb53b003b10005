#!/usr/bin/env python
"""Fetch and verify benchmarks: tvpack against curl, torch.hub and sha256sum, measured in one run.

    python scripts/bench_fetch.py [--big-mb 1200] [--small 24] [--small-mb 12] [--verify-gb 5] [--keep]

Everything runs on loopback: nginx (started here, with its own config in a temp dir) serves
synthetic checkpoints (random bytes, named with their sha256 prefix like torchvision's files) in
the download.pytorch.org layout; lockfiles pin them, so ``tvpack fetch --lock`` needs no registry
and never imports torch. Reported (best of --repeat runs each, page cache warm for every tool):

  1. one big file (vit_l_16-sized): ``tvpack fetch --lock`` (whole process) vs ``curl -o`` (target
     within 1.2x) and vs ``torch.hub.download_url_to_file(hash_prefix=...)`` timed in-process
     without its import (target: tvpack at least 2.5x faster);
  2. N small checkpoints: ``tvpack fetch --lock --jobs 4`` (whole process) vs the same files one
     after another with ``torch.hub.download_url_to_file`` (in-process; target at least 3x);
  3. ``tvpack cache verify`` (whole process) of about 5 GB vs ``sha256sum`` (targets: at least
     1.5 GB/s and 3x).

The big temporary files are removed at the end (unless --keep).
"""
from __future__ import annotations

import argparse
import hashlib
import json
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

from servers import Nginx, ServerError  # noqa: E402

from packager.formats.lockfile import dump_lockfile  # noqa: E402
from packager.registry import WeightsRef  # noqa: E402

UPSTREAM = "https://download.pytorch.org/models/"
MiB = 1 << 20


def write_random(path: Path, size: int, seed: int) -> str:
    """``size`` pseudo-random bytes (fast: a hash chain expanded by numpy-free slicing) -> sha256."""
    digest = hashlib.sha256()
    block = os.urandom(8 * MiB)
    with open(path, "wb") as f:
        left, i = size, 0
        while left:
            # vary each block cheaply so that files and blocks differ
            chunk = (seed.to_bytes(4, "little") + i.to_bytes(4, "little") + block[8:])[:min(left, len(block))]
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
            i += 1
    return digest.hexdigest()


def synth(folder: Path, stem: str, size: int, seed: int) -> WeightsRef:
    tmp = folder / f".{stem}.tmp"
    sha = write_random(tmp, size, seed)
    name = f"{stem}-{sha[:8]}.pth"
    os.replace(tmp, folder / name)
    return WeightsRef(enum=f"Bench_{stem}", member="V1", url=f"{UPSTREAM}bench/{name}", module="bench",
                      models=(stem,), size_hint=size, sha256=sha)


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def timed_clean(fn) -> float:
    """``timed``, after flushing earlier runs' dirty pages so that no run pays for another's."""
    os.sync()
    return timed(fn)


def run(cmd, **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def best(times: list[float]) -> float:
    return min(times)


HUB_SCRIPT = """
import json, sys, time, torch.hub
jobs = json.loads(sys.argv[1])
began = time.perf_counter()
for url, dst, prefix in jobs:
    torch.hub.download_url_to_file(url, dst, hash_prefix=prefix, progress=False)
print(time.perf_counter() - began)
"""


def torch_hub_time(jobs: list[tuple[str, str, str]]) -> tuple[float, float]:
    """(seconds inside download_url_to_file for ``jobs``, seconds for the whole process)."""
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, json.dumps(jobs)], capture_output=True, text=True)
    whole = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"torch.hub run failed:\n{proc.stderr}")
    return float(proc.stdout.strip().splitlines()[-1]), whole


def tvpack_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "packager", *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mb", type=int, default=1200, help="size of the big checkpoint (MB)")
    parser.add_argument("--small", type=int, default=24, help="number of small checkpoints")
    parser.add_argument("--small-mb", type=float, default=12, help="size of each small checkpoint (MB)")
    parser.add_argument("--verify-gb", type=float, default=5, help="bytes in the cache to verify (GB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is reported)")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="tvpack-bench-fetch-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("TVPACK_MIRROR", "TVPACK_OFFLINE", "TVPACK_REGISTRY"):
        env.pop(name, None)
    nginx = None
    results: dict[str, float] = {}
    try:
        mirror = work / "mirror"
        folder = mirror / "models" / "bench"
        folder.mkdir(parents=True)
        try:
            nginx = Nginx(mirror, work / "nginx")  # before the synthesis: fail early if nginx is missing
        except ServerError as exc:
            sys.exit(f"bench_fetch: {exc.format()} (apt-get install nginx-light, or make system-deps)")
        t0 = time.perf_counter()
        big = synth(folder, "vit_l_16_bench", args.big_mb * 1000 * 1000, seed=1)
        small = [synth(folder, f"small{i:02d}", int(args.small_mb * 1000 * 1000) + i, seed=100 + i)
                 for i in range(args.small)]
        print(f"synthesised {args.big_mb} MB + {args.small} x {args.small_mb} MB in {time.perf_counter() - t0:.1f}s",
              flush=True)
        big_lock = dump_lockfile([big], work / "big.lock")
        small_lock = dump_lockfile(small, work / "small.lock")
        try:
            nginx.start()
        except ServerError as exc:
            sys.exit(f"bench_fetch: nginx: {exc.format()}")
        big_url = f"{nginx.url}/models/bench/{big.filename}"
        print(f"nginx on {nginx.url}", flush=True)

        # warm the page cache and the server
        run(["curl", "-sf", "-o", "/dev/null", big_url])

        # 1. the big file ------------------------------------------------------------------------
        out = work / "out"
        out.mkdir()
        curl_t, curl_sync_t, tv_t, hub_t, hub_proc_t = [], [], [], [], []
        for i in range(args.repeat):
            dst = out / "curl.pth"
            curl_t.append(timed_clean(lambda: run(["curl", "-sf", "-o", str(dst), big_url])))
            dst.unlink()
            # the same durability as tvpack (which fsyncs before it renames)
            curl_sync_t.append(timed_clean(lambda: run(["sh", "-c", f"curl -sf -o {dst} {big_url} && sync {dst}"])))
            dst.unlink()
            home = work / f"home-big-{i}"
            tv_t.append(timed_clean(lambda: run(tvpack_cmd("fetch", "--lock", big_lock, "--mirror", nginx.url,
                                                           "--no-upstream", "--torch-home", home, "-q"), env=env)))
            shutil.rmtree(home)
            dst = out / "hub.pth"
            os.sync()
            inside, whole = torch_hub_time([(big_url, str(dst), big.hash_prefix)])
            hub_t.append(inside)
            hub_proc_t.append(whole)
            dst.unlink()
        results.update(curl=best(curl_t), curl_sync=best(curl_sync_t), tvpack_big=best(tv_t), hub_big=best(hub_t),
                       hub_big_process=best(hub_proc_t))
        gb = big.size_hint / 1e9
        print(f"\n[1] one {gb:.2f} GB checkpoint from nginx on loopback (best of {args.repeat})")
        for label, key in [("curl -o", "curl"), ("curl -o && sync FILE", "curl_sync"),
                           ("tvpack fetch --lock (whole process)", "tvpack_big"),
                           ("torch.hub.download_url_to_file + hash", "hub_big"),
                           ("  the same, whole process (import torch)", "hub_big_process")]:
            print(f"    {label:<42} {results[key]:6.2f}s  {gb / results[key]:.2f} GB/s")
        print(f"    tvpack / curl = {results['tvpack_big'] / results['curl']:.2f}x (target <= 1.2x); "
              f"tvpack / (curl + sync) = {results['tvpack_big'] / results['curl_sync']:.2f}x")
        print(f"    torch.hub / tvpack = {results['hub_big'] / results['tvpack_big']:.2f}x faster (target >= 2.5x); "
              f"whole processes: {results['hub_big_process'] / results['tvpack_big']:.2f}x", flush=True)

        # 2. small files ------------------------------------------------------------------------
        par_t, seq_t, seq_proc_t = [], [], []
        for i in range(args.repeat):
            home = work / f"home-small-{i}"
            par_t.append(timed_clean(lambda: run(tvpack_cmd("fetch", "--lock", small_lock, "--mirror", nginx.url,
                                                            "--no-upstream", "--torch-home", home, "--jobs", "4",
                                                            "-q"), env=env)))
            shutil.rmtree(home)
            dsts = out / f"hub-small-{i}"
            dsts.mkdir()
            os.sync()
            inside, whole = torch_hub_time([(f"{nginx.url}/models/bench/{r.filename}", str(dsts / r.filename),
                                             r.hash_prefix) for r in small])
            seq_t.append(inside)
            seq_proc_t.append(whole)
            shutil.rmtree(dsts)
        results.update(tvpack_small=best(par_t), hub_small=best(seq_t), hub_small_process=best(seq_proc_t))
        total_mb = sum(r.size_hint for r in small) / 1e6
        print(f"\n[2] {len(small)} checkpoints of {args.small_mb} MB ({total_mb:.0f} MB)")
        print(f"    tvpack fetch --lock --jobs 4 (whole process)        {results['tvpack_small']:.2f}s")
        print(f"    torch.hub.download_url_to_file, sequential          {results['hub_small']:.2f}s")
        print(f"      the same, whole process (import torch)            {results['hub_small_process']:.2f}s")
        print(f"    torch.hub / tvpack = {results['hub_small'] / results['tvpack_small']:.2f}x faster (target >= 3x); "
              f"whole processes: {results['hub_small_process'] / results['tvpack_small']:.2f}x", flush=True)

        # 3. verify -------------------------------------------------------------------------------
        nginx.stop()
        nginx = None
        shutil.rmtree(out)
        home = work / "home-verify"
        ckpt = home / "hub" / "checkpoints"
        ckpt.mkdir(parents=True)
        target = int(args.verify_gb * 1e9)
        have = 0
        for path in [folder / big.filename, *(folder / r.filename for r in small)]:
            os.replace(path, ckpt / path.name)
            have += (ckpt / path.name).stat().st_size
        i = 0
        while have < target:
            size = min(args.big_mb * 1000 * 1000, target - have)
            ref = synth(ckpt, f"verify{i}", size, seed=1000 + i)
            have += ref.size_hint
            i += 1
        files = sorted(str(p) for p in ckpt.iterdir())
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL)  # warm the page cache
        sum_t, ver_t = [], []
        for i in range(args.repeat):
            if i < 2:  # sha256sum is slow and steady: two runs are enough
                sum_t.append(timed_clean(lambda: run(["sha256sum", *files])))
            ver_t.append(timed_clean(lambda: run(tvpack_cmd("cache", "verify", "--torch-home", home, "-q"), env=env)))
        results.update(sha256sum=best(sum_t), verify=best(ver_t))
        gb = have / 1e9
        print(f"\n[3] verify {gb:.2f} GB in {len(files)} files ({os.cpu_count()} cores)")
        print(f"    sha256sum                            {results['sha256sum']:.2f}s  {gb / results['sha256sum']:.2f} GB/s")
        print(f"    tvpack cache verify (whole process)  {results['verify']:.2f}s  {gb / results['verify']:.2f} GB/s"
              f" (target >= 1.5 GB/s)")
        print(f"    sha256sum / tvpack = {results['sha256sum'] / results['verify']:.2f}x (target >= 3x)")
        print("\nratios: " + json.dumps({
            "fetch_big_vs_curl": round(results["tvpack_big"] / results["curl"], 3),
            "fetch_big_vs_curl_and_sync": round(results["tvpack_big"] / results["curl_sync"], 3),
            "fetch_big_speedup_vs_torch_hub_whole_process": round(results["hub_big_process"] / results["tvpack_big"], 3),
            "fetch_small_speedup_vs_torch_hub_whole_process": round(
                results["hub_small_process"] / results["tvpack_small"], 3),
            "fetch_big_speedup_vs_torch_hub": round(results["hub_big"] / results["tvpack_big"], 3),
            "fetch_small_speedup_vs_torch_hub": round(results["hub_small"] / results["tvpack_small"], 3),
            "verify_gb_per_s": round(gb / results["verify"], 3),
            "verify_speedup_vs_sha256sum": round(results["sha256sum"] / results["verify"], 3),
        }))
    finally:
        if nginx is not None:
            nginx.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
