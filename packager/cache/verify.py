"""``cache verify``: re-hash cached files on every core and record what they are."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import CacheError
from ..formats.checkpoint import deep_check
from ..fsutil import hash_file
from ..registry import hash_prefix_from_filename
from ..report import Reporter, reporter_for
from ..snapshot import resolve
from .index import record_verified
from .layout import HubLayout
from .scan import _manifest_pins, scan_hub


@dataclass(frozen=True)
class VerifyResult:
    path: Path
    size: int
    sha256: str | None
    ok: bool
    detail: str | None = None
    weights: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"file": self.path.name, "path": str(self.path), "size": self.size, "sha256": self.sha256,
                "ok": self.ok, "detail": self.detail, "weights": list(self.weights)}


_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def _files_for(selectors: Sequence[str], hub: Path, registry: Sequence[str]) -> list[Path]:
    """Checkpoint paths named by selectors: plain file names, or weights selectors (registry)."""
    ckpt = HubLayout(hub).checkpoints
    paths, rest = [], []
    for selector in selectors:
        if "/" not in selector and ((ckpt / selector).is_file() or (ckpt / selector).is_symlink()):
            paths.append(ckpt / selector)
        elif selector.endswith(_FILE_SUFFIXES) and "/" not in selector:
            # A file name, not a selector: say so rather than "unknown weights enum".
            raise CacheError(f"not in the cache: {selector} (no such file in {ckpt})")
        else:
            rest.append(selector)
    if rest:
        for ref in resolve(rest, registry=registry):
            paths.append(ckpt / ref.filename)
    return list(dict.fromkeys(paths))


def verify_cache(selectors: Sequence[str] = (), *, torch_home=None, registry: Sequence[str] = (),
                 deep: bool = False, jobs: int | None = None, progress: bool = False,
                 reporter: Reporter | None = None) -> list[VerifyResult]:
    """Re-hash cached files (all, or those selected) on every core and record the results.

    A file is ok when its sha256 matches what its name promises and any installed manifest pins;
    ``deep`` also requires ``torch.load(weights_only=True)`` to succeed.
    """
    hub = HubLayout.of(torch_home).hub
    hub_info = scan_hub(HubLayout(hub), registry=registry, use_registry=False)
    info = hub_info.cache
    by_path = {f.path: f for f in info.files}
    if selectors:
        paths = _files_for(selectors, hub, registry)
        missing = [p.name for p in paths if p not in by_path]
        if missing:
            raise CacheError("not in the cache: " + ", ".join(missing))
    else:
        paths = [f.path for f in info.files if f.status != "partial"]
    pins = _manifest_pins(hub, hub_info.manifests, hub_info.weights)
    # Largest first, so that the last file to finish is a small one.
    paths.sort(key=lambda p: by_path[p].size, reverse=True)
    jobs = jobs or os.cpu_count() or 1
    bar = reporter_for(reporter, progress).progress(sum(by_path[p].size for p in paths), "verify", transient=False)

    def one(path: Path) -> VerifyResult:
        cached = by_path[path]
        if cached.status == "broken":
            return VerifyResult(path, 0, None, False, cached.detail, cached.weights)
        try:
            digest = hash_file(path)
        except OSError as exc:
            return VerifyResult(path, cached.size, None, False, f"cannot read: {exc.strerror or exc}", cached.weights)
        record_verified(path, digest)
        bar.update(cached.size)
        prefix = hash_prefix_from_filename(path.name)
        pin = pins.get(path.name, (None, None))[1]
        detail = None
        if pin and digest != pin:
            detail = f"sha256 {digest} differs from the manifest's {pin}"
        elif prefix and not digest.startswith(prefix):
            detail = f"sha256 starts {digest[:len(prefix)]}, name promises {prefix}"
        elif deep:
            detail = deep_check(path)
        return VerifyResult(path, cached.size, digest, detail is None, detail, cached.weights)

    try:
        # torch.load's deprecation chatter (TypedStorage, quantized tensors) says nothing about the
        # files: the finding is the result. Filters are process-wide, so set once around the pool.
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=max(1, min(jobs, len(paths) or 1)),
                                                           thread_name_prefix="tvpack-verify") as pool:
            if deep:
                warnings.simplefilter("ignore")
            results = list(pool.map(one, paths))
    finally:
        bar.close()
    results.sort(key=lambda r: r.path.name)
    return results


