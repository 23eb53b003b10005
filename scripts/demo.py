"""`make demo`: tvpack's main job end to end on the synthetic zoo, no internet needed.

1. build the zoo (real architectures, random weights) and serve it from a loopback HTTP mirror;
2. `tvpack fetch` through the mirror into a connected machine's cache, then `cache ls`;
3. `tvpack bundle` the cached weights into one archive, `inspect` and `verify` it;
4. `tvpack install` the bundle into a fresh TORCH_HOME (the air-gapped machine);
5. `tvpack predict` there with no network at all (`unshare -n` when available).

Every step runs the real `tvpack` command; the demo stops at the first failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ZOO = "packager.testing.zoo"
SELECTION = ["zoo_mobilenet_v3_small", "zoo_ssdlite320", "zoo_lraspp", "zoo_s3d", "zoo_raft_small",
             "zoo_quantized_shufflenet_v2"]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def tvpack(*args: str, env: dict | None = None, offline: bool = False) -> None:
    cmd = [sys.executable, "-m", "packager", *args]
    if offline and os.geteuid() == 0 and shutil.which("unshare"):
        cmd = ["unshare", "-n", *cmd]
        print("$ unshare -n tvpack " + " ".join(args), flush=True)
    else:
        print("$ tvpack " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT)


def main() -> int:
    from packager.testing import zoo
    from packager.testing.server import MirrorServer

    step("1. synthetic zoo and a loopback mirror")
    print(f"zoo: {zoo.zoo_dir()} ({len(zoo.zoo_files())} checkpoints)")
    work = Path(tempfile.mkdtemp(prefix="tvpack-demo-"))
    online_home, airgap_home = work / "online-torch-home", work / "airgapped-torch-home"
    bundle_path = work / "models.tvpack.tar"
    try:
        with MirrorServer(zoo.zoo_dir()) as server:
            print(f"mirror: {server.url}")
            tvpack("list", "zoo_*", "--registry", ZOO)

            step("2. fetch through the mirror (verified, parallel), then look at the cache")
            tvpack("fetch", *SELECTION, "--with-backbones", "--registry", ZOO, "--mirror", server.url,
                   "--no-upstream", "--torch-home", str(online_home))
            tvpack("cache", "ls", "--torch-home", str(online_home))

        step("3. bundle what is cached (no network needed any more), inspect and verify it")
        tvpack("bundle", *SELECTION, "--with-backbones", "--registry", ZOO, "--no-fetch",
               "--torch-home", str(online_home), "-o", str(bundle_path))
        tvpack("inspect", str(bundle_path))
        tvpack("verify", str(bundle_path))

        step("4. install into a fresh TORCH_HOME (the air-gapped machine)")
        tvpack("install", str(bundle_path), "--torch-home", str(airgap_home))
        tvpack("cache", "ls", "--torch-home", str(airgap_home))

        step("5. predict offline, from the installed cache and straight from the bundle")
        image = work / "example.png"
        _write_example_image(image)
        tvpack("predict", str(airgap_home), "zoo_mobilenet_v3_small", str(image), "--topk", "3",
               "--registry", ZOO, offline=True)
        tvpack("predict", str(bundle_path), "zoo_quantized_shufflenet_v2", str(image), "--topk", "3",
               "--registry", ZOO, offline=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\ndemo finished: fetch -> bundle -> install -> offline predict all worked.")
    return 0


def _write_example_image(path: Path) -> None:
    import torch
    from torchvision.io import write_png

    torch.manual_seed(0)
    y, x = torch.meshgrid(torch.arange(96), torch.arange(128), indexing="ij")
    image = torch.stack([(x * 2) % 256, (y * 2) % 256, ((x + y) * 3) % 256]).to(torch.uint8)
    write_png(image, str(path))


if __name__ == "__main__":
    sys.exit(main())
