"""Is a checkpoint safe for vanilla torchvision? The ``torch.load(weights_only=True)`` check.

vanilla torchvision unpickles cache files with ``weights_only=False``, so a poisoned pickle would
run code there: every checkpoint a bundle installs, and ``cache verify --deep``, must load with
torch's restricted unpickler first. This is one of the few places tvpack imports torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import BundleError
from .archive import BLOCK


def check_checkpoint(source, what: str) -> None:
    """Refuse a checkpoint that ``torch.load(weights_only=True)`` would not load.

    ``source`` is a path (the same code path vanilla torch takes on a cache file) or a seekable
    file object. Tensor data is never read (``skip_data``); only the pickles are unpickled, by
    torch's restricted unpickler, which never runs code. (The meta device would be cheaper still
    but cannot hold quantized tensors.)
    """
    import warnings

    import torch

    if _head(source)[257:262] == b"ustar":
        # PyTorch's pre-2017 tar format: torch refuses weights_only for it (and only reads it
        # from a real file, which a window on the archive is not).
        raise BundleError(f"checkpoint {what} is in PyTorch's legacy .tar format, which cannot be loaded with"
                          " torch.load(weights_only=True); re-save it with a current torch")
    try:
        # skip_data: storages are allocated (untouched, so no resident memory) but never filled.
        with torch.serialization.skip_data(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(source, weights_only=True, map_location="cpu")
    except Exception as exc:  # any failure means vanilla torchvision cannot load it safely
        text = str(exc).strip()
        match = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
        reason = f"its pickle calls {match.group(1)}, which could run code" if match else \
            (text.splitlines()[0][:200] if text else type(exc).__name__)
        raise BundleError(f"checkpoint {what} does not load with torch.load(weights_only=True): {reason}") from None


def _head(source) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read(BLOCK)
    head = source.read(BLOCK)
    source.seek(0)
    return head


def deep_check(path: Path) -> str | None:
    """Why ``torch.load(weights_only=True)`` fails on a cache file (memory-mapped), or None."""
    import torch

    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        return f"torch.load(weights_only=True) failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None
