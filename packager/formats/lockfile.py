"""``tvpack.lock``: the exact bytes a project depends on (pip's ``--require-hashes``, for weights).

A lockfile is JSON::

    {"format": "tvpack-lock", "format_version": 1,
     "torch": "2.14.1", "torchvision": "0.29.1",
     "created_by": {"packager": ..., "torch": ..., "torchvision": ..., "python": ...},
     "weights": [{"weights": "ResNet50_Weights.IMAGENET1K_V2", "enum": ..., "member": ...,
                  "module": ..., "models": [...], "builders": [...], "family": ...,
                  "url": ..., "filename": ..., "size": 102540417, "sha256": "<64 hex>"}]}

Reading one gives :class:`WeightsRef` values with ``sha256`` and the exact ``size_hint`` set, so
``tvpack fetch --lock FILE`` needs neither the registry nor torch.
"""
from __future__ import annotations

import json
import platform
import re
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..errors import LockfileError, SelectorError
from ..fsutil import atomic_write_text
from ..registry import WeightsRef, filename_from_url, hash_prefix_from_filename, parse_selector, select_described

FORMAT = "tvpack-lock"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def lock_data(refs: Sequence[WeightsRef]) -> dict:
    """The lockfile document for refs that carry ``sha256`` and exact ``size_hint``."""
    weights = []
    for ref in refs:
        if not ref.sha256 or ref.size_hint is None:
            raise LockfileError(f"{ref.name}: cannot lock weights whose sha256 and size are unknown")
        weights.append({
            "weights": ref.name, "enum": ref.enum, "member": ref.member, "module": ref.module,
            "models": list(ref.models), "builders": list(ref.builders), "family": ref.family,
            "url": ref.url, "filename": ref.filename, "size": ref.size_hint, "sha256": ref.sha256,
        })
    torch_version, tv_version = _version("torch"), _version("torchvision")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch": torch_version,
        "torchvision": tv_version,
        "created_by": {"packager": __version__, "torch": torch_version, "torchvision": tv_version,
                       "python": platform.python_version()},
        "weights": weights,
    }


def dump_lockfile(refs: Sequence[WeightsRef], output) -> Path:
    """Write refs (with sha256 and size) to ``output`` atomically."""
    output = Path(output)
    text = json.dumps(lock_data(refs), indent=2) + "\n"
    try:
        atomic_write_text(output, text, durable=False)
    except OSError as exc:
        raise LockfileError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


def read_lockfile(path) -> list[WeightsRef]:
    """The pinned refs of a lockfile; LockfileError for anything missing or inconsistent."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LockfileError(f"lockfile {path} does not exist") from None
    except OSError as exc:
        raise LockfileError(f"cannot read lockfile {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise LockfileError(f"lockfile {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise LockfileError(f"lockfile {path} is nested too deeply to be a tvpack lockfile") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LockfileError(f"{path} is not a tvpack lockfile (format should be {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise LockfileError(f"{path}: unsupported lockfile format_version {data.get('format_version')!r}")
    items = data.get("weights")
    if not isinstance(items, list):
        raise LockfileError(f"{path}: 'weights' must be a list")
    refs = []
    for i, item in enumerate(items):
        refs.append(_ref_from_item(item, f"{path}: weights[{i}]"))
    return refs


def _ref_from_item(item, where: str) -> WeightsRef:
    if not isinstance(item, dict):
        raise LockfileError(f"{where} must be an object")
    for key in ("enum", "member", "url", "sha256", "size"):
        if key not in item:
            raise LockfileError(f"{where} lacks {key!r}")
    url, sha, size = item["url"], str(item["sha256"]).lower(), item["size"]
    if not isinstance(url, str) or not filename_from_url(url):
        raise LockfileError(f"{where}: bad url {url!r}")
    filename = filename_from_url(url)
    if item.get("filename") not in (None, filename):
        raise LockfileError(f"{where}: filename {item['filename']!r} is not the url's basename {filename!r}")
    if not _SHA256.fullmatch(sha):
        raise LockfileError(f"{where}: sha256 must be 64 hex digits (a full hash), got {item['sha256']!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise LockfileError(f"{where}: size must be a byte count, got {size!r}")
    prefix = hash_prefix_from_filename(filename)
    if prefix and not sha.startswith(prefix):
        raise LockfileError(f"{where}: sha256 {sha[:12]}... contradicts the hash prefix {prefix!r} in {filename}")
    return WeightsRef(
        enum=str(item["enum"]), member=str(item["member"]), url=url, module=str(item.get("module") or ""),
        models=tuple(item.get("models") or ()), builders=tuple(item.get("builders") or ()),
        family=str(item.get("family") or ""), size_hint=size, sha256=sha,
    )


def select_locked(refs: Sequence[WeightsRef], selectors: Sequence[str]) -> list[WeightsRef]:
    """Filter locked refs without a registry: a file name, or a selector (:func:`packager.registry.parse_selector`).
    A bare model name or glob keeps every locked weights of it; ``MODEL:DEFAULT`` the only one locked."""
    if not selectors:
        return list(refs)
    out = []
    for text in selectors:
        hits = [ref for ref in refs if text.strip() in (ref.name, ref.filename)]
        if not hits:
            selector = parse_selector(text)
            if selector.model is not None and selector.member is None:
                selector = replace(selector, member="all")  # the lockfile does not know a model's default
            try:
                hits = select_described(selector, refs)
            except SelectorError as exc:
                raise LockfileError(f"{exc.message} (in the lockfile)") from None
        if not hits:
            raise LockfileError(f"{text!r} matches nothing in the lockfile")
        out.extend(hits)
    return list(dict.fromkeys(out))
