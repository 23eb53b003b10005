"""packager.formats.signature: OMS signatures over known digests, checked by us and by the OMS tool itself."""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from packager.errors import SignatureError
from packager.formats import signature as sigfmt
from packager.formats.signature import Resource, Trust
from tests.conftest import ROOT, _missing, need_binary

MANIFEST_ID = "0123456789abcdef"
FILES = {
    "hub/checkpoints/resnet50-11ad3fa6.pth": 3000,
    "hub/checkpoints/vit_b_16-c867db91.pth": 2000,
    f"hub/tvpack/manifests/{MANIFEST_ID}.json": 300,
}
MODEL_SIGNING = Path(sys.executable).with_name("model_signing")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([need_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, bytes]:
    """Keys as users make them with openssl, plus a CA: root -> intermediate -> leaf (code signing), an expired
    leaf and a second, untrusted root with its own leaf."""
    d = tmp_path_factory.mktemp("pki")
    for name, curve in [("p256", "prime256v1"), ("p384", "secp384r1"), ("other", "prime256v1"), ("root", "prime256v1"),
                        ("inter", "secp384r1"), ("leaf", "prime256v1"), ("evil_root", "prime256v1"),
                        ("evil_leaf", "prime256v1")]:
        openssl("ecparam", "-genkey", "-name", curve, "-noout", "-out", f"{name}.key", cwd=d)
        openssl("ec", "-in", f"{name}.key", "-pubout", "-out", f"{name}.pub", cwd=d)
    openssl("pkcs8", "-topk8", "-in", "p256.key", "-out", "p256.enc", "-passout", "pass:s3cret", "-v2", "aes-256-cbc",
            cwd=d)
    (d / "ca.ext").write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
                              "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    (d / "leaf.ext").write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                "extendedKeyUsage=codeSigning\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    (d / "ca_leaf.ext").write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature,keyCertSign\n"
                                   "extendedKeyUsage=codeSigning\nsubjectKeyIdentifier=hash\n"
                                   "authorityKeyIdentifier=keyid\n")
    (d / "tls.ext").write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                               "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    for root in ("root", "evil_root"):
        openssl("req", "-x509", "-new", "-key", f"{root}.key", "-subj", f"/CN={root} CA", "-days", "30", "-out",
                f"{root}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)

    def issue(name, subj, ca, ext):
        openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-days", "10",
                "-extfile", ext, "-out", f"{name}.pem", cwd=d)

    issue("inter", "/CN=Test Intermediate", "root", "ca.ext")
    issue("leaf", "/O=ACME/CN=Model Release Signer", "inter", "leaf.ext")
    issue("evil_leaf", "/CN=Model Release Signer", "evil_root", "leaf.ext")
    shutil.copy(d / "leaf.key", d / "tls.key")
    issue("tls", "/CN=www.example.com", "inter", "tls.ext")
    shutil.copy(d / "leaf.key", d / "ca_leaf.key")
    issue("ca_leaf", "/CN=Signer Who Is A CA", "inter", "ca_leaf.ext")  # code signing usages, but CA:TRUE
    for name, data in _backdated_chain(d).items():
        (d / name).write_bytes(data)
    out = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    out["dir"] = str(d).encode()
    return out


def _backdated_chain(d: Path) -> dict[str, bytes]:
    """A root and intermediate valid since 30 days ago and a code-signing leaf (for leaf.key) valid from 20 days
    until 1 day ago: everything is right except that the leaf has expired. openssl 3.0's x509 cannot back-date,
    so cryptography builds them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def cert(cn, key, issuer, issuer_key, start, end, ca):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                            critical=True)
        else:
            builder = builder.add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    leaf_key = serialization.load_pem_private_key((d / "leaf.key").read_bytes(), None)
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Old Root")])
    root = cert("Old Root", root_key, root_name, root_key, now - 30 * day, now + 30 * day, True)
    inter = cert("Old Intermediate", inter_key, root.subject, root_key, now - 30 * day, now + 30 * day, True)
    leaf = cert("Old Signer", leaf_key, inter.subject, inter_key, now - 20 * day, now - day, False)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    return {"old_root.pem": pem(root), "old_chain.pem": pem(leaf) + pem(inter)}


def write_bundle_dir(root: Path, seed: int = 0) -> list[Resource]:
    """Files at their archive paths, as ``tar -xf BUNDLE`` leaves them; returns their resources."""
    import random

    rng = random.Random(seed)
    resources = []
    for path, size in FILES.items():
        data = rng.randbytes(size)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        resources.append(Resource(path, hashlib.sha256(data).hexdigest(), size))
    return resources


def oms_verify(root: Path, sig: Path, *args: str) -> subprocess.CompletedProcess:
    if not MODEL_SIGNING.exists():
        _missing("model_signing CLI (PyPI model-signing)")
    return subprocess.run([str(MODEL_SIGNING), "verify", *args[:1], str(root), "--signature", str(sig), *args[1:]],
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------- the acid test: OMS CLI

@pytest.mark.parametrize("curve", ["p256", "p384"])
def test_oms_cli_verifies_our_key_signature_and_refuses_a_changed_file(tmp_path, pki, curve):
    resources = write_bundle_dir(tmp_path)
    sig_path = tmp_path / sigfmt.signature_path(MANIFEST_ID)
    sig_path.parent.mkdir(parents=True)
    sig_path.write_bytes(sigfmt.sign(resources, key_pem=pki[f"{curve}.key"]))
    pub = Path(pki["dir"].decode()) / f"{curve}.pub"

    ok = oms_verify(tmp_path, sig_path, "key", "--public_key", str(pub))
    assert ok.returncode == 0, ok.stderr
    assert "Verification succeeded" in ok.stdout

    wrong = oms_verify(tmp_path, sig_path, "key", "--public_key", str(Path(pki["dir"].decode()) / "other.pub"))
    assert wrong.returncode == 1

    with open(tmp_path / "hub/checkpoints/vit_b_16-c867db91.pth", "r+b") as f:
        f.write(b"\xff")
    bad = oms_verify(tmp_path, sig_path, "key", "--public_key", str(pub))
    assert bad.returncode == 1
    assert "vit_b_16-c867db91.pth" in bad.stderr


def test_oms_cli_ignores_other_signatures_only_because_the_statement_says_so(tmp_path, pki):
    """Finding: OMS skips the --signature file itself and the statement's ignore_paths, nothing else. A bundle with
    two signatures passes the plain command because we sign ignore_paths=[hub/tvpack/signatures]; the same
    statement without ignore_paths fails on the second .sig as an extra file; a stray non-signature file fails."""
    src, out = tmp_path / "src", tmp_path / "out"
    resources = write_bundle_dir(src)
    pub = str(Path(pki["dir"].decode()) / "p256.pub")
    (src / sigfmt.SIGNATURES_DIR).mkdir()
    (src / sigfmt.signature_path(MANIFEST_ID)).write_bytes(sigfmt.sign(resources, key_pem=pki["p256.key"]))
    (src / sigfmt.signature_path(MANIFEST_ID, "p384")).write_bytes(sigfmt.sign(resources, key_pem=pki["p384.key"]))
    # Through a real tar, as a security team would: the bundle holds the signed files and two signatures.
    tar = need_binary("tar")
    subprocess.run([tar, "-cf", str(tmp_path / "b.tar"), "-C", str(src), "hub"], check=True)
    out.mkdir()
    subprocess.run([tar, "-xf", str(tmp_path / "b.tar"), "-C", str(out)], check=True)
    first = out / sigfmt.signature_path(MANIFEST_ID)
    assert oms_verify(out, first, "key", "--public_key", pub).returncode == 0
    assert oms_verify(out, out / sigfmt.signature_path(MANIFEST_ID, "p384"), "key", "--public_key",
                      pub.replace("p256", "p384")).returncode == 0

    # The same statement without ignore_paths, signed by hand the way sign() does it.
    from cryptography.hazmat.primitives import serialization

    stmt = sigfmt.statement(resources)
    del stmt["predicate"]["serialization"]["ignore_paths"]
    key = serialization.load_pem_private_key(pki["p256.key"], None)
    bundle = json.loads(sigfmt.sign(resources, key_pem=pki["p256.key"]))
    payload = json.dumps(stmt).encode()
    raw = key.sign(sigfmt._pae(payload), sigfmt._ecdsa(key.public_key()))
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(raw).decode()
    first.write_text(json.dumps(bundle))
    assert sigfmt.verify(first.read_bytes(), Trust.from_pem(pki["p256.pub"])).resources == stmt_resources(stmt)
    plain = oms_verify(out, first, "key", "--public_key", pub)
    assert plain.returncode == 1 and "Extra files" in plain.stderr and ".p384.sig" in plain.stderr

    # Ours again, plus a stray file outside the signatures folder: OMS refuses it (it demands the exact set).
    first.write_bytes(sigfmt.sign(resources, key_pem=pki["p256.key"]))
    (out / "hub/checkpoints/extra.pth").write_bytes(b"x")
    stray = oms_verify(out, first, "key", "--public_key", pub)
    assert stray.returncode == 1 and "extra.pth" in stray.stderr


def stmt_resources(stmt: dict) -> dict[str, str]:
    return {r["name"]: r["digest"] for r in stmt["predicate"]["resources"]}


def test_oms_cli_verifies_our_certificate_signature(tmp_path, pki):
    resources = write_bundle_dir(tmp_path)
    sig_path = tmp_path / sigfmt.signature_path(MANIFEST_ID)
    sig_path.parent.mkdir(parents=True)
    sig_path.write_bytes(sigfmt.sign(resources, key_pem=pki["leaf.key"], cert_chain_pem=pki["leaf.pem"] + pki["inter.pem"]))
    d = Path(pki["dir"].decode())
    assert oms_verify(tmp_path, sig_path, "certificate", "--certificate_chain", str(d / "root.pem")).returncode == 0
    untrusted = oms_verify(tmp_path, sig_path, "certificate", "--certificate_chain", str(d / "evil_root.pem"))
    assert untrusted.returncode == 1


def test_oms_cli_accepts_an_expired_leaf_where_we_refuse(tmp_path, pki):
    """Documents model_signing 1.1.1: it checks the chain at the leaf's notBefore, so a leaf that expired
    yesterday still verifies. Ours checks at the time of verification."""
    resources = write_bundle_dir(tmp_path)
    sig_path = tmp_path / sigfmt.signature_path(MANIFEST_ID)
    sig_path.parent.mkdir(parents=True)
    sig_path.write_bytes(sigfmt.sign(resources, key_pem=pki["leaf.key"], cert_chain_pem=pki["old_chain.pem"]))
    root = Path(pki["dir"].decode()) / "old_root.pem"
    assert oms_verify(tmp_path, sig_path, "certificate", "--certificate_chain", str(root)).returncode == 0
    with pytest.raises(SignatureError, match="CN=Old Signer expired on"):
        sigfmt.verify(sig_path.read_bytes(), Trust.from_pem(pki["old_root.pem"]))
    yesterday = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
    assert sigfmt.verify(sig_path.read_bytes(), Trust.from_pem(pki["old_root.pem"]), now=yesterday).signer.subject


def test_we_verify_signatures_made_by_the_oms_tool(tmp_path, pki):
    """The other direction: `model_signing sign key|certificate` output verifies with our code and covers our files."""
    if not MODEL_SIGNING.exists():
        _missing("model_signing CLI (PyPI model-signing)")
    resources = write_bundle_dir(tmp_path / "m")
    d = Path(pki["dir"].decode())
    for method, args, trust in [
        ("key", ["--private_key", str(d / "p384.key")], Trust.from_pem(pki["p384.pub"])),
        ("certificate", ["--private_key", str(d / "leaf.key"), "--signing_certificate", str(d / "leaf.pem"),
                         "--certificate_chain", str(d / "inter.pem")], Trust.from_pem(pki["root.pem"])),
    ]:
        sig = tmp_path / f"{method}.sig"
        subprocess.run([str(MODEL_SIGNING), "sign", method, str(tmp_path / "m"), "--signature", str(sig), *args],
                       check=True, capture_output=True, timeout=60)
        verified = sigfmt.verify(sig.read_bytes(), trust)
        assert verified.method == method
        sigfmt.check_covers(verified, resources)


# ------------------------------------------------------------------------------------------- our verify

def test_key_signature_round_trip_names_signer_algorithm_and_files(pki):
    resources = write_bundle_dir_in_memory()
    for curve, algorithm in [("p256", "ecdsa-p256-sha256"), ("p384", "ecdsa-p384-sha384")]:
        sig = sigfmt.sign(resources, key_pem=pki[f"{curve}.key"], name=MANIFEST_ID)
        verified = sigfmt.verify(sig, Trust.from_pem(pki["other.pub"], pki[f"{curve}.pub"]))
        assert verified.algorithm == algorithm and verified.method == "key" and verified.name == MANIFEST_ID
        # The fingerprint is `sha256sum key.pub` of openssl's output.
        assert verified.signer.fingerprint == "SHA256:" + hashlib.sha256(pki[f"{curve}.pub"]).hexdigest()
        assert verified.resources == {r.path: r.sha256 for r in resources}
        sigfmt.check_covers(verified, resources)
        info = sigfmt.describe(sig)
        assert info.signer == verified.signer and info.resources == verified.resources and info.method == "key"
        assert info.algorithm == algorithm  # read from the signature's size, no key needed


def write_bundle_dir_in_memory() -> list[Resource]:
    return [Resource(p, hashlib.sha256(p.encode()).hexdigest(), n) for p, n in FILES.items()]


def test_statement_is_deterministic_and_sorted_like_oms():
    a = sigfmt.statement(write_bundle_dir_in_memory())
    b = sigfmt.statement(reversed(write_bundle_dir_in_memory()))
    assert a == b
    names = [r["name"] for r in a["predicate"]["resources"]]
    assert names == sorted(FILES)
    assert a["predicate"]["serialization"] == {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                                               "ignore_paths": ["hub/tvpack/signatures"]}


def test_encrypted_key_needs_its_password(pki):
    resources = write_bundle_dir_in_memory()
    sig = sigfmt.sign(resources, key_pem=pki["p256.enc"], password=b"s3cret")
    assert sigfmt.verify(sigfmt.sign(resources, key_pem=pki["p256.enc"], password="s3cret"), Trust.from_pem(pki["p256.pub"]))
    assert sigfmt.verify(sig, Trust.from_pem(pki["p256.pub"])).signer.fingerprint.startswith("SHA256:")
    with pytest.raises(SignatureError, match="encrypted: a password is needed"):
        sigfmt.sign(resources, key_pem=pki["p256.enc"])
    with pytest.raises(SignatureError, match="wrong password"):
        sigfmt.sign(resources, key_pem=pki["p256.enc"], password=b"nope")
    with pytest.raises(SignatureError, match="not a PEM private key$"):
        sigfmt.sign(resources, key_pem=b"garbage")


def test_certificate_signature_verifies_against_the_root_and_names_the_subject(pki):
    resources = write_bundle_dir_in_memory()
    sig = sigfmt.sign(resources, key_pem=pki["leaf.key"], cert_chain_pem=pki["leaf.pem"] + pki["inter.pem"])
    verified = sigfmt.verify(sig, Trust.from_pem(pki["root.pem"]))
    assert verified.method == "certificate" and verified.algorithm == "ecdsa-p256-sha256"
    assert verified.signer.subject == "CN=Model Release Signer,O=ACME"
    assert verified.chain == ("CN=Model Release Signer,O=ACME", "CN=Test Intermediate", "CN=root CA")
    assert "Model Release Signer" in str(verified.signer)
    assert sigfmt.describe(sig).signer == verified.signer


@pytest.mark.parametrize("case, message", [
    ("wrong key", "not a trusted key"),
    ("key sig, only roots", "only CA roots are trusted"),
    ("untrusted root", "does not chain to a trusted CA root"),
    ("expired leaf", "certificate CN=Old Signer expired on"),
    ("leaf after now", "expired on"),
    ("cert sig, only keys", "no CA root is trusted"),
    ("tls leaf", "may not sign code"),
    ("CA as leaf", r"certificate CN=Signer Who Is A CA is a CA certificate \(basicConstraints CA:TRUE\)"),
    ("chain not of key", "not the signing key's certificate"),
    ("empty trust", "no trusted keys or CA roots"),
])
def test_refusals_are_one_line(pki, case, message):
    resources = write_bundle_dir_in_memory()
    chain = pki["leaf.pem"] + pki["inter.pem"]
    with pytest.raises(SignatureError, match=message) as err:
        if case == "wrong key":
            sigfmt.verify(sigfmt.sign(resources, key_pem=pki["p256.key"]), Trust.from_pem(pki["other.pub"]))
        elif case == "key sig, only roots":
            sigfmt.verify(sigfmt.sign(resources, key_pem=pki["p256.key"]), Trust.from_pem(pki["root.pem"]))
        elif case == "untrusted root":
            sig = sigfmt.sign(resources, key_pem=pki["evil_leaf.key"], cert_chain_pem=pki["evil_leaf.pem"])
            sigfmt.verify(sig, Trust.from_pem(pki["root.pem"]))
        elif case == "expired leaf":
            sig = sigfmt.sign(resources, key_pem=pki["leaf.key"], cert_chain_pem=pki["old_chain.pem"])
            sigfmt.verify(sig, Trust.from_pem(pki["old_root.pem"]))
        elif case == "leaf after now":
            far = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=365)
            sigfmt.verify(sigfmt.sign(resources, key_pem=pki["leaf.key"], cert_chain_pem=chain),
                          Trust.from_pem(pki["root.pem"]), now=far)
        elif case == "cert sig, only keys":
            sig = sigfmt.sign(resources, key_pem=pki["leaf.key"], cert_chain_pem=chain)
            sigfmt.verify(sig, Trust.from_pem(pki["leaf.pub"]))
        elif case == "tls leaf":
            sig = sigfmt.sign(resources, key_pem=pki["tls.key"], cert_chain_pem=pki["tls.pem"] + pki["inter.pem"])
            sigfmt.verify(sig, Trust.from_pem(pki["root.pem"]))
        elif case == "CA as leaf":
            sig = sigfmt.sign(resources, key_pem=pki["ca_leaf.key"], cert_chain_pem=pki["ca_leaf.pem"] + pki["inter.pem"])
            sigfmt.verify(sig, Trust.from_pem(pki["root.pem"]))
        elif case == "chain not of key":
            sigfmt.sign(resources, key_pem=pki["p256.key"], cert_chain_pem=chain)
        elif case == "empty trust":
            sigfmt.verify(sigfmt.sign(resources, key_pem=pki["p256.key"]), Trust())
    assert "\n" not in str(err.value)


def _tamper(sig: bytes, edit) -> bytes:
    bundle = json.loads(sig)
    edit(bundle)
    return json.dumps(bundle).encode()


def _swap_payload(bundle, edit):
    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    edit(stmt)
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()


def test_damaged_or_foreign_signature_files_are_refused(pki):
    resources = write_bundle_dir_in_memory()
    sig = sigfmt.sign(resources, key_pem=pki["p256.key"])
    trust = Trust.from_pem(pki["p256.pub"])
    other_digest = hashlib.sha256(b"backdoor").hexdigest()

    def new_digest(stmt):
        stmt["predicate"]["resources"][0]["digest"] = other_digest
        stmt["subject"][0]["digest"]["sha256"] = hashlib.sha256(b"".join(
            bytes.fromhex(r["digest"]) for r in stmt["predicate"]["resources"])).hexdigest()

    cases = {
        "truncated": (sig[: len(sig) // 2], "not JSON"),
        "garbage": (os.urandom(200), "not JSON"),
        "empty": (b"", "not JSON"),
        "other JSON": (b'{"hello": 1}', "no DSSE envelope"),
        "other media type": (_tamper(sig, lambda b: b.update(mediaType="application/x")), "media type"),
        "other predicate": (_tamper(sig, lambda b: _swap_payload(b, lambda s: s.update(predicateType="x"))),
                            "predicate type"),
        "consistent rewrite": (_tamper(sig, lambda b: _swap_payload(b, new_digest)), "bad signature"),
        "inconsistent subject": (_tamper(sig, lambda b: _swap_payload(
            b, lambda s: s["predicate"]["resources"][0].update(digest=other_digest))), "subject digest"),
        "sig flipped": (_tamper(sig, lambda b: b["dsseEnvelope"]["signatures"][0].update(
            sig=base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode())), "bad signature"),
        "bad base64": (_tamper(sig, lambda b: b["dsseEnvelope"].update(payload="!!!")), "bad base64"),
        "no material": (_tamper(sig, lambda b: b.update(verificationMaterial={})), "no public key or certificate"),
        "traversal": (_tamper(sig, lambda b: _swap_payload(
            b, lambda s: s["predicate"]["resources"][0].update(name="../etc/passwd"))), "not a safe relative"),
    }
    for case, (data, message) in cases.items():
        with pytest.raises(SignatureError, match=message) as err:
            sigfmt.verify(data, trust)
        assert "\n" not in str(err.value), case


def test_check_covers_names_the_file(pki):
    resources = write_bundle_dir_in_memory()
    verified = sigfmt.verify(sigfmt.sign(resources, key_pem=pki["p256.key"]), Trust.from_pem(pki["p256.pub"]))
    sigfmt.check_covers(verified, resources)
    with pytest.raises(SignatureError, match="vit_b_16-c867db91.pth: signed, but the bundle does not have it"):
        sigfmt.check_covers(verified, [r for r in resources if "vit" not in r.path])
    with pytest.raises(SignatureError, match="extra.pth: in the bundle, but the signature does not cover it"):
        sigfmt.check_covers(verified, [*resources, Resource("hub/checkpoints/extra.pth", "0" * 64, 1)])
    swapped = [Resource(r.path, "f" * 64, r.size) if "resnet" in r.path else r for r in resources]
    with pytest.raises(SignatureError, match="resnet50-11ad3fa6.pth: sha256 ffffffffffff... differs"):
        sigfmt.check_covers(verified, swapped)


def test_paths_and_inputs():
    assert sigfmt.signature_path(MANIFEST_ID) == f"hub/tvpack/signatures/{MANIFEST_ID}.sig"
    assert sigfmt.manifest_id_of_signature(sigfmt.signature_path(MANIFEST_ID, "a1b2c3")) == MANIFEST_ID
    assert sigfmt.manifest_id_of_signature("hub/checkpoints/x.sig") is None
    with pytest.raises(ValueError):
        sigfmt.signature_path("../x")
    with pytest.raises(SignatureError, match="not a sha256"):
        sigfmt.statement([Resource("a", "xyz", 1)])
    with pytest.raises(SignatureError, match="cannot sign another signature"):
        sigfmt.statement([Resource(sigfmt.signature_path(MANIFEST_ID), "0" * 64, 1)])
    with pytest.raises(SignatureError, match="not a PEM public key or CA certificate"):
        Trust.from_pem(b"hello")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for load in (Trust.from_pem, sigfmt.load_public_key):
        with pytest.raises(SignatureError, match=r"this is a private key: give its public half \(openssl pkey"):
            load(private)


# ------------------------------------------------------------------------------------------- offline, import

VERIFY_SCRIPT = """
import sys
from packager.formats import signature as s
trust = s.Trust.from_pem(open(sys.argv[2], 'rb').read())
print(s.verify(open(sys.argv[1], 'rb').read(), trust).signer)
print('torch' in sys.modules, 'model_signing' in sys.modules)
"""


def test_verify_works_without_any_network(tmp_path, pki):
    unshare = need_binary("unshare")
    if os.geteuid() != 0:
        pytest.skip("unshare -n needs root")
    sig = tmp_path / "x.sig"
    sig.write_bytes(sigfmt.sign(write_bundle_dir_in_memory(), key_pem=pki["leaf.key"],
                                cert_chain_pem=pki["leaf.pem"] + pki["inter.pem"]))
    proc = subprocess.run([unshare, "-n", sys.executable, "-c", VERIFY_SCRIPT, str(sig),
                           str(Path(pki["dir"].decode()) / "root.pem")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "Model Release Signer" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "False False"  # neither torch nor model_signing imported
