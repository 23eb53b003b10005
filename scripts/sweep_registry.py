"""Sweep the offline loader over torchvision's own weights registry, as a new user would use it.

    python scripts/sweep_registry.py [--max-mb N] [--only GLOB] [--jobs 1] [--bundle-every K]

For every torchvision weights whose ``meta["_file_size"]`` is at most ``--max-mb`` (smallest
first), in a temp dir and with no network:

1. ``synthesize_checkpoint(member)`` writes a randomly initialised checkpoint with the member's
   real architecture; the member's url is pointed at it (``https://download.pytorch.org/models/<file>``,
   in this process only);
2. ``packager.bundle`` bundles it, fetching from a directory mirror holding that file (upstream
   disabled), and the bundle is installed into a fresh TORCH_HOME;
3. ``packager.load_model(torch_home, ...)`` (and, for every K-th weights, ``load_model(bundle)``)
   is compared with ``torchvision.models.get_model(model, weights=member)`` run from that
   TORCH_HOME: ``torch.equal`` on every output tensor for an input suited to the family, plus
   ``weights.meta == member.meta`` and the transforms' outputs on a sample.

One line per weights (``ok`` or ``FAIL <reason>``, with the time), then a summary; exit status 1
on any failure. ``--jobs N`` runs N weights at a time in child processes (one per weights).
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

UPSTREAM = "https://download.pytorch.org/models/"

# Weights that cannot run in reasonable time / memory on a 2-core machine even when small on disk:
# name glob -> reason. (Most big ones are already excluded by --max-mb.)
SKIP: dict[str, str] = {}


# -- inputs per family -------------------------------------------------------------------------------

def _rand(*shape, seed=1):
    import torch

    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _image_u8(h=300, w=260, seed=2):
    import torch

    return (torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def _crop(member) -> tuple[int, int]:
    """The image size the weights' transforms produce (else the meta's min_size, else 224)."""
    t = member.transforms()
    crop = getattr(t, "crop_size", None)
    if crop:
        crop = list(crop)
        return (crop[0], crop[-1])
    min_size = member.meta.get("min_size")
    if min_size:
        return (max(int(min_size[0]), 32), max(int(min_size[1]), 32))
    return (224, 224)


def plan(ref, member):
    """(model inputs, forward kwargs, builder kwargs, transforms inputs) for the family."""
    family = ref.family
    if family in ("classification", "quantization"):
        h, w = _crop(member)
        return (_rand(1, 3, h, w),), {}, {}, (_image_u8(),)
    if family == "detection":
        return ([_rand(3, 120, 160), _rand(3, 96, 128, seed=3)],), {}, {}, (_image_u8(),)
    if family == "segmentation":
        return (_rand(1, 3, 128, 128),), {}, {}, (_image_u8(),)
    if family == "video":
        h, w = _crop(member)
        t = max(int(member.meta.get("min_temporal_size", 1) or 1), 4)
        import torch

        clip = (torch.rand(t, 3, 130, 150, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
        return (_rand(1, 3, t, h, w),), {}, {}, (clip,)
    if family == "optical_flow":
        a, b = _rand(1, 3, 128, 128), _rand(1, 3, 128, 128, seed=5)
        return (a, b), {"num_flow_updates": 2}, {}, (_image_u8(seed=6), _image_u8(seed=7))
    raise ValueError(f"no input plan for family {family!r}")


# -- comparing ---------------------------------------------------------------------------------------

def diff(a, b, where="output") -> str | None:
    """None when ``a`` and ``b`` are identical (tensors torch.equal with the same dtype), else where not."""
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return f"{where}: tensor vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.is_quantized or b.is_quantized:
            a, b = a.dequantize(), b.dequantize()
        if not torch.equal(a, b):
            gap = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "?"
            return f"{where}: values differ (max abs {gap})"
        return None
    if isinstance(a, dict):
        if not isinstance(b, dict) or list(a) != list(b):
            return f"{where}: keys {list(a)} vs {list(b) if isinstance(b, dict) else type(b).__name__}"
        for key in a:
            found = diff(a[key], b[key], f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return f"{where}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b) if hasattr(b, '__len__') else '?'}]"
        for i, (x, y) in enumerate(zip(a, b)):
            found = diff(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def forward(model, inputs, kwargs):
    import torch

    with torch.inference_mode():
        return model(*inputs, **kwargs)


# -- one weights -------------------------------------------------------------------------------------

def check_one(ref_name: str, with_bundle_file: bool, workdir: str) -> tuple[str, str]:
    """('ok' | 'FAIL' | 'SKIP', detail) for one weights; everything it writes goes under ``workdir``."""
    import torch
    import torchvision

    from packager import load_model
    from packager.bundle import bundle, install
    from packager.discovery import get_registry
    from packager.loader import LoaderWarning
    from packager.testing.zoo import synthesize_checkpoint

    reg = get_registry(())
    ref = next(r for r in reg.all_refs() if r.name == ref_name)
    member = ref.weights()
    model_name = ref.models[0]
    work = Path(workdir)
    stage = "synthesize"
    old_url = member.value.url
    old_home = os.environ.get("TORCH_HOME")
    try:
        mirror = work / "mirror"
        synth = synthesize_checkpoint(member, mirror / "models")
        object.__setattr__(member.value, "url", UPSTREAM + synth.name) if _frozen(member.value) else \
            setattr(member.value, "url", UPSTREAM + synth.name)
        stage = "bundle"
        selector = f"{model_name}:{member.name}"
        bundle_path = bundle([selector], work / "b.tvpack.tar", torch_home=work / "src-home",
                             mirrors=[str(mirror)], upstream=False, jobs=1)
        shutil.rmtree(work / "src-home", ignore_errors=True)
        stage = "install"
        home = work / "home"
        install(bundle_path, torch_home=home)

        stage = "plan"
        inputs, fwd_kwargs, builder_kwargs, t_inputs = plan(ref, member)
        extra = {"quantize": True} if ref.family == "quantization" else {}

        stage = "torchvision"
        os.environ["TORCH_HOME"] = str(home)
        torch.manual_seed(0)
        expected_model = torchvision.models.get_model(model_name, weights=member, **builder_kwargs, **extra).eval()
        expected = forward(expected_model, inputs, fwd_kwargs)
        del expected_model

        sources = [("cache", home)] + ([("bundle", bundle_path)] if with_bundle_file else [])
        notes = []
        for kind, source in sources:
            stage = f"load({kind})"
            with warnings.catch_warnings(), _loader_log() as messages:
                warnings.simplefilter("error", LoaderWarning)  # a DriftWarning is a finding
                model, weights = load_model(source, selector, **builder_kwargs)
            # the meta-device fast build fell back to a plain one (expected only for quantized models)
            plain = [m for m in messages if "plain way" in m]
            if plain and ref.family != "quantization" and not notes:
                notes.append(f"NOTE plain build: {plain[0][:200]}")
            stage = f"check({kind})"
            if model.training:
                return "FAIL", f"{kind}: model not in eval mode"
            leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
            if leftovers:
                return "FAIL", f"{kind}: meta tensors left: {leftovers[:3]}"
            if weights.meta != member.meta:
                keys = sorted(k for k in set(weights.meta) | set(member.meta)
                              if weights.meta.get(k, ...) != member.meta.get(k, ...))
                return "FAIL", f"{kind}: meta differs ({', '.join(keys)})"
            if weights.url != member.url:
                return "FAIL", f"{kind}: url {weights.url} != {member.url}"
            got = forward(model, inputs, fwd_kwargs)
            found = diff(got, expected)
            if found:
                return "FAIL", f"{kind}: {found}"
            stage = f"transforms({kind})"
            found = diff(weights.transforms()(*t_inputs), member.transforms()(*t_inputs), "transforms")
            if found:
                return "FAIL", f"{kind}: {found}"
            del model, weights, got
        return "ok", f"{model_name}, {ref.family}" + (", +bundle file" if with_bundle_file else "") + \
            "".join(f"; {n}" for n in notes)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, with where it happened
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if os.environ.get("SWEEP_DEBUG"):
            traceback.print_exc()
        return "FAIL", f"{stage}: {type(exc).__name__}: {first[:300]}"
    finally:
        setattr(member.value, "url", old_url) if not _frozen(member.value) else \
            object.__setattr__(member.value, "url", old_url)
        if old_home is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old_home
        gc.collect()


@contextlib.contextmanager
def _loader_log():
    """The packager.loader debug messages logged meanwhile (e.g. a fast build falling back)."""
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("packager.loader")
    handler, level = Collect(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _frozen(value) -> bool:
    params = getattr(type(value), "__dataclass_params__", None)
    return bool(params and params.frozen)


def _child(ref_name: str, with_bundle_file: bool, threads: int) -> tuple[str, str, float]:
    import torch

    torch.set_num_threads(threads)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tvpack-sweep-") as tmp:
        status, detail = check_one(ref_name, with_bundle_file, tmp)
    return status, detail, time.monotonic() - start


# -- main --------------------------------------------------------------------------------------------

def select(max_mb: float, only: str | None):
    from packager.discovery import get_registry

    chosen, skipped = [], []
    for ref in get_registry(()).all_refs():
        if only and not any(fnmatch.fnmatchcase(ref.name, glob) or any(fnmatch.fnmatchcase(m, glob) for m in ref.models)
                            for glob in only.split(",")):
            continue
        if not ref.models:
            skipped.append((ref, "no builder takes it"))
            continue
        size_mb = (ref.size_hint or 0) / (1024 * 1024)
        if ref.size_hint is None or size_mb > max_mb:
            continue
        reason = next((why for pattern, why in SKIP.items() if fnmatch.fnmatchcase(ref.name, pattern)), None)
        if reason:
            skipped.append((ref, reason))
            continue
        chosen.append(ref)
    chosen.sort(key=lambda r: (r.size_hint, r.name))
    return chosen, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-mb", type=float, default=150, help="largest checkpoint to try, in MB (default 150)")
    parser.add_argument("--min-mb", type=float, default=0, help="smallest checkpoint to try, in MB (default 0)")
    parser.add_argument("--only", help="only weights (or models) matching this shell glob (several: comma-separated)")
    parser.add_argument("--jobs", type=int, default=1, help="weights checked at a time (child processes)")
    parser.add_argument("--bundle-every", type=int, default=4,
                        help="also load from the bundle file for every K-th weights (default 4; 1 = all)")
    args = parser.parse_args(argv)

    import torch
    import torchvision

    chosen, skipped = select(args.max_mb, args.only)
    chosen = [r for r in chosen if (r.size_hint or 0) / (1024 * 1024) >= args.min_mb]
    print(f"tvpack registry sweep: torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{len(chosen)} weights <= {args.max_mb:g} MB" + (f" matching {args.only!r}" if args.only else ""),
          flush=True)
    for ref, why in skipped:
        print(f"SKIP  {ref.name}: {why}", flush=True)
    results = []
    start = time.monotonic()
    work = [(i, ref, args.bundle_every > 0 and i % args.bundle_every == 0) for i, ref in enumerate(chosen)]

    def report(i, ref, status, detail, seconds):
        results.append((ref, status, detail, seconds))
        size = (ref.size_hint or 0) / (1024 * 1024)
        print(f"[{len(results):3d}/{len(chosen)}] {status:4s} {ref.name} ({size:.1f} MB) {seconds:6.1f}s  {detail}",
              flush=True)

    if args.jobs <= 1:
        for i, ref, with_file in work:
            status, detail, seconds = _child(ref.name, with_file, torch.get_num_threads())
            report(i, ref, status, detail, seconds)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 2) // args.jobs)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            futures = {pool.submit(_child, ref.name, with_file, threads): (i, ref) for i, ref, with_file in work}
            from concurrent.futures import as_completed

            for future in as_completed(futures):
                i, ref = futures[future]
                try:
                    status, detail, seconds = future.result()
                except Exception as exc:  # noqa: BLE001 - a crashed child (e.g. out of memory)
                    status, detail, seconds = "FAIL", f"child process: {type(exc).__name__}: {exc}", 0.0
                report(i, ref, status, detail, seconds)

    total = time.monotonic() - start
    failed = [r for r in results if r[1] != "ok"]
    families: dict[str, int] = {}
    for ref, status, _d, _s in results:
        if status == "ok":
            families[ref.family] = families.get(ref.family, 0) + 1
    print(f"\n{len(results) - len(failed)}/{len(results)} ok, {len(failed)} failed, {len(skipped)} skipped, "
          f"{total:.0f}s; ok by family: " + ", ".join(f"{k} {v}" for k, v in sorted(families.items())))
    for ref, _status, detail, _s in failed:
        print(f"FAILED {ref.name}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
