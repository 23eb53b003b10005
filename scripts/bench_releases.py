#!/usr/bin/env python
"""What a release (channel checks, record, revocation) and the ML-BOM add to bundling and installing a large bundle.

    python scripts/bench_releases.py [--size-gb 1.3] [--files 4] [--repeat 3] [--keep]

Over synthetic checkpoints (scripts/bench_bundle.py's, hashed once into the verification index), measured in one run:

  1. the BOM: ``formats.sbom.add_bom`` on the bundle's manifest, warm (in-process, best of --repeat), and cold in a
     fresh interpreter (importing cyclonedx-python-lib is most of it);
  2. the release at install: ``channels.check_install`` (revocation check, signer, expiry, the lock, the record)
     plus ``channels.commit_release`` (the record written durably), best of --repeat;
  3. bytes read (``/proc/self/io`` rchar) by ``install_bundle`` of the same bundle with and without a release: the
     release adds no read of checkpoint bytes (the difference is the manifest-sized metadata only);
  4. end to end, for scale: ``bundle`` and ``install_bundle`` of the release bundle (best of --repeat).

Targets: 1 and 2 under 20 ms each (warm), 3 under 1 MB.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bundle import REGISTRY, checkpoints_for, data_arguments, in_scratch, rm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def best(repeat: int, fn, cleanup=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        cleanup()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def run(work: Path, args) -> int:
    import importlib

    from packager import cache, channels, signing
    from packager.formats.release import Release
    from packager.formats.sbom import add_bom

    B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

    selectors = checkpoints_for(work, args)
    home = work / "home"
    for path in sorted((home / "hub" / "checkpoints").iterdir()):
        cache.file_sha256(path)  # warm: already verified
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(work / "k.pem")],
                   check=True)
    subprocess.run(["openssl", "ec", "-in", str(work / "k.pem"), "-pubout", "-out", str(work / "k.pub")],
                   check=True, capture_output=True)
    signer = signing.Signer.load(work / "k.pem")
    trust = signing.trust_policy([work / "k.pub"])
    release = Release("prod", 1)
    out = work / "rel.tvpack"
    plain = work / "plain.tvpack"
    options = dict(registry=[REGISTRY], torch_home=home, fetch=False, sign=signer.members)
    t_bundle = best(args.repeat, lambda: B.bundle(selectors, out, release=release, **options))
    B.bundle(selectors, plain, **options)

    # 1. the BOM
    with B.open_bundle(out) as opened:
        document = json.loads(opened.manifest_bytes)
    document["members"] = {}
    t_bom = best(args.repeat, lambda: add_bom(json.loads(json.dumps(document))))
    cold = subprocess.run([sys.executable, "-c", (
        "import json, sys, time; t = time.perf_counter(); from packager.formats.sbom import add_bom; "
        "add_bom(json.loads(sys.stdin.read())); print(time.perf_counter() - t)")],
        input=json.dumps(document), capture_output=True, text=True, cwd=ROOT, check=True)
    t_bom_cold = float(cold.stdout.split()[-1])

    # 2. the release checks and the record, as install runs them
    site = work / "site"
    hub = site / "hub"
    with B.open_bundle(out) as opened:
        signers = signing.bundle_signatures(opened, trust.trust).valid
        files = {**opened.files}
        manifest, manifest_id = opened.manifest, opened.manifest_id

    decisions = []

    def check():
        with contextlib.ExitStack() as held:
            decisions.append(channels.check_install(hub, manifest, manifest_id, files, signers,
                                                    channels.ReleaseOptions(), held))

    def check_and_commit():
        with contextlib.ExitStack() as held:
            decision = channels.check_install(hub, manifest, manifest_id, files, signers, channels.ReleaseOptions(),
                                              held)
            channels.commit_release(hub, decision)

    # the first release of a channel (no record, the channels folder made), then the same release again (steady
    # state: the record read, checked and rewritten); the check alone, without the durable write
    t_release = best(args.repeat, check_and_commit, lambda: rm(hub / "tvpack" / "channels"))
    t_again = best(args.repeat, check_and_commit)
    t_check = best(args.repeat, check)

    # 3. bytes read by install, with and without a release; 4. install end to end
    def install(path):
        def go():
            before = rchar()
            signing.install_signed(path, trust, torch_home=site)
            reads.append(rchar() - before)
        return go

    reads: list[int] = []
    t_install = best(args.repeat, install(out), lambda: rm(site))
    read_release = min(reads)
    reads.clear()
    t_install_plain = best(args.repeat, install(plain), lambda: rm(site))
    read_plain = min(reads)

    size = out.stat().st_size
    print(f"bundle of {size / (1 << 30):.2f} GiB in {args.files} files, best of {args.repeat}")
    print(f"  ML-BOM (add_bom), warm:               {t_bom * 1000:8.2f} ms   (target < 20 ms)")
    print(f"  ML-BOM, cold (fresh interpreter):     {t_bom_cold * 1000:8.2f} ms   (importing cyclonedx-python-lib)")
    print(f"  release check + record, first:        {t_release * 1000:8.2f} ms   (target < 20 ms)")
    print(f"  release check + record, again:        {t_again * 1000:8.2f} ms   (the record's fsyncs are most of it)")
    print(f"  release check alone:                  {t_check * 1000:8.2f} ms")
    print(f"  bytes read by install, release:       {read_release:12d}")
    print(f"  bytes read by install, no release:    {read_plain:12d}   difference {read_release - read_plain} bytes")
    print(f"  bundle (release + BOM + signature):   {t_bundle:8.3f} s")
    print(f"  install (release + BOM + signature):  {t_install:8.3f} s   plain bundle: {t_install_plain:.3f} s")
    return 0


def main() -> int:
    args = data_arguments(__doc__.splitlines()[0], size_gb=1.3).parse_args()
    return in_scratch("tvpack-bench-releases-", run, args)


if __name__ == "__main__":
    sys.exit(main())
