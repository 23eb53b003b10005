#!/usr/bin/env python
"""Bundle and install benchmarks: tvpack against ``tar -cf`` / ``tar -xf``, measured in one run.

    python scripts/bench_bundle.py [--size-gb 1.5] [--files 4] [--repeat 3] [--keep]

Synthesizes a few large checkpoints (``torch.save`` of random tensors, named with their sha256
prefix like torchvision's files) described by a tiny registry module written next to them; they
sit in a TORCH_HOME cache and are hashed once into the verification index ("warm, already
verified"). Then, page cache warm for every tool and ``sync`` before every timed run:

  1. ``bundle`` of all files vs ``tar -cf`` of the same files (target within 1.2x), and vs ``tar -cf``
     followed by an fsync of what it wrote (tvpack fsyncs a bundle before naming it, tar leaves its
     output in the page cache, so the second baseline does the same work to the same end): the library
     call timed in-process after a warm-up (the data path), runs interleaved with tar's; and once
     the whole ``tvpack bundle`` process (which adds Python start-up and importing
     torch/torchvision, a constant of a few seconds);
  2. ``install`` of that bundle into an empty TORCH_HOME (verify every hash, weights-only pickle
     check, atomic placement, fsync) vs ``tar -xf`` (target within 1.2x) and ``tar -xf`` then an fsync of
     every file and directory it made, the same two ways;
  3. peak RSS (ru_maxrss, via a small launcher process) of the ``tvpack bundle`` / ``tvpack install`` processes
     for one file and for all files, against an interpreter that only imports the same modules,
     and of tar: memory must not grow with the data (target under 200 MB above the interpreter).

Best of --repeat runs each. The temporary files are removed at the end (unless --keep).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REGISTRY = "tvpack_bench_registry"
MiB = 1 << 20


def make_checkpoints(work: Path, total: int, count: int) -> list[str]:
    """Write ``count`` checkpoints of ``total`` bytes in all into the cache; returns selectors."""
    import torch

    ckpt = work / "home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        # a few tensors per file, like a real state dict
        per = total // count // 4 // 4
        state = {f"layer{j}.weight": torch.randn(per, generator=gen) for j in range(4)}
        tmp = ckpt / f"bench{i}.pth"
        torch.save(state, tmp)
        del state
        sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
        final = ckpt / f"bench{i}-{sha[:8]}.pth"
        os.replace(tmp, final)
        names.append(final.name)
    members = "\n".join(
        f"    BIG{i} = Weights(url=URL + {name!r}, transforms=partial(ImageClassification, crop_size=224),"
        f" meta={{'min_size': (1, 1), 'categories': None, '_metrics': {{'Bench': {{'acc@1': {i}.5}}}}}})"
        for i, name in enumerate(names))
    (work / f"{REGISTRY}.py").write_text(textwrap.dedent('''\
        from functools import partial
        from typing import Optional
        from torch import nn
        from torchvision.models._api import Weights, WeightsEnum
        from torchvision.transforms._presets import ImageClassification

        URL = "https://download.pytorch.org/models/tvpack-bench/"


        class Bench_Weights(WeightsEnum):
        ''') + members + "\n\n\ndef bench_model(*, weights: Optional[Bench_Weights] = None) -> nn.Module:\n"
        "    return nn.Identity()\n")
    return [f"Bench_Weights.BIG{i}" for i in range(count)]


def sync() -> None:
    os.sync()
    time.sleep(0.2)


def timed(fn) -> float:
    sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# Linux keeps a process's peak RSS across fork and exec, so a child forked from this (large)
# process would report our peak. A small launcher forks the measured command instead and reports
# its wall time and ru_maxrss.
_LAUNCHER = (
    "import os, sys, time\n"
    "t = time.perf_counter(); pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(time.perf_counter() - t, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))\n"
)


def run_child(args: list[str], env: dict) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    sync()
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *args], env=env, capture_output=True, text=True)
    fields = proc.stdout.split()
    if proc.returncode != 0 or len(fields) != 3 or fields[2] != "0":
        raise SystemExit(f"{args[:4]} failed: {proc.stderr[-2000:]}")
    return float(fields[0]), int(fields[1])


def fsync_tree(path: Path) -> None:
    """fsync ``path`` and, for a directory, every file and directory under it: what makes a copy durable."""
    paths = [path] if path.is_file() else [path, *path.rglob("*")]
    for each in paths:
        fd = os.open(each, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def data_arguments(description: str, *, size_gb: float = 1.3, files: int = 4) -> argparse.ArgumentParser:
    """The options of every benchmark over synthetic checkpoints: --size-gb, --files, --repeat, --keep
    (add more before ``parse_args``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size-gb", type=float, default=size_gb)
    parser.add_argument("--files", type=int, default=files)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    return parser


def checkpoints_for(work: Path, args) -> list[str]:
    """:func:`make_checkpoints` of ``args.size_gb`` in ``args.files`` files, its registry module importable."""
    selectors = make_checkpoints(work, int(args.size_gb * (1 << 30)), args.files)
    sys.path.insert(0, str(work))
    return selectors


def in_scratch(prefix: str, run, args) -> int:
    """``run(work, args)`` in a fresh temporary directory, removed afterwards unless ``args.keep``."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return run(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def interleaved(repeat: int, *contenders) -> list[float]:
    """Best of ``repeat`` for each (run, cleanup), taking turns so that load from elsewhere hits all alike."""
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(repeat):
        for slot, (fn, cleanup) in enumerate(contenders):
            cleanup()
            times[slot].append(fn())
    return [min(t) for t in times]


def main() -> int:
    args = data_arguments(__doc__.splitlines()[0], size_gb=1.5).parse_args()

    return in_scratch("tvpack-bench-bundle-", run, args)


def run(work: Path, args) -> int:
    t0 = time.perf_counter()
    selectors = checkpoints_for(work, args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(work)]), "TVPACK_DEBUG": "1"}
    home = work / "home"
    ckpt = home / "hub" / "checkpoints"
    files = sorted(p.name for p in ckpt.glob("*.pth"))
    data = sum((ckpt / f).stat().st_size for f in files)

    from packager import cache
    from packager.bundle import bundle, install_bundle

    for name in files:  # warm: hashed once, in the verification index from now on
        cache.file_sha256(ckpt / name)
    print(f"{len(files)} checkpoints, {data / MiB:,.0f} MiB in all (made in {time.perf_counter() - t0:.0f} s)")

    out, tar_out = work / "bench.tvpack", work / "bench.tar"
    # warm-up (imports, first torch.load) so that the timed API calls measure the data path
    bundle(selectors[:1], work / "warmup.tvpack", registry=[REGISTRY], torch_home=home, fetch=False)
    install_bundle(work / "warmup.tvpack", torch_home=work / "warmup-home")
    rm(work / "warmup.tvpack")
    rm(work / "warmup-home")
    tar_members = [f"hub/checkpoints/{f}" for f in files]

    dest, tar_dest = work / "installed", work / "extracted"

    def fresh(path: Path):
        def clean():
            rm(path)
            path.mkdir()
        return clean

    def cli_bundle(sels, output):
        return [sys.executable, "-m", "packager", "bundle", "--registry", REGISTRY, *sels, "--no-fetch",
                "--torch-home", str(home), "-q", "-o", str(output)]

    def cli_install(archive):
        return [sys.executable, "-m", "packager", "install", str(archive), "--torch-home", str(dest), "-q"]

    # 1. bundle vs tar -cf (tar's output is kept for step 2)
    def tar_c(durable: bool):
        subprocess.run(["tar", "-cf", str(tar_out), "-C", str(home), *tar_members], check=True)
        if durable:
            fsync_tree(tar_out)

    def tar_x(durable: bool):
        subprocess.run(["tar", "-xf", str(tar_out), "-C", str(tar_dest)], check=True)
        if durable:
            fsync_tree(tar_dest)

    t_bundle, t_tar_c, t_tar_c_sync = interleaved(
        args.repeat,
        (lambda: timed(lambda: bundle(selectors, out, registry=[REGISTRY], torch_home=home, fetch=False)),
         lambda: rm(out)),
        (lambda: timed(lambda: tar_c(False)), lambda: rm(tar_out)),
        (lambda: timed(lambda: tar_c(True)), lambda: rm(tar_out)),
    )
    rm(out)
    t_bundle_cli = run_child(cli_bundle(selectors, out), env)[0]  # once: start-up is a constant

    # 2. install vs tar -xf
    t_install, t_tar_x, t_tar_x_sync = interleaved(
        args.repeat,
        (lambda: timed(lambda: install_bundle(out, torch_home=dest)), fresh(dest)),
        (lambda: timed(lambda: tar_x(False)), fresh(tar_dest)),
        (lambda: timed(lambda: tar_x(True)), fresh(tar_dest)),
    )
    fresh(dest)()
    t_install_cli = run_child(cli_install(out), env)[0]

    # 3. peak memory: one file vs all files, against the bare interpreter with the same imports
    # what each command imports anyway: bundle reads the registry (torchvision), install needs torch
    base_bundle = ("import torch, torchvision, packager.bundle, packager.cache, packager.spec, packager.cli;"
                   f"from packager.discovery import get_registry; get_registry([{REGISTRY!r}])")
    _t, rss_base_bundle = run_child([sys.executable, "-c", base_bundle], env)
    base_install = "import torch, packager.bundle, packager.cache, packager.cli"
    _t, rss_base_install = run_child([sys.executable, "-c", base_install], env)
    one = work / "one.tvpack"
    _t, rss_bundle_one = run_child(cli_bundle(selectors[:1], one), env)
    rm(out)
    _t, rss_bundle_all = run_child(cli_bundle(selectors, out), env)
    fresh(dest)()
    _t, rss_install_one = run_child(cli_install(one), env)
    fresh(dest)()
    _t, rss_install_all = run_child(cli_install(out), env)
    rm(tar_out)
    _t, rss_tar_c = run_child(["tar", "-cf", str(tar_out), "-C", str(home), *tar_members], env)
    fresh(tar_dest)()
    _t, rss_tar_x = run_child(["tar", "-xf", str(tar_out), "-C", str(tar_dest)], env)

    gb = data / (1 << 30)
    print(f"\nbundle  {gb:.2f} GiB: tar -cf {t_tar_c:.2f} s, tar -cf + fsync {t_tar_c_sync:.2f} s | tvpack bundle (API) "
          f"{t_bundle:.2f} s -> ratio {t_bundle / t_tar_c:.2f}x, {t_bundle / t_tar_c_sync:.2f}x durable (target <= 1.2x)"
          f" | whole CLI process {t_bundle_cli:.2f} s -> {t_bundle_cli / t_tar_c:.2f}x")
    print(f"install {gb:.2f} GiB: tar -xf {t_tar_x:.2f} s, tar -xf + fsync {t_tar_x_sync:.2f} s | tvpack install (API) "
          f"{t_install:.2f} s -> ratio {t_install / t_tar_x:.2f}x, {t_install / t_tar_x_sync:.2f}x durable "
          f"(target <= 1.2x) | whole CLI process {t_install_cli:.2f} s -> {t_install_cli / t_tar_x:.2f}x")
    mb = lambda n: n / MiB  # noqa: E731
    one_size = (ckpt / files[0]).stat().st_size
    print(f"peak RSS (tar -cf {mb(rss_tar_c):.0f} MiB, tar -xf {mb(rss_tar_x):.0f} MiB; torch alone is large)")
    for label, base, small, big in (("bundle", rss_base_bundle, rss_bundle_one, rss_bundle_all),
                                    ("install", rss_base_install, rss_install_one, rss_install_all)):
        print(f"  {label:7} interpreter with its imports {mb(base):.0f} MiB | {mb(one_size):,.0f} MiB of data: "
              f"{mb(small):.0f} MiB ({mb(small - base):+.0f}) | {mb(data):,.0f} MiB of data: {mb(big):.0f} MiB "
              f"({mb(big - base):+.0f}) -> growth {mb(big - small):+.0f} MiB for {data / one_size:.1f}x the data"
              " (target: flat, under +200)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
