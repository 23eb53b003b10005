#!/usr/bin/env python
"""What the floor plan buys: data-only commands without torch, and bundling at the cost of a copy.

    python scripts/bench_layers.py [--repeat 5] [--big-gb 1.2] [--small-gb 0.1]

1. ``tvpack list resnet50`` and ``tvpack fetch --dry-run resnet50`` as whole processes with a warm
   registry snapshot, against the same commands with ``--live-registry`` (what every command paid
   before the snapshot: importing torch + torchvision): median wall time and peak RSS (targets
   under 0.3 s and 120 MB).
2. ``tvpack bundle``'s cost per byte: the whole-process time to bundle ~1.3 GB minus the time to
   bundle ~0.1 GB of warm, verified checkpoints, against the same difference for ``tar -cf``
   (target within 1.1x). Constant costs (start-up, imports) cancel in the difference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_bundle import REGISTRY, make_checkpoints, rm, run_child  # noqa: E402

TVPACK = [sys.executable, "-m", "packager"]


def median_run(args: list[str], env: dict, repeat: int) -> tuple[float, int]:
    runs = [run_child(args, env) for _ in range(repeat)]
    return statistics.median(t for t, _ in runs), max(rss for _, rss in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--big-gb", type=float, default=1.2, help="bytes added on top of the small set")
    parser.add_argument("--small-gb", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tvpack-bench-layers-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": f"{HERE.parent}:{work}", "XDG_CACHE_HOME": str(work / "xdg"),
               "TORCH_HOME": str(work / "home")}
        env.pop("TVPACK_NO_SNAPSHOT", None)
        # 1. data-only commands
        run_child([*TVPACK, "list", "resnet50"], env)  # makes the snapshot
        print(f"{'command':<34} {'snapshot':>16} {'--live-registry':>18} {'ratio':>7}")
        for command in (["list", "resnet50"], ["fetch", "--dry-run", "resnet50"]):
            warm_t, warm_rss = median_run([*TVPACK, *command], env, args.repeat)
            live_t, live_rss = median_run([*TVPACK, "--live-registry", *command], env, args.repeat)
            print(f"tvpack {' '.join(command):<27} {warm_t:6.3f} s {warm_rss / 2**20:5.0f} MB "
                  f"{live_t:8.3f} s {live_rss / 2**20:5.0f} MB {live_t / warm_t:5.1f}x faster, "
                  f"{live_rss / warm_rss:.1f}x smaller")
        # 2. bundle cost per byte
        small_bytes, big_bytes = int(args.small_gb * 2**30), int((args.small_gb + args.big_gb) * 2**30)
        small = make_checkpoints(work / "small", small_bytes, 1)
        big = make_checkpoints(work / "big", big_bytes - small_bytes, 4)
        home = work / "home" / "hub" / "checkpoints"
        home.mkdir(parents=True, exist_ok=True)
        names = {}
        for sub in ("small", "big"):
            src = work / sub / "home" / "hub" / "checkpoints"
            names[sub] = sorted(f.name for f in src.iterdir())
            for name in names[sub]:
                os.replace(src / name, home / name)
        # one registry module describing both sets: Small_Weights and Bench_Weights
        small_src = (work / "small" / f"{REGISTRY}.py").read_text()
        big_src = (work / "big" / f"{REGISTRY}.py").read_text()
        body = big_src.split("class Bench_Weights(WeightsEnum):\n", 1)[1].split("\n\n\ndef ", 1)[0]
        (work / f"{REGISTRY}.py").write_text(
            small_src.replace("Bench_Weights", "Small_Weights").replace("bench_model", "small_model")
            + "\n\nclass Bench_Weights(WeightsEnum):\n" + body
            + "\n\n\ndef bench_model(*, weights: Optional[Bench_Weights] = None) -> nn.Module:\n    return nn.Identity()\n")
        small_sel = [s.replace("Bench_Weights", "Small_Weights") for s in small]
        sets = {"small": small_sel, "big": small_sel + big}
        files = {"small": names["small"], "big": names["small"] + names["big"]}
        env_b = {**env, "TVPACK_REGISTRY": REGISTRY}
        subprocess.run([*TVPACK, "cache", "verify"], env=env_b, check=True, capture_output=True)  # warm index
        for f in home.iterdir():
            f.read_bytes()  # warm page cache
        results = {}
        for name in ("small", "big"):
            out, tar_out = work / f"{name}.tvpack", work / f"{name}.tar"
            t_tv = []
            t_tar = []
            for _ in range(args.repeat):
                rm(out)
                t_tv.append(run_child([*TVPACK, "bundle", *sets[name], "--no-fetch", "-o", str(out)], env_b)[0])
                rm(tar_out)
                t_tar.append(run_child(["tar", "-cf", str(tar_out), "-C", str(work / "home"),
                                        *[f"hub/checkpoints/{f}" for f in files[name]]], env)[0])
            results[name] = (statistics.median(t_tv), statistics.median(t_tar), out.stat().st_size)
        d_tv = results["big"][0] - results["small"][0]
        d_tar = results["big"][1] - results["small"][1]
        size = (results["big"][2] - results["small"][2]) / 2**30
        print(f"\nbundle, whole processes, medians of {args.repeat}:")
        for name in ("small", "big"):
            t_tv, t_tar, n = results[name]
            print(f"  {n / 2**30:5.2f} GiB: tvpack bundle {t_tv:.2f} s, tar -cf {t_tar:.2f} s")
        print(f"  cost of the extra {size:.2f} GiB: tvpack {d_tv:.2f} s, tar -cf {d_tar:.2f} s -> "
              f"{d_tv / d_tar:.2f}x tar (target <= 1.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
