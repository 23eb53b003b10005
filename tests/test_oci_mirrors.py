"""Registry mirrors from containers-registries.conf, against real registries on loopback: a real distribution
pull-through cache (``proxy: {remoteurl}``) in front of the real registry, mirrors that are down, refuse or serve
wrong bytes, credentials that stay with their host, pushes to the location only, blocked registries."""
from __future__ import annotations

import importlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import need_server, run_tvpack
from referrers_registry import ReferrersFront
from registry_server import DistributionRegistry
from servers import free_port

from packager import oci

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

@pytest.fixture(autouse=True)
def isolated(oci_isolated):
    """The empty registries.conf each test configures (conftest's ``oci_isolated``; ``small_bundle`` is there too)."""
    return oci_isolated


def configure(conf: Path, prefix: str, *mirrors: str, extra: str = "", mirror_extra: str = "") -> None:
    text = f'[[registry]]\nprefix = "{prefix}"\ninsecure = true\n{extra}\n'
    for location in mirrors:
        text += f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n{mirror_extra}\n'
    conf.write_text(text)


def registry(tmp_path, **kwargs) -> DistributionRegistry:
    return need_server(DistributionRegistry, tmp_path, **kwargs).start()


@pytest.fixture
def servers():
    started: list = []
    yield started
    for server in reversed(started):
        server.stop()


def installed(home: Path, bundle: Path) -> bool:
    with B.open_bundle(bundle) as opened:
        return all((home / "hub/checkpoints" / e.filename).read_bytes() == opened.open_checkpoint(e.name).read()
                   for e in opened.entries)


def blob_gets(reg, agent: str | None = None, not_agent: str | None = None) -> list[str]:
    return [path.rsplit("/", 1)[-1] for method, path, status, ua in reg.user_agents()
            if method == "GET" and "/blobs/sha256:" in path and status in (200, 206)
            and (agent is None or ua.startswith(agent)) and (not_agent is None or not ua.startswith(not_agent))]


def test_installs_go_through_a_pull_through_cache_and_upstream_serves_each_blob_once(
        tmp_path, servers, small_bundle, isolated):
    upstream = registry(tmp_path)
    servers.append(upstream)
    cache = registry(tmp_path, proxy=upstream.url)
    servers.append(cache)
    oci.push_bundle(small_bundle, f"oci://{upstream.host}/models/small:v1", plain_http=True)
    before = len(upstream.user_agents())
    configure(isolated, upstream.host, cache.host)
    counts = []
    for n in range(3):  # three nodes, one image
        home = tmp_path / f"node{n}"
        proc = run_tvpack("install", f"oci://{upstream.host}/models/small:v1", "--torch-home", home)
        assert proc.returncode == 0, proc.stderr
        assert "mirror" not in proc.stderr and installed(home, small_bundle)
        counts.append(len(blob_gets(upstream)))
    upstream_log = upstream.user_agents()[before:]
    assert not [r for r in upstream_log if r[3].startswith("tvpack")]  # every node went to the mirror
    # the cache fetched the three layers (2 checkpoints, the manifest layer) on the first install (Debian's
    # distribution 2.8 GETs a blob twice on a miss: once to serve, once to store), never again...
    fetched = blob_gets(upstream)
    assert counts[0] == counts[-1] == len(fetched) and len(set(fetched)) == 3
    assert all(fetched.count(d) <= 2 for d in fetched)
    assert len(blob_gets(cache, agent="tvpack")) == 9  # ...and served them three times


def test_mirrors_down_refusing_or_serving_wrong_bytes_are_skipped_with_one_notice_each(
        tmp_path, servers, small_bundle, isolated):
    upstream = registry(tmp_path)
    empty = registry(tmp_path)
    liar = registry(tmp_path)
    servers.extend([upstream, empty, liar])
    report = oci.push_bundle(small_bundle, f"oci://{upstream.host}/models/small:v1", plain_http=True)
    oci.push_bundle(small_bundle, f"oci://{liar.host}/models/small:v1", plain_http=True)
    manifest = json.loads(liar.blob_path(report.digest).read_bytes())
    checkpoint_layer = manifest["layers"][0]["digest"]
    data = bytearray(liar.blob_path(checkpoint_layer).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte off
    liar.blob_path(checkpoint_layer).write_bytes(bytes(data))
    down = f"127.0.0.1:{free_port()}"
    configure(isolated, upstream.host, down, empty.host, liar.host)

    home = tmp_path / "home"
    proc = run_tvpack("install", f"oci://{upstream.host}/models/small:v1", "--torch-home", home, "-q")
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if "skipped" in line]
    assert [line.split()[2] for line in notices] == [f"{down}/models/small", f"{empty.host}/models/small",
                                                      f"{liar.host}/models/small"], proc.stderr
    assert all(line.startswith("tvpack: mirror ") for line in notices)
    assert "from mirror" in notices[0] and notices[-1].endswith(f"from {upstream.host}/models/small")
    assert installed(home, small_bundle)
    # the liar's good layers were taken from it; the one it corrupted came from upstream
    assert checkpoint_layer in blob_gets(upstream, agent="tvpack")
    assert checkpoint_layer in blob_gets(liar, agent="tvpack")

    # pull writes the same bundle through the same mirrors
    out = tmp_path / "pulled.tvpack"
    proc = run_tvpack("pull", f"oci://{upstream.host}/models/small:v1", "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == small_bundle.read_bytes()
    assert len([line for line in proc.stderr.splitlines() if "skipped" in line]) == 3


def test_layers_come_through_a_mirror_several_at_once_and_a_dead_mirror_costs_one_notice(
        tmp_path, servers, small_bundle, isolated):
    """``pull --jobs`` through registries.conf mirrors: the checkpoint layers are asked of the mirror at the same
    time (each blob GET waits at a barrier until the other one arrives: one at a time, the barrier breaks), and
    the workers share which mirrors were given up on."""
    upstream, mirror = registry(tmp_path), registry(tmp_path)
    servers.extend([upstream, mirror])
    for reg in (upstream, mirror):
        report = oci.push_bundle(small_bundle, f"oci://{reg.host}/models/small:v1", plain_http=True)
    manifest = json.loads(mirror.blob_path(report.digest).read_bytes())
    checkpoints = {layer["digest"] for layer in manifest["layers"][:-1]}  # the last one holds the bundle manifest
    assert len(checkpoints) == 2
    barrier, met = threading.Barrier(len(checkpoints), timeout=120), []

    def before(method: str, path: str) -> None:
        if method == "GET" and path.rsplit("/", 1)[-1] in checkpoints:
            try:
                barrier.wait()
                met.append(path)
            except threading.BrokenBarrierError:
                pass

    down = f"127.0.0.1:{free_port()}"
    with ReferrersFront(mirror.host, before=before) as front:
        configure(isolated, upstream.host, down, front.host)
        out = tmp_path / "pulled.tvpack"
        proc = run_tvpack("pull", f"oci://{upstream.host}/models/small:v1", "-o", out, "--jobs", "4", "-q")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == small_bundle.read_bytes()
    assert len(met) == len(checkpoints), "the checkpoint layers were not asked of the mirror at the same time"
    assert [line for line in proc.stderr.splitlines() if "skipped" in line] == [
        line for line in proc.stderr.splitlines() if line.startswith(f"tvpack: mirror {down}/")], proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not blob_gets(upstream, agent="tvpack")  # the mirror served every layer


def test_pushes_go_to_the_location_only(tmp_path, servers, small_bundle, isolated):
    upstream, mirror = registry(tmp_path), registry(tmp_path)
    servers.extend([upstream, mirror])
    configure(isolated, upstream.host, mirror.host)
    proc = run_tvpack("push", small_bundle, f"oci://{upstream.host}/models/small:v1", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "pushed"
    assert mirror.user_agents() == [] and upstream.uploads()


def test_a_digest_only_mirror_serves_references_by_digest_only(tmp_path, servers, small_bundle, isolated):
    upstream = registry(tmp_path)
    servers.append(upstream)
    cache = registry(tmp_path, proxy=upstream.url)
    servers.append(cache)
    digest = oci.push_bundle(small_bundle, f"oci://{upstream.host}/models/small:v1", plain_http=True).digest
    configure(isolated, upstream.host, cache.host, mirror_extra='pull-from-mirror = "digest-only"')
    proc = run_tvpack("inspect", f"oci://{upstream.host}/models/small:v1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert cache.user_agents() == []
    proc = run_tvpack("install", f"oci://{upstream.host}/models/small@{digest}", "--torch-home", tmp_path / "h", "-q")
    assert proc.returncode == 0, proc.stderr
    assert len(blob_gets(cache, agent="tvpack")) == 3


def test_a_blocked_registry_is_refused_in_one_line_before_any_request(tmp_path, servers, small_bundle, isolated):
    upstream = registry(tmp_path)
    servers.append(upstream)
    configure(isolated, upstream.host, extra="blocked = true")
    for args in (["install", f"oci://{upstream.host}/models/small:v1", "--torch-home", tmp_path / "h"],
                 ["push", small_bundle, f"oci://{upstream.host}/models/small:v1"]):
        proc = run_tvpack(*args)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            f"tvpack: error: {upstream.host}/models/small:v1: registry {upstream.host} is blocked in {isolated}"], \
            proc.stderr
    assert upstream.user_agents() == []


class _Recorder(BaseHTTPRequestHandler):
    """A mirror that wants credentials (HTTP 401, Basic) and records every Authorization header it is sent."""

    seen: list

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mirror"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET


def test_upstream_credentials_are_never_sent_to_a_mirror(tmp_path, servers, small_bundle, isolated):
    upstream = registry(tmp_path, users={"alice": "s3cret"})
    servers.append(upstream)
    proc = run_tvpack("login", upstream.host, "-u", "alice", "--password-stdin", "--plain-http", input="s3cret\n")
    assert proc.returncode == 0, proc.stderr
    oci.push_bundle(small_bundle, f"oci://{upstream.host}/models/small:v1", plain_http=True)
    handler = type("Recorder", (_Recorder,), {"seen": []})
    mirror = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    try:
        configure(isolated, upstream.host, f"127.0.0.1:{mirror.server_port}")
        proc = run_tvpack("install", f"oci://{upstream.host}/models/small:v1", "--torch-home", tmp_path / "h", "-q")
    finally:
        mirror.shutdown()
        mirror.server_close()
    assert proc.returncode == 0, proc.stderr
    assert handler.seen and all(auth is None for _path, auth in handler.seen), handler.seen
    assert len([line for line in proc.stderr.splitlines() if "skipped" in line]) == 1
    assert installed(tmp_path / "h", small_bundle)
