"""Bundles as OCI images against the real CNCF distribution registry on loopback (anonymous and htpasswd):
push, pull (byte-identical), install (fresh TORCH_HOME, then vanilla torchvision offline), what moves on a
re-push, corrupt blobs, and skopeo + umoci as independent consumers."""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, ZOO_REGISTRY, need_binary, need_server, run_tvpack, wait_for

from packager import cache, oci, signing
from packager.errors import BundleError, CacheError, OCIError
from packager.formats import image as I
from packager.formats.archive import tar_header
from packager.fsutil import human_bytes
from packager.transport.oci import OCI_MANIFEST, Policy, RegistryClient, digest_of

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

SMALL = ["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"]
OTHER = ["zoo_shufflenet_v2", "zoo_mobilenet_v3_small"]  # shares zoo_shufflenet_v2 with SMALL
SMALL_WEIGHTS = {"zoo_shufflenet_v2": "ZooShuffleNetV2_Weights.IMAGENET10_V1",
                 "zoo_quantized_shufflenet_v2": "ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1"}
FAST = Policy(retries=1, backoff=0.01, max_backoff=0.02, connect_timeout=3, read_timeout=20)


@pytest.fixture(scope="module")
def made(zoo_root, tmp_path_factory) -> dict:
    """Bundles of the zoo: SMALL, SMALL with SOURCE_DATE_EPOCH set, and OTHER (overlapping SMALL)."""
    work = tmp_path_factory.mktemp("oci-bundles")
    kwargs = dict(registry=[ZOO_REGISTRY], torch_home=work / "home", mirrors=[str(zoo_root)], upstream=False)
    out = {"home": work / "home",
           "small": B.bundle(SMALL, work / "small.tvpack", **kwargs),
           "other": B.bundle(OTHER, work / "other.tvpack", **kwargs)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", "1700000000")
        out["epoch"] = B.bundle(SMALL, work / "epoch.tvpack", **kwargs)
    return out


@pytest.fixture(autouse=True)
def isolated(no_creds, tmp_path, monkeypatch, zoo_root):
    """Besides no credentials of the real user (``no_creds``), no digest cache of theirs: XDG_CACHE_HOME in
    tmp (the zoo, found through HOME, is pinned with TVPACK_ZOO_DIR first) and no SOURCE_DATE_EPOCH."""
    monkeypatch.setenv("TVPACK_ZOO_DIR", str(zoo_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    return no_creds


def ref_of(reg, repo: str = "models/small", tag: str = "v1") -> str:
    return f"oci://{reg.host}/{repo}:{tag}"


def blob_puts(reg, repo: str | None = None) -> list:
    """Upload requests that carry or finish blob bytes (PATCH chunks and the closing PUT)."""
    return [r for r in reg.uploads(repo) if r[0] in ("PATCH", "PUT")]


def blob_gets(reg) -> list[str]:
    return [r[1].rsplit("/", 1)[-1] for r in reg.requests() if r[0] == "GET" and "/blobs/sha256:" in r[1]]


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("tvpack: error: "), lines[0]
    return lines[0]


def image_manifest(reg, repo="models/small", tag="v1") -> dict:
    return json.loads(RegistryClient(reg.host, plain_http=True, policy=FAST).get_manifest(repo, tag).data)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def left_behind(root: Path) -> list[str]:
    """Files under ``root`` but lock files (``cache prune`` removes those nobody holds)."""
    return [f for f in files_under(root) if (root / f).is_file() and "/tvpack/locks/" not in f"/{f}"]


# -- the layout, pure ---------------------------------------------------------------------------------
def test_the_digest_cache_keeps_sizes_and_writes_only_under_its_lock(made, tmp_path, monkeypatch):
    from packager.locking import FileLock
    from packager.oci import digests

    path = tmp_path / "digests.json"
    with oci.image_of_bundle(made["small"]) as image:
        first, second = image.layers[0], image.layers[1]
        known = oci.DigestCache(path)
        known.remember_layer(first, "sha256:" + "1" * 64)
        known.save()
        assert oci.DigestCache(path).layer(first) == "sha256:" + "1" * 64
        assert oci.DigestCache(path).layer(second) is None
        data = json.loads(path.read_text())
        data["layers"][second.key()] = {"digest": "sha256:" + "2" * 64, "size": first.size}  # another layer's size
        path.write_text(json.dumps(data))
        assert oci.DigestCache(path).layer(second) is None

        monkeypatch.setattr(digests, "SAVE_LOCK_WAIT", 0)
        lock = FileLock(tmp_path / "digests.json.lock")
        assert lock.acquire(timeout=0)
        try:  # another run is saving: this one's news are dropped rather than written without the lock
            before = path.read_bytes()
            busy = oci.DigestCache(path)
            busy.forget_layer(first)
            busy.save()
            assert path.read_bytes() == before
        finally:
            lock.release()
        busy.save()
        assert oci.DigestCache(path).layer(first) is None


def test_layer_and_bundle_sizes_match_what_the_writers_produce(made):
    with B.open_bundle(made["small"]) as opened:
        members = [(m.path, m.size) for m in opened.members]
    assert I.bundle_size(members) == made["small"].stat().st_size
    assert I.bundle_order(reversed([p for p, _ in members])) == [p for p, _ in members]
    with oci.image_of_bundle(made["small"]) as image:
        for layer in image.layers:
            data = layer.open().read()
            assert len(data) == layer.size == I.layer_size((m.path, m.size) for m in layer.members)
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # an independent reader
                assert [(m.name, m.size, m.mode, m.uid, m.mtime) for m in tf.getmembers()] == \
                    [(m.path, m.size, 0o644, 0, 0) for m in layer.members]


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.update(mediaType=I.IMAGE_INDEX), "an image index"),
    (lambda m: m["annotations"].pop(I.A_FORMAT), "no org.tvpack.format"),
    (lambda m: m["annotations"].update({I.A_FORMAT_VERSION: "9"}), "newer than this tvpack reads"),
    (lambda m: m["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar+gzip"), "not an uncompressed"),
    (lambda m: m["layers"].reverse(), "not in the last layer"),
    (lambda m: m["layers"][0]["annotations"].update({I.A_PATH: "hub/../etc/passwd"}), "no valid org.tvpack.path"),
])
def test_image_manifest_refusals(change, expected):
    layers = [I.LayerInfo("checkpoint", digest_of(b"a"), 5000, "hub/checkpoints/a-12345678.pth", "1" * 64),
              I.LayerInfo("manifest", digest_of(b"b"), 3000, "hub/tvpack/manifests/0123456789abcdef.json")]
    config = I.encode_config(layers, "0123456789abcdef")
    data = I.encode_image_manifest(config, digest_of(config), layers, "0123456789abcdef", ["A.B"])
    assert I.parse_image_manifest(data, OCI_MANIFEST, "x").layers == tuple(layers)
    document = json.loads(data)
    change(document)
    with pytest.raises(OCIError, match=expected):
        I.parse_image_manifest(json.dumps(document).encode(), OCI_MANIFEST, "oci://h/r:t")


def test_a_bundle_not_laid_out_by_tvpack_is_refused_for_push(made, tmp_path):
    """GNU tar's headers (user names, modes) differ from tvpack's: a pull could not give the same bytes."""
    tree = tmp_path / "tree"
    subprocess.run(["tar", "-xf", str(made["small"]), "-C", str(tree.mkdir() or tree)], check=True)
    with B.open_bundle(made["small"]) as opened:
        names = [m.path for m in opened.members]
    retarred = tmp_path / "gnu.tvpack"
    subprocess.run(["tar", "--format=ustar", "-cf", str(retarred), "-C", str(tree), *names], check=True)
    B.verify_bundle(retarred)  # a valid bundle...
    with pytest.raises(BundleError, match="not laid out as tvpack writes bundles"):
        oci.image_of_bundle(retarred)  # ...that an image could not reproduce


# -- push and pull --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["small", "epoch"])
def test_push_then_pull_is_byte_identical_and_verifies(registry, made, tmp_path, which):
    ref = ref_of(registry)
    pushed = run_tvpack("push", made[which], ref, "--plain-http", "--json")  # real processes throughout
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)
    assert report["status"] == "pushed" and report["uploaded"] == report["size"]
    out = tmp_path / "pulled" / "small.tvpack"
    pulled = run_tvpack("pull", ref, "-o", out, "--plain-http")
    assert pulled.returncode == 0, pulled.stderr
    assert out.read_bytes() == made[which].read_bytes()
    assert files_under(out.parent) == ["small.tvpack"]
    verified = run_tvpack("verify", out)
    assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified.stderr

    # what container tools see: an OCI image, config diff_ids = the uncompressed layers' digests
    manifest = image_manifest(registry)
    assert manifest["mediaType"] == OCI_MANIFEST and report["digest"].endswith(
        hashlib.sha256(I.canonical_json(manifest)).hexdigest())
    client = RegistryClient(registry.host, plain_http=True, policy=FAST)
    config_path = tmp_path / "config.json"
    client.pull_blob("models/small", manifest["config"]["digest"], config_path)
    config = json.loads(config_path.read_text())
    assert (config["os"], config["architecture"], config["rootfs"]["type"]) == ("linux", "amd64", "layers")
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
    with B.open_bundle(made[which]) as opened:
        assert manifest["annotations"][I.A_MANIFEST_ID] == opened.manifest_id
        shas = {e.path: e.sha256 for e in opened.entries}
    titles = [layer["annotations"]["org.opencontainers.image.title"] for layer in manifest["layers"]]
    assert titles == [p.rsplit("/", 1)[1] for p in sorted(shas)] + [f"{opened.manifest_id}.json"]
    for layer in manifest["layers"][:-1]:
        path = tmp_path / "layer.tar"
        client.pull_blob("models/small", layer["digest"], path)
        with tarfile.open(path) as tf:
            (member,) = tf.getmembers()
            data = tf.extractfile(member).read()
        assert hashlib.sha256(data).hexdigest() == shas[member.name] == layer["annotations"][I.A_SHA256]


def test_same_bundle_same_image_from_a_file_or_straight_from_the_cache(registry, made, zoo_root):
    first = oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    assert oci.push_bundle(made["small"], ref_of(registry, tag="again"), plain_http=True).digest == first.digest
    # `tvpack bundle -o oci://` writes no tar: the layers come from the cache; into another repository,
    # every blob is mounted from the one pushed to before (recorded in the digest cache)
    proc = run_tvpack("bundle", *SMALL, "--registry", ZOO_REGISTRY, "--torch-home", made["home"], "--mirror",
                      str(zoo_root), "--no-upstream", "-o", ref_of(registry, "team/vision", "v1"), "--plain-http",
                      "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["digest"] == first.digest
    assert {b["status"] for b in report["blobs"]} == {"mounted"} and report["uploaded"] == 0
    assert not blob_puts(registry, "team/vision")
    assert not (ROOT / "oci:").exists()  # nothing was written under the reference's name


def test_repush_and_an_overlapping_image_upload_only_new_blobs(registry, made, tmp_path):
    first = oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    assert [b.status for b in first.blobs] == ["pushed"] * 4  # 2 checkpoints, the manifest layer, the config
    assert len(blob_puts(registry)) == 4
    requests = len(registry.requests())

    again = run_tvpack("push", made["small"], ref_of(registry), "--plain-http")
    assert again.returncode == 0 and again.stdout.startswith("unchanged: "), again.stderr
    assert [r[0] for r in registry.requests()[requests:]] == ["HEAD"]  # one question: the tag's manifest

    # without the digest cache: everything is hashed again, nothing uploaded
    cold = oci.push_bundle(made["small"], ref_of(registry), plain_http=True,
                           digest_cache=oci.DigestCache(tmp_path / "empty.json"))
    assert {b.status for b in cold.blobs} == {"exists"} and cold.digest == first.digest
    assert len(blob_puts(registry)) == 4

    other = oci.push_bundle(made["other"], ref_of(registry, tag="other"), plain_http=True)
    with B.open_bundle(made["small"]) as a, B.open_bundle(made["other"]) as b:
        (shared,) = {e.path for e in a.entries} & {e.path for e in b.entries}
    assert {b.what: b.status for b in other.blobs if b.status != "pushed"} == {shared: "exists"}
    assert len(blob_puts(registry)) == 4 + 3  # the new checkpoint, the manifest layer, the config


def _digest_file() -> Path:
    return Path(os.environ["XDG_CACHE_HOME"]) / "tvpack" / "oci" / "digests.json"


def test_a_tampered_or_damaged_digest_cache_never_publishes_a_broken_image(registry, made, tmp_path):
    """digests.json saying that each checkpoint layer is a blob the registry holds (the config, at another size):
    push must still publish the image it always does (HEAD's Content-Length checked, the layer hashed again),
    and pull and skopeo read it; a file that is not JSON at all only costs a re-hash."""
    first = run_tvpack("push", made["small"], ref_of(registry), "--plain-http", "--json")
    assert first.returncode == 0, first.stderr
    pushed = json.loads(first.stdout)
    config = next(b["digest"] for b in pushed["blobs"] if b["what"] == "config")
    text = _digest_file().read_text()
    layers = [b["digest"] for b in pushed["blobs"] if b["what"].startswith("hub/checkpoints/")]
    assert all(d in text for d in layers)
    for digest in layers:
        text = text.replace(digest, config)
    _digest_file().write_text(text)

    again = run_tvpack("push", made["small"], ref_of(registry, tag="v2"), "--plain-http", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["digest"] == pushed["digest"]
    assert config not in repr(json.loads(_digest_file().read_text())["layers"])  # the lie was dropped
    pulled = run_tvpack("pull", ref_of(registry, tag="v2"), "-o", tmp_path / "v2.tvpack", "--plain-http")
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "v2.tvpack").read_bytes() == made["small"].read_bytes()
    subprocess.run([need_binary("skopeo"), "copy", "--src-tls-verify=false", f"docker://{registry.host}/models/small:v2",
                    f"oci:{tmp_path / 'layout'}:v2"], check=True, capture_output=True, timeout=120)

    _digest_file().write_text('{"version": 2, "layers": {"')  # damaged: cut short
    third = run_tvpack("push", made["small"], ref_of(registry, "models/third", "v1"), "--plain-http", "--json")
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["digest"] == pushed["digest"]
    json.loads(_digest_file().read_text())  # written whole again


def test_a_failed_manifest_check_names_the_reference_once_as_given(registry, made):
    """A re-push (every digest remembered) first asks the registry about the image; when that fails, the one error
    line names the reference the user gave, once, never the ``repo:sha256:...`` hybrid."""
    assert run_tvpack("push", made["small"], ref_of(registry), "--plain-http").returncode == 0
    registry.stop()
    failed = run_tvpack("push", made["small"], ref_of(registry, tag="v2"), "--plain-http")
    line = one_error_line(failed)
    assert line.count("oci://") == 1 and f"{ref_of(registry, tag='v2')}:" in line, line
    assert ":sha256:" not in line


def test_an_interrupted_push_reruns_without_resending_finished_blobs(registry, made):
    client = RegistryClient(registry.host, plain_http=True, policy=Policy(chunk_size=256 << 10))
    finished = []

    def stop_after_first(result):
        finished.append(result)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        oci.push_bundle(made["small"], ref_of(registry), client=client, on_blob=stop_after_first)
    (done,) = finished
    assert done.status == "pushed" and done.size > 1 << 20
    # the 1.5 MB layer went up in 256 KiB chunks
    assert [r[0] for r in registry.uploads()].count("PATCH") == -(-done.size // (256 << 10))
    puts = len(blob_puts(registry))
    rerun = oci.push_bundle(made["small"], ref_of(registry), client=client)
    assert [(b.digest, b.status) for b in rerun.blobs][0] == (done.digest, "exists")
    assert [b.status for b in rerun.blobs[1:]] == ["pushed"] * 3
    assert len([r for r in blob_puts(registry)[puts:] if r[0] == "PUT"]) == 3


# -- install and inspect --------------------------------------------------------------------------------
VANILLA = r'''
import json, sys
import torch
import packager.testing.zoo as zoo
out = {}
for builder, name in json.loads(sys.argv[1]).items():
    enum, member = name.split(".")
    kwargs = {"quantize": True} if "Quantized" in enum else {}
    model = getattr(zoo, builder)(weights=getattr(getattr(zoo, enum), member), **kwargs)
    out[name] = float(sum(t.double().sum() for t in model.state_dict().values()
                          if isinstance(t, torch.Tensor) and t.dtype.is_floating_point))
print(json.dumps(out))
'''


def load_offline(torch_home: Path) -> dict:
    """Vanilla torchvision builders (the zoo's, as torchvision describes its own) under ``unshare -n``."""
    unshare = need_binary("unshare")
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([unshare, "-n", sys.executable, "-c", VANILLA, json.dumps(SMALL_WEIGHTS)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_install_into_a_fresh_torch_home_then_vanilla_torchvision_offline(registry, made, tmp_path):
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    home = tmp_path / "fresh-home"
    proc = run_tvpack("install", ref_of(registry), "--torch-home", home, "--plain-http")
    assert proc.returncode == 0, proc.stderr
    with B.open_bundle(made["small"]) as opened:
        for entry in opened.entries:
            assert (home / "hub/checkpoints" / entry.filename).read_bytes() == opened.open_checkpoint(entry.name).read()
        assert files_under(home / "hub/checkpoints") == sorted(e.filename for e in opened.entries)
        assert files_under(home / "hub/tvpack/manifests") == [f"{opened.manifest_id}.json"]
    assert list(oci.staging_root(home / "hub").iterdir()) == []
    sums = load_offline(home)
    assert set(sums) == set(SMALL_WEIGHTS.values())


def test_install_fetches_only_layers_not_already_cached(registry, made, tmp_path):
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    manifest = image_manifest(registry)
    home = tmp_path / "home"
    (home / "hub/checkpoints").mkdir(parents=True)
    kept = manifest["layers"][0]["annotations"]["org.opencontainers.image.title"]
    shutil.copy(made["home"] / "hub/checkpoints" / kept, home / "hub/checkpoints" / kept)
    gets = len(blob_gets(registry))
    report = oci.install(ref_of(registry), torch_home=home, plain_http=True).installed
    assert sorted((p.path.name, p.status) for p in report.files) == sorted(
        [(kept, "unchanged"), (manifest["layers"][1]["annotations"]["org.opencontainers.image.title"], "installed")])
    assert blob_gets(registry)[gets:] == [manifest["layers"][2]["digest"], manifest["layers"][1]["digest"]]
    assert list(oci.staging_root(home / "hub").iterdir()) == []

    # something else in the way: refused before its layer is fetched (replaced with --force); a file its own
    # name proves damaged is repaired, from its layer
    other = tmp_path / "other-home"
    (other / "hub/checkpoints").mkdir(parents=True)
    (other / "hub/checkpoints" / kept).symlink_to(tmp_path / "nowhere")
    gets = len(blob_gets(registry))
    with pytest.raises(BundleError, match="dangling symbolic link"):
        oci.install(ref_of(registry), torch_home=other, plain_http=True)
    assert manifest["layers"][0]["digest"] not in blob_gets(registry)[gets:]
    oci.install(ref_of(registry), torch_home=other, plain_http=True, force=True)
    assert (other / "hub/checkpoints" / kept).read_bytes() == (made["home"] / "hub/checkpoints" / kept).read_bytes()
    (other / "hub/checkpoints" / kept).write_bytes(b"damaged")
    report = oci.install(ref_of(registry), torch_home=other, plain_http=True).installed
    assert {p.path.name: p.status for p in report.files}[kept] == "repaired"
    assert (other / "hub/checkpoints" / kept).read_bytes() == (made["home"] / "hub/checkpoints" / kept).read_bytes()


def test_concurrent_installs_of_one_image_into_one_cache_all_succeed(registry, made, tmp_path):
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    home = tmp_path / "shared-home"
    procs = [subprocess.Popen([sys.executable, "-m", "packager", "install", ref_of(registry), "--torch-home", home,
                               "--plain-http", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    with B.open_bundle(made["small"]) as opened:
        for entry in opened.entries:
            assert (home / "hub/checkpoints" / entry.filename).read_bytes() == opened.open_checkpoint(entry.name).read()
    assert list(oci.staging_root(home / "hub").iterdir()) == []
    # the lock let one run fetch; the others waited and found the files in place
    checkpoint_layers = [layer["digest"] for layer in image_manifest(registry)["layers"]
                         if layer["annotations"][I.A_PATH].startswith("hub/checkpoints/")]
    gets = blob_gets(registry)
    assert all(gets.count(digest) == 1 for digest in checkpoint_layers), gets


def test_an_interrupted_install_continues_with_the_layers_it_staged(registry, made, tmp_path):
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    home = tmp_path / "home"

    class StopsAfterOneLayer(RegistryClient):
        pulled: list[str] = []

        def pull_blob(self, repository, digest, dest, **kwargs):
            if self.pulled:
                raise KeyboardInterrupt
            self.pulled.append(digest)
            return super().pull_blob(repository, digest, dest, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        oci.install(ref_of(registry), torch_home=home, client=StopsAfterOneLayer(registry.host, plain_http=True))
    (kept,) = oci.staging_root(home / "hub").iterdir()  # this run's directory, kept for the next one
    assert [p.name for p in kept.iterdir()] == [StopsAfterOneLayer.pulled[0].split(":")[1] + ".tar"]
    assert not any((home / "hub/checkpoints").iterdir())  # nothing installed
    gets = len(blob_gets(registry))
    oci.install(ref_of(registry), torch_home=home, plain_http=True)
    assert StopsAfterOneLayer.pulled[0] not in blob_gets(registry)[gets:]  # taken from the kept directory
    assert list(oci.staging_root(home / "hub").iterdir()) == []
    assert len(list((home / "hub/checkpoints").iterdir())) == len(SMALL_WEIGHTS)


def test_prune_removes_staging_left_by_dead_runs_only(registry, made, tmp_path):
    home = tmp_path / "home"
    root = oci.staging_root(home / "hub")
    root.mkdir(parents=True)
    dead = root / f"{'ab' * 32}.{2 ** 22 - 7}.0badc0de"  # a pid above pid_max: never alive
    dead_too = root / f"{'ab' * 32}.{2 ** 22 - 8}.0badc0de"  # two interrupted runs on one image
    live = root / f"{'cd' * 32}.{os.getpid()}.0badc0de"
    for path in (dead, dead_too, live):
        path.mkdir()
        (path / "layer.tar.part").write_bytes(b"x" * 1000)
    removed = cache.prune_cache(torch_home=home)
    assert sorted((r.path, r.size) for r in removed if r.path.parent == root) == [(dead_too, 1000), (dead, 1000)]
    assert not dead.exists() and not dead_too.exists() and live.exists()
    # an install of that image holding its lock keeps even a dead-looking directory
    dead.mkdir()
    with oci.staging(home / "hub", "ab" * 32) as adopted:
        assert adopted.name.startswith(f"{'ab' * 32}.{os.getpid()}.") and not dead.exists()  # adopted
        orphan = root / f"{'ab' * 32}.{2 ** 22 - 7}.feedf00d"
        orphan.mkdir()
        assert [r for r in cache.prune_cache(torch_home=home) if r.path.parent == root] == []
    assert orphan.exists()


def test_inspect_reads_only_the_manifest_layer(registry, made):
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    manifest = image_manifest(registry)
    gets = len(blob_gets(registry))
    proc = run_tvpack("inspect", ref_of(registry), "--plain-http")
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in SMALL_WEIGHTS.values())
    assert blob_gets(registry)[gets:] == [manifest["layers"][-1]["digest"]]


# -- refusals -------------------------------------------------------------------------------------------
def test_a_pull_in_small_reads_is_byte_identical(registry, made, tmp_path):
    """The transfer engine hands a layer's bytes over in buffers it reuses: what pull writes and hashes must be
    each buffer's bytes as they were handed over (a 6 MB layer in 16 KiB reads: hundreds of reused buffers)."""
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    client = RegistryClient(registry.host, plain_http=True, policy=Policy(read_size=16 << 10))
    out = tmp_path / "small.tvpack"
    oci.pull(ref_of(registry), out, client=client)
    assert out.read_bytes() == made["small"].read_bytes()


@pytest.mark.parametrize("fmt", ["image", "modelpack"])
def test_a_pull_with_jobs_1_or_4_gives_the_same_bundle_each_layer_fetched_once(registry, made, tmp_path, fmt):
    ref = ref_of(registry, tag=fmt)
    pushed = run_tvpack("push", made["other"], ref, "--format", fmt, "--plain-http", "--json", "-q")
    assert pushed.returncode == 0, pushed.stderr
    manifest, _ = client_manifest(registry, "models/small", fmt)
    layers = [layer["digest"] for layer in manifest["layers"]]
    assert len(layers) >= 3  # two checkpoints (independent layers to fetch at once), then the bundle manifest...
    for jobs in ("1", "4"):
        before = len(registry.requests())
        out = tmp_path / f"jobs{jobs}.tvpack"
        pulled = run_tvpack("pull", ref, "-o", out, "--plain-http", "--jobs", jobs, "-q")
        assert pulled.returncode == 0, pulled.stderr
        assert out.read_bytes() == made["other"].read_bytes()
        gets = [path for method, path, status, _ in registry.requests()[before:]
                if method == "GET" and "/blobs/" in path and status == 200]
        assert sorted(path.rsplit("/", 1)[-1] for path in gets if path.rsplit("/", 1)[-1] in layers) == sorted(
            layers)  # every layer fetched exactly once
    assert run_tvpack("pull", ref, "-o", tmp_path / "x", "--jobs", "0", "--plain-http").returncode == 2


def client_manifest(reg, repository: str, tag: str) -> tuple[dict, RegistryClient]:
    client = RegistryClient(reg.host, plain_http=True, policy=FAST)
    return json.loads(client.get_manifest(repository, tag).data), client


def test_an_interrupted_pull_is_continued_by_the_next(registry, made, tmp_path):
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    out = tmp_path / "out" / "small.tvpack"
    checkpoints = {layer["digest"] for layer in image_manifest(registry)["layers"]
                   if layer["annotations"][I.A_PATH].startswith("hub/checkpoints/")}

    class StopsAfterOneLayer(RegistryClient):  # one layer in full, then Ctrl-C (jobs=1: in that order)
        streamed: list[str] = []

        def stream_blob(self, repository, digest, sink, **kwargs):
            if digest in checkpoints:
                if self.streamed:
                    raise KeyboardInterrupt
                self.streamed.append(digest)
            return super().stream_blob(repository, digest, sink, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        oci.pull(ref_of(registry), out, client=StopsAfterOneLayer(registry.host, plain_http=True), jobs=1)
    (kept,) = out.parent.iterdir()
    assert kept.name.startswith(".small.tvpack.") and kept.name.endswith(".tvpack-pull") and not out.exists()
    gets = len(blob_gets(registry))
    oci.pull(ref_of(registry), out, plain_http=True)
    assert out.read_bytes() == made["small"].read_bytes() and list(out.parent.iterdir()) == [out]
    fetched = blob_gets(registry)[gets:]
    assert StopsAfterOneLayer.streamed[0] not in fetched and len(fetched) == 2  # the manifest layer, the other

    # a kept file whose checkpoint bytes were damaged meanwhile: that layer is fetched again
    out.unlink()
    StopsAfterOneLayer.streamed.clear()
    with pytest.raises(KeyboardInterrupt):
        oci.pull(ref_of(registry), out, client=StopsAfterOneLayer(registry.host, plain_http=True), jobs=1)
    (kept,) = out.parent.iterdir()
    (path,) = [layer["annotations"][I.A_PATH] for layer in image_manifest(registry)["layers"]
               if layer["digest"] == StopsAfterOneLayer.streamed[0]]
    with tarfile.open(made["small"]) as archive:
        member = archive.getmember(path)
    at = member.offset_data + member.size - 2000  # inside the checkpoint written in full
    with open(kept, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    gets = len(blob_gets(registry))
    oci.pull(ref_of(registry), out, plain_http=True)
    assert out.read_bytes() == made["small"].read_bytes()
    assert StopsAfterOneLayer.streamed[0] in blob_gets(registry)[gets:]


def test_a_blob_corrupted_in_the_registry_is_refused_on_pull_and_install(registry, made, tmp_path):
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    layer = image_manifest(registry)["layers"][0]
    stored = registry.blob_path(layer["digest"])
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped inside the checkpoint
    stored.write_bytes(bytes(raw))

    out = tmp_path / "out"
    out.mkdir()
    proc = run_tvpack("pull", ref_of(registry), "-o", out / "small.tvpack", "--plain-http")
    assert "do not match its digest" in one_error_line(proc)
    assert files_under(out) == []

    home = tmp_path / "home"
    proc = run_tvpack("install", ref_of(registry), "--torch-home", home, "--plain-http")
    assert "do not match its digest" in one_error_line(proc)
    assert left_behind(home) == []  # no checkpoint, manifest or staged layer


def test_pull_and_install_refuse_a_disk_too_small_before_fetching_a_blob(registry, made, tmpfs):
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    disk = tmpfs("1m")
    for args in (("pull", ref_of(registry), "-o", disk / "out" / "small.tvpack"),
                 ("install", ref_of(registry), "--torch-home", disk / "home")):
        line = one_error_line(run_tvpack(*args, "--plain-http"))
        assert re.search(r"not enough disk space in \S+: need [\d.]+ MB, [\d.]+ [KM]B free", line), line
    layers = {layer["digest"] for layer in image_manifest(registry)["layers"]
              if layer["annotations"][I.A_PATH].startswith("hub/checkpoints/")}
    assert layers and not layers & set(blob_gets(registry))  # the manifest layer was read, no checkpoint's
    assert left_behind(disk) == []


def test_a_disk_that_fills_during_an_oci_install_keeps_no_staged_layer(registry, made, tmpfs, monkeypatch):
    """Layers are staged beside the cache, then copied into it: a disk that fills meanwhile (after the
    up-front check) is reported as full, and neither a checkpoint nor a staged layer or its part is left.
    The disk is smaller than the largest layer, so the staging of the layers (fetched in parallel) fills it:
    one CacheError naming the staging directory and the bytes the layer that hit it needed."""
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    layers = sorted(layer["size"] for layer in image_manifest(registry)["layers"])
    assert 2 * layers[-2] < layers[-1] - 256 * 1024, layers  # the smaller layers fit, staged and installed
    disk = tmpfs(f"{(layers[-1] - 128 * 1024) // 1024}k")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1 << 40))  # another writer
    with pytest.raises(CacheError) as err:
        oci.install(ref_of(registry), torch_home=disk / "home", plain_http=True)
    needs = "|".join(re.escape(human_bytes(size)) for size in layers)
    assert re.fullmatch(rf"disk full while writing {re.escape(str(disk))}/home/\S+/oci-layers/\S+ "
                        rf"\(needs ({needs})\)", err.value.message), err.value.message
    assert left_behind(disk) == []


def test_an_image_that_is_not_a_tvpack_image_is_refused_in_one_line(registry, tmp_path):
    client = RegistryClient(registry.host, plain_http=True, policy=FAST)
    layer = tar_header("hub/x/file", 3, 0) + b"abc" + bytes(509 + 1024)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [digest_of(layer)]}}).encode()
    for data in (layer, config):
        client.push_blob("plain/image", data, size=len(data), digest=digest_of(data))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": I.IMAGE_CONFIG, "digest": digest_of(config), "size": len(config)},
                           "layers": [{"mediaType": I.LAYER_TAR, "digest": digest_of(layer),
                                       "size": len(layer)}]}).encode()
    client.put_manifest("plain/image", "v1", manifest, OCI_MANIFEST)
    ref = ref_of(registry, "plain/image")
    for args in (("pull", ref, "-o", tmp_path / "x.tvpack"), ("inspect", ref), ("install", ref, "--torch-home",
                                                                                 tmp_path / "home")):
        line = one_error_line(run_tvpack(*args, "--plain-http"))
        assert f"{ref}: not a tvpack image (no org.tvpack.format=tvpack-bundle annotation)" in line, line
    assert not (tmp_path / "x.tvpack").exists() and not (tmp_path / "home").exists()
    missing = one_error_line(run_tvpack("pull", ref_of(registry, "plain/image", "v2"), "-o", tmp_path / "y",
                                        "--plain-http"))
    assert "tag or manifest not found" in missing


# -- blob GETs that stall: deadlines, notices, Ctrl-C ------------------------------------------------
class StallingFront:
    """A registry front on loopback: every request is redirected to the real registry at ``target``,
    except GETs of blob ``stall``, which it accepts and never answers. ``stalled`` is set when one arrives."""

    def __init__(self, target: str, stall: str):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.stalled = threading.Event()
        self.stalls = 0  # stalled GETs received: a second one is a retry after a read timeout
        self._release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(307)
                self.send_header("Location", f"http://{target}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                if self.path.endswith(f"/blobs/{stall}"):
                    owner.stalls += 1
                    owner.stalled.set()
                    owner._release.wait()  # the connection stays open, silent
                    return
                self.do_HEAD()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


def checkpoint_layer(reg) -> dict:
    return max(image_manifest(reg)["layers"], key=lambda layer: layer["size"])


def test_a_registry_that_never_answers_a_blob_get_says_so_and_gives_up_in_one_line(registry, made, tmp_path):
    """A blob GET the registry accepts and never answers: a notice naming what is waited for, one retry
    (it stalled: waiting longer will not heal it), then one line; a --max-time shorter than the wait ends it
    at the deadline."""
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    with StallingFront(registry.host, checkpoint_layer(registry)["digest"]) as front:
        stalled = run_tvpack("pull", ref_of(front), "-o", tmp_path / "out" / "x.tvpack", "--plain-http",
                             "--speed-time", "1", timeout=120)
        deadline = run_tvpack("pull", ref_of(front), "-o", tmp_path / "out" / "x.tvpack", "--plain-http",
                              "--speed-time", "60", "--max-time", "2", timeout=120)
        assert front.stalled.is_set()
    lines = stalled.stderr.strip().splitlines()
    assert stalled.returncode == 1 and len(lines) == 2, stalled.stderr
    assert f"no answer from {front.host} for 1s; retrying in" in lines[0], stalled.stderr
    assert lines[1].startswith("tvpack: error: ") and f"no answer from {front.host} for 1s (gave up after 2 attempts)" \
        in lines[1], stalled.stderr
    assert "not complete within 2s" in one_error_line(deadline)
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize("command", ["pull", "install"])
def test_ctrl_c_stops_a_stalled_oci_blob_get_at_once(registry, made, tmp_path, command):
    import signal

    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    # pull: no read timeout or speed limit can end the wait, only the signal; install has no such options: its
    # read timeout (30 s, then retries) would end in "gave up", exit 1, never 130
    where = (["-o", str(tmp_path / "x"), "--read-timeout", "3600", "--speed-limit", "0"] if command == "pull"
             else ["--torch-home", str(tmp_path / "home")])
    with StallingFront(registry.host, checkpoint_layer(registry)["digest"]) as front:
        proc = subprocess.Popen([sys.executable, "-m", "packager", command, ref_of(front), *where,
                                 "--plain-http"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(front.stalled.is_set, what="the blob GET")
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=600)  # bounds a hang only
        finally:
            proc.kill()
    assert front.stalls == 1  # stopped during the first GET: not retried after a read timeout
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "tvpack: interrupted", stderr


# -- signatures ---------------------------------------------------------------------------------------
def ec_key(openssl: str, directory: Path, name: str) -> tuple[Path, Path]:
    key, pub = directory / f"{name}.key", directory / f"{name}.pub"
    subprocess.run([openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)], check=True)
    subprocess.run([openssl, "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    return key, pub


def test_signatures_travel_in_the_image_and_are_checked_from_the_registry(registry, made, tmp_path, zoo_root):
    openssl = need_binary("openssl")
    (alice, alice_pub), (bob, bob_pub) = ec_key(openssl, tmp_path, "alice"), ec_key(openssl, tmp_path, "bob")
    _other, other_pub = ec_key(openssl, tmp_path, "other")
    path = tmp_path / "signed.tvpack"
    shutil.copy(made["small"], path)
    # two signatures, appended in an order that is not sorted: the image keeps the bundle's order
    signing.sign_bundle(path, signing.Signer.load(alice))
    signing.sign_bundle(path, signing.Signer.load(bob), label="release")
    with B.open_bundle(path) as opened:
        names = [m.path.rsplit("/", 1)[1] for m in opened.signatures]
    assert names == sorted(names, reverse=True)
    ref = ref_of(registry, "models/signed")
    assert run_tvpack("push", path, ref, "--plain-http").returncode == 0
    out = tmp_path / "pulled.tvpack"
    assert run_tvpack("pull", ref, "-o", out, "--plain-http").returncode == 0
    assert out.read_bytes() == path.read_bytes()
    shown = run_tvpack("inspect", ref, "--plain-http")
    assert "signatures: 2" in shown.stdout, shown.stderr
    verified = run_tvpack("verify", ref, "--key", bob_pub, "--plain-http")
    assert verified.returncode == 0 and "signed by" in verified.stdout, verified.stderr
    staged = oci.staging_root(Path(os.environ["XDG_CACHE_HOME"]) / "tvpack" / "oci-verify")
    assert list(staged.iterdir()) == []  # the layers verify fetched are gone again

    # an untrusted signer is refused before any checkpoint layer is fetched; nothing is written
    layers = image_manifest(registry, "models/signed")["layers"]
    gets = len(blob_gets(registry))
    home = tmp_path / "home"
    line = one_error_line(run_tvpack("install", ref, "--key", other_pub, "--torch-home", home, "--plain-http"))
    assert "signature" in line
    assert blob_gets(registry)[gets:] == [layers[-1]["digest"]] and files_under(home / "hub/checkpoints") == []
    installed = run_tvpack("install", ref, "--key", alice_pub, "--torch-home", home, "--plain-http")
    assert installed.returncode == 0 and "signature valid" in installed.stdout, installed.stderr
    assert len(files_under(home / "hub/tvpack/signatures")) == 2

    # signed straight from the cache into a registry
    proc = run_tvpack("bundle", *SMALL, "--registry", ZOO_REGISTRY, "--torch-home", made["home"], "--no-fetch",
                      "--sign-key", alice, "-o", ref_of(registry, "models/from-cache"), "--plain-http")
    assert proc.returncode == 0, proc.stderr
    again = run_tvpack("install", ref_of(registry, "models/from-cache"), "--key", alice_pub, "--torch-home",
                       tmp_path / "home2", "--plain-http")
    assert again.returncode == 0 and "signature valid" in again.stdout, again.stderr


# -- authentication -------------------------------------------------------------------------------------
def test_htpasswd_registry_login_then_push_pull_install(auth_registry, made, tmp_path):
    ref = ref_of(auth_registry)
    line = one_error_line(run_tvpack("push", made["small"], ref, "--plain-http"))
    assert f"unauthorized: no credentials for {auth_registry.host}" in line
    assert os.environ["REGISTRY_AUTH_FILE"] in line and f"tvpack login {auth_registry.host}" in line

    auth_file = Path(os.environ["REGISTRY_AUTH_FILE"])
    for args, what in ((("-u", "alice"), "pipe it in with --password-stdin"), ((), "give -u USER")):
        no_tty = run_tvpack("login", auth_registry.host, *args, "--plain-http", stdin=subprocess.DEVNULL)
        assert no_tty.returncode == 2 and what in no_tty.stderr, no_tty.stderr  # not a prompt that aborts
    bad = run_tvpack("login", auth_registry.host, "-u", "alice", "--password-stdin", "--plain-http", input="wrong\n")
    assert "refused the credentials" in one_error_line(bad) and not auth_file.exists()
    good = run_tvpack("login", auth_registry.host, "-u", "alice", "--password-stdin", "--plain-http",
                      input="s3cret\n")
    assert good.returncode == 0 and str(auth_file) in good.stdout, good.stderr
    assert list(json.loads(auth_file.read_text())["auths"]) == [auth_registry.host]

    assert run_tvpack("push", made["small"], ref, "--plain-http").returncode == 0
    out = tmp_path / "pulled.tvpack"
    assert run_tvpack("pull", ref, "-o", out, "--plain-http").returncode == 0
    assert out.read_bytes() == made["small"].read_bytes()
    proc = run_tvpack("install", ref, "--torch-home", tmp_path / "home", "--plain-http", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["bundle"] == ref, proc.stderr


def test_push_and_pull_through_nginx_with_its_default_body_limit(registry, made, tmp_path):
    from servers import Nginx

    with need_server(Nginx, tmp_path / "root", tmp_path / "nginx", proxy_to=f"http://{registry.host}") as proxy:
        ref = f"oci://127.0.0.1:{proxy.port}/models/small:v1"  # nginx's default client_max_body_size: 1 MB
        proc = run_tvpack("push", made["small"], ref, "--plain-http")
        assert proc.returncode == 0, proc.stderr
        assert 413 in [status for _m, _p, status, _s in proxy.requests()]  # it did have to adapt
        out = tmp_path / "pulled.tvpack"
        assert run_tvpack("pull", ref, "-o", out, "--plain-http").returncode == 0
        assert out.read_bytes() == made["small"].read_bytes()


# -- independent consumers ------------------------------------------------------------------------------
def test_skopeo_copy_and_umoci_unpack_give_a_torch_home_vanilla_torchvision_loads_offline(registry, made, tmp_path):
    skopeo, umoci = need_binary("skopeo"), need_binary("umoci")
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    layout = tmp_path / "layout"
    subprocess.run([skopeo, "copy", "--src-tls-verify=false", f"docker://{registry.host}/models/small:v1",
                    f"oci:{layout}:v1"], check=True, capture_output=True, timeout=120)
    out = tmp_path / "unpacked"
    subprocess.run([umoci, "unpack", "--rootless", "--image", f"{layout}:v1", str(out)], check=True,
                   capture_output=True, timeout=120)
    rootfs = out / "rootfs"
    with B.open_bundle(made["small"]) as opened:
        for entry in opened.entries:
            assert (rootfs / entry.path).read_bytes() == opened.open_checkpoint(entry.name).read()
        assert (rootfs / opened.manifest_path).is_file()
    sums = load_offline(rootfs)
    assert set(sums) == set(SMALL_WEIGHTS.values())


def test_offline_means_no_request_at_the_registry(registry, made, tmp_path):
    """TVPACK_OFFLINE=1 (or --offline) refuses every oci:// command in one line, and the registry's access log
    shows not one request from them."""
    oci.push_bundle(made["small"], ref_of(registry), plain_http=True)
    before = len(registry.requests())
    bundle_oci = ("bundle", *SMALL, "--registry", ZOO_REGISTRY, "--torch-home", made["home"], "--no-upstream",
                  "-o", ref_of(registry, "team/offline", "v1"))
    commands = [("inspect", ref_of(registry)), ("pull", ref_of(registry), "-o", tmp_path / "out.tvpack"),
                ("push", made["small"], ref_of(registry, tag="v2")),
                ("install", ref_of(registry), "--torch-home", tmp_path / "home"), bundle_oci]
    for args in commands:
        line = one_error_line(run_tvpack(*args, "--plain-http", env={"TVPACK_OFFLINE": "1"}))
        assert f"offline mode (TVPACK_OFFLINE=1 or --offline): not connecting to {registry.host}" in line, line
    for args in [commands[1], commands[2], bundle_oci]:  # the commands with an --offline flag
        line = one_error_line(run_tvpack(*args, "--plain-http", "--offline"))
        assert "offline mode" in line, line
    assert len(registry.requests()) == before
    assert not (tmp_path / "out.tvpack").exists() and not (tmp_path / "home").exists()


def test_a_pulled_checkpoint_of_many_chunks_is_hashed_as_it_was_written(registry, tmp_path, monkeypatch):
    """The transfer engine hands ``write`` views of buffers it reuses: the pulled checkpoint's sha256 (computed on
    another thread) must be of the bytes received, not of whatever the buffer holds later (found by
    scripts/bench_oci.py: a 100 MB checkpoint came out with a different sha256 on every pull)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_bundle import REGISTRY, make_checkpoints
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    selectors = make_checkpoints(tmp_path, 48 << 20, 1)
    monkeypatch.syspath_prepend(str(tmp_path))
    made = B.bundle(selectors, tmp_path / "big.tvpack", registry=[REGISTRY], torch_home=tmp_path / "home",
                    fetch=False)
    oci.push_bundle(made, ref_of(registry), plain_http=True)
    proc = run_tvpack("pull", ref_of(registry), "-o", tmp_path / "pulled.tvpack", "--plain-http", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pulled.tvpack").read_bytes() == made.read_bytes()
