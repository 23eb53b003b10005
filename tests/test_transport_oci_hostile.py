"""The OCI client against a registry that lies on purpose (tests/hostile_registry.py) on loopback: credentials stay
with their registry, bodies are read with caps, waits are bounded and announced, odd redirects and tokens are one
line naming the cause."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from hostile_registry import HostileRegistry, drip, drip_headers, endless, redirect, reply, silent

from packager.errors import OCIError
from packager.transport.oci import OCI_MANIFEST, Credentials, Policy, RegistryClient, digest_of
from packager.transport.stream import Cancel, Cancelled

pytestmark = pytest.mark.timeout(120)

FAST = Policy(retries=2, backoff=0.01, max_backoff=0.02, connect_timeout=3, read_timeout=10)
ALICE = Credentials("alice", "s3cret", "test")
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()


@pytest.fixture
def reg():
    with HostileRegistry() as server:
        yield server


@pytest.fixture
def other():
    """A second server: where a hostile registry sends uploads, redirects or token requests."""
    with HostileRegistry() as server:
        yield server


def client_of(server, policy=FAST, **kwargs) -> RegistryClient:
    kwargs.setdefault("notify", lambda message: None)
    return RegistryClient(server.host, plain_http=not server.url.startswith("https"), policy=policy, **kwargs)


def auths(server, method=None) -> list[str | None]:
    return [r.headers.get("Authorization") for r in server.seen(method)]


def write_auth_file(entries: dict[str, tuple[str, str]]) -> None:
    import base64

    Path(os.environ["REGISTRY_AUTH_FILE"]).write_text(json.dumps({"auths": {
        host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        for host, (user, password) in entries.items()}}))


# -- 16.1 credentials go only to the registry they belong to ---------------------------------------------

@pytest.mark.parametrize("challenge", ["basic", "bearer"])
def test_an_upload_location_on_another_host_gets_no_credentials(reg, other, no_creds, challenge):
    reg.challenge = 'Basic realm="r"' if challenge == "basic" else f'Bearer realm="{reg.url}/token",service="r"'
    reg.upload_location = f"{other.url}/elsewhere/upload"
    client = client_of(reg, credentials=ALICE)
    data = b"weights" * 1000
    assert client.push_blob("r", data, size=len(data), digest=digest_of(data)) == digest_of(data)  # one PUT
    assert client.push_blob("r", data, size=len(data), chunk_size=4000) == digest_of(data)  # PATCH chunks
    assert other.blobs[digest_of(data)] == data
    assert [r.method for r in other.seen()] == ["PUT", "PATCH", "PATCH", "PUT"]
    assert auths(other) == [None] * 4
    expected = ALICE.basic() if challenge == "basic" else "Bearer t0k3n"
    assert auths(reg, "POST") == [None, expected, expected]  # the registry itself still gets them


def test_a_redirect_to_another_host_gets_no_credentials(reg, other, no_creds):
    reg.challenge = 'Basic realm="r"'
    other.manifests["v1"] = (MANIFEST, OCI_MANIFEST)
    reg.route("GET", "/v2/r/manifests/v1", redirect(f"{other.url}/v2/r/manifests/v1", 307))
    client = client_of(reg, credentials=ALICE)
    client.ping()  # the registry asks for basic auth: from now on every request to it carries the password
    assert client.get_manifest("r", "v1").data == MANIFEST
    assert auths(other) == [None]
    assert auths(reg, "GET")[-1] == ALICE.basic()


def test_no_password_to_a_plain_http_token_realm_of_an_https_registry(tmp_path, other, no_creds, monkeypatch):
    from registry_server import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    with HostileRegistry(tls=(cert, key)) as secure:
        secure.challenge = f'Bearer realm="{other.url}/token",service="r"'  # same host name, plain http
        with pytest.raises(OCIError, match=rf"token server over plain http \({other.url}/token\); refusing to "
                                           rf"send the password for {other.host} in clear text"):
            client_of(secure, credentials=ALICE).ping()
        assert other.seen() == []
        # anonymous: nothing secret to leak, so the token is fetched
        client_of(secure, credentials=None).ping()
        assert auths(other) == [None]
        assert auths(secure) == [None, None, "Bearer t0k3n"]


def test_a_token_realm_on_another_host_gets_only_that_hosts_own_credentials(reg, other, no_creds):
    realm_host = f"localhost:{other.port}"  # another host name for the same loopback server
    reg.challenge = f'Bearer realm="http://{realm_host}/token",service="r"'
    write_auth_file({reg.host: ("alice", "s3cret")})
    client_of(reg).ping()
    assert auths(other) == [None]  # the registry's password stays with the registry

    write_auth_file({reg.host: ("alice", "s3cret"), realm_host: ("tokens", "pw")})
    client_of(reg).ping()
    assert auths(other)[-1] == Credentials("tokens", "pw").basic()

    # same host name, any port: the registry's operator runs it, so the registry's credentials go
    reg.challenge = f'Bearer realm="{other.url}/token",service="r"'
    client_of(reg).ping()
    assert auths(other)[-1] == ALICE.basic()


# -- 16.3 offline means offline ------------------------------------------------------------------------------

def test_an_offline_client_sends_nothing_blob_gets_included(reg, no_creds, tmp_path):
    from packager.errors import OfflineError

    data = b"layer" * 100
    reg.blobs[digest_of(data)] = data
    client = client_of(reg, offline=True)
    refusal = rf"offline mode \(TVPACK_OFFLINE=1 or --offline\): not connecting to {reg.host}"
    for call in (client.ping, lambda: client.get_manifest("r", "v1"), lambda: client.tags("r"),
                 lambda: client.push_blob("r", data, size=len(data), digest=digest_of(data)),
                 lambda: client.pull_blob("r", digest_of(data), tmp_path / "blob", size=len(data)),
                 lambda: client.stream_blob("r", digest_of(data), lambda chunk: None, size=len(data))):
        with pytest.raises(OfflineError, match=refusal):
            call()
    assert reg.seen() == [] and not (tmp_path / "blob").exists()
    client.offline = False  # the same client, back online
    client.pull_blob("r", digest_of(data), tmp_path / "blob", size=len(data))
    assert (tmp_path / "blob").read_bytes() == data


# -- 16.7 bounded reads -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, action, expected", [
    ("/token", endless(), "sent a token response larger than 64 KiB (application/json, starting '{\"token\": \"AAA"),
    ("/v2/r/manifests/v1", endless(404, prefix=b'{"errors": "'), "sent a HTTP 404 error body larger than 64 KiB"),
    ("/v2/r/manifests/v1", endless(content_type=OCI_MANIFEST, prefix=b"{"), "sent a manifest larger than 4 MiB"),
    ("/v2/r/manifests/v1", endless(content_type=OCI_MANIFEST, announce=1 << 40),
     "sent a manifest of 1099511627776 bytes"),
])
def test_endless_bodies_are_read_up_to_a_cap(reg, no_creds, path, action, expected):
    reg.challenge = f'Bearer realm="{reg.url}/token",service="r"'
    reg.route("GET", path, action)
    with pytest.raises(OCIError, match="refused") as err:
        client_of(reg, credentials=None).get_manifest("r", "v1")
    assert f"{reg.host} {expected}" in err.value.message
    assert "\n" not in err.value.message


# -- 16.8 deadlines, announced and bounded ------------------------------------------------------------------

def test_a_registry_that_never_answers_is_announced_then_given_up(reg, no_creds):
    reg.route("GET", "/v2/r/manifests/v1", silent())
    notices = []
    client = client_of(reg, Policy(read_timeout=0.5, retries=4, backoff=0.01), notify=notices.append)
    with pytest.raises(OCIError, match=rf"no answer from {reg.host} for 0.5 s \(gave up after 2 attempts\)"):
        client.get_manifest("r", "v1")
    assert notices == [f"oci://{reg.host}/r:v1: no answer from {reg.host} for 0.5 s; retrying"]
    assert len(reg.seen("GET")) == 2


def test_a_manifest_dripped_byte_by_byte_is_given_up(reg, no_creds):
    reg.route("GET", "/v2/r/manifests/v1", drip(MANIFEST, every=0.2, content_type=OCI_MANIFEST))
    notices = []
    client = client_of(reg, Policy(speed_limit=100, speed_time=0.5, backoff=0.01), notify=notices.append)
    with pytest.raises(OCIError, match=rf"only \d bytes from {reg.host} in \d s \(gave up after 2 attempts\)"):
        client.get_manifest("r", "v1")
    assert len(notices) == 1 and notices[0].endswith("; retrying")


def test_an_answer_whose_headers_drip_is_given_up(reg, no_creds):
    reg.route("GET", "/v2/r/manifests/v1", drip_headers(every=0.1))
    notices = []
    client = client_of(reg, Policy(connect_timeout=0.5, read_timeout=0.5, backoff=0.01), notify=notices.append)
    with pytest.raises(OCIError, match=rf"no answer from {reg.host} for 1 s \(gave up after 2 attempts\)"):
        client.get_manifest("r", "v1")
    assert notices == [f"oci://{reg.host}/r:v1: no answer from {reg.host} for 1 s; retrying"]


def test_max_time_bounds_everything_a_client_does(reg, no_creds):
    reg.route("*", "/v2/.*", silent())
    client = client_of(reg, Policy(read_timeout=30, max_time=1.0, backoff=0.01, stall_retries=9))
    with pytest.raises(OCIError, match=r"not done within 1 s \(--max-time\)"):
        client.ping()


def test_a_sibling_made_late_has_no_fresh_time_limit(reg, no_creds):
    """pull and install give each layer worker a sibling of the command's client: --max-time bounds the whole
    command, so a sibling made after the limit passed refuses at once instead of starting a new allowance."""
    reg.route("GET", "/v2/", reply(200, {}))
    client = client_of(reg, Policy(max_time=1.0, backoff=0.01))
    client.ping()
    time.sleep(1.2)  # past the command's limit (not a race: nothing else is waited for)
    with pytest.raises(OCIError, match=r"not done within 1 s \(--max-time\)"):
        client.sibling().ping()


def test_a_retry_wait_ends_at_once_when_cancelled(reg, no_creds):
    reg.route("GET", "/v2/", reply(503, {"errors": []}))
    retrying, cancel, outcome = threading.Event(), Cancel(), []
    client = client_of(reg, Policy(backoff=300, max_backoff=300), cancel=cancel, notify=lambda m: retrying.set())

    def run():
        try:
            client.ping()
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(exc)
    worker = threading.Thread(target=run)
    worker.start()
    assert retrying.wait(180)  # bounds a hang only
    cancel.cancel()
    worker.join(180)
    assert not worker.is_alive() and isinstance(outcome[0], Cancelled)


# -- 16.11 odd redirects, 16.13 odd tokens: one line naming the cause ---------------------------------------

@pytest.mark.parametrize("location, expected", [
    ("/v2/r/manifests/v1", "redirects in a loop (more than 10 redirects"),
    ("file:///etc/passwd", "answered HTTP 302 with a file:// Location 'file:///etc/passwd'; only http(s)"),
    ("ftp://127.0.0.1/m", "answered HTTP 302 with a ftp:// Location 'ftp://127.0.0.1/m'; only http(s)"),
    ("http://[::1/m", "answered HTTP 302 with a malformed Location 'http://[::1/m'"),
    ("http://127.0.0.1:99999/m", "answered HTTP 302 with a malformed Location"),
])
def test_odd_redirects_are_one_line_naming_the_cause(reg, no_creds, location, expected):
    reg.route("GET", "/v2/r/manifests/v1", redirect(location))
    with pytest.raises(OCIError) as err:
        client_of(reg).get_manifest("r", "v1")
    assert expected in err.value.message and "bug" not in err.value.message


@pytest.mark.parametrize("location", ["file:///tmp/upload", "ftp://127.0.0.1/up", "http://[::1/up"])
def test_an_upload_location_that_is_not_http_is_one_line(reg, no_creds, location):
    reg.upload_location = location
    with pytest.raises(OCIError) as err:
        client_of(reg).push_blob("r", b"x", size=1, digest=digest_of(b"x"))
    assert err.value.message == (f"oci://{reg.host}/r@{digest_of(b'x')}: the registry opened an upload session "
                                 f"at {location!r}, which is not an http(s) url")


@pytest.mark.parametrize("body, expected", [
    ({"token": 12345}, "gave a malformed token (int '12345'); the token server is at fault, not the credentials"),
    ({"token": "a b\n"}, "gave a malformed token (str 'a b\\n')"),
    ({"expires_in": 60}, "gave no token"),
    ([1, 2], "answered with something other than a JSON object"),
])
def test_a_token_server_giving_no_usable_token_is_blamed(reg, no_creds, body, expected):
    reg.challenge = f'Bearer realm="{reg.url}/token",service="r"'
    reg.token_body = body
    with pytest.raises(OCIError) as err:
        client_of(reg, credentials=ALICE).ping()
    assert f"token server {reg.url}/token {expected}" in err.value.message
    assert "refused the credentials" not in err.value.message
    assert auths(reg, "GET")[1:] == [ALICE.basic()]  # no "Bearer 12345" sent on


def test_the_fixture_stops_by_itself():
    import requests

    server = HostileRegistry(lifetime=60, max_requests=1).start()
    assert requests.get(server.url + "/v2/", timeout=5).status_code == 200
    assert requests.get(server.url + "/v2/", timeout=5).status_code == 503  # past max_requests: it stops
    server._thread.join(180)  # bounds a hang only
    assert not server._thread.is_alive()

    server = HostileRegistry(lifetime=0.2).start()  # past its lifetime: it stops, and a silent answer ends
    server.route("GET", "/v2/", silent())
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.url + "/v2/", timeout=30)
    server._thread.join(180)  # bounds a hang only
    assert not server._thread.is_alive()


# -- through the real CLI -------------------------------------------------------------------------------------

def one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tvpack: error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "this is a bug" not in proc.stderr, proc.stderr
    return errors[0]


def test_cli_announces_a_silent_registry_then_gives_up_in_one_line(reg, no_creds, tmp_path):
    from conftest import run_tvpack

    reg.route("GET", "/v2/r/manifests/v1", silent())
    proc = run_tvpack("pull", f"oci://{reg.host}/r:v1", "-o", tmp_path / "out.tvpack", "--plain-http",
                      "--read-timeout", "0.5", timeout=60)
    line = one_error_line(proc)
    assert f"tvpack: oci://{reg.host}/r:v1: no answer from {reg.host} for 0.5 s; retrying" in proc.stderr
    assert line.endswith(f"no answer from {reg.host} for 0.5 s (gave up after 2 attempts)")
    assert not (tmp_path / "out.tvpack").exists()


@pytest.mark.parametrize("setup, expected", [
    (lambda reg: reg.route("GET", "/v2/r/manifests/v1", redirect("file:///etc/passwd")),
     "with a file:// Location 'file:///etc/passwd'; only http(s) redirects are followed"),
    (lambda reg: reg.route("GET", "/v2/r/manifests/v1", redirect("/v2/r/manifests/v1", 301)), "redirects in a loop"),
    (lambda reg: setattr(reg, "challenge", f'Bearer realm="{reg.url}/token"') or setattr(reg, "token_body",
                                                                                           {"token": 12345}),
     "gave a malformed token (int '12345'); the token server is at fault, not the credentials"),
])
def test_cli_names_the_cause_of_odd_redirects_and_tokens(reg, no_creds, setup, expected):
    from conftest import run_tvpack

    setup(reg)
    line = one_error_line(run_tvpack("inspect", f"oci://{reg.host}/r:v1", "--plain-http", timeout=60))
    assert expected in line, line


def test_tags_are_listed_page_by_page_and_an_endless_list_is_capped(reg, no_creds):
    reg.route("GET", "/v2/r/tags/list", lambda h: reply(200, {"name": "r", "tags": ["b", "c"]})(h)
              if "last=a" in h.path else reply(200, {"name": "r", "tags": ["a"]},
                                              headers={"Link": '</v2/r/tags/list?last=a>; rel="next"'})(h))
    assert client_of(reg).tags("r") == ["a", "b", "c"]
    reg.route("GET", "/v2/r/tags/list", endless(prefix=b'{"name": "r", "tags": ["'))
    with pytest.raises(OCIError, match=rf"{reg.host} sent a tag list larger than 4 MiB"):
        client_of(reg).tags("r")
    reg.route("GET", "/v2/r/tags/list", reply(200, {"name": "r", "tags": [1]}))
    with pytest.raises(OCIError, match="sent a tag list that is not distribution's"):
        client_of(reg).tags("r")
