"""Load benchmark: time and peak memory to an eval-ready model, tvpack vs torchvision.

For vit_l_16 (a ~1.2 GB checkpoint) and resnet50: a synthetic checkpoint with the real
architecture is installed from a bundle into a TORCH_HOME; then, each in its own subprocess and
from the same warm cache (page cache warm, tvpack's verification index warm),

  baseline  torchvision.models.get_model(name, weights=member).eval()
  tvpack    packager.load_model(TORCH_HOME, name)       (and from the bundle file, for reference)

Reported: median wall time of the call, peak RSS (ru_maxrss) of the process and its growth over
the process's RSS just before the call, and the same peak after a first forward pass (when the
memory-mapped weights are actually read). Ratios printed: speedup (target >= 10x for vit_l_16)
and (baseline peak - tvpack peak) / checkpoint size (target >= 0.9). Nothing is asserted.

    python scripts/bench_load.py [--runs 2] [--models vit_l_16,resnet50] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = "https://download.pytorch.org/models/"
MODELS = {
    "vit_l_16": ("ViT_L_16_Weights", "IMAGENET1K_V1"),
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2"),
}


# -- the measured child ------------------------------------------------------------------------------

def child(mode: str, model: str, weights: str, filename: str, source: str) -> None:
    import torch
    import torchvision

    import packager.loader  # noqa: F401 - imports are not what we measure, on either side

    enum_name, member_name = weights.split(".")
    member = getattr(torchvision.models.get_model_weights(model), member_name)
    member.value.url = UPSTREAM + filename  # the synthetic file stands in for the real one

    def status_kb(field: str) -> int:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (this script)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/self/status")

    before = status_kb("VmRSS")
    start = time.perf_counter()
    if mode == "torchvision":
        net = torchvision.models.get_model(model, weights=member).eval()
    else:
        net, _ = packager.loader.load_model(source, model)
    seconds = time.perf_counter() - start
    peak_load = status_kb("VmHWM")
    size = member.meta.get("min_size", (224, 224))
    side = max(224, size[0])
    start = time.perf_counter()
    with torch.inference_mode():
        net(torch.rand(1, 3, side, side))
    forward = time.perf_counter() - start
    peak_forward = status_kb("VmHWM")
    print(json.dumps({"seconds": seconds, "rss_before_kb": before, "peak_load_kb": peak_load,
                      "peak_forward_kb": peak_forward, "forward_seconds": forward}))


def run_child(mode: str, model: str, weights: str, filename: str, source: Path, home: Path) -> dict:
    env = {**os.environ, "TORCH_HOME": str(home), "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, model, weights, filename, str(source)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- setup ---------------------------------------------------------------------------------------------

def synthetic_checkpoint(model: str, weights: str, store: Path) -> Path:
    """The synthetic checkpoint for ``weights``, made once and kept in ``store``."""
    import torchvision

    from packager.testing.zoo import synthesize_checkpoint

    index = store / "index.json"
    known = json.loads(index.read_text()) if index.is_file() else {}
    if weights in known and (store / known[weights]).is_file():
        return store / known[weights]
    member = getattr(torchvision.models.get_model_weights(model), weights.split(".")[1])
    print(f"synthesizing {weights} (once; kept in {store}) ...", flush=True)
    path = synthesize_checkpoint(member, store)
    known[weights] = path.name
    index.write_text(json.dumps(known, indent=1))
    return path


def prepare(model: str, weights: str, ckpt: Path, work: Path) -> tuple[Path, Path]:
    """A bundle of the synthetic checkpoint and a TORCH_HOME where it is installed."""
    import torchvision

    from packager.bundle import bundle, install

    member = getattr(torchvision.models.get_model_weights(model), weights.split(".")[1])
    member.value.url = UPSTREAM + ckpt.name
    staging = work / f"{model}-staging"
    (staging / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    target = staging / "hub" / "checkpoints" / ckpt.name
    if not target.exists():
        os.link(ckpt, target)
    bundle_path = bundle([f"{model}:{member.name}"], work / f"{model}.tar", torch_home=staging, fetch=False)
    home = work / f"{model}-home"
    install(bundle_path, torch_home=home)
    return bundle_path, home


def warm(home: Path, bundle_path: Path) -> None:
    """A warm cache for everyone: files in the page cache, tvpack's verification index filled."""
    from packager.cache import file_sha256

    for path in [*(home / "hub" / "checkpoints").iterdir(), bundle_path]:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass
        if path.parent.name == "checkpoints":
            file_sha256(path)


# -- report --------------------------------------------------------------------------------------------

def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--store", default=None, help="where synthetic checkpoints are kept between runs")
    parser.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from packager.testing.zoo import zoo_dir

    store = Path(args.store) if args.store else zoo_dir().parent / "bench-load"
    store.mkdir(parents=True, exist_ok=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tvpack-bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for model in args.models.split(","):
            enum_name, member_name = MODELS[model]
            weights = f"{enum_name}.{member_name}"
            ckpt = synthetic_checkpoint(model, weights, store)
            bundle_path, home = prepare(model, weights, ckpt, work)
            size = ckpt.stat().st_size
            print(f"\n{model}: {weights}, checkpoint {size / 1e6:.0f} MB", flush=True)
            results = {}
            warm(home, bundle_path)
            for mode, source in (("torchvision", home), ("tvpack", home), ("tvpack-bundle", bundle_path)):
                runs = [run_child(mode, model, weights, ckpt.name, source, home) for _ in range(args.runs)]
                results[mode] = runs
                peak, before = median(runs, "peak_load_kb") / 1e3, median(runs, "rss_before_kb") / 1e3
                print(f"  {mode:14s} {median(runs, 'seconds'):7.3f} s   peak RSS {peak:7.0f} MB"
                      f" (+{peak - before:5.0f} MB over the process before the call)   after a forward:"
                      f" {median(runs, 'peak_forward_kb') / 1e3:6.0f} MB,"
                      f" forward {median(runs, 'forward_seconds'):.2f} s", flush=True)
            tv, tp, tb = results["torchvision"], results["tvpack"], results["tvpack-bundle"]
            speedup = median(tv, "seconds") / median(tp, "seconds")
            saved = (median(tv, "peak_load_kb") - median(tp, "peak_load_kb")) * 1024 / size
            saved_fwd = (median(tv, "peak_forward_kb") - median(tp, "peak_forward_kb")) * 1024 / size
            speedup_b = median(tv, "seconds") / median(tb, "seconds")
            saved_b = (median(tv, "peak_load_kb") - median(tb, "peak_load_kb")) * 1024 / size
            print(f"  ratios: installed cache {speedup:.1f}x faster, peak {saved:.2f}x checkpoint size lower"
                  f" ({saved_fwd:.2f}x after a forward); bundle file {speedup_b:.1f}x faster,"
                  f" peak {saved_b:.2f}x lower")
            rows.append((model, speedup, saved, saved_fwd, speedup_b, saved_b))
            bundle_path.unlink()
        print("\nsummary (targets for vit_l_16: speedup >= 10x, peak saving >= 0.9x checkpoint size)")
        for model, speedup, saved, saved_fwd, speedup_b, saved_b in rows:
            print(f"  {model:10s} load_model vs get_model: {speedup:5.1f}x faster, peak RSS lower by {saved:.2f}x"
                  f" the checkpoint ({saved_fwd:.2f}x after a forward); from the bundle file: {speedup_b:.1f}x,"
                  f" {saved_b:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
    else:
        sys.exit(main(sys.argv[1:]))
