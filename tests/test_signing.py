"""Signed bundles end to end: sign while bundling or afterwards, verify, install under a trust policy, installed
signatures, the loader; every refusal through the real CLI; the OMS tool as the independent judge.

Keys come from openssl (the ``pki`` fixture of test_signature); bundles from the synthetic zoo.
"""
from __future__ import annotations

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
from conftest import ROOT, ZOO_REGISTRY, _missing, need_binary, run_tvpack
from test_signature import MODEL_SIGNING, pki  # noqa: F401 - pki is a fixture

from packager import signing
from packager.errors import BundleError, SignatureError
from packager.formats import signature as sigfmt
from packager.formats.manifest import decode_manifest, encode_manifest, manifest_path_for, parse_manifest

B = importlib.import_module("packager.bundle")  # `from packager import bundle` is the function

pytestmark = pytest.mark.timeout(300)

SMALL = ["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"]
SHUFFLE = "ZooShuffleNetV2_Weights.IMAGENET10_V1"


@pytest.fixture(scope="module")
def keys(pki) -> Path:  # noqa: F811 - the imported fixture
    return Path(pki["dir"].decode())


@pytest.fixture(scope="module")
def bundles(zoo_root, tmp_path_factory) -> dict[str, Path]:
    """Two unsigned bundles of different selections (so: different manifests)."""
    work = tmp_path_factory.mktemp("signing-bundles")
    home = work / "home"
    return {
        "small": B.bundle(SMALL, work / "small.tvpack", registry=[ZOO_REGISTRY], torch_home=home,
                          mirrors=[str(zoo_root)], upstream=False),
        "one": B.bundle(SMALL[:1], work / "one.tvpack", registry=[ZOO_REGISTRY], torch_home=home,
                        mirrors=[str(zoo_root)], upstream=False),
    }


def copy_of(bundles, tmp_path, name="small") -> Path:
    out = tmp_path / f"{name}-copy.tvpack"
    shutil.copy(bundles[name], out)
    return out


def signed(bundles, tmp_path, key: Path, *, name="small", chain=()) -> Path:
    path = copy_of(bundles, tmp_path, name)
    signing.sign_bundle(path, signing.Signer.load(key, cert_chain=chain))
    return path


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tvpack: error: "), lines[0]
    return lines[0]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def refused_everywhere(cli, bundle: Path, home: Path, trust: list, message: str) -> None:
    """verify and install (plus their --json forms) refuse with one line matching ``message``; the TORCH_HOME is
    exactly as it was."""
    before = tree(home)
    for args in (("verify", bundle, *trust), ("install", bundle, "--torch-home", home, *trust)):
        line = one_error_line(cli(*args))
        assert re.search(message, line), line
        result = cli(*args, "--json")
        assert result.exit_code == 1
    assert json.loads(cli("verify", bundle, *trust, "--json").stdout)["ok"] is False
    assert tree(home) == before


def members_of(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A bundle written by Python's tarfile (an independent writer), members in the order given."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return path


def append_member(path: Path, name: str, data: bytes) -> None:
    """Append with Python's tarfile: how an attacker (or any tool) adds a member."""
    with tarfile.open(path, "a") as tf:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        tf.addfile(info, io.BytesIO(data))


def resources_of(path: Path) -> list[sigfmt.Resource]:
    with B.open_bundle(path) as opened:
        return signing.bundle_resources(opened.manifest_bytes, opened.files)


# ------------------------------------------------------------------------------------------- the independent judge

def test_tar_xf_then_the_oms_tool_verifies_every_signature(zoo_root, keys, tmp_path, cli):
    """Signed while bundling (P-256), then by `tvpack sign` with another key (P-384) and with a certificate chain:
    after a plain `tar -xf`, `model_signing verify` (not our code) accepts each signature with its key or root."""
    if not MODEL_SIGNING.exists():
        _missing("model_signing CLI (PyPI model-signing)")
    path = tmp_path / "b.tvpack"
    made = cli("bundle", *SMALL, "--registry", ZOO_REGISTRY, "--torch-home", tmp_path / "src", "--mirror", zoo_root,
               "--no-upstream", "-o", path,
               "--sign-key", keys / "p256.key", "--json")
    assert made.exit_code == 0, made.output
    manifest_id = json.loads(made.stdout)["manifest_id"]
    assert json.loads(made.stdout)["signatures"] == [sigfmt.signature_path(manifest_id)]
    assert cli("sign", path, "--key", keys / "p384.key").exit_code == 0
    result = cli("sign", path, "--key", keys / "leaf.key", "--cert-chain", keys / "leaf.pem", "--cert-chain",
                 keys / "inter.pem", "--label", "release", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["subject"] == "CN=Model Release Signer,O=ACME"

    out = tmp_path / "empty"
    out.mkdir()
    subprocess.run([need_binary("tar"), "-xf", str(path), "-C", str(out)], check=True)
    sigs = sorted((out / sigfmt.SIGNATURES_DIR).iterdir())
    assert len(sigs) == 3
    for sig in sigs:
        if sig.name == f"{manifest_id}.sig":
            method, args = "key", ["--public_key", str(keys / "p256.pub")]
        elif sig.name == f"{manifest_id}.release.sig":
            method, args = "certificate", ["--certificate_chain", str(keys / "root.pem")]
        else:
            method, args = "key", ["--public_key", str(keys / "p384.pub")]
        proc = subprocess.run([str(MODEL_SIGNING), "verify", method, str(out), "--signature", str(sig), *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (sig.name, proc.stderr)
    # and it does notice a swapped byte in a checkpoint
    victim = next((out / "hub/checkpoints").iterdir())
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    proc = subprocess.run([str(MODEL_SIGNING), "verify", "key", str(out), "--signature",
                           str(out / sigfmt.signature_path(manifest_id)), "--public_key", str(keys / "p256.pub")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and victim.name in proc.stderr


# ------------------------------------------------------------------------------------------- signing

def test_sign_appends_in_place_reading_only_headers(bundles, keys, tmp_path, cli):
    path = copy_of(bundles, tmp_path)
    original = path.read_bytes()
    inode = path.stat().st_ino
    with B.open_bundle(path) as opened:
        end = max(m.offset + m.size + (-m.size % 512) for m in opened.members)
        manifest_id = opened.manifest_id
    signer = signing.Signer.load(keys / "p256.key")
    io_before = _read_chars()
    result = signing.sign_bundle(path, signer)
    read = _read_chars() - io_before
    assert read < 64 * 1024 < len(original) // 16, read  # the headers, the manifest and the end blocks; not data
    after = path.read_bytes()
    assert path.stat().st_ino == inode and after[:end] == original[:end]  # appended in place, payload untouched
    assert result.signature == sigfmt.signature_path(manifest_id) and result.added == len(after) - len(original)
    assert len(after) % (20 * 512) == 0
    names = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert names[-1] == result.signature and len(names) == 5  # manifest, 2 checkpoints, ML-BOM, signature
    # verify names the signer; JSON too
    ok = cli("verify", path, "--key", keys / "p256.pub")
    assert ok.exit_code == 0 and f"signed by key {signer.signer.fingerprint}" in ok.stdout
    data = json.loads(cli("verify", path, "--key", keys / "p256.pub", "--json").stdout)
    assert data["ok"] and data["signatures"]["signed_by"] == [str(signer.signer)]
    # the same key again is refused; with a label it is a second signature
    line = one_error_line(cli("sign", path, "--key", keys / "p256.key"))
    assert "already signed by key" in line and "--label" in line
    assert cli("sign", path, "--key", keys / "p256.key", "--label", "again").exit_code == 0
    assert one_error_line(cli("sign", path, "--key", keys / "p256.key", "--label", "again"))
    assert one_error_line(cli("sign", path, "--key", keys / "p384.key", "--label", "bad/label")).endswith(
        "use 1 to 64 letters, digits, '-' or '_'")
    with B.open_bundle(path) as opened:
        assert [m.path for m in opened.signatures] == [result.signature, sigfmt.signature_path(manifest_id, "again")]


def _read_chars() -> int:
    text = Path("/proc/self/io").read_text()
    return int(re.search(r"rchar: (\d+)", text).group(1))


def test_signing_while_bundling_is_reproducible(bundles, zoo_root, keys, tmp_path):
    """RFC 6979 signatures: the same selection, files and key give the same bytes, signature included."""
    signer = signing.Signer.load(keys / "p384.key")
    made = [B.bundle(SMALL, tmp_path / f"{i}.tvpack", registry=[ZOO_REGISTRY], torch_home=tmp_path / "home",
                     mirrors=[str(zoo_root)], upstream=False, sign=signer.members) for i in range(2)]
    assert made[0].read_bytes() == made[1].read_bytes()
    with B.open_bundle(made[0]) as opened:
        assert len(opened.signatures) == 1
        # an unsigned bundle of the same selection is the signed one up to its signature member
        assert made[0].read_bytes()[:opened.signatures[0].offset - 512] == \
            bundles["small"].read_bytes()[:opened.signatures[0].offset - 512]


def test_every_intermediate_state_of_an_append_is_a_readable_bundle(bundles, keys, tmp_path):
    """The crash-safety argument of sign_bundle, state by state: extended with zeros, then the header with the data
    still zeros. Both open, verify without a policy, and the half-written signature is refused as garbage."""
    done = signed(bundles, tmp_path, keys / "p256.key")
    original = bundles["small"].read_bytes()
    final = done.read_bytes()
    with B.open_bundle(done) as opened:
        sig = opened.signatures[0]
    states = {
        "extended": original + bytes(len(final) - len(original)),
        "header only": final[:sig.offset] + bytes(len(final) - sig.offset),
    }
    trust = signing.trust_policy([keys / "p256.pub"])
    for name, data in states.items():
        path = tmp_path / f"{name}.tvpack"
        path.write_bytes(data)
        assert B.verify_bundle(path).weights == 2, name
        with pytest.raises(SignatureError, match="not JSON|is not signed"):
            signing.verify_signed(path, trust)


def test_sign_refuses_split_bundles_and_bad_keys(bundles, keys, tmp_path, cli):
    from packager.formats.volumes import split_file

    split = copy_of(bundles, tmp_path)
    split_file(split, 1 << 20)
    line = one_error_line(cli("sign", split.with_name(split.name + ".sha256"), "--key", keys / "p256.key"))
    assert "split into volumes; sign the bundle before splitting it" in line
    path = copy_of(bundles, tmp_path)
    for key, message in [(keys / "p256.pub", "not a PEM private key"), (tmp_path / "nope.pem", "cannot read"),
                         (keys / "root.pem", "not a PEM private key")]:
        assert message in one_error_line(cli("sign", path, "--key", key))
    line = one_error_line(cli("sign", path, "--key", keys / "p256.key", "--cert-chain", keys / "leaf.pem"))
    assert "not the signing key's certificate" in line
    assert path.read_bytes() == bundles["small"].read_bytes()


def test_encrypted_key_needs_a_password_from_the_environment_or_a_terminal(bundles, keys, tmp_path, tvpack):
    path = copy_of(bundles, tmp_path)
    proc = tvpack("sign", path, "--key", keys / "p256.enc", stdin=subprocess.DEVNULL)  # no terminal
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"tvpack: error: the signing key {keys / 'p256.enc'} is encrypted: set TVPACK_SIGNING_KEY_PASSWORD "
        "(there is no terminal to ask for it)"]
    proc = tvpack("sign", path, "--key", keys / "p256.enc", env={"TVPACK_SIGNING_KEY_PASSWORD": "wrong"})
    assert proc.returncode == 1 and "wrong password" in proc.stderr
    assert path.read_bytes() == bundles["small"].read_bytes()
    # on a terminal: a prompt that does not echo
    output = _on_a_terminal([sys.executable, "-m", "packager", "sign", str(path), "--key", str(keys / "p256.enc")],
                            b"s3cret\n")
    assert b"Password for" in output and b"s3cret" not in output and b"signed " in output
    assert run_tvpack("verify", path, "--key", keys / "p256.pub").returncode == 0


def _on_a_terminal(argv: list[str], answer: bytes) -> bytes:
    import pty
    import select

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TVPACK_SIGNING_KEY_PASSWORD", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: a new session whose terminal is the pty
        os.chdir(ROOT)
        os.execve(argv[0], argv, env)
    output, answered = b"", False
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            if not ready:
                raise AssertionError(f"no output from {argv}: {output!r}")
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            # click writes "Password for KEY:", then getpass turns echo off (flushing input) and writes " "
            if not answered and b"Password for" in output and output.endswith(b": "):
                os.write(fd, answer)
                answered = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return output


# ------------------------------------------------------------------------------------------- verify, inspect

def test_inspect_lists_signatures_without_a_key(bundles, keys, tmp_path, cli):
    path = signed(bundles, tmp_path, keys / "leaf.key", chain=[keys / "leaf.pem", keys / "inter.pem"])
    assert cli("sign", path, "--key", keys / "p384.key").exit_code == 0
    out = cli("inspect", path).stdout
    assert "signatures: 2" in out
    assert re.search(r"\.sig  CN=Model Release Signer,O=ACME \(key SHA256:[0-9a-f]{64}\), ecdsa-p256-sha256  not checked",
                     out)
    assert re.search(r"\.[0-9a-f]{12}\.sig  key SHA256:[0-9a-f]{64}, ecdsa-p384-sha384  not checked", out)
    assert "signatures: none (unsigned)" in cli("inspect", bundles["small"]).stdout
    # without a key, verify checks the contents and says the signatures were not checked
    result = cli("verify", path)
    assert result.exit_code == 0 and "2 signature(s) not checked" in result.stdout


def test_verify_with_a_ca_root_names_the_certificate_subject(bundles, keys, tmp_path, cli):
    path = signed(bundles, tmp_path, keys / "leaf.key", chain=[keys / "leaf.pem", keys / "inter.pem"])
    result = cli("verify", path, "--ca-root", keys / "root.pem", "--json")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["signatures"]["signatures"][0]
    assert check["valid"] and check["method"] == "certificate" and check["algorithm"] == "ecdsa-p256-sha256"
    assert check["chain"] == ["CN=Model Release Signer,O=ACME", "CN=Test Intermediate", "CN=root CA"]
    # one valid signature among several is enough; the others are reported
    assert cli("sign", path, "--key", keys / "other.key").exit_code == 0
    result = cli("verify", path, "--ca-root", keys / "root.pem")
    assert result.exit_code == 0 and "signed by CN=Model Release Signer,O=ACME" in result.stdout


def test_verify_and_install_work_with_no_network(bundles, keys, tmp_path):
    unshare = need_binary("unshare")
    if subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        _missing("permission to run unshare -n")
    path = signed(bundles, tmp_path, keys / "p256.key")
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TVPACK_TRUSTED_KEYS": str(keys / "p256.pub")}
    for args in (["verify", str(path)], ["install", str(path), "--torch-home", str(home)]):
        proc = subprocess.run([unshare, "-n", sys.executable, "-m", "packager", *args], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "signed by key SHA256:" in proc.stdout
    assert len(list((home / "hub/tvpack/signatures").iterdir())) == 1


# ------------------------------------------------------------------------------------------- refusals, one by one

def test_refuses_an_unsigned_bundle_under_a_policy_from_the_environment(bundles, keys, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("TVPACK_TRUSTED_KEYS", f"{keys / 'other.pub'},{keys / 'root.pem'}")
    refused_everywhere(cli, bundles["small"], tmp_path / "home", [],
                       r"small\.tvpack is not signed, and the trust policy \(TVPACK_TRUSTED_KEYS\) requires")


def test_refuses_an_unsigned_bundle_under_a_policy_from_the_trusted_folder(bundles, keys, tmp_path, cli):
    home = tmp_path / "home"
    trusted = home / "hub" / "tvpack" / "trusted"
    trusted.mkdir(parents=True)
    shutil.copy(keys / "p256.pub", trusted / "release.pem")
    before = tree(home)
    line = one_error_line(cli("install", bundles["small"], "--torch-home", home))
    assert "requires a trusted signature" in line and str(trusted) in line
    assert tree(home) == before
    # signed by the trusted key: it installs, and so does the loader (next tests)
    assert cli("install", signed(bundles, tmp_path, keys / "p256.key"), "--torch-home", home).exit_code == 0


def test_a_broken_policy_fails_closed(bundles, keys, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("TVPACK_TRUSTED_KEYS", str(tmp_path / "missing.pub"))
    assert "cannot read trusted key (TVPACK_TRUSTED_KEYS)" in one_error_line(cli("verify", bundles["small"]))
    monkeypatch.setenv("TVPACK_TRUSTED_KEYS", str(keys / "p256.key"))  # a private key where a public one belongs
    assert "this is a private key: give its public half" in one_error_line(cli("verify", bundles["small"]))


@pytest.mark.parametrize("value", ["", " , ", ","])
def test_a_trusted_keys_variable_naming_no_file_is_an_error_not_no_policy(bundles, tmp_path, cli, monkeypatch, value):
    """Set but blank is a slip (a template or quoting that lost the value), never "trust nothing, require nothing":
    install, verify and the loader refuse with one line naming the variable; nothing is installed."""
    from packager.errors import UsageError
    from packager.loader import load_weights

    monkeypatch.setenv("TVPACK_TRUSTED_KEYS", value)
    home = tmp_path / "home"
    for args in (("install", bundles["small"], "--torch-home", home), ("verify", bundles["small"])):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            f"tvpack: error: TVPACK_TRUSTED_KEYS is set but names no key file ({value!r}) (give comma-separated PEM "
            "files, or unset it for no trust policy)"]
    assert tree(home) == []
    with pytest.raises(UsageError, match="TVPACK_TRUSTED_KEYS is set but names no key file"):
        load_weights(bundles["small"], SHUFFLE, registry=[ZOO_REGISTRY])
    monkeypatch.delenv("TVPACK_TRUSTED_KEYS")  # unset: no policy, as documented
    assert cli("install", bundles["small"], "--torch-home", home).exit_code == 0


def test_verify_says_when_one_of_two_signatures_is_not_valid(bundles, keys, tmp_path, cli):
    """Text output names the bad one as the --json does; one valid signature is enough for the verdict."""
    path = signed(bundles, tmp_path, keys / "p256.key")
    signing.sign_bundle(path, signing.Signer.load(keys / "other.key"), label="other")
    result = cli("verify", path, "--key", keys / "p256.pub")
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert re.search(r"; signed by key SHA256:[0-9a-f]{64}; 1 of 2 signatures not valid: [0-9a-f]{16}\.other\.sig: "
                     r"signed by key SHA256:[0-9a-f]{64}, which is not a trusted key$", line), line
    as_json = json.loads(cli("verify", path, "--key", keys / "p256.pub", "--json").stdout)
    assert [s["valid"] for s in as_json["signatures"]["signatures"]] == [True, False]


def test_refuses_a_signature_by_another_key(bundles, keys, tmp_path, cli):
    path = signed(bundles, tmp_path, keys / "p256.key")
    refused_everywhere(cli, path, tmp_path / "home", ["--key", keys / "other.pub"],
                       r"refusing signature [0-9a-f]{16}\.sig: signed by key SHA256:[0-9a-f]{64}, which is not a "
                       "trusted key")


def test_refuses_a_signature_over_a_different_manifest(bundles, keys, tmp_path, cli):
    other = signed(bundles, tmp_path, keys / "p256.key", name="one")
    with B.open_bundle(other) as opened:
        foreign = signing.read_signatures(opened)[0][1]
    with B.open_bundle(bundles["small"]) as opened:
        this_id = opened.manifest_id
    # under this bundle's name: it lists the other manifest, not this one
    path = copy_of(bundles, tmp_path)
    append_member(path, sigfmt.signature_path(this_id), foreign)
    assert B.verify_bundle(path).weights == 2  # the archive itself is fine
    refused_everywhere(cli, path, tmp_path / "home", ["--key", keys / "p256.pub"],
                       r"hub/[a-z/_0-9-]+\.(json|pth): (signed, but the bundle does not have it|in the bundle, but the "
                       r"signature does not cover it)")
    # under its own name: the reader refuses it (installed, it would sit beside the other manifest)
    path = copy_of(bundles, tmp_path)
    with B.open_bundle(other) as opened:
        append_member(path, opened.signatures[0].path, foreign)
    refused_everywhere(cli, path, tmp_path / "home", ["--key", keys / "p256.pub"],
                       rf"is named for manifest [0-9a-f]{{16}}, not this bundle's {this_id}")


def test_refuses_a_swapped_checkpoint_with_a_consistently_rewritten_manifest(bundles, keys, tmp_path, cli):
    """The attack signatures exist for: a backdoored checkpoint, a manifest rewritten to match it, the original
    signature kept (or renamed to the new manifest). The contents verify; only the signature tells."""
    import torch

    path = signed(bundles, tmp_path, keys / "p256.key")
    members = members_of(path)
    manifest_name, manifest = members[0]
    document = decode_manifest(manifest)
    item = next(w for w in document["weights"] if w["name"] == SHUFFLE)
    old_path = item["path"]
    state = torch.load(io.BytesIO(dict(members)[old_path]), weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1  # the "backdoor"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    evil = buffer.getvalue()
    import hashlib

    sha = hashlib.sha256(evil).hexdigest()
    new_name = f"zoo_shufflenet_v2-{sha[:8]}.pth"
    item.update(path=f"hub/checkpoints/{new_name}", url=item["url"].rsplit("/", 1)[0] + "/" + new_name,
                size=len(evil), sha256=sha)
    new_manifest = encode_manifest(document)
    checkpoints = sorted([(n, d) for n, d in members[1:] if n.startswith("hub/checkpoints/") and n != old_path]
                         + [(item["path"], evil)])
    checkpoints += [(n, d) for n, d in members[1:] if n.startswith("hub/tvpack/sbom/")]  # the ML-BOM, unchanged
    old_sig = [(n, d) for n, d in members if n.startswith(sigfmt.SIGNATURES_DIR)]
    hostile = write_tar(tmp_path / "hostile.tvpack", [(manifest_path_for(new_manifest), new_manifest), *checkpoints,
                                                     *old_sig])
    refused_everywhere(cli, hostile, tmp_path / "home", ["--key", keys / "p256.pub"], "is named for manifest")
    new_id = manifest_path_for(new_manifest).rsplit("/", 1)[1][:16]
    renamed = write_tar(tmp_path / "renamed.tvpack", [(manifest_path_for(new_manifest), new_manifest), *checkpoints,
                                                     (sigfmt.signature_path(new_id), old_sig[0][1])])
    assert cli("verify", renamed).exit_code == 0  # self-consistent: without a signature check it would pass
    refused_everywhere(cli, renamed, tmp_path / "home", ["--key", keys / "p256.pub"],
                       "(signed, but the bundle does not have it|does not cover it)")
    stripped = write_tar(tmp_path / "stripped.tvpack", [(manifest_path_for(new_manifest), new_manifest), *checkpoints])
    refused_everywhere(cli, stripped, tmp_path / "home", ["--key", keys / "p256.pub"], "is not signed")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_refuses_a_truncated_or_garbage_signature(bundles, keys, tmp_path, cli, damage):
    good = signed(bundles, tmp_path, keys / "p256.key")
    with B.open_bundle(good) as opened:
        name, data = signing.read_signatures(opened)[0]
    bad = {"truncated": data[:len(data) // 2], "garbage": os.urandom(700), "empty": b""}[damage]
    path = copy_of(bundles, tmp_path)
    append_member(path, name, bad)
    refused_everywhere(cli, path, tmp_path / "home", ["--key", keys / "p256.pub"],
                       r"signature file is not JSON \(truncated or garbage\)")


@pytest.mark.parametrize("change", ["lists_a_file_the_bundle_lacks", "misses_a_file_the_bundle_has"])
def test_refuses_a_signature_whose_file_list_differs(bundles, keys, tmp_path, cli, change):
    path = copy_of(bundles, tmp_path)
    resources = resources_of(path)
    if change == "lists_a_file_the_bundle_lacks":
        resources.append(sigfmt.Resource("hub/checkpoints/extra-0123abcd.pth", "0123abcd" + "0" * 56, 1))
        message = r"hub/checkpoints/extra-0123abcd\.pth: signed, but the bundle does not have it"
    else:
        dropped = resources.pop()
        message = rf"{re.escape(dropped.path)}: in the bundle, but the signature does not cover it"
    with B.open_bundle(path) as opened:
        name = sigfmt.signature_path(opened.manifest_id)
    append_member(path, name, sigfmt.sign(resources, key_pem=(keys / "p256.key").read_bytes()))
    refused_everywhere(cli, path, tmp_path / "home", ["--key", keys / "p256.pub"], message)


def test_refuses_an_expired_certificate(bundles, keys, tmp_path, cli):
    path = signed(bundles, tmp_path, keys / "leaf.key", chain=[keys / "old_chain.pem"])
    refused_everywhere(cli, path, tmp_path / "home", ["--ca-root", keys / "old_root.pem"],
                       r"certificate CN=Old Signer expired on \d{4}-\d\d-\d\d")


def test_refuses_a_ca_certificate_as_the_signer(bundles, keys, tmp_path, cli):
    """A CA:TRUE certificate that chains to the trusted root and carries code-signing usages is still no signer."""
    path = signed(bundles, tmp_path, keys / "ca_leaf.key", chain=[keys / "ca_leaf.pem", keys / "inter.pem"])
    refused_everywhere(cli, path, tmp_path / "home", ["--ca-root", keys / "root.pem"],
                       r"certificate CN=Signer Who Is A CA is a CA certificate \(basicConstraints CA:TRUE\): a "
                       "signature must be made with an end-entity")


def test_refuses_a_certificate_from_an_untrusted_ca(bundles, keys, tmp_path, cli):
    path = signed(bundles, tmp_path, keys / "evil_leaf.key", chain=[keys / "evil_leaf.pem"])
    refused_everywhere(cli, path, tmp_path / "home", ["--ca-root", keys / "root.pem"],
                       "certificate CN=Model Release Signer does not chain to a trusted CA root")


# ------------------------------------------------------------------------------------------- the strict reader

def test_reader_allows_only_signatures_after_the_payload(bundles, tmp_path):
    with B.open_bundle(bundles["small"]) as opened:
        sig_name = sigfmt.signature_path(opened.manifest_id)
    cases = {
        "not_a_signature": ("hub/tvpack/signatures/readme.txt", b"hello", "is not a signature"),
        "nested": ("hub/tvpack/signatures/x/0123456789abcdef.sig", b"{}", "is not a signature"),
        "too_large": (sig_name, bytes(sigfmt.MAX_SIGNATURE + 1), "implausibly large"),
    }
    for name, data, message in cases.values():
        path = copy_of(bundles, tmp_path)
        append_member(path, name, data)
        with pytest.raises(BundleError, match=message):
            B.open_bundle(path)
    members = members_of(bundles["small"])
    early = write_tar(tmp_path / "early.tvpack", [members[0], (sig_name, b"{}"), *members[1:]])
    with pytest.raises(BundleError, match="follows a signature; signatures come after the files they sign"):
        B.open_bundle(early)


@pytest.mark.parametrize("place", ["hub/tvpack/signatures/0123456789abcdef.sig", "hub/tvpack/trusted/mine.pem"])
def test_a_manifest_cannot_list_signatures_or_trusted_keys(bundles, place):
    with B.open_bundle(bundles["small"]) as opened:
        document = dict(opened.manifest)
    document["members"] = {place: {"size": 1, "sha256": "0" * 64}}
    with pytest.raises(BundleError, match="outside the places a bundle may write"):
        parse_manifest(document)


# ------------------------------------------------------------------------------------------- installed signatures

def test_cache_verify_signatures_rechecks_installed_files(bundles, keys, tmp_path, cli):
    home = tmp_path / "home"
    path = signed(bundles, tmp_path, keys / "p256.key")
    assert cli("install", path, "--torch-home", home, "--key", keys / "p256.pub").exit_code == 0
    with B.open_bundle(path) as opened:
        sig = home / opened.signatures[0].path
        assert sig.read_bytes() == signing.read_signatures(opened)[0][1]  # kept beside the manifest
    ok = cli("cache", "verify", "--signatures", "--torch-home", home, "--key", keys / "p256.pub")
    assert ok.exit_code == 0, ok.output
    assert re.search(r"ok   manifest [0-9a-f]{16}  signed by key SHA256:", ok.stdout)
    # the policy from the trusted folder works the same; another key does not
    trusted = home / "hub/tvpack/trusted"
    trusted.mkdir()
    shutil.copy(keys / "p256.pub", trusted / "k.pem")
    assert cli("cache", "verify", "--signatures", "--torch-home", home).exit_code == 0
    line = one_error_line(cli("cache", "verify", "--signatures", "--torch-home", home, "--key", keys / "other.pub"))
    assert "fail the signature check" in line
    # a checkpoint replaced after install (same name), and a file no signature covers
    ckpt = home / "hub/checkpoints"
    victim = sorted(ckpt.iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    shutil.copy(sorted(ckpt.iterdir())[1], ckpt / "stray.pth")
    result = cli("cache", "verify", "--signatures", "--torch-home", home, "--json")
    assert result.exit_code == 1
    files = {f["file"]: f for f in json.loads(result.stdout)["files"]}
    assert not files[victim.name]["ok"] and "differs from the manifest" in files[victim.name]["detail"]
    assert files["stray.pth"]["detail"] == "no trusted signature covers it"
    assert [f["ok"] for n, f in sorted(files.items()) if n not in (victim.name, "stray.pth")] == [True]
    # an installed signature that was tampered with
    sig.write_bytes(sig.read_bytes()[:-10])
    result = cli("cache", "verify", "--signatures", "--torch-home", home, "--json")
    manifest = json.loads(result.stdout)["manifests"][0]
    assert not manifest["ok"] and "not JSON" in manifest["problem"]


def test_loader_refuses_checkpoints_no_trusted_signature_covers(bundles, keys, tmp_path, monkeypatch):
    from packager.loader import load_model, load_weights

    path = signed(bundles, tmp_path, keys / "p256.key")
    model, weights = load_model(path, SHUFFLE, registry=[ZOO_REGISTRY], trusted_keys=[keys / "p256.pub"])
    assert weights.name == SHUFFLE and not model.training
    with pytest.raises(SignatureError, match=f"refusing {SHUFFLE} from bundle .*which is not a trusted key"):
        load_weights(path, SHUFFLE, registry=[ZOO_REGISTRY], trusted_keys=[(keys / "other.pub").read_bytes()])
    with pytest.raises(SignatureError, match="is not signed"):
        load_weights(bundles["small"], SHUFFLE, registry=[ZOO_REGISTRY], trusted_keys=[keys / "p256.pub"])
    with pytest.raises(SignatureError, match="require_signed=True, but nothing is trusted"):
        load_weights(path, SHUFFLE, registry=[ZOO_REGISTRY], require_signed=True)

    # installed: the configured policy applies by default, require_signed=False opts out
    home = tmp_path / "home"
    B.install(bundles["one"], torch_home=home)  # unsigned, installed before any policy existed
    monkeypatch.setenv("TVPACK_TRUSTED_KEYS", str(keys / "p256.pub"))
    with pytest.raises(SignatureError, match=f"refusing {SHUFFLE} from cache .*is not signed"):
        load_weights(home, SHUFFLE, registry=[ZOO_REGISTRY])
    assert load_weights(home, SHUFFLE, registry=[ZOO_REGISTRY], require_signed=False).name == SHUFFLE
    signing.install_signed(path, signing.configured_policy(home), torch_home=home)  # same file, now signed
    weights = load_weights(home, SHUFFLE, registry=[ZOO_REGISTRY])
    assert weights.get_state_dict()  # covered: the signed manifest lists this file with this sha256
    # the signature on disk is what counts: damaged, the same load is refused
    for sig in (home / "hub/tvpack/signatures").iterdir():
        sig.write_bytes(b"{}")
    with pytest.raises(SignatureError, match="refusing"):
        load_weights(home, SHUFFLE, registry=[ZOO_REGISTRY])


def _signed_home(bundles, keys, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A TORCH_HOME with a signed bundle installed under a configured policy; (home, the shufflenet checkpoint)."""
    home = tmp_path / "home"
    signing.install_signed(signed(bundles, tmp_path, keys / "p256.key"), signing.trust_policy([keys / "p256.pub"]),
                           torch_home=home)
    monkeypatch.setenv("TVPACK_TRUSTED_KEYS", str(keys / "p256.pub"))
    with B.open_bundle(bundles["small"]) as opened:
        filename = next(e.filename for e in opened.entries if e.name == SHUFFLE)
    return home, home / "hub/checkpoints" / filename


@pytest.mark.parametrize("indexed", [False, True], ids=["hashed-now", "from-the-index"])
def test_the_loaded_bytes_are_the_verified_bytes_when_the_file_is_swapped(bundles, keys, tmp_path, monkeypatch,
                                                                         indexed):
    """A file renamed over the checkpoint after it was hashed (or matched to the index) and before it is loaded is
    not what loads: the loader loads the descriptor it hashed, never the path again."""
    import torch

    from packager import cache, loader

    home, ckpt = _signed_home(bundles, keys, tmp_path, monkeypatch)
    genuine = torch.load(ckpt, weights_only=True)
    evil = tmp_path / "evil.pth"
    torch.save({k: torch.full_like(v, 7) if v.is_floating_point() else v for k, v in genuine.items()}, evil)
    if indexed:
        cache.file_sha256(ckpt)  # the index now vouches for this inode: no hashing on the load
    real = loader._torch_load

    def swapped_then_loaded(f, *args, **kwargs):  # between the hash and the load: rename a file over it
        os.replace(evil, ckpt)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(loader, "_torch_load", swapped_then_loaded)
    model, _ = loader.load_model(home, SHUFFLE, registry=[ZOO_REGISTRY], require_signed=True)
    assert not evil.exists()  # the swap happened
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in genuine.items()), "loaded other bytes than the signed ones"


def test_a_checkpoint_written_to_while_it_is_loaded_is_refused(bundles, keys, tmp_path, monkeypatch):
    from packager import loader
    from packager.errors import IntegrityError

    home, ckpt = _signed_home(bundles, keys, tmp_path, monkeypatch)
    real = loader._torch_load

    def edited_then_loaded(f, *args, **kwargs):  # between the hash and the load: edit the same inode in place
        with open(ckpt, "r+b") as out:
            out.seek(ckpt.stat().st_size - 1)
            out.write(b"\0")
        return real(f, *args, **kwargs)

    monkeypatch.setattr(loader, "_torch_load", edited_then_loaded)
    with pytest.raises(IntegrityError, match="a file written to while it was loaded"):
        loader.load_weights(home, SHUFFLE, registry=[ZOO_REGISTRY], require_signed=True).get_state_dict()


def test_predict_checks_signatures_as_the_loader_does(bundles, keys, tmp_path, cli, monkeypatch):
    import torch
    import torchvision

    image = tmp_path / "img.png"
    torchvision.io.write_png(torch.zeros((3, 40, 40), dtype=torch.uint8), str(image))
    path = signed(bundles, tmp_path, keys / "p256.key")
    predict = ("predict", "--topk", "1", "--registry", ZOO_REGISTRY)
    ok = cli(*predict, path, SHUFFLE, image, "--key", keys / "p256.pub", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)[0]["weights"] == SHUFFLE
    line = one_error_line(cli(*predict, path, SHUFFLE, image, "--key", keys / "other.pub"))
    assert f"refusing {SHUFFLE}" in line and "not a trusted key" in line
    line = one_error_line(cli(*predict, bundles["small"], SHUFFLE, image, "--key", keys / "p256.pub"))
    assert "is not signed" in line
    # a configured policy applies with no option at all
    monkeypatch.setenv("TVPACK_TRUSTED_KEYS", str(keys / "p256.pub"))
    assert "is not signed" in one_error_line(cli(*predict, bundles["small"], SHUFFLE, image))
    assert cli(*predict, path, SHUFFLE, image).exit_code == 0
    # for a bundle file, --torch-home names the TORCH_HOME whose <hub>/tvpack/trusted/ applies
    monkeypatch.delenv("TVPACK_TRUSTED_KEYS")
    site = tmp_path / "site"
    (site / "hub" / "tvpack" / "trusted").mkdir(parents=True)
    shutil.copy(keys / "other.pub", site / "hub" / "tvpack" / "trusted" / "other.pub")
    assert cli(*predict, bundles["small"], SHUFFLE, image).exit_code == 0  # the default TORCH_HOME trusts nothing
    assert "is not signed" in one_error_line(cli(*predict, bundles["small"], SHUFFLE, image, "--torch-home", site))
    line = one_error_line(cli(*predict, path, SHUFFLE, image, "--torch-home", site))
    assert f"refusing {SHUFFLE}" in line and "not a trusted key" in line


def test_mirror_from_bundle_checks_signatures_before_publishing(bundles, keys, tmp_path, cli, monkeypatch):
    path = signed(bundles, tmp_path, keys / "p256.key")
    dest = tmp_path / "mirror"
    line = one_error_line(cli("mirror", "--from-bundle", path, "--to", dest, "--key", keys / "other.pub"))
    assert "refusing signature" in line and "not a trusted key" in line
    assert "is not signed" in one_error_line(cli("mirror", "--from-bundle", bundles["small"], "--to", dest,
                                                 "--key", keys / "p256.pub"))
    monkeypatch.setenv("TVPACK_TRUSTED_KEYS", str(keys / "p256.pub"))
    assert "is not signed" in one_error_line(cli("mirror", "--from-bundle", bundles["small"], "--to", dest))
    assert tree(dest) == []  # nothing published by a refusal
    ok = cli("mirror", "--from-bundle", path, "--to", dest, "--json")
    assert ok.exit_code == 0, ok.output
    assert {r["status"] for r in json.loads(ok.stdout)["results"]} == {"exported"}
    # the options belong to bundles: from the cache they are a usage error
    assert cli("mirror", "resnet50", "--to", dest, "--key", keys / "p256.pub").exit_code == 2
