"""The one read path (packager/transport/engine.py) through its public API, against the loopback mirror:
a caller's write gets every byte once however the source resumes; a file that changed under a part is
fetched again; a cancelled run stops an open that waits for an answer."""
from __future__ import annotations

import hashlib
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from packager.errors import IntegrityError
from packager.testing.server import MirrorServer
from packager.transport import Cancel, Cancelled, Policy, Verifier, fetch, source_of, stream

FAST = Policy(connect_timeout=2, read_timeout=5, retries=3, backoff=0.01, max_backoff=0.05, chunk_size=64 * 1024)


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def test_stream_feeds_each_byte_once_when_the_resume_is_answered_from_byte_0(tmp_path):
    data = data_of(900_000)
    (tmp_path / "blob").write_bytes(data)
    with MirrorServer(tmp_path) as server:
        server.add_fault("reset", path="/blob", at=300_000, times=1)
        server.add_fault("ignore_range", path="/blob", times=1)
        out = bytearray()
        verifier = Verifier("blob", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        result = stream(source_of(server.url + "/blob"), out.extend, verifier, FAST)
        server.settle()
        ranges = [r.range for r in server.transfers("/blob")]
    assert bytes(out) == data and result.attempts == 2
    assert ranges[0] is None and ranges[1] and ranges[1] != "bytes=0-"  # asked to continue; sent from 0


def test_stream_refuses_bytes_that_are_not_the_object(tmp_path):
    (tmp_path / "blob").write_bytes(data_of(10_000))
    with MirrorServer(tmp_path) as server:
        verifier = Verifier("blob", sha256="0" * 64, size=10_000)
        with pytest.raises(IntegrityError, match="sha256 mismatch"):
            stream(source_of(server.url + "/blob"), bytearray().extend, verifier, FAST)


def test_a_file_that_changed_under_its_part_is_fetched_again_from_zero(tmp_path):
    source = tmp_path / "weights.pth"
    old, new = data_of(500_000, seed=2), data_of(500_000, seed=3)
    source.write_bytes(old)
    part = tmp_path / "weights.pth.part"
    cancel = Cancel()
    got = []

    def cancel_after_first_chunk(n: int) -> None:  # stop the first transfer part way, keeping its part
        got.append(n)
        cancel.cancel()
    with pytest.raises(Cancelled):
        fetch(source_of(str(source)), part, Verifier("w", size=len(old)), FAST, on_bytes=cancel_after_first_chunk,
              cancel=cancel)
    assert 0 < part.stat().st_size < len(old)
    source.write_bytes(new)  # same size, other bytes, new mtime: the part is not a prefix of this file
    result = fetch(source_of(str(source)), part, Verifier("w", sha256=hashlib.sha256(new).hexdigest()), FAST)
    assert part.read_bytes() == new and result.sha256 == hashlib.sha256(new).hexdigest()
    assert result.resumed_from == 0 and result.attempts == 1  # its validator said so: nothing appended, no retry


def test_cancel_stops_an_open_that_waits_for_an_answer(tmp_path):
    asked, release = threading.Event(), threading.Event()

    class Silent(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.set()
            release.wait()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cancel = Cancel()
    slow = Policy(connect_timeout=2, read_timeout=600, retries=0, speed_limit=0)  # only cancel can end the wait
    outcome: list = []

    def run() -> None:
        try:
            fetch(source_of(f"http://127.0.0.1:{server.server_address[1]}/x"), tmp_path / "x.part",
                  Verifier("x"), slow, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001 - what ended it is the test
            outcome.append(exc)
    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert asked.wait(180)  # bounds a hang only
        cancel.cancel()
        worker.join(180)
        assert not worker.is_alive() and len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
