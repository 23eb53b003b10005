"""Release channels: the release inside the signed manifest, what a site remembers of each channel, every refusal
through the real CLI with nothing written, overrides, revocation (vanilla torchvision offline too), tvpack channels.

Keys come from openssl; bundles from the synthetic zoo, made once per module through the library.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import IN_CI, ROOT, ZOO_REGISTRY, _missing, need_binary, run_tvpack
from test_signature import MODEL_SIGNING

from packager import channels, signing
from packager.errors import BundleError
from packager.formats.release import Release, Revocation, parse_time

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

SHUFFLE, QUANT = "zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"
SHUFFLE_WEIGHTS = "ZooShuffleNetV2_Weights.IMAGENET10_V1"


def openssl(*args, cwd: Path) -> None:
    subprocess.run([need_binary("openssl"), *map(str, args)], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """prod (may sign any channel), other (trusted nowhere), team (trusted for channel staging only)."""
    d = tmp_path_factory.mktemp("keys")
    for name in ("prod", "other", "team"):
        openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", f"{name}.key", cwd=d)
        openssl("ec", "-in", f"{name}.key", "-pubout", "-out", f"{name}.pub", cwd=d)
    (d / "team-limited.pub").write_bytes(b"tvpack-channels: staging\n" + (d / "team.pub").read_bytes())
    return d


@pytest.fixture(scope="module")
def made(zoo_root, tmp_path_factory, keys) -> dict[str, Path]:
    """Release bundles of channel prod, made once."""
    work = tmp_path_factory.mktemp("releases")
    producer = work / "producer"
    carried = B.bundle([SHUFFLE], work / "probe.tvpack", registry=[ZOO_REGISTRY], torch_home=producer,
                       mirrors=[str(zoo_root)], upstream=False)
    with B.open_bundle(carried) as opened:
        shuffle_sha = opened.entries[0].sha256

    def make(name, selectors, sequence, *, key="prod", expires=None, revokes=(), channel="prod", **options):
        release = Release(channel, sequence, parse_time(expires, "expires") if expires else None, tuple(revokes))
        sign = signing.Signer.load(keys / f"{key}.key").members if key else None
        return B.bundle(selectors, work / f"{name}.tvpack", registry=[ZOO_REGISTRY], torch_home=producer,
                        mirrors=[str(zoo_root)], upstream=False, release=release, sign=sign, **options)

    return {
        "r1": make("r1", [SHUFFLE], 1),
        "r2": make("r2", [SHUFFLE, QUANT], 2, expires="2027-01-05"),
        "r2-other": make("r2-other", [QUANT], 2),
        "r3-revokes": make("r3", [QUANT], 3, revokes=[Revocation(shuffle_sha, "poisoned labels")]),
        "unsigned": make("unsigned", [SHUFFLE], 5, key=None),
        "team": make("team", [SHUFFLE], 7, key="team"),
        "staging": make("staging", [SHUFFLE], 1, key="team", channel="staging"),
        "shuffle_sha": shuffle_sha,
        "producer": producer,
    }


def site(tmp_path: Path, keys: Path, name: str = "site") -> Path:
    """A TORCH_HOME whose trust policy is <hub>/tvpack/trusted/: prod's key, and team's for channel staging."""
    home = tmp_path / name
    trusted = home / "hub" / "tvpack" / "trusted"
    trusted.mkdir(parents=True)
    shutil.copy(keys / "prod.pub", trusted / "prod.pub")
    shutil.copy(keys / "team-limited.pub", trusted / "team.pub")
    return home


def snapshot(home: Path) -> dict[str, str]:
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*")) if p.is_file()}


def install(bundle, home, *extra, env=None):
    return run_tvpack("install", bundle, "--torch-home", home, "-q", *extra, env=env)


def refused(proc, *fragments) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("tvpack: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def record(home: Path, channel: str = "prod") -> dict:
    return json.loads((home / "hub" / "tvpack" / "channels" / f"{channel}.json").read_text())


# -- the release in the manifest ----------------------------------------------------------------------------------

def test_bundle_options_write_the_release_inspect_shows_it_and_the_oms_tool_accepts_the_signature(
        made, keys, tmp_path, zoo_root):
    out = tmp_path / "rel.tvpack"
    sha = "ab" * 32
    proc = run_tvpack("bundle", SHUFFLE, "-o", out, "--registry", ZOO_REGISTRY, "--mirror", zoo_root,
                      "--no-upstream", "--torch-home", made["producer"], "--sign-key", keys / "prod.key", "-q",
                      "--channel", "prod", "--sequence", "42", "--expires", "2027-01-05",
                      "--revoke", f"{sha}=bad data", "--revoke", "CD" * 32)
    assert proc.returncode == 0, proc.stderr
    assert "release: release 42 of prod, expires 2027-01-05, revokes 2 checkpoints" in proc.stdout
    manifest = json.loads(run_tvpack("inspect", out, "--json", check=True).stdout)
    assert manifest["release"] == {"channel": "prod", "sequence": 42, "expires": "2027-01-05T00:00:00Z",
                                   "revokes": [{"sha256": sha, "reason": "bad data"},
                                               {"sha256": "cd" * 32, "reason": ""}]}
    assert "release: release 42 of prod, expires 2027-01-05" in run_tvpack("inspect", out, check=True).stdout
    # the OMS reference tool still accepts the signature over the extracted tree
    if not MODEL_SIGNING.exists():
        _missing("model_signing CLI (PyPI model-signing)")
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(tree)], check=True)
    sig = next((tree / "hub" / "tvpack" / "signatures").glob("*.sig"))
    oms = subprocess.run([str(MODEL_SIGNING), "verify", "key", str(tree), "--signature", str(sig),
                          "--public_key", str(keys / "prod.pub")], capture_output=True, text=True, timeout=120)
    assert oms.returncode == 0, oms.stdout + oms.stderr
    # a 90d duration is counted from now
    dur = run_tvpack("bundle", SHUFFLE, "-o", tmp_path / "d.tvpack", "--registry", ZOO_REGISTRY, "--no-fetch",
                     "--torch-home", made["producer"], "-q", "--channel", "prod", "--sequence", "1",
                     "--expires", "90d", "--json", check=True)
    with B.open_bundle(json.loads(dur.stdout)["path"]) as opened:
        expires = parse_time(opened.manifest["release"]["expires"], "expires")
    assert 89 <= (expires - datetime.now(timezone.utc)).days <= 90


@pytest.mark.parametrize("args, message", [
    (["--sequence", "3"], "give --channel NAME too"),
    (["--channel", "prod"], "--channel needs --sequence"),
    (["--channel", "Prod!", "--sequence", "1"], "is not a name"),
    (["--channel", "prod", "--sequence", "1", "--revoke", "abc"], "64 hex digits"),
    (["--channel", "prod", "--sequence", "1", "--expires", "soon"], "not an ISO-8601 date"),
])
def test_bad_release_options_are_refused_before_anything_is_written(made, tmp_path, args, message):
    proc = run_tvpack("bundle", SHUFFLE, "-o", tmp_path / "x.tvpack", "--registry", ZOO_REGISTRY, "--no-fetch",
                      "--torch-home", made["producer"], "-q", *args)
    assert proc.returncode in (1, 2) and message in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_a_release_cannot_revoke_what_it_carries(made, tmp_path):
    with pytest.raises(BundleError, match="revokes sha256 .* which the bundle would carry"):
        B.bundle([SHUFFLE], tmp_path / "x.tvpack", registry=[ZOO_REGISTRY], torch_home=made["producer"], fetch=False,
                 release=Release("prod", 9, None, (Revocation(made["shuffle_sha"], "x"),)))
    assert not list(tmp_path.iterdir())


def test_delta_bundles_and_split_volumes_carry_the_release(made, tmp_path):
    release = Release("prod", 4)
    delta = B.bundle([SHUFFLE, QUANT], tmp_path / "delta.tvpack", registry=[ZOO_REGISTRY],
                     torch_home=made["producer"], fetch=False, site=_Holds(made["shuffle_sha"]), release=release)
    listing = B.bundle([SHUFFLE, QUANT], tmp_path / "split.tvpack", registry=[ZOO_REGISTRY],
                       torch_home=made["producer"], fetch=False, split=1 << 20, release=release)
    for path in (delta, listing):
        with B.open_bundle(path) as opened:
            assert opened.manifest["release"] == {"channel": "prod", "sequence": 4}
    with B.open_bundle(delta) as opened:
        assert opened.site_files  # it is a delta bundle


class _Holds:
    def __init__(self, sha):
        self.sha = sha

    def has(self, name, sha):
        return sha == self.sha


# -- what the site remembers, and its refusals ----------------------------------------------------------------------

def test_a_signed_release_installs_and_is_recorded_reinstalling_it_is_fine(made, keys, tmp_path):
    home = site(tmp_path, keys)
    proc = install(made["r2"], home)
    assert proc.returncode == 0, proc.stderr
    first = record(home)
    assert first["sequence"] == 2 and first["expires"] == "2027-01-05T00:00:00Z" and first["overrides"] == []
    with B.open_bundle(made["r2"]) as opened:
        assert first["manifest"] == opened.manifest_id
    assert first["signer"].startswith("key SHA256:")
    again = install(made["r2"], home)
    assert again.returncode == 0, again.stderr
    assert record(home)["sequence"] == 2


def test_rollback_is_refused_with_nothing_written(made, keys, tmp_path):
    home = site(tmp_path, keys)
    assert install(made["r2"], home).returncode == 0
    before = snapshot(home)
    refused(install(made["r1"], home), "channel prod is at release 2 here; this bundle is release 1")
    assert snapshot(home) == before


def test_allow_rollback_installs_and_records_the_override(made, keys, tmp_path):
    home = site(tmp_path, keys)
    assert install(made["r2"], home).returncode == 0
    proc = install(made["r1"], home, "--allow-rollback")
    assert proc.returncode == 0, proc.stderr
    rec = record(home)
    assert rec["sequence"] == 1
    [override] = rec["overrides"]
    assert override["kind"] == "rollback" and override["previous"] == 2 and override["sequence"] == 1
    assert "--allow-rollback" in override["command"] and override["at"].endswith("Z")


def test_equivocation_is_refused_with_nothing_written(made, keys, tmp_path):
    home = site(tmp_path, keys)
    assert install(made["r2"], home).returncode == 0
    before = snapshot(home)
    refused(install(made["r2-other"], home), "release 2 of prod here is manifest", "two different releases")
    refused(install(made["r2-other"], home, "--allow-rollback"), "two different releases")
    assert snapshot(home) == before


def test_an_expired_release_is_refused_then_allowed_and_recorded(made, keys, tmp_path):
    faketime = need_binary("faketime")
    home = site(tmp_path, keys)
    later = [faketime, "2027-02-01 00:00:00"]

    def run_later(*args):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run([*later, sys.executable, "-m", "packager", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=300, cwd=ROOT)

    before = snapshot(home)
    refused(run_later("install", made["r2"], "--torch-home", home, "-q"), "release 2 of prod expired on 2027-01-05")
    assert snapshot(home) == before
    proc = run_later("install", made["r2"], "--torch-home", home, "-q", "--allow-expired")
    assert proc.returncode == 0, proc.stderr
    [override] = record(home)["overrides"]
    assert override["kind"] == "expired" and override["at"].startswith("2027-02-01")
    # tvpack channels warns about it
    shown = run_later("channels", "--torch-home", home)
    assert "release 2 of prod expired on 2027-01-05" in shown.stderr


def test_an_unsigned_release_is_refused_at_install_even_without_a_trust_policy(made, tmp_path):
    home = tmp_path / "plain"
    home.mkdir()
    refused(install(made["unsigned"], home), "release 5 of prod is not signed by a trusted key")
    assert snapshot(home) == {}


def test_a_release_no_trusted_key_may_sign_for_its_channel_is_refused(made, keys, tmp_path):
    home = site(tmp_path, keys)
    before = snapshot(home)
    refused(install(made["team"], home), "release 7 of prod claims channel prod, which no trusted key may sign",
            "may sign staging")
    assert snapshot(home) == before
    # an untrusted key is refused by the signature check itself
    refused(install(made["r1"], home, "--key", keys / "other.pub"), "r1.tvpack")
    assert snapshot(home) == before
    # the same key may sign its own channel
    assert install(made["staging"], home).returncode == 0
    assert record(home, "staging")["sequence"] == 1


def test_a_failed_install_leaves_the_record_as_it_was(made, keys, tmp_path):
    home = site(tmp_path, keys)
    assert install(made["r1"], home).returncode == 0
    rec = (home / "hub" / "tvpack" / "channels" / "prod.json").read_bytes()
    # release 2 with a flipped byte in a checkpoint: it passes the release checks, then fails the sha256 check
    broken = tmp_path / "broken.tvpack"
    shutil.copy(made["r2"], broken)
    with B.open_bundle(broken) as opened:
        offset = next(m.offset for m in opened.members if m.path.endswith(".pth")) + 1000
    with open(broken, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = snapshot(home)
    refused(install(broken, home), "sha256 mismatch")
    assert (home / "hub" / "tvpack" / "channels" / "prod.json").read_bytes() == rec
    assert snapshot(home) == before


# -- revocation ---------------------------------------------------------------------------------------------------

def test_revocation_moves_the_checkpoint_names_the_release_and_refuses_its_return(made, keys, tmp_path, cli):
    home = site(tmp_path, keys)
    assert install(made["r2"], home).returncode == 0
    with B.open_bundle(made["r1"]) as opened:
        shuffle = home / "hub" / "checkpoints" / opened.entries[0].filename
    assert shuffle.is_file()
    assert install(made["r3-revokes"], home).returncode == 0
    assert not shuffle.exists()
    kept = home / "hub" / "tvpack" / "revoked" / shuffle.name
    assert kept.is_file() and hashlib.sha256(kept.read_bytes()).hexdigest() == made["shuffle_sha"]
    [revoked] = record(home)["revoked"]
    assert revoked["sequence"] == 3 and revoked["reason"] == "poisoned labels" and revoked["file"] == shuffle.name
    # the loader and predict name the revoking release
    from packager.errors import LoadError
    from packager.loader import load_model

    with pytest.raises(LoadError, match="revoked by release 3 of prod: poisoned labels"):
        load_model(home, SHUFFLE, registry=[ZOO_REGISTRY])
    # a later install that would bring it back refuses, with nothing written (the rollback override does not help)
    before = snapshot(home)
    refused(install(made["r1"], home, "--allow-rollback"), f"{shuffle.name} was revoked by release 3 of prod")
    assert snapshot(home) == before
    # cache ls shows it revoked; cache prune --revoked deletes it
    listing = json.loads(run_tvpack("cache", "ls", "--torch-home", home, "--json", check=True).stdout)
    assert [r["file"] for r in listing["revoked"]] == [shuffle.name]
    # the installed weights whose file was revoked is shown revoked, not current
    [gone] = [w for w in listing["installed"] if w["file"] == shuffle.name]
    assert gone["revoked"] == "revoked by release 3 of prod: poisoned labels"
    assert all(w["revoked"] is None for w in listing["installed"] if w["file"] != shuffle.name)
    shown = run_tvpack("cache", "ls", "--torch-home", home, check=True).stdout
    [row] = [line for line in shown.splitlines() if line.startswith(gone["weights"] + " ")]
    assert row.split()[1] == "REVOKED" and row.endswith("revoked by release 3 of prod: poisoned labels"), row
    pruned = run_tvpack("cache", "prune", "--revoked", "--torch-home", home, check=True)
    assert shuffle.name in pruned.stdout and not kept.exists()
    # channels: the count of revoked checkpoints
    [shown] = json.loads(run_tvpack("channels", "--torch-home", home, "--json", check=True).stdout)
    assert (shown["channel"], shown["sequence"], shown["revoked"]) == ("prod", 3, 1)
    assert set(shown) >= {"channel", "sequence", "manifest", "signer", "installed", "expires", "revoked"}


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_vanilla_torchvision_offline_loads_a_checkpoint_before_its_revocation_and_not_after(
        keys, tmp_path, monkeypatch):
    """A real torchvision member (its url patched to a synthetic checkpoint, as in test_loader) through
    torchvision's own builder, under unshare -n: it loads from the cache before the revoking release is installed
    and must download (impossible offline) after."""
    if not _can_unshare():
        if IN_CI:
            pytest.fail("unshare -n is required in CI")
        pytest.skip("unshare -n is not permitted here")
    import torchvision

    from packager.testing import zoo as zoo_module

    member = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    synth = zoo_module.synthesize_checkpoint(member, tmp_path / "synth")
    url = "https://download.pytorch.org/models/" + synth.name
    monkeypatch.setattr(member.value, "url", url)
    producer = tmp_path / "producer"
    (producer / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(synth, producer / "hub" / "checkpoints" / synth.name)
    sign = signing.Signer.load(keys / "prod.key").members
    first = B.bundle(["squeezenet1_1:IMAGENET1K_V1"], tmp_path / "one.tvpack", torch_home=producer, fetch=False,
                     release=Release("prod", 1), sign=sign)
    sha = hashlib.sha256(synth.read_bytes()).hexdigest()
    revoking = B.bundle([QUANT], tmp_path / "two.tvpack", registry=[ZOO_REGISTRY], torch_home=producer,
                        mirrors=[str(zoo_module.zoo_dir())], upstream=False,
                        release=Release("prod", 2, None, (Revocation(sha, "mislabelled"),)), sign=sign)
    home = site(tmp_path, keys)
    assert install(first, home).returncode == 0
    script = textwrap.dedent(f"""
        import torchvision
        member = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
        object.__setattr__(member.value, "url", {url!r})
        try:
            torchvision.models.squeezenet1_1(weights=member)
            print("LOADED")
        except Exception as exc:
            print("FAILED", type(exc).__name__)
    """)
    env = {**os.environ, "TORCH_HOME": str(home)}

    def vanilla() -> str:
        proc = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=300)
        return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr

    assert vanilla() == "LOADED"
    assert install(revoking, home).returncode == 0
    assert vanilla().startswith("FAILED")
    assert (home / "hub" / "tvpack" / "revoked" / synth.name).is_file()


# -- tvpack channels, install oci:// ------------------------------------------------------------------------------

def test_channels_lists_each_channel_and_warns_within_seven_days(made, keys, tmp_path):
    home = site(tmp_path, keys)
    assert "no release channels here" in run_tvpack("channels", "--torch-home", home, check=True).stdout
    assert install(made["r1"], home).returncode == 0
    assert install(made["staging"], home).returncode == 0
    shown = json.loads(run_tvpack("channels", "--torch-home", home, "--json", check=True).stdout)
    assert [(c["channel"], c["sequence"], c["expires"]) for c in shown] == [("prod", 1, None), ("staging", 1, None)]
    # a record about to expire is warned about
    path = home / "hub" / "tvpack" / "channels" / "prod.json"
    data = json.loads(path.read_text())
    soon = datetime.fromtimestamp(datetime.now(timezone.utc).timestamp() + 3 * 86400, timezone.utc)
    data["expires"] = soon.strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(json.dumps(data))
    proc = run_tvpack("channels", "--torch-home", home, check=True)
    assert "release 1 of prod expires on" in proc.stderr and "within 7 days" in proc.stderr
    assert "prod" in proc.stdout and "staging" in proc.stdout


def test_install_from_a_registry_goes_through_the_same_release_checks(made, keys, tmp_path, registry):
    home = site(tmp_path, keys)
    ref = f"oci://{registry.host}/models/prod:r1"
    run_tvpack("push", made["r1"], ref, "--plain-http", check=True)
    assert install(made["r2"], home).returncode == 0
    before = snapshot(home)
    refused(install(ref, home, "--plain-http"), "channel prod is at release 2 here; this bundle is release 1")
    # (the OCI store's per-image staging lock file stays, empty: it is how installs of one image take turns)
    assert {k: v for k, v in snapshot(home).items() if not k.startswith("hub/tvpack/locks/oci-")} == before
    proc = install(ref, home, "--plain-http", "--allow-rollback")
    assert proc.returncode == 0, proc.stderr
    assert record(home)["sequence"] == 1


def test_check_release_takes_an_explicit_clock(made, keys, tmp_path):
    """The library's clock parameter: the same release is fresh before its expiry and frozen after."""
    release = Release("prod", 2, parse_time("2027-01-05", "t"))
    from packager.formats.signature import Signer, Verified

    signer = Verified("key", Signer("SHA256:" + "0" * 64), "ecdsa-p256-sha256", "x", {})
    hub = tmp_path / "hub"
    before = datetime(2027, 1, 4, tzinfo=timezone.utc)
    decision = channels.check_release(hub, release, "0" * 16, [signer], channels.ReleaseOptions(now=before))
    assert decision.overrides == ()
    after = channels.ReleaseOptions(now=datetime(2027, 1, 6, tzinfo=timezone.utc))
    with pytest.raises(BundleError, match="release 2 of prod expired on 2027-01-05"):
        channels.check_release(hub, release, "0" * 16, [signer], after)
    assert not hub.exists()
