"""The OCI distribution client against the real CNCF distribution registry (and a token server) on loopback."""
from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import need_server

from packager.errors import IntegrityError, OCIError, UsageError
from packager.transport.oci import (
    OCI_MANIFEST,
    Credentials,
    Policy,
    Reference,
    RegistryClient,
    credential_files,
    digest_of,
    find_credentials,
    login,
    parse_reference,
)

FAST = Policy(retries=2, backoff=0.01, max_backoff=0.02, connect_timeout=3, read_timeout=10)


@pytest.fixture
def client(registry):
    return RegistryClient(registry.host, plain_http=True, policy=FAST)


def blob(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def auth_entry(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- references and credentials (pure) ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("oci://registry.example.com/models/resnet", Reference("registry.example.com", "models/resnet", "latest")),
    ("oci://127.0.0.1:5000/a/b/c:v1.2", Reference("127.0.0.1:5000", "a/b/c", "v1.2")),
    ("oci://localhost:5000/repo@sha256:" + "a" * 64, Reference("localhost:5000", "repo", None, "sha256:" + "a" * 64)),
    ("oci://[::1]:5000/x_y/z-w:tag@sha256:" + "b" * 64, Reference("[::1]:5000", "x_y/z-w", "tag", "sha256:" + "b" * 64)),
])
def test_parse_reference(text, expected):
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref
    assert ref.reference == (expected.digest or expected.tag)


@pytest.mark.parametrize("text", ["docker://h/r", "oci://h", "oci://h/", "oci://h/Upper", "oci://h/r:bad tag",
                                  "oci://h/r@sha256:abc", "oci://h/r@md5:" + "a" * 32, "oci://h:port/r"])
def test_parse_reference_refuses(text):
    with pytest.raises(UsageError):
        parse_reference(text)


def test_credentials_from_docker_and_containers_files(tmp_path, no_creds):
    docker = no_creds / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {"https://reg.example:5000/v1/": auth_entry("dock", "pw1"),
                                            "other:1": auth_entry("x", "y")}}))
    found = find_credentials("reg.example:5000")
    assert (found.username, found.password, found.source) == ("dock", "pw1", str(docker))
    assert find_credentials("reg.example") is None  # the port is part of the key

    # the containers auth file wins, and a repository-scoped key beats the bare host
    Path(os.environ["REGISTRY_AUTH_FILE"]).write_text(json.dumps({"auths": {
        "reg.example:5000": auth_entry("pod", "pw2"), "reg.example:5000/team": auth_entry("team", "pw3")}}))
    assert find_credentials("reg.example:5000", "other/repo").username == "pod"
    assert find_credentials("reg.example:5000", "team/models").username == "team"
    assert credential_files()[0] == Path(os.environ["REGISTRY_AUTH_FILE"])


def test_credentials_default_auth_file_under_xdg_runtime_dir(tmp_path, no_creds, monkeypatch):
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    auth = tmp_path / "run" / "containers" / "auth.json"
    auth.parent.mkdir(parents=True)
    auth.write_text(json.dumps({"auths": {"h:1": auth_entry("u", "p:with:colons")}}))
    assert find_credentials("h:1") == Credentials("u", "p:with:colons", str(auth))


# -- blobs and manifests against the registry --------------------------------------------------------

def test_push_pull_round_trip_and_manifest(client, registry, tmp_path):
    data = blob(300_000)
    digest = digest_of(data)
    source = tmp_path / "layer.tar"
    source.write_bytes(data)
    assert client.blob_exists("models/zoo", digest) is None
    seen = []
    assert client.push_blob("models/zoo", source, size=len(data), digest=digest, on_bytes=seen.append) == digest
    assert sum(seen) == len(data)
    assert client.blob_exists("models/zoo", digest) == len(data)

    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(b"{}"),
                                      "size": 2},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest,
                                       "size": len(data)}]}).encode()
    client.push_blob("models/zoo", b"{}", size=2, digest=digest_of(b"{}"))
    assert client.put_manifest("models/zoo", "v1", manifest, OCI_MANIFEST) == digest_of(manifest)
    got = client.get_manifest("models/zoo", "v1")
    assert got == (manifest, OCI_MANIFEST, digest_of(manifest))
    assert client.get_manifest("models/zoo", digest_of(manifest)).data == manifest
    assert client.manifest_digest("models/zoo", "v1") == digest_of(manifest)
    assert client.manifest_digest("models/zoo", "v2") is None

    dest = tmp_path / "out" / "layer.tar"
    dest.parent.mkdir()
    progress = []
    assert client.pull_blob("models/zoo", digest, dest, size=len(data), on_bytes=progress.append) == len(data)
    assert dest.read_bytes() == data and sum(progress) == len(data)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["layer.tar"]


def test_second_push_uploads_nothing_and_mount_moves_no_bytes(client, registry):
    data = blob(50_000, seed=1)
    digest = digest_of(data)
    assert client.ensure_blob("a/one", data, size=len(data), digest=digest) == "pushed"
    uploads = len(registry.uploads())
    assert client.ensure_blob("a/one", data, size=len(data), digest=digest) == "exists"
    assert len(registry.uploads()) == uploads  # HEAD only

    assert client.ensure_blob("b/two", data, size=len(data), digest=digest, mount_from=("a/one",)) == "mounted"
    assert [r[0] for r in registry.uploads("b/two")] == ["POST"]  # the mount request, no PATCH/PUT
    assert client.blob_exists("b/two", digest) == len(data)
    assert client.mount_blob("c/three", digest, "nowhere/else") is False  # declined: its session is cancelled
    assert [r[:1] + r[2:3] for r in registry.requests() if r[1].startswith("/v2/c/three/blobs/uploads/")] == \
        [("POST", 202), ("DELETE", 204)]


def test_chunked_upload_with_digest_computed_while_uploading(client, registry, tmp_path):
    data = blob(2_500_000, seed=2)
    seen = []
    pushed = client.push_blob("big/blob", lambda: open_bytes(tmp_path, data), size=len(data), chunk_size=1 << 20,
                              on_bytes=seen.append)
    assert pushed == digest_of(data) and sum(seen) == len(data)
    methods = [r[0] for r in registry.uploads("big/blob")]
    assert methods == ["POST", "PATCH", "PATCH", "PATCH", "PUT"]
    out = tmp_path / "back"
    client.pull_blob("big/blob", pushed, out)
    assert out.read_bytes() == data


def open_bytes(tmp_path: Path, data: bytes):
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return open(path, "rb")


def test_push_refuses_a_source_that_does_not_match_its_digest(client):
    data = blob(10_000)
    with pytest.raises(OCIError, match="rejected the upload.*DIGEST_INVALID"):
        client.push_blob("r", data, size=len(data), digest=digest_of(b"something else"))
    with pytest.raises(OCIError, match="do not match the digest"):
        client.push_blob("r", data, size=len(data), digest=digest_of(b"something else"), chunk_size=4096)


def test_pull_resumes_a_part_file_with_range(client, registry, tmp_path):
    data = blob(400_000, seed=3)
    digest = client.push_blob("r", data, size=len(data), digest=digest_of(data))
    dest = tmp_path / "blob"
    part = tmp_path / "blob.part"
    part.write_bytes(data[:123_456])  # an earlier pull interrupted here
    progress = []
    client.pull_blob("r", digest, dest, size=len(data), on_bytes=progress.append)
    assert dest.read_bytes() == data and not part.exists()
    assert progress[0] == 123_456 and sum(progress) == len(data)
    gets = [r for r in registry.requests() if r[0] == "GET" and r[1] == f"/v2/r/blobs/{digest}"]
    assert gets[-1][2:] == (206, len(data) - 123_456)


def test_pull_finishes_a_complete_part_without_a_request(client, registry, tmp_path):
    data = blob(50_000, seed=8)
    digest = client.push_blob("r", data, size=len(data), digest=digest_of(data))
    (tmp_path / "blob.part").write_bytes(data)  # interrupted between the last byte and the rename
    before = len(registry.requests())
    assert client.pull_blob("r", digest, tmp_path / "blob", size=len(data)) == len(data)
    assert (tmp_path / "blob").read_bytes() == data and len(registry.requests()) == before


def test_pull_drops_a_part_that_is_not_a_prefix_and_starts_over(client, registry, tmp_path):
    """As for any source of the engine: a resumed blob that fails its digest may owe it to the old part,
    so it is fetched once more from byte 0 before the registry is blamed."""
    data = blob(100_000, seed=4)
    digest = client.push_blob("r", data, size=len(data), digest=digest_of(data))
    dest, part = tmp_path / "blob", tmp_path / "blob.part"
    part.write_bytes(b"x" * 1000)
    before = len(registry.requests())
    assert client.pull_blob("r", digest, dest, size=len(data)) == len(data)
    assert dest.read_bytes() == data and not part.exists()
    sent = [sent for method, path, status, sent in registry.requests()[before:] if method == "GET"]
    assert sent == [len(data) - 1000, len(data)]  # the ranged GET that continued the bad part, then the whole blob


def test_blob_corrupted_in_registry_storage_is_refused(client, registry, tmp_path):
    data = blob(200_000, seed=5)
    digest = client.push_blob("r", data, size=len(data), digest=digest_of(data))
    stored = registry.blob_path(digest)
    corrupt = bytearray(stored.read_bytes())
    corrupt[1000] ^= 0xFF
    stored.write_bytes(corrupt)
    dest = tmp_path / "blob"
    with pytest.raises(IntegrityError) as err:
        client.pull_blob("r", digest, dest, size=len(data))
    assert "do not match its digest" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.glob("blob*")) == []


def test_manifest_corrupted_in_storage_is_refused(client, registry):
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
    digest = client.put_manifest("r", "v1", manifest, "application/vnd.oci.image.index.v1+json")
    registry.blob_path(digest).write_bytes(manifest.replace(b"[]", b"[ ]"))
    with pytest.raises(OCIError, match="manifest refused: its bytes do not match"):
        client.get_manifest("r", "v1")
    with pytest.raises(OCIError, match="sent a manifest of 89 bytes .*more than the 10 bytes allowed; refused"):
        client.get_manifest("r", digest, max_size=10)


def test_one_line_errors(client, registry, tmp_path):
    data = b"{}"
    client.push_blob("r", data, size=2, digest=digest_of(data))
    cases = [
        (lambda: client.get_manifest("r", "missing"), "r:missing: tag or manifest not found"),
        (lambda: client.put_manifest("r", "v1", b'{"schemaVersion": 2}', "application/x-not-a-manifest"),
         "rejected the manifest or its media type"),
        (lambda: client.pull_blob("r", digest_of(b"nope"), tmp_path / "x"), "blob not found"),
        (lambda: RegistryClient(f"127.0.0.1:{free_port()}", plain_http=True, policy=FAST).ping(),
         "connection refused"),
    ]
    for call, expected in cases:
        with pytest.raises(OCIError) as err:
            call()
        assert expected in str(err.value) and "\n" not in err.value.format()


def test_manifest_check_names_a_digest_reference_with_an_at():
    # a failed HEAD of oci://host/repo@sha256:... (push's re-push check) spells it as get_manifest does
    digest = digest_of(b"{}")
    down = RegistryClient(f"127.0.0.1:{free_port()}", plain_http=True, policy=FAST)
    for check in (down.manifest_digest, down.get_manifest):
        with pytest.raises(OCIError) as err:
            check("models/zoo", digest)
        assert f"/models/zoo@{digest}" in str(err.value) and f"zoo:{digest}" not in str(err.value)
    with pytest.raises(OCIError, match="/models/zoo:v1"):
        down.manifest_digest("models/zoo", "v1")


def free_port() -> int:
    from servers import free_port as port

    return port()


# -- authentication ----------------------------------------------------------------------------------

def test_basic_auth_with_docker_config_in_home(auth_registry, no_creds):
    docker = no_creds / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {f"http://{auth_registry.host}": auth_entry("alice", "s3cret")}}))
    client = RegistryClient(auth_registry.host, plain_http=True, policy=FAST)
    data = blob(70_000)
    assert client.ensure_blob("private/m", data, size=len(data), digest=digest_of(data)) == "pushed"


def test_basic_auth_through_a_credential_helper(auth_registry, no_creds, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-tvpacktest"
    helper.write_text(f"#!/bin/sh\nread host\n[ \"$host\" = {auth_registry.host} ] || exit 1\n"
                      "echo '{\"Username\": \"alice\", \"Secret\": \"s3cret\"}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    docker = no_creds / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {auth_registry.host: {}}, "credsStore": "tvpacktest"}))
    found = find_credentials(auth_registry.host)
    assert (found.username, found.password) == ("alice", "s3cret") and "credential helper tvpacktest" in found.source
    RegistryClient(auth_registry.host, plain_http=True, policy=FAST).ping()
    assert find_credentials("other.host:1") is None


def test_basic_auth_with_registry_auth_file_and_wrong_or_missing_creds(auth_registry, no_creds, tmp_path):
    host = auth_registry.host
    with pytest.raises(OCIError) as err:
        RegistryClient(host, plain_http=True, policy=FAST).blob_exists("r", digest_of(b""))
    message = str(err.value)
    assert "unauthorized: no credentials" in message and os.environ["REGISTRY_AUTH_FILE"] in message
    assert str(no_creds / ".docker" / "config.json") in message

    auth_file = Path(os.environ["REGISTRY_AUTH_FILE"])
    auth_file.write_text(json.dumps({"auths": {host: auth_entry("alice", "wrong")}}))
    with pytest.raises(OCIError) as err:
        RegistryClient(host, plain_http=True, policy=FAST).ping()
    assert f"refused the credentials for {host} from {auth_file}" in str(err.value)

    auth_file.write_text(json.dumps({"auths": {host: auth_entry("alice", "s3cret")}}))
    assert RegistryClient(host, plain_http=True, policy=FAST).blob_exists("r", digest_of(b"")) is None


def test_login_checks_then_writes_the_containers_auth_file(auth_registry, no_creds, tmp_path):
    auth_file = Path(os.environ["REGISTRY_AUTH_FILE"])
    auth_file.write_text(json.dumps({"auths": {"elsewhere:1": auth_entry("x", "y")}, "other": True}))
    with pytest.raises(OCIError, match="refused the credentials"):
        login(auth_registry.host, "alice", "wrong", plain_http=True, policy=FAST)
    assert auth_registry.host not in auth_file.read_text()

    assert login(auth_registry.host, "alice", "s3cret", plain_http=True, policy=FAST) == auth_file
    assert auth_file.stat().st_mode & 0o777 == 0o600
    saved = json.loads(auth_file.read_text())
    assert saved["other"] is True and "elsewhere:1" in saved["auths"]
    assert find_credentials(auth_registry.host).password == "s3cret"
    assert [p.name for p in auth_file.parent.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_bearer_token_challenge_with_distribution_token_auth(tmp_path, no_creds):
    from registry_server import DistributionRegistry, TokenServer

    tokens = need_server(TokenServer, tmp_path, users={"bob": "pw", "carol": "pw"}, pull_only=("carol",))
    with tokens, need_server(DistributionRegistry, tmp_path, token_server=tokens) as reg:
        reader = RegistryClient(reg.host, plain_http=True, policy=FAST, credentials=Credentials("carol", "pw", "C"))
        with pytest.raises(OCIError, match="access denied: the credentials from C do not allow push"):
            reader.push_blob("team/a", b"x", size=1, digest=digest_of(b"x"))
        with pytest.raises(OCIError, match="unauthorized: no credentials"):
            RegistryClient(reg.host, plain_http=True, policy=FAST).ping()
        with pytest.raises(OCIError, match="refused the credentials"):
            RegistryClient(reg.host, plain_http=True, policy=FAST, credentials=Credentials("bob", "no", "test")).ping()

        Path(os.environ["REGISTRY_AUTH_FILE"]).write_text(json.dumps({"auths": {reg.host: auth_entry("bob", "pw")}}))
        client = RegistryClient(reg.host, plain_http=True, policy=FAST)
        data = blob(80_000)
        digest = digest_of(data)
        assert client.ensure_blob("team/a", data, size=len(data), digest=digest) == "pushed"
        assert client.ensure_blob("team/b", data, size=len(data), digest=digest, mount_from=("team/a",)) == "mounted"
        client.pull_blob("team/b", digest, tmp_path / "out", size=len(data))
        assert (tmp_path / "out").read_bytes() == data
        assert reader.blob_exists("team/b", digest) == len(data)  # carol may pull
        # one token per repository (a push token serves the pull too); the mount's also covers the source
        scopes = [{s.rsplit(":", 1)[0] + ":" + ",".join(sorted(s.rsplit(":", 1)[1].split(","))) for s in scopes}
                  for user, scopes in tokens.issued if user == "bob"]
        assert scopes == [{"repository:team/a:pull", "repository:team/a:pull,push"},
                          {"repository:team/b:pull", "repository:team/b:pull,push"},
                          {"repository:team/a:pull", "repository:team/b:pull,push"}]
        client.ping()
        assert tokens.issued[-1] == ("bob", [])  # /v2/ itself asks for no scope


def test_token_expiring_during_a_chunked_upload_is_renewed_and_the_chunk_resent(tmp_path, no_creds):
    import time

    from registry_server import DistributionRegistry, TokenServer

    tokens = need_server(TokenServer, tmp_path, users={"bob": "pw"})
    with tokens, need_server(DistributionRegistry, tmp_path, token_server=tokens) as reg:
        tokens.lifetime = -58  # the registry allows 60 s of clock skew: this token lives one to two seconds
        client = RegistryClient(reg.host, plain_http=True, policy=FAST, credentials=Credentials("bob", "pw", "t"))
        data = blob(300_000, seed=7)
        progress = []

        def on_bytes(n: int) -> None:
            progress.append(n)
            if len(progress) == 1:  # during the first chunk: let the token run out
                time.sleep(3)
                tokens.lifetime = 300
        assert client.push_blob("r", data, size=len(data), chunk_size=100_000, on_bytes=on_bytes) == digest_of(data)
        assert sum(progress) == len(data)
        patches = [r[2] for r in reg.uploads("r") if r[0] == "PATCH"]
        assert patches == [202, 401, 202, 202]
        client.pull_blob("r", digest_of(data), tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == data


def test_tls_with_requests_ca_bundle_and_without(tmp_path, no_creds, monkeypatch):
    from registry_server import DistributionRegistry

    with need_server(DistributionRegistry, tmp_path, tls=True) as reg:
        with pytest.raises(OCIError) as err:
            RegistryClient(reg.host, policy=FAST).ping()
        line = err.value.format()
        assert "certificate verify failed" in line and "REQUESTS_CA_BUNDLE" in line and "--plain-http" in line
        with pytest.raises(OCIError, match="speaks HTTPS; drop --plain-http"):
            RegistryClient(reg.host, plain_http=True, policy=FAST).ping()

        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(reg.ca_cert))
        client = RegistryClient(reg.host, policy=FAST)
        data = blob(10_000)
        digest = client.push_blob("secure/r", data, size=len(data), digest=digest_of(data))
        client.pull_blob("secure/r", digest, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == data


def test_tls_hint_offers_plain_http_only_for_loopback():
    import requests

    exc = requests.exceptions.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    remote = RegistryClient("registry.example.com").\
        _connection_error(exc, "oci://registry.example.com/r").format()
    assert "REQUESTS_CA_BUNDLE" in remote and "--plain-http" not in remote


# -- redirects, retries and resets: a front that redirects blob GETs to another host ------------------

class _Front:
    """A registry front on 127.0.0.1 that wants basic auth and redirects blob GETs to itself as
    ``localhost`` (another host), then to ``target``; it records the Authorization header of every request."""

    def __init__(self, target: str):
        self.target = target
        self.seen: list[tuple[str, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                auth = self.headers.get("Authorization")
                owner.seen.append((self.path, auth))
                if self.path.startswith("/v2/") and auth != "Basic " + base64.b64encode(b"u:p").decode():
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="front"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                name = self.path.rsplit("/", 1)[-1]
                # first hop: to this same server under another host name, which records what it got
                location = owner.target + "/" + name if self.path.startswith("/storage/") else \
                    f"http://localhost:{self.server.server_address[1]}/storage/{name}"
                self.send_response(307)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_redirected_blob_get_drops_auth_retries_5xx_and_resumes_after_reset(tmp_path, no_creds):
    from packager.testing.server import MirrorServer

    data = blob(1_000_000, seed=6)
    digest = digest_of(data)
    store = tmp_path / "store"
    store.mkdir()
    (store / digest).write_bytes(data)
    with MirrorServer(store) as bucket:
        front = _Front(bucket.url)
        try:
            bucket.add_fault("status", status=503, times=1)
            bucket.add_fault("reset", at=300_000, times=1)
            small_reads = Policy(retries=2, backoff=0.01, max_backoff=0.02, read_size=64 * 1024)  # a read in flight is lost
            client = RegistryClient(front.host, plain_http=True, policy=small_reads, credentials=Credentials("u", "p", "t"))
            client.pull_blob("r", digest, tmp_path / "out", size=len(data))
            assert (tmp_path / "out").read_bytes() == data
            bucket.settle()
            served = bucket.requests()
            assert [r.status for r in served] == [503, 200, 206]
            assert served[-1].range not in (None, "bytes=0-")  # continued where the reset left the part
            assert all(r.path == f"/{digest}" for r in served)
            # the registry got the credentials; the redirect target (another host) never did
            assert {auth is not None for path, auth in front.seen if path.startswith("/v2/")} == {True, False}
            assert [auth for path, auth in front.seen if path.startswith("/storage/")] == [None] * 3

            bucket.add_fault("not_found", times=None)
            with pytest.raises(OCIError, match="not found"):
                client.pull_blob("r", digest, tmp_path / "again", size=len(data))
            bucket.settle()
            assert len(bucket.requests()) == 4  # a 4xx is not retried
        finally:
            front.close()


# -- a registry behind nginx with its default body limit (1 MB), as Harbor's docs warn -------------------

def test_push_through_a_proxy_with_a_body_limit_goes_up_in_smaller_chunks(registry, tmp_path):
    from servers import Nginx

    with need_server(Nginx, tmp_path / "root", tmp_path / "nginx", proxy_to=f"http://{registry.host}",
                     max_body="1m") as proxy:
        client = RegistryClient(f"127.0.0.1:{proxy.port}", plain_http=True)
        first, second = blob(3_000_000, seed=7), blob(3_000_000, seed=8)
        assert client.push_blob("p/q", first, size=len(first), digest=digest_of(first)) == digest_of(first)
        log = [(method, status) for method, path, status, _ in proxy.requests() if "/blobs/uploads/" in path]
        # the monolithic PUT and the first 1.5 MB chunk are refused; 750 kB chunks go through
        assert log[:3] == [("POST", 202), ("PUT", 413), ("PATCH", 413)]
        assert log[3:] == [("PATCH", 202)] * 4 + [("PUT", 201)]
        seen = len(proxy.requests())
        client.push_blob("p/q", second, size=len(second), digest=digest_of(second))  # remembers the limit
        assert 413 not in [status for _m, _p, status, _s in proxy.requests()[seen:]]
        for data in (first, second):
            client.pull_blob("p/q", digest_of(data), tmp_path / "out", size=len(data))
            assert (tmp_path / "out").read_bytes() == data

    with need_server(Nginx, tmp_path / "root", tmp_path / "nginx2", proxy_to=f"http://{registry.host}",
                     max_body="100k") as proxy:
        client = RegistryClient(f"127.0.0.1:{proxy.port}", plain_http=True)
        with pytest.raises(OCIError, match=r"a proxy in front of it, refuses request bodies of \d+ bytes "
                                           r"\(HTTP 413\): raise its limit \(nginx: client_max_body_size 0\)"):
            client.push_blob("p/q", first, size=len(first), digest=digest_of(first))


def test_tags_of_a_repository(client, registry):
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
    for tag in ("v2", "v1"):
        client.put_manifest("r", tag, manifest, "application/vnd.oci.image.index.v1+json")
    assert sorted(client.tags("r")) == ["v1", "v2"]
    with pytest.raises(OCIError, match="repository not found"):
        client.tags("nothing/here")
