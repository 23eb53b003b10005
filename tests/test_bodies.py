"""transport/bodies: bodies parsed whole are read with a cap and at a pace, against real servers on loopback
(the hostile registry fixture and moto's S3)."""
from __future__ import annotations

import pytest
import requests
from conftest import need_server
from hostile_registry import HostileRegistry, drip, endless, reply

from packager.errors import DownloadError, MirrorError
from packager.transport.bodies import Pace, TooSlow, read_capped

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server():
    with HostileRegistry() as hostile:
        yield hostile


def get(server, path: str):
    return requests.get(server.url + path, stream=True, timeout=10)


def test_a_body_within_its_cap_is_read_whole(server):
    server.route("GET", "/ok", reply(200, b"x" * 1000))
    assert read_capped(get(server, "/ok"), 1000, "listing") == b"x" * 1000


def test_an_endless_body_stops_at_its_cap_naming_the_server_and_what_it_sent(server):
    server.route("GET", "/endless", endless(content_type="text/html", prefix=b"<html>"))
    with pytest.raises(DownloadError) as err:
        read_capped(get(server, "/endless"), 64 << 10, "listing")
    assert err.value.message == (f"{server.host} sent a listing larger than 64 KiB (text/html, starting "
                                 f"'<html>{'A' * 34}'...); refused")
    assert len(server.seen()) == 1


def test_a_body_announced_larger_than_its_cap_is_refused_before_it_is_read(server):
    server.route("GET", "/big", endless(announce=5 << 30))
    with pytest.raises(MirrorError, match=rf"^{server.host} sent a token of 5368709120 bytes \(application/json\), "
                                          r"more than the 4 MiB allowed; refused$"):
        read_capped(get(server, "/big"), 4 << 20, "token", error=MirrorError)


def test_a_dripped_body_is_too_slow(server):
    server.route("GET", "/drip", drip(b"{}" * 50, every=0.1))
    with pytest.raises(TooSlow, match=rf"only \d+ bytes from {server.host} in \d s"):
        read_capped(get(server, "/drip"), 1000, "index", pace=Pace(speed_limit=1000, speed_time=0.5))


def test_an_s3_object_read_whole_has_a_cap(monkeypatch):
    from servers import MotoS3

    from packager.transport import open_target

    with need_server(MotoS3) as moto:
        for name, value in moto.env().items():
            monkeypatch.setenv(name, value)
        s3 = moto.client()
        s3.create_bucket(Bucket="mirror")
        s3.put_object(Bucket="mirror", Key="m/index.json", Body=b'{"format": 1}')
        target = open_target("s3://mirror/m", endpoint_url=moto.endpoint)
        assert target.read_text("index.json") == '{"format": 1}'
        s3.put_object(Bucket="mirror", Key="m/index.json", Body=b"[" * ((16 << 20) + 1))
        with pytest.raises(DownloadError, match=r"^s3://mirror/m/index.json: an object read whole \(a mirror index "
                                                r"or checksum file\) larger than 16 MiB \(starting '\[\[\[\["):
            target.read_text("index.json")
