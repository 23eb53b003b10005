"""``tvpack mirror``: export to a directory / nginx / S3, and fetch back from each.

Real servers on loopback: nginx (its access log counts the transfers) and moto's S3 API. A tiny
user registry written into tmp_path covers urls off download.pytorch.org (stored at
``<DEST>/<basename>``); the synthetic zoo covers real checkpoints end to end.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
from conftest import ZOO_REGISTRY, need_server, run_tvpack
from servers import MotoS3, Nginx

pytestmark = pytest.mark.timeout(300)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flip_byte(data: bytes, at: int | None = None) -> bytes:
    at = len(data) // 2 if at is None else at
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def leftovers(root: Path) -> list[Path]:
    """Temp files an interrupted or failed write could leave behind."""
    return [p for p in root.rglob("*") if p.name.startswith(".") and p.name != ".tvpack-index.lock"]


ZOO_SELECTORS = ["zoo_*", "zoo_mobilenet_v3_small:all"]  # every zoo checkpoint
S3_SELECTORS = ["zoo_mobilenet_v3_small:all", "zoo_raft_small", "zoo_quantized_shufflenet_v2"]  # 4 files


# -- a tiny user registry: one upstream-style url and one from elsewhere ------------------------

TINY_MODULE = '''
from functools import partial
from typing import Optional

from torchvision.models._api import Weights, WeightsEnum
from torchvision.transforms._presets import ImageClassification

_META = {{"categories": ["a", "b"], "num_params": 10, "min_size": (1, 1), "_docs": "tiny"}}


class TinyWeights(WeightsEnum):
    UPSTREAM_V1 = Weights(url={url_a!r}, transforms=partial(ImageClassification, crop_size=8), meta=_META)
    OTHER_V1 = Weights(url={url_b!r}, transforms=partial(ImageClassification, crop_size=8), meta=_META)
    DEFAULT = UPSTREAM_V1


def tiny_net(*, weights: Optional[TinyWeights] = None, progress: bool = True, **kwargs):
    raise NotImplementedError("never built in these tests")
'''


class Tiny:
    """Two checkpoints, their registry module and a source mirror directory holding them."""

    def __init__(self, root: Path):
        self.module = f"tvpack_tiny_{uuid.uuid4().hex[:8]}"
        self.src = root / "src-mirror"
        self.files = {}  # weights name -> dict(url, path, sha256, data)
        for member, size, url_of in (
            ("UPSTREAM_V1", 300_000, lambda name: f"https://download.pytorch.org/models/tvpack-test/{name}"),
            ("OTHER_V1", 200_000, lambda name: f"https://weights.example.com/some/deep/dir/{name}"),
        ):
            data = os.urandom(size)
            sha = hashlib.sha256(data).hexdigest()
            name = f"tiny_{member.lower()}-{sha[:8]}.pth"
            url = url_of(name)
            rel = f"models/tvpack-test/{name}" if "pytorch.org" in url else name
            (self.src / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.src / rel).write_bytes(data)
            self.files[f"TinyWeights.{member}"] = {"url": url, "path": rel, "sha256": sha, "data": data,
                                                   "filename": name}
        (root / f"{self.module}.py").write_text(TINY_MODULE.format(
            url_a=self.files["TinyWeights.UPSTREAM_V1"]["url"], url_b=self.files["TinyWeights.OTHER_V1"]["url"]))

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def source_args(self, torch_home: Path) -> list[str]:
        return ["--registry", self.module, "--mirror", str(self.src), "--no-upstream", "--torch-home", str(torch_home)]


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Tiny:
    root = tmp_path / "registry"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return Tiny(root)


def make_bundle(path: Path, entries: list[dict], *, corrupt: str | None = None) -> Path:
    """A bundle laid out as COMMON.md describes (manifest first), written by hand so that tests
    can also make broken ones. ``entries``: dicts with name, url, data."""
    weights = []
    for entry in entries:
        filename = entry["url"].rsplit("/", 1)[1]
        enum, member = entry["name"].split(".")
        weights.append({
            "name": entry["name"], "enum": enum, "member": member, "module": "m", "models": [], "builders": [],
            "family": "classification", "url": entry["url"], "path": f"hub/checkpoints/{filename}",
            "size": len(entry["data"]), "sha256": hashlib.sha256(entry["data"]).hexdigest(),
            "transforms": {}, "meta": {},
        })
    manifest = json.dumps({"format": "tvpack-bundle", "format_version": 1, "created_by": {}, "weights": weights,
                           "members": {}}).encode()
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(f"hub/tvpack/manifests/{hashlib.sha256(manifest).hexdigest()[:16]}.json", manifest)
        for entry, w in zip(entries, weights):
            data = flip_byte(entry["data"]) if entry["name"] == corrupt else entry["data"]
            add(w["path"], data)
    return path


# -- directory export ----------------------------------------------------------------------------

def test_export_to_directory_layout_sidecars_index_and_skips(cli, tiny, tmp_path):
    dest = tmp_path / "mirror"
    result = cli("mirror", *tiny.names, *tiny.source_args(tmp_path / "home"), "--to", dest, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert sorted(r["status"] for r in report["results"]) == ["exported", "exported"]

    for f in tiny.files.values():
        stored = dest / f["path"]
        assert stored.read_bytes() == f["data"]
        assert (dest / (f["path"] + ".sha256")).read_text() == f"{f['sha256']}  {f['filename']}\n"
    # upstream urls keep their path, any other url lands at the root under its basename
    assert (dest / "models/tvpack-test" / tiny.files["TinyWeights.UPSTREAM_V1"]["filename"]).is_file()
    assert (dest / tiny.files["TinyWeights.OTHER_V1"]["filename"]).is_file()
    if shutil.which("sha256sum"):
        for f in tiny.files.values():
            sidecar = dest / (f["path"] + ".sha256")
            subprocess.run(["sha256sum", "--check", "--quiet", sidecar.name], cwd=sidecar.parent, check=True)

    index = json.loads((dest / "index.json").read_text())
    assert index["format"] == "tvpack-mirror"
    entries = {e["weights"]: e for e in index["weights"]}
    assert set(entries) == set(tiny.names)
    for name, f in tiny.files.items():
        assert entries[name]["path"] == f["path"]
        assert entries[name]["sha256"] == f["sha256"]
        assert entries[name]["size"] == len(f["data"])
        assert entries[name]["url"] == f["url"]
    assert leftovers(dest) == []

    # Nothing changed: everything is skipped.
    again = cli("mirror", *tiny.names, *tiny.source_args(tmp_path / "home"), "--to", dest, "--json")
    assert [r["status"] for r in json.loads(again.output)["results"]] == ["skipped", "skipped"]

    # A damaged file at the destination (same size) is found and replaced; the other is skipped.
    damaged = dest / tiny.files["TinyWeights.OTHER_V1"]["path"]
    damaged.write_bytes(flip_byte(damaged.read_bytes()))
    third = cli("mirror", *tiny.names, *tiny.source_args(tmp_path / "home"), "--to", f"file://{dest}", "--json")
    statuses = {r["weights"][0]: r["status"] for r in json.loads(third.output)["results"]}
    assert statuses == {"TinyWeights.UPSTREAM_V1": "skipped", "TinyWeights.OTHER_V1": "exported"}
    assert damaged.read_bytes() == tiny.files["TinyWeights.OTHER_V1"]["data"]


def test_index_is_merged_across_exports(cli, tiny, tmp_path):
    dest = tmp_path / "mirror"
    for name in tiny.names:
        assert cli("mirror", name, *tiny.source_args(tmp_path / "home"), "--to", dest, "-q").exit_code == 0
    index = json.loads((dest / "index.json").read_text())
    assert [e["weights"] for e in index["weights"]] == sorted(tiny.names)


def test_dry_run_writes_and_fetches_nothing(cli, tiny, tmp_path):
    dest = tmp_path / "mirror"
    home = tmp_path / "home"
    result = cli("mirror", *tiny.names, *tiny.source_args(home), "--to", dest, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in json.loads(result.output)["results"]] == ["would fetch", "would fetch"]
    assert not dest.exists()
    assert not (home / "hub" / "checkpoints").exists() or not any((home / "hub" / "checkpoints").iterdir())


def test_http_destination_is_refused(cli, tiny, tmp_path):
    result = cli("mirror", *tiny.names, *tiny.source_args(tmp_path / "home"), "--to", "http://127.0.0.1:9/x")
    assert result.exit_code == 1
    assert "cannot export to http://127.0.0.1:9/x" in result.output


def test_from_bundle_to_directory_verifies_while_copying(cli, tiny, tmp_path):
    entries = [{"name": n, "url": f["url"], "data": f["data"]} for n, f in tiny.files.items()]
    good = make_bundle(tmp_path / "good.tvpack", entries)
    dest = tmp_path / "mirror"
    result = cli("mirror", "--from-bundle", good, "--to", dest, "--json")
    assert result.exit_code == 0, result.output
    for f in tiny.files.values():
        assert sha256_of(dest / f["path"]) == f["sha256"]
    assert {e["weights"] for e in json.loads((dest / "index.json").read_text())["weights"]} == set(tiny.names)

    # A flipped byte inside the bundle: refused, nothing at the final path, no temp file left.
    bad = make_bundle(tmp_path / "bad.tvpack", entries, corrupt="TinyWeights.OTHER_V1")
    dest2 = tmp_path / "mirror2"
    result = cli("mirror", "--from-bundle", bad, "--to", dest2)
    assert result.exit_code == 1
    assert "sha256 mismatch" in result.output
    assert not (dest2 / tiny.files["TinyWeights.OTHER_V1"]["path"]).exists()
    assert (dest2 / tiny.files["TinyWeights.UPSTREAM_V1"]["path"]).is_file()  # the good one made it
    assert [e["weights"] for e in json.loads((dest2 / "index.json").read_text())["weights"]] == [
        "TinyWeights.UPSTREAM_V1"]
    assert leftovers(dest2) == []


@pytest.mark.parametrize("url", [
    "https://download.pytorch.org/models/../../../evil-{sha8}.pth",  # out of the mirror
    "https://download.pytorch.org/models/.hidden/evil-{sha8}.pth",  # where temp files live
    "https://elsewhere.example.com/index.json",  # over the mirror's own index
])
def test_from_bundle_refuses_paths_outside_the_mirror(cli, tmp_path, url):
    data = b"x" * 1000
    url = url.format(sha8=hashlib.sha256(data).hexdigest()[:8])
    bundle = make_bundle(tmp_path / "evil.tvpack", [{"name": "Evil_Weights.V1", "url": url, "data": data}])
    dest = tmp_path / "mirror"
    result = cli("mirror", "--from-bundle", bundle, "--to", dest)
    assert result.exit_code == 1
    assert "refusing" in result.output and "mirror path" in result.output
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == data]
    assert written == []


def test_real_bundle_published_without_network_then_fetched(zoo, zoo_root, tmp_path):
    from packager.bundle import bundle

    archive = bundle(S3_SELECTORS, tmp_path / "zoo.tvpack", registry=[ZOO_REGISTRY], mirrors=[str(zoo_root)],
                     upstream=False, torch_home=tmp_path / "home-bundle")
    dest = tmp_path / "mirror"
    # The air-gapped side: no network at all (when we may make a network namespace).
    prefix = ["unshare", "-n"] if os.geteuid() == 0 and shutil.which("unshare") else []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([*prefix, sys.executable, "-m", "packager", "mirror", "--from-bundle", str(archive),
                           "--to", str(dest), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert [r["status"] for r in results] == ["exported"] * 4

    home = tmp_path / "home-fetch"
    fetch = run_tvpack("fetch", *S3_SELECTORS, "--registry", ZOO_REGISTRY, "--mirror", dest, "--no-upstream",
                       "--torch-home", home, "-q")
    assert fetch.returncode == 0, fetch.stderr
    zoo_index = {e["file"]: e for e in json.loads((zoo_root / "zoo.json").read_text())["files"].values()}
    for r in results:
        name = r["path"].rsplit("/", 1)[1]
        assert r["path"] == f"models/tvpack-zoo/{name}"
        assert sha256_of(home / "hub" / "checkpoints" / name) == zoo_index[name]["sha256"]


# -- nginx serving an exported directory -----------------------------------------------------------



def test_nginx_serves_an_exported_mirror_to_fetch(cli, zoo, zoo_root, tmp_path):
    dest = tmp_path / "www"
    nginx = need_server(Nginx, dest, tmp_path / "nginx")
    export = cli("mirror", *ZOO_SELECTORS, "--registry", ZOO_REGISTRY, "--mirror", zoo_root, "--no-upstream",
                 "--torch-home", tmp_path / "home-export", "--to", dest, "--jobs", "4", "-q")
    assert export.exit_code == 0, export.output
    zoo_index = json.loads((zoo_root / "zoo.json").read_text())["files"]

    fresh = tmp_path / "home-fetch"
    with nginx:
        fetch = run_tvpack("fetch", *ZOO_SELECTORS, "--registry", ZOO_REGISTRY, "--mirror", nginx.url,
                           "--no-upstream", "--torch-home", fresh, "-q")
    assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    checkpoints = fresh / "hub" / "checkpoints"
    for entry in zoo_index.values():
        assert sha256_of(checkpoints / entry["file"]) == entry["sha256"]
    # nginx's own log: each checkpoint went over the wire once, whole.
    transfers = {path: sent for method, path, status, sent in nginx.requests()
                 if method == "GET" and status in (200, 206) and path.endswith(".pth")}
    assert transfers == {f"/models/tvpack-zoo/{e['file']}": e["size"] for e in zoo_index.values()}


# -- S3 (moto's server on loopback) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_s3():
    server = need_server(MotoS3).start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto_s3, monkeypatch) -> str:
    """A fresh bucket on the loopback S3 server, with the environment pointing at it."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    name = f"tvpack-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=name)
    return name


def test_s3_export_fetch_back_reexport_and_corruption(cli, zoo, zoo_root, moto_s3, bucket, tmp_path):
    s3 = moto_s3.client()
    dest = f"s3://{bucket}/torchvision"
    source = ["--registry", ZOO_REGISTRY, "--mirror", zoo_root, "--no-upstream",
              "--torch-home", tmp_path / "home-export"]
    export = cli("mirror", *S3_SELECTORS, *source, "--to", dest, "--json")
    assert export.exit_code == 0, export.output
    results = json.loads(export.output)["results"]
    assert [r["status"] for r in results] == ["exported"] * 4
    zoo_index = {e["file"]: e for e in json.loads((zoo_root / "zoo.json").read_text())["files"].values()}
    for r in results:
        key = f"torchvision/{r['path']}"
        head = s3.head_object(Bucket=bucket, Key=key)
        entry = zoo_index[r["path"].rsplit("/", 1)[1]]
        assert head["ContentLength"] == entry["size"]
        assert head["Metadata"]["sha256"] == entry["sha256"]
        sidecar = s3.get_object(Bucket=bucket, Key=key + ".sha256")["Body"].read().decode()
        assert sidecar == f"{entry['sha256']}  {entry['file']}\n"
    index = json.loads(s3.get_object(Bucket=bucket, Key="torchvision/index.json")["Body"].read())
    assert len(index["weights"]) == 4

    # Fetch back through the S3 mirror into a fresh TORCH_HOME.
    fetch = cli("fetch", *S3_SELECTORS, "--registry", ZOO_REGISTRY, "--mirror", dest, "--no-upstream",
                "--torch-home", tmp_path / "home-fetch", "-q")
    assert fetch.exit_code == 0, fetch.output
    for r in results:
        name = r["path"].rsplit("/", 1)[1]
        assert sha256_of(tmp_path / "home-fetch" / "hub" / "checkpoints" / name) == zoo_index[name]["sha256"]

    # Re-export: everything is already there.
    again = cli("mirror", *S3_SELECTORS, *source, "--to", dest, "--json")
    assert [r["status"] for r in json.loads(again.output)["results"]] == ["skipped"] * 4

    # Someone overwrites one object with damaged bytes: fetch detects it (real process, exit 1).
    victim = next(r for r in results if "raft" in r["path"])
    key = f"torchvision/{victim['path']}"
    data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=flip_byte(data))
    home = tmp_path / "home-corrupt"
    proc = run_tvpack("fetch", "zoo_raft_small", "--registry", ZOO_REGISTRY, "--mirror", dest, "--no-upstream",
                      "--torch-home", home, "-q")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tvpack: error:" in proc.stderr and "mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "hub" / "checkpoints" / victim["path"].rsplit("/", 1)[1]).exists()

    # The next export notices the damage and repairs it.
    repair = cli("mirror", *S3_SELECTORS, *source, "--to", dest, "--json")
    statuses = {r["path"]: r["status"] for r in json.loads(repair.output)["results"]}
    assert statuses.pop(victim["path"]) == "exported"
    assert set(statuses.values()) == {"skipped"}
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_s3_multipart_upload_is_verified_before_it_becomes_visible(moto_s3, bucket, tmp_path):
    from packager.errors import IntegrityError
    from packager.mirror import ExportItem, export_items
    from packager.transport import s3 as s3mod

    data = os.urandom(11 * 1024 * 1024 + 123)
    sha = hashlib.sha256(data).hexdigest()
    source = tmp_path / "big.bin"
    source.write_bytes(data)

    def item(claimed: str, path: str) -> ExportItem:
        return ExportItem(("Big_Weights.V1",), f"https://example.com/{path}", path, len(data), claimed,
                          str(source), lambda: open(source, "rb"))

    dest = f"s3://{bucket}/p"
    report = export_items([item(sha, "big.bin")], dest, multipart_threshold=8 << 20, part_size=5 << 20)
    assert [r.status for r in report.results] == ["exported"]
    info = s3mod.head(f"{dest}/big.bin")
    assert info.etag.endswith("-3")  # three parts
    assert info.sha256 == sha
    chunks, total, _ = s3mod.open_stream(f"{dest}/big.bin", offset=7_000_000)
    assert total == len(data)
    assert b"".join(chunks) == data[7_000_000:]

    # The source does not hash to what it claims: aborted, nothing under the key, no open upload.
    with pytest.raises(IntegrityError):
        export_items([item("0" * 64, "liar.bin")], dest, multipart_threshold=8 << 20, part_size=5 << 20)
    assert s3mod.head(f"{dest}/liar.bin") is None
    assert not moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_s3_from_bundle_with_endpoint_option(cli, tiny, moto_s3, bucket, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only --endpoint-url says where the server is
    entries = [{"name": n, "url": f["url"], "data": f["data"]} for n, f in tiny.files.items()]
    bundle = make_bundle(tmp_path / "b.tvpack", entries)
    dest = f"s3://{bucket}/mirror"
    result = cli("mirror", "--from-bundle", bundle, "--to", dest, "--endpoint-url", moto_s3.endpoint, "--json")
    assert result.exit_code == 0, result.output
    s3 = moto_s3.client()
    for f in tiny.files.values():
        assert s3.get_object(Bucket=bucket, Key=f"mirror/{f['path']}")["Body"].read() == f["data"]
    missing = cli("mirror", "--from-bundle", bundle, "--to", "s3://no-such-bucket-here/x",
                  "--endpoint-url", moto_s3.endpoint)
    assert missing.exit_code == 1
    assert "no such bucket" in missing.output

    # The S3 mirror serves fetch for the user registry too (urls off download.pytorch.org included).
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    home = tmp_path / "home"
    fetch = cli("fetch", *tiny.names, "--registry", tiny.module, "--mirror", dest, "--no-upstream",
                "--torch-home", home, "-q")
    assert fetch.exit_code == 0, fetch.output
    for f in tiny.files.values():
        assert sha256_of(home / "hub" / "checkpoints" / f["filename"]) == f["sha256"]


@pytest.mark.parametrize("spec, words", [
    ("ftp://x", "unsupported scheme 'ftp'"), ("http://", "no host"), ("s3://", "no bucket"),
    ("http://[::1", "Invalid IPv6 URL"), ("http://h:99999", "Port out of range"), ("  ", "empty --mirror"),
])
def test_malformed_mirror_is_a_usage_error(spec, words):
    from packager.errors import UsageError
    from packager.transport.urls import candidate_urls

    with pytest.raises(UsageError, match=words.replace("[", r"\[")):
        candidate_urls("https://download.pytorch.org/models/x-12345678.pth", [spec])


@pytest.mark.parametrize("dest, words", [
    ("", "empty mirror destination"), ("file://", "no directory path"), ("s3://[x", "Invalid IPv6 URL"),
])
def test_malformed_export_destination_is_a_usage_error_and_writes_nothing(dest, words, tmp_path, monkeypatch, cli):
    """``--to ''`` used to publish into the current directory; a bad url was an 'unexpected ValueError'."""
    monkeypatch.chdir(tmp_path)
    result = cli("mirror", "resnet50", "--to", dest, "--dry-run")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("tvpack: error: ") and words in result.output
    assert list(tmp_path.iterdir()) == []


def test_no_lock_file_is_left_in_a_published_directory(cli, tiny, tmp_path):
    import fcntl

    from packager.transport.file import DirectoryTarget

    dest = tmp_path / "mirror"
    for name in tiny.names:
        assert cli("mirror", name, *tiny.source_args(tmp_path / "home"), "--to", dest, "-q").exit_code == 0
    published = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert not [p for p in published if p.endswith(".lock") or "/." in f"/{p}"], published
    # the index is still guarded: while one export holds it, another cannot take it
    with DirectoryTarget(dest).index_lock():
        fd = os.open(dest, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_s3_destination_is_checked_before_anything_is_fetched(cli, tiny, moto_s3, bucket, monkeypatch, tmp_path):
    """Missing credentials or a missing bucket fail at once: nothing fetched into the cache first."""
    home = tmp_path / "home"
    control = cli("mirror", *tiny.names, *tiny.source_args(home), "--to", f"s3://{bucket}/m")
    assert control.exit_code == 0, control.output  # with the fixture's credentials
    home2 = tmp_path / "home2"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup for credentials
    result = cli("mirror", *tiny.names, *tiny.source_args(home2), "--to", f"s3://{bucket}/m")
    assert result.exit_code == 1 and "no S3 credentials" in result.output
    assert not (home2 / "hub" / "checkpoints").exists() or not any((home2 / "hub" / "checkpoints").iterdir())

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    result = cli("mirror", *tiny.names, *tiny.source_args(home2), "--to", "s3://no-such-bucket-here/m")
    assert result.exit_code == 1 and "no such bucket" in result.output
    assert not (home2 / "hub" / "checkpoints").exists() or not any((home2 / "hub" / "checkpoints").iterdir())


def test_the_s3_endpoint_is_a_value_passed_down_to_the_fetch(cli, tiny, moto_s3, bucket, monkeypatch, tmp_path):
    """The library takes the endpoint as a value (the transfer Policy), as --endpoint-url gives it: no
    process-wide setting, so two fetches in one process may read two endpoints."""
    from packager.cache import fetch
    from packager.errors import DownloadError
    from packager.transport import Policy

    dest = f"s3://{bucket}/mirror"
    assert cli("mirror", *tiny.names, *tiny.source_args(tmp_path / "src"), "--to", dest).exit_code == 0
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    common = {"registry": [tiny.module], "mirrors": [dest], "upstream": False}
    paths = fetch(tiny.names, torch_home=tmp_path / "a", policy=Policy(s3_endpoint_url=moto_s3.endpoint), **common)
    assert [sha256_of(p) for p in paths] == [f["sha256"] for f in tiny.files.values()]
    with pytest.raises(DownloadError):  # the same fetch without it: AWS's endpoint, unreachable here
        fetch(tiny.names, torch_home=tmp_path / "b", policy=Policy(retries=0, connect_timeout=1), **common)


def test_endpoint_url_on_every_command_that_reads_s3_mirrors(cli, tiny, moto_s3, bucket, monkeypatch, tmp_path):
    dest = f"s3://{bucket}/mirror"
    assert cli("mirror", *tiny.names, *tiny.source_args(tmp_path / "src"), "--to", dest).exit_code == 0
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # from here on only --endpoint-url says where the server is
    source = ["--registry", tiny.module, "--mirror", dest, "--no-upstream", "--endpoint-url", moto_s3.endpoint]
    fetch = cli("fetch", *tiny.names, *source, "--torch-home", tmp_path / "a", "-q")
    assert fetch.exit_code == 0, fetch.output
    lock = cli("lock", *tiny.names, *source, "--torch-home", tmp_path / "b", "-o", tmp_path / "tvpack.lock")
    assert lock.exit_code == 0, lock.output
    made = cli("bundle", *tiny.names, *source, "--torch-home", tmp_path / "c", "-o", tmp_path / "b.tar")
    assert made.exit_code == 0, made.output
    for home in ("a", "b", "c"):
        for f in tiny.files.values():
            assert sha256_of(tmp_path / home / "hub" / "checkpoints" / f["filename"]) == f["sha256"]
    # the option lasts one command (a value passed down, no process-wide setting): without it, and without
    # AWS_ENDPOINT_URL, the next command in the same process does not reach the server
    alone = cli("fetch", *tiny.names, *source[:-2], "--torch-home", tmp_path / "d", "-q", "--retries", "0",
                "--connect-timeout", "1")
    assert alone.exit_code == 1, alone.output
    assert not (tmp_path / "d" / "hub" / "checkpoints").exists() or not any((tmp_path / "d" / "hub" / "checkpoints").iterdir())
