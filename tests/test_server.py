"""The loopback mirror used by the tests must itself speak HTTP ranges and validators correctly."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT, wait_for


@pytest.fixture
def served(mirror_server):
    data = os.urandom(10_000)
    (mirror_server.root / "models").mkdir()
    (mirror_server.root / "models" / "f.bin").write_bytes(data)
    return mirror_server, f"{mirror_server.url}/models/f.bin", data


def test_full_head_and_ranges(served):
    server, url, data = served
    r = requests.get(url)
    assert r.status_code == 200 and r.content == data and r.headers["Accept-Ranges"] == "bytes"
    etag, modified = r.headers["ETag"], r.headers["Last-Modified"]
    assert etag.startswith('"') and modified.endswith("GMT")
    h = requests.head(url)
    assert h.status_code == 200 and int(h.headers["Content-Length"]) == len(data) and not h.content
    r = requests.get(url, headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == data[100:]
    assert r.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    r = requests.get(url, headers={"Range": "bytes=10-19"})
    assert r.content == data[10:20]
    r = requests.get(url, headers={"Range": "bytes=-5"})
    assert r.content == data[-5:]
    r = requests.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    for validator in (etag, modified):
        r = requests.get(url, headers={"Range": "bytes=100-", "If-Range": validator})
        assert r.status_code == 206
    r = requests.get(url, headers={"Range": "bytes=100-", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == data
    server.settle()
    log = server.requests("/models/f.bin")
    assert [(x.method, x.status) for x in log][:3] == [("GET", 200), ("HEAD", 200), ("GET", 206)]
    assert log[2].range == "bytes=100-" and log[2].start == 100 and log[2].bytes_sent == len(data) - 100
    assert len(server.transfers("/models/f.bin")) == len(log) - 2  # HEAD and 416 send no body


def test_no_escape_from_the_root(served):
    server, _url, _data = served
    (server.root.parent / "secret.txt").write_text("no")
    for path in ("/../secret.txt", "/models/../../secret.txt", "/%2e%2e/secret.txt"):
        assert requests.get(server.url + path).status_code == 404


def test_faults_count_down_and_apply_per_path(served):
    server, url, data = served
    (server.root / "other.bin").write_bytes(b"other")
    server.add_fault("status", path="/models/f.bin", times=2, status=503, retry_after=7)
    r = requests.get(url)
    assert r.status_code == 503 and r.headers["Retry-After"] == "7"
    assert requests.get(server.url + "/other.bin").status_code == 200  # another path is untouched
    assert requests.get(url).status_code == 503
    assert requests.get(url).content == data
    server.add_fault("flip", times=1, at=3)
    flipped = requests.get(url).content
    assert flipped[3] == data[3] ^ 0xFF and flipped[:3] + flipped[4:] == data[:3] + data[4:]
    server.add_fault("truncate", times=1, at=1000)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _ = requests.get(url).content
    server.add_fault("ignore_range", times=1)
    assert requests.get(url, headers={"Range": "bytes=5-"}).status_code == 200
    with pytest.raises(ValueError, match="unknown fault"):
        server.add_fault("explode")


def test_runs_as_a_module(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello")
    proc = subprocess.Popen([sys.executable, "-m", "packager.testing.server", "--root", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ")
        base = line.rsplit(" ", 1)[1].strip()
        def answers() -> bytes | None:
            try:
                return requests.get(base + "/x.bin", timeout=30).content
            except requests.ConnectionError:
                return None

        assert wait_for(answers, what="the server's answer") == b"hello"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _request_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if "process_request_thread" in t.name and t.is_alive()]


def test_a_client_that_resets_between_requests_is_not_logged(mirror_server, capsys):
    """A client that resets a kept-alive connection (a pool dropping it, a cancelled fetch) is normal for a server:
    no traceback from its threads."""
    import socket
    import struct

    body = b"x" * 1000
    (mirror_server.root / "f.bin").write_bytes(body)
    earlier = set(_request_threads())  # handlers of earlier tests' servers (a stall fault sleeps on) are not ours
    host, port = mirror_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"GET /f.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while not received.endswith(body):
            received += client.recv(65536)  # the whole answer; the server now waits for the next request
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    wait_for(lambda: not set(_request_threads()) - earlier, what="the handler to end, its error handled")
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err
    assert len(mirror_server.transfers("/f.bin")) == 1
