#!/usr/bin/env python
"""Split-volume and delta-bundle benchmarks, measured against baselines in the same run.

    python scripts/bench_delta.py [--size-gb 1.3] [--files 10] [--parts 4] [--repeat 3] [--keep]

Synthesizes ``--files`` checkpoints of ``--size-gb`` in all (as scripts/bench_bundle.py does), warm
in a TORCH_HOME cache and its verification index. Page cache warm for every contender and ``sync``
before every timed run; best of ``--repeat``, contenders taking turns:

  1. ``install`` from a ``--parts``-part split of the bundle (read in place through NAME.000) vs
     ``install`` from the single file (target within 1.1x), and ``verify`` the same two ways (the
     read path alone: install's fsyncs vary with the disk's other work); ``bundle --split`` vs ``bundle``, and
     vs ``bundle`` then coreutils ``split -b`` and ``sha256sum`` (the parts must be hashed once for
     NAME.sha256: that is the cost); ``tvpack split`` vs ``split -b`` + ``sha256sum``;
  2. a delta bundle for a site holding 90% of the selection (its inventory lists all but the last
     tenth of the files) vs the full bundle: time and size; plus ``inventory`` of the site from the
     index and with ``--deep``.

The temporary files are removed at the end (unless --keep).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_bundle import REGISTRY, checkpoints_for, data_arguments, in_scratch, interleaved, rm, timed  # noqa: E402

MiB = 1 << 20


def main() -> int:
    parser = data_arguments(__doc__.splitlines()[0], files=10)
    parser.add_argument("--parts", type=int, default=4)
    args = parser.parse_args()
    return in_scratch("tvpack-bench-delta-", run, args)


def run(work: Path, args) -> int:
    t0 = time.perf_counter()
    selectors = checkpoints_for(work, args)
    home = work / "home"
    ckpt = home / "hub" / "checkpoints"

    from packager import cache, delta
    from packager.bundle import bundle, install_bundle, verify_bundle
    from packager.formats.inventory import make_inventory

    files = sorted(ckpt.glob("*.pth"))
    for path in files:  # warm: hashed once, in the verification index from now on
        cache.file_sha256(path)
    data = sum(p.stat().st_size for p in files)
    print(f"{len(files)} checkpoints, {data / MiB:,.0f} MiB in all (made in {time.perf_counter() - t0:.0f} s)")

    single, split_dir = work / "single.tar", work / "split"
    split_dir.mkdir()
    kw = dict(registry=[REGISTRY], torch_home=home, fetch=False)
    bundle(selectors[:1], work / "warmup.tar", **kw)  # imports, registry: time the data path from here on
    install_bundle(work / "warmup.tar", torch_home=work / "warmup-home")
    rm(work / "warmup.tar")
    rm(work / "warmup-home")

    def fresh(path: Path):
        def clean():
            rm(path)
            path.mkdir()
        return clean

    # 1. bundle --split vs bundle, then install from the parts vs from the single file
    bundle(selectors, single, **kw)
    part_size = -(-single.stat().st_size // args.parts)
    part_size += -part_size % 4096
    t_bundle, t_bundle_split = interleaved(
        args.repeat,
        (lambda: timed(lambda: bundle(selectors, single, **kw)), lambda: rm(single)),
        (lambda: timed(lambda: bundle(selectors, split_dir / "b.tar", split=part_size, **kw)),
         lambda: [rm(p) for p in split_dir.iterdir()]),
    )
    coreutils_dir, resplit_dir = work / "coreutils", work / "resplit"
    coreutils = (f"split -b {part_size} -d -a 3 {single} {coreutils_dir}/b.tar. && cd {coreutils_dir} && "
                 "sha256sum b.tar.0* > b.tar.sha256")
    t_coreutils, t_tvpack_split = interleaved(
        args.repeat,
        (lambda: timed(lambda: subprocess.run(["sh", "-c", coreutils], check=True)), fresh(coreutils_dir)),
        (lambda: timed(lambda: delta.split_bundle(single, part_size, resplit_dir / "b.tar")), fresh(resplit_dir)),
    )
    assert (coreutils_dir / "b.tar.sha256").read_text() == (resplit_dir / "b.tar.sha256").read_text()
    rm(coreutils_dir)
    rm(resplit_dir)
    parts = sorted(split_dir.glob("b.tar.0*"))
    assert len(parts) == args.parts, parts
    dest_single, dest_split = work / "installed-single", work / "installed-split"

    t_install, t_install_split = interleaved(
        args.repeat,
        (lambda: timed(lambda: install_bundle(single, torch_home=dest_single)), fresh(dest_single)),
        (lambda: timed(lambda: install_bundle(parts[0], torch_home=dest_split)), fresh(dest_split)),
    )
    rm(dest_single)
    rm(dest_split)
    # the read path alone (no writes, no fsync whose cost varies with the disk's other work)
    t_verify, t_verify_split = interleaved(
        args.repeat,
        (lambda: timed(lambda: verify_bundle(single)), lambda: None),
        (lambda: timed(lambda: verify_bundle(parts[0])), lambda: None),
    )

    # 2. a delta bundle for a site that holds 90% of the selection
    held = files[:len(files) - max(1, len(files) // 10)]
    site = make_inventory((p.name, p.stat().st_size, cache.file_sha256(p)) for p in held)
    delta_out = work / "delta.tar"
    t_full, t_delta = interleaved(
        args.repeat,
        (lambda: timed(lambda: bundle(selectors, single, **kw)), lambda: rm(single)),
        (lambda: timed(lambda: bundle(selectors, delta_out, site=site, **kw)), lambda: rm(delta_out)),
    )
    t_inventory = min(timed(lambda: delta.inventory(torch_home=home)) for _ in range(args.repeat))
    t_inventory_deep = timed(lambda: delta.inventory(torch_home=home, deep=True))

    gb = data / (1 << 30)
    size_full, size_delta = single.stat().st_size, delta_out.stat().st_size
    print(f"\nsplit   {gb:.2f} GiB in {args.parts} parts of {part_size / MiB:,.0f} MiB:")
    print(f"  install: single file {t_install:.2f} s | from the parts (read in place) {t_install_split:.2f} s "
          f"-> ratio {t_install_split / t_install:.2f}x (target <= 1.1x)")
    print(f"  verify:  single file {t_verify:.2f} s | from the parts {t_verify_split:.2f} s "
          f"-> ratio {t_verify_split / t_verify:.2f}x")
    print(f"  bundle:  single file {t_bundle:.2f} s | --split {t_bundle_split:.2f} s "
          f"-> ratio {t_bundle_split / t_bundle:.2f}x | single file then split -b + sha256sum "
          f"{t_bundle + t_coreutils:.2f} s -> ratio {t_bundle_split / (t_bundle + t_coreutils):.2f}x")
    print(f"  split an existing bundle: split -b + sha256sum {t_coreutils:.2f} s | tvpack split {t_tvpack_split:.2f} s "
          f"-> ratio {t_tvpack_split / t_coreutils:.2f}x")
    print(f"delta   site holds {len(held)} of {len(files)} files ({sum(p.stat().st_size for p in held) / data:.0%} "
          "of the bytes):")
    print(f"  bundle time: full {t_full:.2f} s | delta {t_delta:.2f} s -> {t_delta / t_full:.2f}x")
    print(f"  bundle size: full {size_full / MiB:,.1f} MiB | delta {size_delta / MiB:,.1f} MiB -> "
          f"{size_delta / size_full:.1%} of the full bundle")
    print(f"  inventory of {len(files)} files: from the index {t_inventory * 1000:.0f} ms | --deep "
          f"{t_inventory_deep:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
