#!/usr/bin/env python
"""Fan-out: N nodes installing one image, directly from upstream vs through a pull-through cache.

    python scripts/bench_fanout.py [--size-gb 1.3] [--files 4] [--nodes 8] [--keep]

Synthesizes a bundle (the checkpoints of scripts/bench_bundle.py), pushes it to the CNCF distribution registry
(Debian's docker-registry) on loopback as "upstream", then runs --nodes concurrent ``tvpack install oci://...``
into --nodes fresh TORCH_HOMEs twice: straight from upstream (registries.conf empty), and through a second
docker-registry with ``proxy: {remoteurl: upstream}`` named as the mirror in registries.conf. Prints the wall
time of each fan-out and the bytes upstream served (its access log), and their ratios. The cache may fetch a
blob more than once while several nodes ask for it at the same moment; tvpack's part is sending every node to
the mirror and verifying what comes back. A third fan-out through the now warm cache shows what later waves
cost upstream. Nothing is asserted.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the nginx, moto and registry harnesses live with the tests
sys.path.insert(0, str(HERE))

from bench_bundle import REGISTRY, checkpoints_for, data_arguments, in_scratch  # noqa: E402

MiB = 1 << 20


def main() -> int:
    parser = data_arguments(__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    args = parser.parse_args()
    if shutil.which("docker-registry") is None and not Path("/usr/sbin/docker-registry").exists():
        print("docker-registry is not installed (apt-get install docker-registry)")
        return 1
    return in_scratch("tvpack-bench-fanout-", run, args)


def served(reg) -> tuple[int, int]:
    """(blob GETs, body bytes of blob GETs) in ``reg``'s access log so far."""
    gets = [r for r in reg.requests() if r[0] == "GET" and "/blobs/sha256:" in r[1]]
    return len(gets), sum(r[3] for r in gets)


def fan_out(work: Path, name: str, ref: str, nodes: int, env: dict) -> float:
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "packager", "install", ref, "--torch-home",
                               str(work / f"{name}-{i}"), "--plain-http", "-q"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(nodes)]
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"install failed: {err[-2000:]}")
    return time.perf_counter() - started


def run(work: Path, args) -> int:
    from registry_server import DistributionRegistry

    from packager.bundle import bundle
    from packager.oci import push_bundle

    selectors = checkpoints_for(work, args)
    the_bundle = bundle(selectors, work / "bench.tvpack", registry=[REGISTRY], torch_home=work / "home", fetch=False)
    size = the_bundle.stat().st_size
    empty_conf, mirror_conf = work / "empty.conf", work / "mirror.conf"
    empty_conf.write_text("")
    with DistributionRegistry(work / "upstream") as upstream:
        os.environ["CONTAINERS_REGISTRIES_CONF"] = str(empty_conf)
        push_bundle(the_bundle, f"oci://{upstream.host}/bench/models:v1", plain_http=True)
        ref = f"oci://{upstream.host}/bench/models:v1"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(work / "xdg")}
        print(f"image of {args.files} checkpoints, {size / MiB:,.0f} MiB; {args.nodes} concurrent installs")

        before = served(upstream)
        direct = fan_out(work, "direct", ref, args.nodes, {**env, "CONTAINERS_REGISTRIES_CONF": str(empty_conf)})
        after = served(upstream)
        direct_bytes = after[1] - before[1]
        print(f"direct:  {direct:7.1f} s, upstream served {after[0] - before[0]} blob GETs, {direct_bytes / MiB:,.0f} MiB")
        for i in range(args.nodes):
            shutil.rmtree(work / f"direct-{i}", ignore_errors=True)

        with DistributionRegistry(work / "cache", proxy=upstream.url) as cache:
            mirror_conf.write_text(f'[[registry]]\nprefix = "{upstream.host}"\ninsecure = true\n'
                                   f'[[registry.mirror]]\nlocation = "{cache.host}"\ninsecure = true\n')
            before = served(upstream)
            mirrored = fan_out(work, "mirror", ref, args.nodes, {**env, "CONTAINERS_REGISTRIES_CONF": str(mirror_conf)})
            after = served(upstream)
            mirror_bytes = after[1] - before[1]
            print(f"mirror:  {mirrored:7.1f} s, upstream served {after[0] - before[0]} blob GETs, "
                  f"{mirror_bytes / MiB:,.0f} MiB; the cache served {served(cache)[1] / MiB:,.0f} MiB")
            for i in range(args.nodes):
                shutil.rmtree(work / f"mirror-{i}", ignore_errors=True)
            before = served(upstream)
            warm = fan_out(work, "warm", ref, args.nodes, {**env, "CONTAINERS_REGISTRIES_CONF": str(mirror_conf)})
            after = served(upstream)
            print(f"warm:    {warm:7.1f} s, upstream served {after[0] - before[0]} blob GETs, "
                  f"{(after[1] - before[1]) / MiB:,.0f} MiB (the same {args.nodes} installs again, cache warm)")
    print(f"ratio (mirror / direct): time {mirrored / direct:.2f}x, upstream bytes {mirror_bytes / max(direct_bytes, 1):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
