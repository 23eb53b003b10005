#!/usr/bin/env python
"""OCI registry benchmarks: tvpack push / pull against ``skopeo copy`` of the same image, measured in one run.

    python scripts/bench_oci.py [--size-gb 1.3] [--files 4] [--repeat 3] [--jobs 4] [--keep]

Synthesizes a ~1.3 GB bundle (the checkpoints of scripts/bench_bundle.py) and runs the CNCF distribution
registry (Debian's docker-registry) on loopback. Whole processes are timed, page cache warm, ``sync`` before
each run, contenders taking turns, best of --repeat:

  1. push into an empty registry (a fresh one per run): ``tvpack push BUNDLE oci://...`` vs
     ``skopeo copy oci:LAYOUT docker://...`` of the same image (target within 1.3x). tvpack once with its
     layer digests known (as an OCI layout knows them) and once from a cold digest cache (every layer
     hashed before it is offered);
  2. pull: ``tvpack pull oci://... -o FILE`` vs ``skopeo copy docker://... oci:DIR`` (target within 1.3x);
  3. re-push of the unchanged image: ``tvpack push`` again, whole process (target under 1 s);
  4. pull over a capped link: nginx with ``limit_rate`` (--rate, per connection) in front of the registry, the
     image's --files large layers: ``tvpack pull`` as it is (--jobs layers at once, each large layer in ranges)
     vs one layer at a time over one connection (``--jobs 1 --connections 1``), and ``skopeo copy`` through the
     same proxy (target: clearly faster than one layer at a time).
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

from bench_bundle import REGISTRY, checkpoints_for, data_arguments, in_scratch, rm, run_child  # noqa: E402

MiB = 1 << 20


def main() -> int:
    parser = data_arguments(__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="tvpack pull --jobs (layers fetched at once)")
    parser.add_argument("--rate", default="40m", help="nginx limit_rate per connection for the capped pull")
    args = parser.parse_args()
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed (apt-get install docker-registry skopeo)")
            return 1
    return in_scratch("tvpack-bench-oci-", run, args)


def run(work: Path, args) -> int:
    from registry_server import DistributionRegistry

    from packager.bundle import bundle

    t0 = time.perf_counter()
    selectors = checkpoints_for(work, args)
    the_bundle = bundle(selectors, work / "bench.tvpack", registry=[REGISTRY], torch_home=work / "home", fetch=False)
    size = the_bundle.stat().st_size
    print(f"bundle of {args.files} checkpoints, {size / MiB:,.0f} MiB (made in {time.perf_counter() - t0:.0f} s)")
    warm_cache, cold_cache = work / "xdg-warm", work / "xdg-cold"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(warm_cache)}
    # skopeo's blob-info cache (which registries hold which blob) lives under HOME: keep it to this run
    skopeo_env = {**os.environ, "HOME": str(work / "skopeo-home")}

    def tvpack(*argv) -> list[str]:
        return [sys.executable, "-m", "packager", *map(str, argv), "--plain-http", "-q"]

    registries: list[DistributionRegistry] = []

    def fresh_registry() -> DistributionRegistry:
        for old in registries:
            old.stop()
            shutil.rmtree(old.workdir, ignore_errors=True)
        registries.clear()
        reg = DistributionRegistry(work / "registries").start()
        registries.append(reg)
        return reg

    try:
        # the image, once, and an OCI layout of it for skopeo (same digests: skopeo copies it as it is)
        seed = fresh_registry()
        subprocess.run(tvpack("push", the_bundle, f"oci://{seed.host}/bench/models:v1"), env=env, check=True,
                       stdout=subprocess.DEVNULL)
        layout = work / "layout"
        subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{seed.host}/bench/models:v1",
                        f"oci:{layout}:v1"], env=skopeo_env, check=True)

        def timed_child(argv, child_env) -> float:
            return run_child(argv, child_env)[0]

        # 1. push into an empty registry
        times: dict[str, list[float]] = {"tvpack": [], "tvpack-cold": [], "skopeo": []}
        for _ in range(args.repeat):
            reg = fresh_registry()
            times["tvpack"].append(timed_child(tvpack("push", the_bundle, f"oci://{reg.host}/bench/models:v1"), env))
            reg = fresh_registry()
            rm(cold_cache)
            times["tvpack-cold"].append(timed_child(tvpack("push", the_bundle, f"oci://{reg.host}/bench/models:v1"),
                                                    {**env, "XDG_CACHE_HOME": str(cold_cache)}))
            reg = fresh_registry()
            times["skopeo"].append(timed_child(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1",
                                                f"docker://{reg.host}/bench/models:v1"], skopeo_env))
        push = {k: min(v) for k, v in times.items()}

        # 2. pull from a registry holding the image
        reg = fresh_registry()
        subprocess.run(tvpack("push", the_bundle, f"oci://{reg.host}/bench/models:v1"), env=env, check=True,
                       stdout=subprocess.DEVNULL)
        ref = f"oci://{reg.host}/bench/models:v1"
        pulled, pulled_layout = work / "pulled.tvpack", work / "pulled-layout"
        times = {"tvpack": [], "skopeo": []}
        for _ in range(args.repeat):
            rm(pulled)
            times["tvpack"].append(timed_child(tvpack("pull", ref, "-o", pulled, "--jobs", args.jobs), env))
            rm(pulled_layout)
            times["skopeo"].append(timed_child(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                                f"docker://{reg.host}/bench/models:v1", f"oci:{pulled_layout}:v1"],
                                               skopeo_env))
        pull = {k: min(v) for k, v in times.items()}
        identical = pulled.read_bytes() == the_bundle.read_bytes()

        # 3. re-push of the unchanged image, and a Python that only starts (the floor of any CLI call)
        repush = min(timed_child(tvpack("push", the_bundle, ref), env) for _ in range(args.repeat))
        startup = min(timed_child([sys.executable, "-c", "import packager.cli"], env) for _ in range(args.repeat))

        # 4. pull over a link that caps each connection
        capped = capped_pull(work, reg.host, args, tvpack, env, skopeo_env, timed_child)
    finally:
        for reg in registries:
            reg.stop()

    mb = size / MiB
    print(f"\npush {mb:,.0f} MiB into an empty registry: skopeo copy oci:->docker:// {push['skopeo']:.2f} s | "
          f"tvpack push {push['tvpack']:.2f} s -> ratio {push['tvpack'] / push['skopeo']:.2f}x (target <= 1.3x) | "
          f"cold digest cache (hashes every layer first) {push['tvpack-cold']:.2f} s -> "
          f"{push['tvpack-cold'] / push['skopeo']:.2f}x")
    print(f"pull {mb:,.0f} MiB: skopeo copy docker://->oci: {pull['skopeo']:.2f} s | tvpack pull {pull['tvpack']:.2f} s "
          f"-> ratio {pull['tvpack'] / pull['skopeo']:.2f}x (target <= 1.3x); pulled bundle byte-identical: {identical}")
    print(f"re-push of the unchanged image: {repush:.2f} s, whole process (target < 1 s; "
          f"python -c 'import packager.cli' alone: {startup:.2f} s)")
    print(f"pull {mb:,.0f} MiB in {args.files} layers through nginx limit_rate {args.rate} per connection: "
          f"one layer at a time, one connection {capped['serial']:.2f} s | skopeo copy {capped['skopeo']:.2f} s | "
          f"tvpack pull (--jobs {args.jobs}, ranges) {capped['tvpack']:.2f} s -> "
          f"{capped['serial'] / capped['tvpack']:.2f}x faster than one at a time, "
          f"{capped['skopeo'] / capped['tvpack']:.2f}x faster than skopeo")
    return 0 if identical else 1


def capped_pull(work: Path, registry_host: str, args, tvpack, env, skopeo_env, timed_child) -> dict[str, float]:
    """Best-of-repeat pull times through nginx capping each connection at --rate in front of the registry."""
    from servers import Nginx

    proxy = Nginx(work, work / "capped-proxy", proxy_to=f"http://{registry_host}", max_body="0",
                  limit_rate=args.rate).start()
    try:
        ref = f"oci://127.0.0.1:{proxy.port}/bench/models:v1"
        out, layout = work / "capped.tvpack", work / "capped-layout"
        times: dict[str, list[float]] = {"tvpack": [], "serial": [], "skopeo": []}
        for _ in range(args.repeat):
            rm(out)
            times["tvpack"].append(timed_child(tvpack("pull", ref, "-o", out, "--jobs", args.jobs), env))
            rm(out)
            times["serial"].append(timed_child(tvpack("pull", ref, "-o", out, "--jobs", 1, "--connections", 1), env))
            rm(layout)
            times["skopeo"].append(timed_child(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                                f"docker://127.0.0.1:{proxy.port}/bench/models:v1",
                                                f"oci:{layout}:v1"], skopeo_env))
    finally:
        proxy.stop()
    return {k: min(v) for k, v in times.items()}


if __name__ == "__main__":
    sys.exit(main())
