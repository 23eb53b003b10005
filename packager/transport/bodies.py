"""Small response bodies that are parsed whole (tokens, error JSON, manifests, tag lists, mirror indexes):
read with a cap, streamed, and at a pace.

A hostile or broken server can answer with an endless body (a 404 page that never ends, a token that
grows without bound) or drip it one byte at a time. ``response.content`` would hold the whole of it in
memory, and a per-read socket timeout never trips on a drip. :func:`read_capped` reads at most
``cap`` bytes as they arrive, refusing more in one line that names the server and what it sent; with
a :class:`Pace` it also gives up on a body that arrives too slowly or past a deadline.

    data = read_capped(response, 64 * KiB, "token from auth.example.com", error=OCIError)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from ..errors import DownloadError, TvpackError

KiB = 1 << 10
MiB = 1 << 20
READ_SIZE = 64 * KiB


class TooSlow(Exception):
    """The body arrived slower than :class:`Pace` allows (a retry may heal it); ``reason`` is one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Pace:
    """At least ``speed_limit`` bytes per ``speed_time`` seconds (0: no limit), all before ``deadline``
    (a ``time.monotonic()`` value; None: none)."""

    speed_limit: float = 0.0
    speed_time: float = 30.0
    deadline: float | None = None


def server_of(response) -> str:
    """``host:port`` of the server that sent ``response`` (its final url after redirects)."""
    url = getattr(response, "url", None) or ""
    return urlsplit(url).netloc or url or "the server"


def _sample(data: bytes, limit: int = 40) -> str:
    text = data[:limit].decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else "." for c in text)
    return repr(text) + ("..." if len(data) > limit else "")


def _human(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n // KiB} KiB" if n % KiB == 0 else f"{n} bytes"


def read_capped(response, cap: int, what: str, *, error: type[TvpackError] = DownloadError,
                pace: Pace | None = None) -> bytes:
    """The body of a ``requests`` response (opened with ``stream=True``), at most ``cap`` bytes.

    A larger body (announced by Content-Length, or as it streams in) raises ``error``: "SERVER sent a
    WHAT larger than CAP (TYPE, starting '...'); refused". A ``pace`` it falls behind raises
    :class:`TooSlow`. The response is closed either way."""
    server = server_of(response)
    kind = (response.headers.get("Content-Type") or "no content type").split(";")[0].strip()
    try:
        announced = int(response.headers.get("Content-Length") or -1)
    except ValueError:
        announced = -1
    with response:
        if announced > cap:
            raise error(f"{server} sent a {what} of {announced} bytes ({kind}), more than the {_human(cap)} "
                        "allowed; refused")
        data = read_chunks(_arrivals(response.raw), cap, pace, server)
        if len(data) > cap:
            raise error(f"{server} sent a {what} larger than {_human(cap)} ({kind}, starting {_sample(data)}); "
                        "refused")
    return data


def capped_join(chunks: Iterable[bytes], cap: int, what: str, where: str, *,
                error: type[TvpackError] = DownloadError) -> bytes:
    """``b"".join(chunks)`` of at most ``cap`` bytes (an S3 object, a file): more raises ``error``."""
    data = read_chunks(chunks, cap, None, where)
    if len(data) > cap:
        raise error(f"{where}: {what} larger than {_human(cap)} (starting {_sample(data)}); refused")
    return data


def read_chunks(chunks: Iterable[bytes], cap: int, pace: Pace | None, server: str) -> bytes:
    """Up to ``cap + 1`` bytes of ``chunks`` (one more than allowed says "too large")."""
    buf = bytearray()
    window_start, window_bytes = time.monotonic(), 0
    for data in chunks:
        buf += data
        if len(buf) > cap:
            return bytes(buf[:cap + 1])
        if pace is None:
            continue
        now = time.monotonic()
        window_bytes += len(data)
        if pace.deadline is not None and now >= pace.deadline:
            raise TooSlow(f"{server} had sent {len(buf)} bytes when the time allowed ran out")
        if pace.speed_limit > 0 and now - window_start >= pace.speed_time:
            if window_bytes < pace.speed_limit * pace.speed_time:
                raise TooSlow(f"only {window_bytes} bytes from {server} in {now - window_start:.0f} s")
            window_start, window_bytes = now, 0
    return bytes(buf)


def _arrivals(raw) -> Iterable[bytes]:
    """What arrives on a urllib3 response, as it arrives (``read1``: one socket read, not a full buffer:
    a drip is seen byte by byte rather than blocking until a whole buffer is filled)."""
    while True:
        data = raw.read1(READ_SIZE, decode_content=True) if hasattr(raw, "read1") else raw.read(READ_SIZE)
        if not data:
            return
        yield data
