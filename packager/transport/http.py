"""http(s) sources: GET with Range resume, retries with backoff, Retry-After honoured.

Retries (exponential backoff with full jitter) cover connection errors, read timeouts, truncated
bodies, 408/429 and 5xx; any other 4xx fails at once. A resumed transfer asks for
``Range: bytes=<have>-`` with ``If-Range`` (a strong ETag, else Last-Modified) and accepts a 206
only when its ``Content-Range`` starts where the part ends; a 200 means the server ignored the
range or the file changed, so the part restarts from zero. The validators of a part live beside it
in ``<part>.json``. Proxies and CA bundles come from the environment (requests).
"""
from __future__ import annotations

import email.utils
import http.client
import threading
import time

from ..errors import DownloadError, IntegrityError
from .stream import (
    Pipeline,
    Restart,
    Result,
    Retryable,
    check_space,
    discard_part,
    disk_error,
    finish,
    prehash,
    read_state,
    write_state,
)

USER_AGENT = "tvpack"

def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    # "bytes 100-199/200" or "bytes 100-199/*"
    if not value or not value.startswith("bytes "):
        return None
    try:
        span, total = value[6:].split("/", 1)
        start, end = (int(x) for x in span.split("-", 1))
        return start, end, None if total.strip() == "*" else int(total)
    except ValueError:
        return None


_session_local = threading.local()


def default_session():
    """One requests.Session per thread (connection reuse; sessions are not thread-safe)."""
    session = getattr(_session_local, "session", None)
    if session is None:
        import requests

        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
        _session_local.session = session
    return session


def transfer_http(url, part, verifier, policy, session, on_bytes, on_total) -> Result:
    import requests
    import urllib3

    session = session or default_session()
    transient = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                 ConnectionError, TimeoutError)
    attempt = 0
    first_offset = None
    restarted = False
    while True:
        offset = prehash(part, verifier, policy.chunk_size)
        if offset == 0:
            discard_part(part)
        if first_offset is None:
            first_offset = offset
        try:
            result = _http_attempt(url, part, verifier, policy, session, offset, on_bytes, on_total)
            return Result(url, result, verifier.count, first_offset, attempt + 1)
        except Restart:
            discard_part(part)
            if restarted:
                raise DownloadError(f"{url}: server keeps answering ranges inconsistently") from None
            restarted = True
            continue
        except IntegrityError:
            # A resumed transfer that fails verification may owe it to the old part: once more
            # from zero before blaming the source.
            discard_part(part)
            if offset > 0 and not restarted:
                restarted = True
                continue
            raise
        except Retryable as exc:
            reason, retry_after = exc.reason, exc.retry_after
        except transient as exc:
            reason, retry_after = _describe(exc), None
        attempt += 1
        if attempt > policy.retries:
            raise DownloadError(f"{url}: {reason} (gave up after {attempt} attempts)")
        if retry_after is not None and retry_after > policy.max_retry_after:
            raise DownloadError(f"{url}: {reason}; server asks to retry after {retry_after:.0f}s")
        time.sleep(policy.delay(attempt, retry_after))


def _describe(exc: BaseException) -> str:
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, requests.exceptions.ConnectionError):
        inner = exc.args[0] if exc.args else exc
        text = str(inner)
        if "timed out" in text.lower() or "Read timed out" in text:
            return "read timeout"
        if "Connection refused" in text or "NewConnectionError" in text:
            return "connection refused"
        reason = getattr(inner, "reason", None)  # urllib3's MaxRetryError wraps the real cause
        if type(reason).__name__ == "NameResolutionError" or "Failed to resolve" in text:
            host = getattr(getattr(reason, "conn", None), "host", None) or "the host"
            return f"cannot resolve {host} (no DNS or no network?)"
        if isinstance(reason, OSError) and reason.strerror:
            return f"connection error: {reason.strerror}"
        return f"connection error ({type(reason or inner).__name__})"
    name = type(exc).__name__
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if "Timeout" in name:
        return "read timeout"
    if "IncompleteRead" in str(exc) or "ProtocolError" in name:
        return "connection closed early"
    return f"{name}: {exc}"


def _http_attempt(url, part, verifier, policy, session, offset, on_bytes, on_total) -> str:
    state = read_state(part) if offset else {}
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("url") == url:
            etag = state.get("etag")
            if etag and not etag.startswith("W/"):
                headers["If-Range"] = etag
            elif state.get("last_modified"):
                headers["If-Range"] = state["last_modified"]
    timeout = (policy.connect_timeout, policy.read_timeout)
    response = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    try:
        status = response.status_code
        if status in (408, 429) or status >= 500:
            raise Retryable(f"HTTP {status}", _parse_retry_after(response.headers.get("Retry-After")))
        if status == 416 and offset:
            raise Restart()
        if status >= 400:
            raise DownloadError(f"{url}: HTTP {status} {response.reason or ''}".rstrip())
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206 and offset:
            content_range = _parse_content_range(response.headers.get("Content-Range"))
            if content_range is None or content_range[0] != offset:
                raise Restart()
            total = content_range[2]
            mode = "ab"
        elif status == 200:
            if offset:  # range ignored or file changed upstream: a clean full download
                verifier.reset()
                if on_total is not None:
                    on_total(length, -offset)  # tell the progress bar to take the bytes back
                offset = 0
            total = length
            mode = "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status}")
        if total is not None and verifier.size is not None and total != verifier.size:
            raise IntegrityError(f"{url}: wrong size", expected=f"{verifier.size} bytes", got=f"{total} bytes")
        if on_total is not None:
            on_total(total, offset)
        check_space(part, (total - offset) if total is not None else None)
        try:
            write_state(part, {
                "url": url,
                "etag": response.headers.get("ETag"),
                "last_modified": response.headers.get("Last-Modified"),
                "total": total,
            })
            f = open(part, mode)
        except OSError as exc:
            raise disk_error(exc, part) from exc
        with f:
            pipeline = Pipeline(f, verifier, on_bytes, policy.chunk_size)
            try:
                pipeline.run(_http_filler(response, policy.chunk_size))
            except http.client.IncompleteRead:
                raise Retryable("connection closed early") from None
            except OSError as exc:
                if isinstance(exc, (ConnectionError, TimeoutError)) or exc.errno is None:
                    raise
                raise disk_error(exc, part) from exc
            if total is not None and verifier.count < total:
                raise Retryable("connection closed early")
            try:
                return finish(part, f, verifier)
            except OSError as exc:
                raise disk_error(exc, part) from exc
    finally:
        response.close()


def _http_filler(response, chunk_size: int):
    """``fill(buffer) -> n`` reading the body straight into ``buffer`` (no intermediate bytes).

    Uses http.client's ``readinto`` under urllib3 when available (it enforces Content-Length and
    de-chunks); otherwise urllib3's ``read``, copied in.
    """
    fp = getattr(response.raw, "_fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if fp is not None and hasattr(fp, "readinto") and encoding in ("", "identity"):
        def fill(buf: bytearray) -> int:
            return fp.readinto(buf)
        return fill
    read = response.raw.read

    def fill_copy(buf: bytearray) -> int:
        data = read(len(buf), decode_content=False)
        buf[: len(data)] = data
        return len(data)
    return fill_copy
