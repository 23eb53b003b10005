"""http(s) sources: GET with Range resume, retries with backoff, Retry-After honoured.

Retries (exponential backoff with full jitter) cover connection errors, read timeouts, truncated
bodies, 408/429 and 5xx; any other 4xx fails at once. A resumed transfer asks for
``Range: bytes=<have>-`` with ``If-Range`` (a strong ETag, else Last-Modified) and accepts a 206
only when its ``Content-Range`` starts where the part ends; a 200 means the server ignored the
range or the file changed, so the part restarts from zero. The validators of a part live beside it
in ``<part>.json``. Proxies and CA bundles come from the environment (requests).

What cannot heal fails at once, naming the cause: a certificate that does not verify (and how
to trust a private CA), a redirect loop (at most ``Policy.max_redirects`` hops, one chain), a
proxy that refuses connections (named as the proxy, not as the mirror). A body that is not the
checkpoint (an HTML error page served with status 200) is described by its type and first bytes.
A :class:`~.stream.Watchdog` shuts the socket down under a blocked read when the run is
cancelled, the bytes trickle below the minimum speed, or the time allowed per file is up.
"""
from __future__ import annotations

import email.utils
import http.client
import socket
import ssl
import threading
import time

from ..errors import DownloadError, IntegrityError
from ..fsutil import reserve_space
from .stream import (
    Cancelled,
    Pipeline,
    Restart,
    Result,
    Retryable,
    Watchdog,
    check_deadline,
    deadline_of,
    discard_part,
    disk_error,
    finish,
    open_part,
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


def transfer_http(url, part, verifier, policy, session, on_bytes, on_total, cancel=None) -> Result:
    import requests
    import urllib3

    session = session or default_session()
    session.max_redirects = policy.max_redirects
    transient = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                 ConnectionError, TimeoutError)
    deadline = deadline_of(policy)
    attempt = 0
    first_offset = None
    restarted = False
    while True:
        if cancel is not None:
            cancel.check()
        check_deadline(url, policy, deadline)
        offset = prehash(part, verifier, policy.chunk_size)
        if offset == 0:
            discard_part(part)
        if first_offset is None:
            first_offset = offset
        try:
            result = _http_attempt(url, part, verifier, policy, session, offset, on_bytes, on_total, cancel, deadline)
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
            if cancel is not None and cancel.cancelled:
                raise Cancelled() from None
            fatal = _fatal(url, exc)
            if fatal is not None:
                raise fatal from None
            reason, retry_after = _describe(exc), None
        attempt += 1
        if attempt > policy.retries:
            raise DownloadError(f"{url}: {reason} (gave up after {attempt} attempts)")
        if retry_after is not None and retry_after > policy.max_retry_after:
            raise DownloadError(f"{url}: {reason}; server asks to retry after {retry_after:.0f}s")
        delay = policy.delay(attempt, retry_after)
        check_deadline(url, policy, deadline, delay)
        if cancel is not None:
            cancel.sleep(delay)
        else:
            time.sleep(delay)


def _fatal(url: str, exc: BaseException) -> DownloadError | None:
    """A DownloadError for an error no retry can heal (certificate, redirect loop, dead proxy), else None."""
    import requests

    text = str(exc)
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        last = getattr(getattr(exc, "response", None), "url", None)
        return DownloadError(f"{url}: redirect loop (more than {_max_redirects(exc)} redirects"
                             + (f", last to {last})" if last else ")"))
    if isinstance(exc, requests.exceptions.SSLError):
        verify = _cause(exc, ssl.SSLCertVerificationError)
        if verify is None:
            return None  # a handshake cut short may heal
        message = getattr(verify, "verify_message", None) or "the certificate was not accepted"
        if "hostname" in message.lower():
            return DownloadError(f"{url}: certificate verify failed: {message}")
        return DownloadError(f"{url}: certificate verify failed: {message}; set REQUESTS_CA_BUNDLE to your CA bundle "
                             "(a PEM file holding the CA that signed the server's certificate)")
    if isinstance(exc, requests.exceptions.ProxyError):
        proxy = _proxy_of(exc)
        where = f"the proxy {proxy}" if proxy else "the proxy"
        variable = "HTTPS_PROXY" if url.lower().startswith("https:") else "HTTP_PROXY"
        if "Connection refused" in text:
            return DownloadError(f"{url}: {where} refused the connection (the proxy comes from {variable}; "
                                 "check it, or exempt this host with NO_PROXY)")
        if "Failed to resolve" in text or "Name or service not known" in text:
            return DownloadError(f"{url}: cannot resolve {where} (the proxy comes from {variable})")
    return None


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in the chain requests and urllib3 wrap around a cause."""
    seen = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        todo.extend([getattr(current, "reason", None), current.__cause__, current.__context__,
                     *(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))])
    return None


def _max_redirects(exc) -> str:
    text = str(exc)
    digits = "".join(ch for ch in text.split("redirects")[0] if ch.isdigit())
    return digits or "the allowed"


def _inner_text(exc: BaseException) -> str:
    inner = exc.args[0] if exc.args else exc
    reason = getattr(inner, "reason", None)
    return str(reason or inner)[:200]


def _proxy_of(exc: BaseException) -> str | None:
    inner = exc.args[0] if exc.args else None
    proxy = getattr(getattr(inner, "pool", None), "proxy", None)
    return str(proxy) if proxy else None


def _describe(exc: BaseException) -> str:
    import requests

    if isinstance(exc, requests.exceptions.ProxyError):
        proxy = _proxy_of(exc)
        return f"cannot reach the proxy {proxy}" if proxy else "cannot reach the proxy"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error: {_inner_text(exc)}"
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


_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")


def _received(count: int, head: bytes, content_type: str | None) -> str | None:
    """"1234 bytes of text/html starting '<!DOCTYPE html>...'" when what came looks like a page
    (a text type, or printable first bytes), else None: a checkpoint is binary."""
    kind = (content_type or "").split(";")[0].strip().lower()
    try:
        start = head.decode("utf-8")
        printable = bool(start) and all(c.isprintable() or c.isspace() for c in start)
    except UnicodeDecodeError:
        start, printable = head.decode("utf-8", "replace"), False
    if not (kind.startswith(_TEXT_TYPES) or printable):
        return None
    start = " ".join(start.split())[:40]
    return f"{count} bytes of {kind or 'unknown type'}" + (f" starting {start!r}" if start else "") + \
        " (an error page or login portal served instead of the file?)"


def _explain(exc: IntegrityError, verifier, content_type: str | None) -> IntegrityError:
    """The same refusal, saying what was received when it looks like an error page."""
    what = _received(verifier.count, verifier.head, content_type)
    if what is None:
        return exc
    message = exc.message.rsplit(": expected ", 1)[0]
    return IntegrityError(message, expected=exc.expected, got=what, hint=exc.hint)


def _socket_of(response):
    """The socket under a streamed requests response (to shut it down from another thread)."""
    raw = response.raw
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock


def _aborter(response):
    sock = _socket_of(response)

    def abort() -> None:
        # shutdown (not close) wakes a thread blocked in recv on this socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    return abort


def _http_attempt(url, part, verifier, policy, session, offset, on_bytes, on_total, cancel, deadline) -> str:
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
        content_type = response.headers.get("Content-Type")
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
            got = None
            if status == 200:
                got = _received(total, _peek(response), content_type)  # an error page? say what it was
            raise IntegrityError(f"{url}: wrong size", expected=f"{verifier.size} bytes", got=got or f"{total} bytes")
        if on_total is not None:
            on_total(total, offset)
        with reserve_space(part, (total - offset) if total is not None else None) as reservation:
            try:
                write_state(part, {
                    "url": url,
                    "etag": response.headers.get("ETag"),
                    "last_modified": response.headers.get("Last-Modified"),
                    "total": total,
                })
                f = open_part(part, mode)
            except OSError as exc:
                raise disk_error(exc, part) from exc
            with f, Watchdog(url, policy, cancel, deadline, _aborter(response)) as watchdog:
                pipeline = Pipeline(f, verifier, on_bytes, policy.chunk_size, cancel=cancel, reservation=reservation)
                try:
                    pipeline.run(_http_filler(response, policy.chunk_size, watchdog, length))
                except IntegrityError as exc:
                    raise _explain(exc, verifier, content_type) from None
                except http.client.IncompleteRead:
                    watchdog.raise_if_fired()
                    raise Retryable("connection closed early") from None
                except OSError as exc:
                    watchdog.raise_if_fired()
                    if isinstance(exc, (ConnectionError, TimeoutError)) or exc.errno is None:
                        raise
                    raise disk_error(exc, part) from exc
                except Exception:
                    watchdog.raise_if_fired()
                    raise
                watchdog.raise_if_fired()
                if total is not None and verifier.count < total:
                    raise Retryable("connection closed early")
                try:
                    return finish(part, f, verifier)
                except IntegrityError as exc:
                    raise _explain(exc, verifier, content_type) from None
                except OSError as exc:
                    raise disk_error(exc, part) from exc
    finally:
        response.close()


def _peek(response, n: int = 64) -> bytes:
    try:
        return response.raw.read(n, decode_content=False) or b""
    except Exception:  # noqa: BLE001 - only to describe the page
        return b""


_FILL_SECONDS = 0.5
_FILL_SOON = 256 * 1024  # hand over a buffer this full when the socket runs dry (stalls keep little in memory)


def _http_filler(response, chunk_size: int, watchdog, length: int | None):
    """``fill(buffer) -> n`` reading the body into ``buffer``, reporting bytes as they arrive.

    Each read returns what has arrived (never waits for a whole buffer), so the watchdog sees a
    trickle however large the buffer, and a buffer is handed on once the socket runs dry (a stall
    leaves little unwritten). A plain body (not chunked, not encoded) is read straight into the
    buffer by the socket file's ``readinto1`` (no copy), its length enforced here; a chunked one
    through http.client's ``read1`` (it de-chunks); anything else through urllib3's ``read``.
    """
    fp = getattr(response.raw, "_fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    plain = encoding in ("", "identity")
    sock_file = getattr(fp, "fp", None)
    if plain and fp is not None and not getattr(fp, "chunked", True) and hasattr(sock_file, "readinto1"):
        remaining = [length]

        def read_plain(view) -> int:
            if remaining[0] is not None:
                if not remaining[0]:
                    return 0
                view = view[: remaining[0]]
            k = sock_file.readinto1(view)
            if remaining[0] is not None:
                remaining[0] -= k
            return k
        return _filler(read_plain, watchdog)
    if plain and fp is not None and hasattr(fp, "read1"):
        def read_chunked(view) -> int:
            data = fp.read1(len(view))
            view[: len(data)] = data
            return len(data)
        return _filler(read_chunked, watchdog)
    read = response.raw.read

    def read_other(view) -> int:
        data = read(len(view), decode_content=False)
        view[: len(data)] = data
        return len(data)
    return _filler(read_other, watchdog)


def _filler(read, watchdog):
    """``fill(buffer)`` from ``read(view) -> bytes read`` (0 at the end), which returns what has arrived."""
    deferred: list[BaseException] = []

    def fill(buf: bytearray) -> int:
        if deferred:
            raise deferred.pop()
        n = 0
        started = time.monotonic()
        with memoryview(buf) as view:
            while n < len(buf):
                want = len(buf) - n
                try:
                    k = read(view[n:])
                except Exception as exc:
                    if not n:
                        raise
                    deferred.append(exc)  # hand over the bytes we have first: they are kept for a resume
                    break
                if not k:
                    break
                n += k
                watchdog.fed(k)
                if n >= _FILL_SOON and (k < want or time.monotonic() - started > _FILL_SECONDS):
                    break  # the socket ran dry, or a slow link: write what came, so the part keeps up
        return n
    return fill
