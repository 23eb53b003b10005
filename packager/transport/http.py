"""http(s) sources of the engine (:mod:`.engine`): GET with Range resume, Retry-After honoured.

Retries (the engine's, exponential backoff with full jitter) cover connection errors, read timeouts, truncated
bodies, 408/429 and 5xx; any other 4xx fails at once. A resumed transfer asks for
``Range: bytes=<have>-`` with ``If-Range`` (a strong ETag, else Last-Modified) and accepts a 206
only when its ``Content-Range`` starts where the part ends; a 200 means the server ignored the
range or the file changed, so the part restarts from zero. The validators of a part live beside it
in ``<part>.json``. Proxies and CA bundles come from the environment (requests).

What cannot heal fails at once, naming the cause: a certificate that does not verify (and how
to trust a private CA), a redirect loop (at most ``Policy.max_redirects`` hops, one chain), a
proxy that refuses connections (named as the proxy, not as the mirror). A body that is not the
checkpoint (an HTML error page served with status 200) is described by its type and first bytes.
The engine's :class:`~.stream.Watchdog` shuts the socket down (:func:`aborter`) under a blocked
read when the run is cancelled, the bytes trickle below the minimum speed, or the time allowed per
file is up.
"""
from __future__ import annotations

import email.utils
import http.client
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from ..errors import DownloadError
from .engine import Body, fetch
from .stream import USER_AGENT, Restart, Result, Retryable


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


def transfer_http(url, part, verifier, policy, session, on_bytes, on_total, cancel=None, notify=None) -> Result:
    return fetch(HttpSource(url, session, max_redirects=policy.max_redirects), part, verifier, policy,
                 on_bytes=on_bytes, on_total=on_total, cancel=cancel, notify=notify)


class HttpSource:
    """An http(s) url as a :class:`~.engine.Source`: a GET with ``Range`` and ``If-Range``.

    A 206 whose ``Content-Range`` starts at the offset continues the object; a 200 starts it over
    (the range was ignored, or ``If-Range`` found the object changed); 408, 429 and 5xx may heal
    (Retry-After honoured); any other status fails at once (:meth:`refuse`). ``headers`` go with
    every request (an OCI registry's Authorization: requests drops it when a redirect leaves the
    host). ``if_range``: False for content-addressed objects, whose name is their validator.
    """

    segmentable = True  # a large object comes in ranges (``open(..., end=)``)

    def __init__(self, url: str, session=None, *, headers: dict | None = None, max_redirects: int = 10,
                 if_range: bool = True):
        self.url = url  # for messages
        self.location = url  # what is fetched
        self.session = session or default_session()
        self.headers = headers or {}
        self.max_redirects = max_redirects
        self.if_range = if_range

    def open(self, offset: int, validator: str | None, timeout: tuple[float, float], end: int | None = None) -> Body:
        response = self.get(self._headers(offset, validator, end), timeout)
        try:
            return self._body(response, offset, end is not None)
        except BaseException:
            response.close()
            raise

    def _headers(self, offset: int, validator: str | None, end: int | None = None) -> dict:
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if offset or end is not None:
            headers["Range"] = f"bytes={offset}-" + (f"{end - 1}" if end is not None else "")
            if validator and self.if_range:
                headers["If-Range"] = validator
        return headers

    def get(self, headers: dict, timeout: tuple[float, float]):
        """The response to one GET (streamed), or Retryable / DownloadError."""
        import requests

        self.session.max_redirects = self.max_redirects
        try:
            return self.session.get(self.location, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
        except requests.exceptions.ReadTimeout:
            raise Retryable(f"no answer from {urlsplit(self.location).netloc} for {timeout[1]:g}s",
                            stalled=True) from None
        except (*_transient(), ValueError) as exc:
            fatal = self.fatal(exc)
            if fatal is not None:
                raise fatal from None
            raise Retryable(_describe(exc)) from None

    def fatal(self, exc: BaseException) -> Exception | None:
        """The error for a failed request that no retry heals (certificate, redirect loop, dead proxy), else None."""
        return _fatal(self.url, exc)

    def refuse(self, response) -> Exception:
        """The error for a status that no retry heals (a 4xx but 408 and 429)."""
        return DownloadError(f"{self.url}: HTTP {response.status_code} {response.reason or ''}".rstrip())

    def _body(self, response, offset: int, ranged: bool = False) -> Body:
        status = response.status_code
        if status in (408, 429) or status >= 500:
            raise Retryable(f"HTTP {status}", _parse_retry_after(response.headers.get("Retry-After")))
        if status == 416 and (offset or ranged):
            raise Restart()
        if status >= 400:
            raise self.refuse(response)
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206 and (offset or ranged):
            content_range = _parse_content_range(response.headers.get("Content-Range"))
            if content_range is None or content_range[0] != offset:
                raise Restart()
            start, total = offset, content_range[2]
        elif status == 200:
            start, total = 0, length
        else:
            raise DownloadError(f"{self.url}: unexpected HTTP {status}")
        etag = response.headers.get("ETag")
        validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        return Body(start, total, validator, _reader(response, length), abort=aborter(response.raw),
                    close=response.close, content_type=response.headers.get("Content-Type"),
                    peek=lambda: _peek(response))


def _transient():
    import requests
    import urllib3

    return (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
            ConnectionError, TimeoutError)


def _fatal(url: str, exc: BaseException) -> DownloadError | None:
    """A DownloadError for an error no retry can heal (certificate, redirect loop, dead proxy), else None."""
    import requests

    text = str(exc)
    if isinstance(exc, (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
                        requests.exceptions.MissingSchema, ValueError)):  # only a redirect can be this bad
        return DownloadError(f"{url}: redirected to an unsupported or malformed location ({str(exc)[:200]})")
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


def socket_of(raw):
    """The socket under a urllib3 response (requests' ``response.raw``, botocore's raw stream)."""
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock


def aborter(raw):
    """``abort()`` for a body read from ``raw``: shut its socket down (not close: that wakes a
    thread blocked in recv on it), from any thread."""
    sock = socket_of(raw)

    def abort() -> None:
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    return abort


def _peek(response, n: int = 64) -> bytes:
    try:
        return response.raw.read(n, decode_content=False) or b""
    except Exception:  # noqa: BLE001 - only to describe the page
        return b""


def _reader(response, length: int | None):
    """``read_into(view) -> n`` over the body, returning what has arrived (never waiting for a whole
    buffer); a failure that may heal becomes Retryable. A plain body (not chunked, not encoded) is
    read straight into the buffer by the socket file's ``readinto1`` (no copy), its length enforced
    here; a chunked one through http.client's ``read1`` (it de-chunks); anything else through
    urllib3's ``read``."""
    fp = getattr(response.raw, "_fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    plain = encoding in ("", "identity")
    sock_file = getattr(fp, "fp", None)
    if plain and fp is not None and not getattr(fp, "chunked", True) and hasattr(sock_file, "readinto1"):
        remaining = [length]

        def read(view) -> int:
            if remaining[0] is not None:
                if not remaining[0]:
                    return 0
                view = view[: remaining[0]]
            k = sock_file.readinto1(view)
            if remaining[0] is not None:
                remaining[0] -= k
            return k
    elif plain and fp is not None and hasattr(fp, "read1"):
        def read(view) -> int:
            data = fp.read1(len(view))
            view[: len(data)] = data
            return len(data)
    else:
        def read(view) -> int:
            data = response.raw.read(len(view), decode_content=False)
            view[: len(data)] = data
            return len(data)
    return retryable(read)


def retryable(read):
    """``read`` with the failures of a connection raised as Retryable."""
    transient = _transient()

    def read_into(view) -> int:
        try:
            return read(view)
        except (*transient, OSError) as exc:  # a read only reads: any OSError is the connection's
            raise Retryable(_describe(exc)) from None
    return read_into
