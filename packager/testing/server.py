"""A loopback HTTP mirror for tests, scripts and demos: Range, validators, a request log, faults.

    with MirrorServer(root) as server:           # 127.0.0.1, a free port
        url = server.url + "/models/x-1234abcd.pth"
        server.add_fault("status", path="/models/x-1234abcd.pth", status=503, times=2, retry_after=0)
        ...
        server.transfers("/models/x-1234abcd.pth")  # GETs that sent a body (200 or 206)
        server.requests()                            # every request, as RequestRecord values

It serves files under ``root`` with ``ETag`` (size and mtime), ``Last-Modified``, ``Range``
(single ranges) and ``If-Range``. Faults apply to one path or to every path (``path=None``), to the
next ``times`` matching GETs (None: all of them), in the order they were added:

    truncate      send ``at`` body bytes (default: half), then close (Content-Length stays whole)
    flip          flip the byte at body offset ``at`` (default: the middle)
    status        answer ``status`` (500/503/429...) with ``Retry-After: retry_after`` if given
    reset         send ``at`` body bytes, then reset the connection (RST)
    stall         send ``at`` body bytes, then sleep ``seconds`` (past a client's read timeout)
    not_found     answer 404
    ignore_range  answer 200 with the whole file even when a Range was asked for
    slow          send at most ``rate`` bytes per second (time to kill a client mid-transfer)
    hold          send ``at`` body bytes (default 0), then wait until :meth:`MirrorServer.release` (or the
                  client hangs up, or the server stops): a client stopped at a known point
    replace       before answering, replace the file with ``data`` (bytes): a file that changes between ranges

``range_from=N`` limits a fault to ranged GETs whose range starts at byte N or later (one range of a
segmented download, say). The log records each request's Range and the body bytes it sent;
:meth:`MirrorServer.wait_for` waits on a condition over the server (requests in flight, the log).

Command line: ``python -m packager.testing.server --root DIR [--port N] [--fault KIND:k=v,...]``.
"""
from __future__ import annotations

import argparse
import email.utils
import os
import posixpath
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

FAULT_KINDS = ("truncate", "flip", "status", "reset", "stall", "not_found", "ignore_range", "slow", "hold", "replace")
_BLOCK = 256 * 1024
_SENDFILE = 1 << 20  # bytes per sendfile call: the log counts what went out even when the client hangs up


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    range: str | None  # the Range header as sent
    if_range: str | None
    status: int
    start: int  # first body byte sent
    bytes_sent: int  # body bytes actually written to the socket
    fault: str | None  # the fault applied, if any
    complete: bool  # the whole promised body went out
    seq: int = 0  # arrival order: the log is sorted by it, not by when a request finished


@dataclass
class Fault:
    kind: str
    path: str | None = None
    times: int | None = None
    params: dict = field(default_factory=dict)

    def matches(self, path: str, start: int | None = None) -> bool:
        range_from = self.params.get("range_from")
        if range_from is not None and (start is None or start < int(range_from)):
            return False
        return (self.path is None or self.path == path) and (self.times is None or self.times > 0)


def _range_start(value: str | None) -> int | None:
    """The first byte a ``Range: bytes=N-...`` header asks for (None: no range, or a suffix range)."""
    if not value or not value.startswith("bytes="):
        return None
    first = value[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tvpack-mirror/1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - quiet: the request log is the record
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    # --------------------------------------------------------------------------------------------
    def _record(self, status, start=0, sent=0, fault=None, complete=True):
        self.server.owner._log(RequestRecord(
            self.command, self._path, self.headers.get("Range"), self.headers.get("If-Range"),
            status, start, sent, fault, complete, self._seq,
        ))

    def _error(self, status, fault=None, extra_headers=()):
        body = f"{status}\n".encode()
        self.send_response(status)
        for key, value in extra_headers:
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status, fault=fault)

    def _serve(self, head: bool):
        self._path = posixpath.normpath(unquote(urlparse(self.path).path))
        owner = self.server.owner
        self._seq = owner._begin()
        try:
            self._serve_inner(head, owner)
        finally:
            owner._end()

    def _serve_inner(self, head: bool, owner: "MirrorServer"):
        fault = None if head else owner._take_fault(self._path, _range_start(self.headers.get("Range")))
        kind = fault.kind if fault else None
        params = fault.params if fault else {}
        if kind == "replace":
            owner._replace(self._path, params["data"])
        if kind == "status":
            code = int(params.get("status", 503))
            headers = []
            if params.get("retry_after") is not None:
                headers.append(("Retry-After", str(params["retry_after"])))
            return self._error(code, kind, headers)
        if kind == "not_found":
            return self._error(404, kind)
        file = (owner.root / self._path.lstrip("/")).resolve()
        if owner.root not in file.parents or not file.is_file():
            return self._error(404)
        stat = file.stat()
        size = stat.st_size
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if wanted and kind != "ignore_range" and not owner.ignore_ranges:
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range in (etag, last_modified):
                parsed = _parse_range(wanted, size)
                if parsed is None:
                    return self._error(416, extra_headers=[("Content-Range", f"bytes */{size}")])
                start, end = parsed
                status = 206
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return self._record(status, start, 0, None, True)
        sent = 0
        complete = False
        self.sent = 0
        try:
            sent, complete = self._send_body(file, start, length, kind, params)
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            self.close_connection = True
            sent = self.sent
        finally:
            self._record(status, start, sent, kind, complete)

    def _send_body(self, file: Path, start: int, length: int, kind, params) -> tuple[int, bool]:
        cut = None  # body bytes to send before the fault acts
        if kind in ("truncate", "reset", "stall", "hold"):
            cut = int(params.get("at", 0 if kind == "hold" else length // 2))
            cut = max(0, min(cut, length))
        flip_at = int(params.get("at", length // 2)) if kind == "flip" else None
        rate = float(params.get("rate", 1 << 20)) if kind == "slow" else None
        sent = 0
        with open(file, "rb") as f:
            f.seek(start)
            if kind in (None, "replace") and length > 0:  # the fast path, counted as it goes
                while sent < length:
                    n = self.connection.sendfile(f, start + sent, min(_SENDFILE, length - sent))
                    if not n:
                        break
                    sent += n
                    self.sent = sent
                return sent, sent == length
            began = time.monotonic()
            while sent < length:
                block = min(_BLOCK if rate is None else max(1, int(rate / 20)), length - sent)
                if cut is not None:
                    block = min(block, cut - sent)
                if block > 0:
                    data = bytearray(f.read(block))
                    if not data:
                        break
                    if flip_at is not None and sent <= flip_at < sent + len(data):
                        data[flip_at - sent] ^= 0xFF
                    self.wfile.write(data)
                    sent += len(data)
                    self.sent = sent
                if cut is not None and sent >= cut:
                    return self._after_cut(kind, params, sent)
                if rate is not None:
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        return sent, sent == length

    def _after_cut(self, kind, params, sent) -> tuple[int, bool]:
        if kind == "stall":
            time.sleep(float(params.get("seconds", 5)))
        elif kind == "hold":
            self.wfile.flush()
            self.server.owner._hold(self.connection)
        elif kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        if kind == "reset":
            self.connection.close()
        else:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return sent, False


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[6:].strip().partition("-")
    try:
        if first == "":  # suffix: the last N bytes
            n = int(last)
            return (max(0, size - n), size - 1) if n > 0 and size else None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    owner: "MirrorServer"

    def handle_error(self, request, client_address):
        """A client that hangs up or resets mid-answer (a cancelled fetch, a timeout, a test's fault) is normal for a
        server: nothing to log. Anything else is a bug of this server, and socketserver's traceback says so."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class MirrorServer:
    """A threaded HTTP server on 127.0.0.1 serving ``root`` (see the module docstring)."""

    def __init__(self, root, *, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.ignore_ranges = False
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self.peak = 0  # the most requests served at once
        self._arrivals = 0
        self._log_records: list[RequestRecord] = []
        self._faults: list[Fault] = []
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MirrorServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="tvpack-mirror", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "MirrorServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------------------
    def add_fault(self, kind: str, path: str | None = None, *, times: int | None = None, **params) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; choose from {', '.join(FAULT_KINDS)}")
        if path is not None and not path.startswith("/"):
            path = "/" + path
        fault = Fault(kind, posixpath.normpath(path) if path else None, times, params)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def release(self) -> None:
        """Let every ``hold`` fault's request go on (and those to come: they do not wait)."""
        self._released.set()

    def _hold(self, connection: socket.socket) -> None:
        """Wait for :meth:`release`; a client that hangs up ends the wait (ConnectionResetError)."""
        while not self._released.wait(0.05):
            readable, _, _ = select.select([connection], [], [], 0)
            if readable:
                try:
                    gone = connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    raise ConnectionResetError("the client hung up")

    def _replace(self, path: str, data: bytes) -> None:
        """The file at ``path`` becomes ``data`` (a new ETag and Last-Modified: another version)."""
        file = self.root / path.lstrip("/")
        tmp = file.with_name(file.name + ".replacing")
        tmp.write_bytes(data)
        stat = file.stat()
        os.replace(tmp, file)
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    @property
    def active(self) -> int:
        """Requests being served now (connections the server is answering)."""
        with self._lock:
            return self._active

    def wait_for(self, condition, timeout: float = 30.0) -> bool:
        """Wait until ``condition(self)`` holds (checked whenever a request starts or ends); False on timeout."""
        deadline = time.monotonic() + timeout
        while not condition(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._idle:
                self._idle.wait(min(left, 0.1))
        return True

    def _take_fault(self, path: str, start: int | None = None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(path, start):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    # -- the log -----------------------------------------------------------------------------------
    def _begin(self) -> int:
        with self._lock:
            self._active += 1
            self.peak = max(self.peak, self._active)
            self._arrivals += 1
            self._idle.notify_all()
            return self._arrivals

    def _end(self) -> None:
        with self._lock:
            self._active -= 1
            self._idle.notify_all()

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is being served (a client may finish reading before the server
        logs its request); True when idle."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self._log_records.append(record)
            self._idle.notify_all()

    def requests(self, path: str | None = None) -> list[RequestRecord]:
        """Every request logged so far (call :meth:`settle` first to include those in flight)."""
        with self._lock:
            records = sorted(self._log_records, key=lambda r: r.seq)
        if path is not None:
            path = posixpath.normpath("/" + path.lstrip("/"))
            records = [r for r in records if r.path == path]
        return records

    def transfers(self, path: str | None = None) -> list[RequestRecord]:
        """GET requests that started sending a body (status 200 or 206)."""
        return [r for r in self.requests(path) if r.method == "GET" and r.status in (200, 206)]

    def clear_log(self) -> None:
        with self._lock:
            self._log_records.clear()


def _parse_fault(spec: str) -> tuple[str, dict]:
    kind, _, rest = spec.partition(":")
    params: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key.strip()] = value.strip()
    for key in ("times", "status", "at", "range_from"):
        if key in params:
            params[key] = int(params[key])
    return kind, params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m packager.testing.server",
                                     description="Serve a mirror directory on 127.0.0.1 with Range support.")
    parser.add_argument("--root", required=True, help="directory to serve (a mirror root)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND:k=v,...",
                        help="e.g. 'status:status=503,times=2,retry_after=1,path=/models/x.pth'")
    parser.add_argument("--log", action="store_true", help="print each request when it completes")
    args = parser.parse_args(argv)
    server = MirrorServer(args.root, port=args.port)
    for spec in args.fault:
        kind, params = _parse_fault(spec)
        server.add_fault(kind, params.pop("path", None), times=params.pop("times", None), **params)
    if args.log:
        original = server._log

        def log_and_print(record, _original=original):
            _original(record)
            print(f"{record.method} {record.path} range={record.range} -> {record.status} "
                  f"{record.bytes_sent} bytes{' fault=' + record.fault if record.fault else ''}", flush=True)

        server._log = log_and_print
    server.start()
    print(f"serving {server.root} at {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
