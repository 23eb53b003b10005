"""Mirrors: where else a weights url can be fetched from, and (export) how to build one.

A mirror holds files in the upstream layout: ``https://download.pytorch.org/<path>`` lives at
``<mirror>/<path>`` (``models/...``, ``models/quantized/...``), any other url at
``<mirror>/<basename>``. Mirrors are http(s) URLs, ``file://`` URLs, plain directories or
``s3://bucket/prefix``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from . import env

UPSTREAM_HOST = "download.pytorch.org"


def mirror_path(url: str) -> str:
    """The path of ``url`` inside a mirror (no leading slash)."""
    parsed = urlparse(url)
    if parsed.hostname == UPSTREAM_HOST:
        return parsed.path.lstrip("/")
    return os.path.basename(parsed.path)


def normalize_mirror(mirror: str) -> str:
    """A mirror spec as a URL: plain directories become ``file://`` URLs."""
    mirror = mirror.strip()
    if "://" not in mirror:
        return Path(mirror).expanduser().resolve().as_uri()
    return mirror


def candidate_urls(url: str, mirrors: Iterable[str] | None = None, *, upstream: bool = True) -> list[str]:
    """Where to try fetching ``url`` from, in order: each mirror, then upstream (unless disabled).

    ``mirrors=None`` means the ``TVPACK_MIRROR`` environment variable.
    """
    mirrors = env.mirrors() if mirrors is None else list(mirrors)
    out = []
    for mirror in mirrors:
        base = normalize_mirror(mirror).rstrip("/")
        out.append(f"{base}/{mirror_path(url)}")
    if upstream:
        out.append(url)
    return list(dict.fromkeys(out))
