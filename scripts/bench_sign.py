#!/usr/bin/env python
"""What signatures cost on a large bundle: ``tvpack sign`` in place, and verify with a signature against without.

    python scripts/bench_sign.py [--size-gb 1.3] [--files 4] [--repeat 3] [--keep]

Builds a bundle of a few synthetic checkpoints (scripts/bench_bundle.py's ``make_checkpoints``), unsigned, then:

  1. ``sign_bundle`` (the library call behind ``tvpack sign``) on that existing bundle, best of --repeat (each run
     appends one more signature), with the bytes it read (``rchar`` of /proc/self/io) against the bundle's size;
     target: under 0.2 s, and no read of the checkpoint data. Also once the whole ``tvpack sign`` process (adds
     Python start-up and imports, a constant).
  2. verify without a policy (``verify_bundle``) against verify with a trusted key (``verify_signed``), interleaved,
     best of --repeat each, page cache warm, with the bytes each read: the signature check reads no data twice.

Timings are printed, never asserted. The temporary files are removed at the end (unless --keep).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_bundle import checkpoints_for, data_arguments, in_scratch  # noqa: E402

MiB = 1 << 20


def read_chars() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (page-cache hits included)."""
    return int(re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text()).group(1))


def measured(fn) -> tuple[float, int]:
    """(seconds, bytes read) of one call."""
    before_io, started = read_chars(), time.perf_counter()
    fn()
    return time.perf_counter() - started, read_chars() - before_io


def write_key(work: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = work / "release.key", work / "release.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def main() -> int:
    args = data_arguments(__doc__.splitlines()[0]).parse_args()
    return in_scratch("tvpack-bench-sign-", run, args)


def run(work: Path, args) -> int:
    import os

    from bench_bundle import REGISTRY, sync

    t0 = time.perf_counter()
    selectors = checkpoints_for(work, args)
    home = work / "home"

    from packager import cache, signing
    from packager.bundle import bundle, verify_bundle

    for path in sorted((home / "hub" / "checkpoints").glob("*.pth")):
        cache.file_sha256(path)  # the hashes are known, as after any fetch
    out = bundle(selectors, work / "bench.tvpack", registry=[REGISTRY], torch_home=home, fetch=False)
    size = out.stat().st_size
    print(f"bundle of {args.files} checkpoints, {size / MiB:,.0f} MiB (made in {time.perf_counter() - t0:.0f} s)")
    private, public = write_key(work)
    signer = signing.Signer.load(private)
    trust = signing.trust_policy([public])

    # 1. signing an existing bundle: the payload stays on disk untouched, only the end blocks change
    sync()
    sign_runs = [measured(lambda i=i: signing.sign_bundle(out, signer, label=f"run{i}")) for i in range(args.repeat)]
    t_sign, read_sign = min(sign_runs)
    sync()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(work)])}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "packager", "sign", str(out), "--key", str(private), "--label", "cli"],
                   check=True, env=env, capture_output=True)
    t_sign_cli = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import packager.cli, packager.signing"], check=True, env=env)
    t_imports = time.perf_counter() - started

    # 2. verify, contents only vs contents and signatures (page cache warm for both)
    verify_bundle(out)
    plain, signed = [], []
    for _ in range(args.repeat):
        plain.append(measured(lambda: verify_bundle(out)))
        signed.append(measured(lambda: signing.verify_signed(out, trust)))
    (t_plain, read_plain), (t_signed, read_signed) = min(plain), min(signed)
    from packager.bundle import open_bundle

    with open_bundle(out) as opened:
        t_check, read_check = measured(lambda: signing.require_signed(
            signing.bundle_signatures(opened, trust.trust), trust, out.name))
        n_sigs = len(opened.signatures)

    print(f"\nsign    {size / MiB:,.0f} MiB bundle in place: {t_sign * 1000:.1f} ms (target < 200 ms), read "
          f"{read_sign / 1024:.0f} KiB of {size / MiB:,.0f} MiB (headers, manifest, end blocks; no checkpoint data)")
    print(f"        whole `tvpack sign` process {t_sign_cli:.2f} s, of which Python start-up and imports "
          f"{t_imports:.2f} s")
    print(f"verify  without signature check {t_plain:.2f} s (read {read_plain / MiB:,.0f} MiB) | with a trusted key, "
          f"{n_sigs} signatures {t_signed:.2f} s (read {read_signed / MiB:,.0f} MiB) -> "
          f"{(t_signed - t_plain) * 1000:+.0f} ms, {(read_signed - read_plain) / 1024:+.0f} KiB read")
    print(f"        the signature check alone: {t_check * 1000:.1f} ms, {read_check / 1024:.0f} KiB read "
          f"(no second read of the data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
