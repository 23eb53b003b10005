"""One transfer against the loopback mirror: hashing, resume, retries, faults, file sources."""
from __future__ import annotations

import email.utils
import hashlib
import os
import time

import pytest

from packager.errors import DownloadError, IntegrityError
from packager.transport import Policy, Verifier, part_state_path, transfer
from packager.transport.http import _parse_retry_after
from packager.transport.stream import MiB

FAST = Policy(connect_timeout=2, read_timeout=5, retries=3, backoff=0.01, max_backoff=0.05, chunk_size=256 * 1024)


def put(server, name: str, size: int = 3 * MiB, seed: int = 0) -> tuple[str, bytes, str]:
    """A random file under the server root named with its hash prefix; (url, data, sha256)."""
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32)
    data = bytes((b ^ (i * 7)) & 0xFF for i, b in enumerate(data[:4096])) + data[4096:]
    sha = hashlib.sha256(data).hexdigest()
    stem, ext = os.path.splitext(name)
    filename = f"{stem}-{sha[:8]}{ext}"
    (server.root / filename).write_bytes(data)
    return f"{server.url}/{filename}", data, sha


def verifier(url, sha, **kwargs):
    return Verifier(url, hash_prefix=sha[:8], **kwargs)


def test_plain_transfer_hashes_while_streaming(mirror_server, tmp_path):
    url, data, sha = put(mirror_server, "a.pth")
    part = tmp_path / "a.part"
    result = transfer(url, part, verifier(url, sha), policy=FAST)
    assert result.sha256 == sha and result.size == len(data) and result.resumed_from == 0
    assert part.read_bytes() == data
    mirror_server.settle()
    (record,) = mirror_server.requests()
    assert (record.status, record.range, record.bytes_sent) == (200, None, len(data))


def test_truncated_body_resumes_with_a_validated_range(mirror_server, tmp_path):
    url, data, sha = put(mirror_server, "a.pth")
    mirror_server.add_fault("truncate", times=1, at=MiB)
    part = tmp_path / "a.part"
    result = transfer(url, part, verifier(url, sha), policy=FAST)
    assert result.sha256 == sha and part.read_bytes() == data
    mirror_server.settle()
    first, second = mirror_server.requests()
    assert first.bytes_sent == MiB and not first.complete
    assert second.status == 206 and second.range == f"bytes={MiB}-" and second.start == MiB
    assert second.if_range and second.if_range.startswith('"')  # the strong ETag of the first answer
    assert second.bytes_sent == len(data) - MiB


def test_flipped_bytes_are_refused_naming_url_expected_and_got(mirror_server, tmp_path):
    url, _data, sha = put(mirror_server, "a.pth")
    mirror_server.add_fault("flip")
    part = tmp_path / "a.part"
    with pytest.raises(IntegrityError) as info:
        transfer(url, part, verifier(url, sha), policy=FAST)
    message = str(info.value)
    assert url in message and sha[:8] in message and "got" in message
    assert info.value.expected == sha[:8] and info.value.got != sha[:8]
    assert not part.exists() and not part_state_path(part).exists()


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_are_retried_then_recover(mirror_server, tmp_path, status):
    url, data, sha = put(mirror_server, "a.pth")
    mirror_server.add_fault("status", times=2, status=status, retry_after=0)
    result = transfer(url, tmp_path / "a.part", verifier(url, sha), policy=FAST)
    assert result.sha256 == sha and result.attempts == 3
    mirror_server.settle()
    assert [r.status for r in mirror_server.requests()] == [status, status, 200]


def test_retry_after_is_honoured(mirror_server, tmp_path):
    url, _data, sha = put(mirror_server, "a.pth", size=1000)
    mirror_server.add_fault("status", times=1, status=503, retry_after=1)
    notices = []
    began = time.monotonic()
    result = transfer(url, tmp_path / "a.part", verifier(url, sha), policy=FAST, notify=notices.append)
    waited = time.monotonic() - began
    assert result.attempts == 2 and len(notices) == 1
    assert "HTTP 503; retrying in 1s" in notices[0], notices  # the backoff alone would wait at most 0.05 s
    # the behaviour is the wait: a lower bound only (a sleep never ends early; a loaded machine only adds)
    assert waited >= 0.9


def test_persistent_5xx_gives_up_after_the_retries(mirror_server, tmp_path):
    url, _data, sha = put(mirror_server, "a.pth", size=1000)
    mirror_server.add_fault("status", status=500)
    with pytest.raises(DownloadError, match="HTTP 500.*gave up after 4 attempts"):
        transfer(url, tmp_path / "a.part", verifier(url, sha), policy=FAST)
    mirror_server.settle()
    assert len(mirror_server.requests()) == FAST.retries + 1


@pytest.mark.parametrize("status_fault", [("not_found", {}), ("status", {"status": 403})])
def test_4xx_is_not_retried(mirror_server, tmp_path, status_fault):
    kind, params = status_fault
    url, _data, sha = put(mirror_server, "a.pth", size=1000)
    mirror_server.add_fault(kind, **params)
    with pytest.raises(DownloadError, match=r"HTTP 40[34]"):
        transfer(url, tmp_path / "a.part", verifier(url, sha), policy=FAST)
    mirror_server.settle()
    assert len(mirror_server.requests()) == 1


def test_missing_file_is_a_404_without_retry(mirror_server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        transfer(f"{mirror_server.url}/nope-12345678.pth", tmp_path / "a.part", Verifier("x"), policy=FAST)
    mirror_server.settle()
    assert len(mirror_server.requests()) == 1


def test_connection_reset_is_retried(mirror_server, tmp_path):
    url, data, sha = put(mirror_server, "a.pth")
    mirror_server.add_fault("reset", times=2, at=MiB)
    part = tmp_path / "a.part"
    result = transfer(url, part, verifier(url, sha), policy=FAST)
    assert result.sha256 == sha and part.read_bytes() == data and result.attempts == 3


def test_stall_past_the_read_timeout_is_retried(mirror_server, tmp_path):
    url, data, sha = put(mirror_server, "a.pth")
    mirror_server.add_fault("stall", times=1, at=MiB, seconds=3)
    policy = Policy(connect_timeout=2, read_timeout=0.5, retries=2, backoff=0.01, chunk_size=256 * 1024)
    part = tmp_path / "a.part"
    result = transfer(url, part, verifier(url, sha), policy=policy)
    assert result.sha256 == sha and part.read_bytes() == data and result.attempts == 2
    # The retry continued from the bytes that arrived before the stall.
    retry = [r for r in mirror_server.requests() if r.fault is None][0]
    assert retry.status == 206 and retry.start > 0


def test_server_ignoring_range_gets_a_clean_full_download(mirror_server, tmp_path):
    url, data, sha = put(mirror_server, "a.pth")
    mirror_server.ignore_ranges = True
    mirror_server.add_fault("truncate", times=1, at=MiB)
    part = tmp_path / "a.part"
    result = transfer(url, part, verifier(url, sha), policy=FAST)
    assert result.sha256 == sha and part.read_bytes() == data
    mirror_server.settle()
    statuses = [(r.status, r.range) for r in mirror_server.requests()]
    assert statuses == [(200, None), (200, f"bytes={MiB}-")]


def test_changed_file_upstream_restarts_instead_of_splicing(mirror_server, tmp_path):
    url, data, sha = put(mirror_server, "a.pth")
    part = tmp_path / "a.part"
    mirror_server.add_fault("truncate", times=1, at=MiB)
    policy = Policy(retries=0, backoff=0.01, chunk_size=256 * 1024)
    with pytest.raises(DownloadError):
        transfer(url, part, verifier(url, sha), policy=policy)
    assert part.stat().st_size == MiB
    # The server's copy is touched (new mtime, so new ETag): If-Range no longer matches.
    path = mirror_server.root / url.rsplit("/", 1)[1]
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    result = transfer(url, part, verifier(url, sha), policy=FAST)
    assert result.sha256 == sha and part.read_bytes() == data
    mirror_server.settle()
    last = mirror_server.requests()[-1]
    assert last.range == f"bytes={MiB}-" and last.status == 200


def test_a_bad_partial_is_discarded_and_fetched_again(mirror_server, tmp_path):
    url, data, sha = put(mirror_server, "a.pth")
    part = tmp_path / "a.part"
    part.write_bytes(b"\0" * MiB)  # garbage that a resume would build on
    result = transfer(url, part, verifier(url, sha), policy=FAST)
    assert result.sha256 == sha and part.read_bytes() == data
    mirror_server.settle()
    assert [r.status for r in mirror_server.requests()] == [206, 200]


def test_too_large_is_refused_before_the_body(mirror_server, tmp_path):
    url, data, sha = put(mirror_server, "a.pth")
    part = tmp_path / "a.part"
    with pytest.raises(IntegrityError, match="wrong size"):
        transfer(url, part, verifier(url, sha, size=len(data) - 1), policy=FAST)
    assert not part.exists()


def test_full_sha256_pin(mirror_server, tmp_path):
    url, _data, sha = put(mirror_server, "a.pth")
    pinned = sha[:8] + "0" * 56
    with pytest.raises(IntegrityError, match="sha256 mismatch") as info:
        transfer(url, tmp_path / "a.part", Verifier(url, hash_prefix=sha[:8], sha256=pinned), policy=FAST)
    assert info.value.expected == pinned and info.value.got == sha


def test_file_url_and_plain_path_sources(tmp_path):
    data = os.urandom(MiB + 123)
    sha = hashlib.sha256(data).hexdigest()
    source = tmp_path / "src" / f"a-{sha[:8]}.pth"
    source.parent.mkdir()
    source.write_bytes(data)
    for i, url in enumerate([source.as_uri(), str(source)]):
        part = tmp_path / f"{i}.part"
        result = transfer(url, part, verifier(url, sha), policy=FAST)
        assert result.sha256 == sha and part.read_bytes() == data
    # resume from a partial copy
    part = tmp_path / "r.part"
    part.write_bytes(data[:1000])
    result = transfer(source.as_uri(), part, verifier("x", sha), policy=FAST)
    assert result.resumed_from == 1000 and part.read_bytes() == data
    with pytest.raises(DownloadError, match="no such file"):
        transfer((tmp_path / "missing.pth").as_uri(), tmp_path / "m.part", Verifier("x"), policy=FAST)


def test_connection_refused_is_a_download_error(tmp_path):
    from servers import free_port

    url = f"http://127.0.0.1:{free_port()}/a-12345678.pth"
    with pytest.raises(DownloadError, match="connection refused|connection error"):
        transfer(url, tmp_path / "a.part", Verifier(url), policy=Policy(retries=1, backoff=0.01, connect_timeout=1))


def test_verifier_rules():
    data = b"hello"
    sha = hashlib.sha256(data).hexdigest()
    v = Verifier("x", hash_prefix=sha[:10], sha256=sha, size=5)
    v.update(data)
    assert v.check() == sha
    v = Verifier("x", size=4)
    with pytest.raises(IntegrityError, match="too large"):
        v.update(data)
    v = Verifier("x", hash_prefix="abcdef")
    v.update(data)
    with pytest.raises(IntegrityError, match="prefix mismatch: expected abcdef, got"):
        v.check()


def test_retry_after_parsing():
    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after(None) is None and _parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _parse_retry_after(later) <= 31
    assert Policy(max_retry_after=10).delay(1, 99) == 10
    assert 0 <= Policy(backoff=1, max_backoff=3).delay(5) <= 3


def test_dns_failure_is_described_by_host_not_by_urllib3_class():
    """Without network the reason read 'connection error (MaxRetryError)'; it now names the host."""
    import socket

    import requests
    from urllib3.connection import HTTPSConnection
    from urllib3.exceptions import MaxRetryError, NameResolutionError

    from packager.transport.http import _describe

    conn = HTTPSConnection("download.pytorch.org", 443)
    cause = NameResolutionError("download.pytorch.org", conn, socket.gaierror(-3, "Temporary failure in name resolution"))
    exc = requests.exceptions.ConnectionError(MaxRetryError(None, "/models/x.pth", cause))
    assert _describe(exc) == "cannot resolve download.pytorch.org (no DNS or no network?)"
