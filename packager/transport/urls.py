"""Where a weights url can be fetched from: mirrors in the upstream layout, then upstream itself.

A mirror holds files in the upstream layout: ``https://download.pytorch.org/<path>`` lives at
``<mirror>/<path>`` (``models/...``, ``models/quantized/...``), any other url at
``<mirror>/<basename>``. Mirrors are http(s) URLs, ``file://`` URLs, plain directories or
``s3://bucket/prefix``. Pure but for looking at a plain directory: it must exist.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from .. import env
from ..errors import UsageError

UPSTREAM_HOST = "download.pytorch.org"


def mirror_path(url: str) -> str:
    """The path of ``url`` inside a mirror (no leading slash)."""
    parsed = urlparse(url)
    if parsed.hostname == UPSTREAM_HOST:
        return parsed.path.lstrip("/")
    return os.path.basename(parsed.path)


MIRROR_SCHEMES = ("http", "https", "file", "s3")
# "host:port" or "host:port/path" with no scheme: meant as a url, not as a relative directory
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):\d{1,5}(?:/.*)?$")


def normalize_mirror(mirror: str) -> str:
    """A mirror spec as a URL: plain directories become ``file://`` URLs.

    Raises :class:`UsageError` for a spec that can never work (empty, unknown scheme, no host,
    unparsable, a directory that does not exist, ``host:port`` without a scheme), so a typo fails
    at once with the mirror named rather than once per file.
    """
    raw = mirror
    mirror = mirror.strip()
    if not mirror:
        raise UsageError("empty --mirror given (expected http(s)://, file://, s3:// or a directory)")
    if "://" not in mirror:
        path = Path(mirror).expanduser()
        if not path.is_dir():
            if _HOST_PORT.match(mirror):
                raise UsageError(f"bad mirror {raw!r}: no scheme; did you mean http://{mirror} ? "
                                 "(a mirror without a scheme is a directory, and there is no such directory)")
            if path.exists():
                raise UsageError(f"bad mirror {raw!r}: not a directory")
            raise UsageError(f"bad mirror {raw!r}: no such directory (give http(s)://, file://, s3:// or an "
                             "existing directory)")
        return path.resolve().as_uri()
    try:
        parsed = urlparse(mirror)
        parsed.port  # noqa: B018 - validates the port (and IPv6 brackets) now
    except ValueError as exc:
        raise UsageError(f"bad mirror {raw!r}: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme not in MIRROR_SCHEMES:
        raise UsageError(f"bad mirror {raw!r}: unsupported scheme {parsed.scheme!r} "
                         f"(expected http(s)://, file://, s3:// or a directory)")
    if scheme in ("http", "https", "s3") and not parsed.netloc:
        raise UsageError(f"bad mirror {raw!r}: no {'bucket' if scheme == 's3' else 'host'}")
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

