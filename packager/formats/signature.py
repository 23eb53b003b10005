"""Bundle signatures in the OpenSSF model signing (OMS) format: encode, decode, verify. Pure over bytes.

A signature file (``hub/tvpack/signatures/<manifest-id>.sig``) is a Sigstore bundle (JSON, media type
``application/vnd.dev.sigstore.bundle.v0.3+json``) holding a DSSE envelope over an in-toto statement with predicate
``https://model_signing/signature/v1.0``. The statement lists every signed file by archive path with its sha256,
and a subject digest = sha256 over those digests in listed order. This is byte-for-byte the shape the reference
implementation (PyPI ``model-signing`` 1.1.1) writes for its ``key`` and ``certificate`` methods, so its CLI
verifies our bundles after ``tar -xf`` (tests/test_signature.py runs exactly that).

Why this module writes the format with ``cryptography`` instead of calling ``model_signing`` at run time:
- its public API only signs a directory it hashes itself (a second read of tens of GB); building a statement from
  known digests needs its private modules (``model_signing._signing.signing.Payload``, ``manifest._FileSerialization``);
- its signers and verifiers take key *paths*, and its key password path is broken (typed ``str``, handed to
  ``cryptography`` which needs bytes: ``TypeError``);
- its certificate verifier checks the chain at the leaf's notBefore, so an expired leaf verifies (tested); with no
  root given it silently trusts the web PKI (certifi). We check the chain at ``now`` against the given roots only;
- it reads only the first DSSE signature and fails with assorted ValueError/KeyError/OpenSSL errors;
- importing it costs ~0.3 s and pulls sigstore, protobuf, in-toto and pyOpenSSL onto the air-gapped side;
  this module needs only ``cryptography`` (~30 ms import).
``model_signing`` stays the independent judge in the tests, in both directions.

What ``model_signing verify`` does with files that are not in the statement (found by reading 1.1.1 and tested):
- it hashes every regular file under the directory and demands the set equal the signed set ("Extra files found");
- it always skips the file named by ``--signature`` and, by default, ``.git/ .gitattributes .github/ .gitignore``;
- it also skips the statement's own ``predicate.serialization.ignore_paths`` (relative to the directory). So we sign
  with ``ignore_paths = ["hub/tvpack/signatures"]``: the plain ``model_signing verify key DIR --signature SIG
  --public_key PUB`` then succeeds on ``tar -xf BUNDLE`` even when the bundle carries several signatures, with no
  ``--ignore_paths``. Without it, a second ``.sig`` in that folder fails as an extra file.
- Consequence: OMS does not check what sits in ``hub/tvpack/signatures/``; tvpack's own check (``check_covers``
  against the bundle's member list) must: the bundle reader should allow only ``*.sig`` members there.

**Channel limits.** A trusted key or CA root file may begin, before its first ``-----BEGIN``, with a line
``tvpack-channels: prod, staging``: that key (or every signer chaining to that root) may then sign releases of
those channels only (:mod:`packager.channels` refuses the others). PEM readers (OpenSSL, ``cryptography``) skip
text before the block, so the file stays an ordinary PEM file. Without the line, a key may sign any channel.

Signers are named by ``fingerprint``: ``SHA256:<hex>`` where hex = sha256 of the public key's PEM
(SubjectPublicKeyInfo) -- which is ``sha256sum key.pub`` of an ``openssl ec -pubout`` file and the
``publicKey.hint`` OMS writes into key signatures, so ``describe`` can name the key without having it.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from packager.errors import SignatureError

SIGNATURES_DIR = "hub/tvpack/signatures"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# Files OMS verification must not count as model files: every signature the bundle carries.
IGNORE_PATHS = (SIGNATURES_DIR,)
# Limits for readers: a certificate signature is a few KB, and a bundle needs only a handful.
MAX_SIGNATURE = 1 << 20
MAX_SIGNATURES = 64

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_ID = re.compile(r"[0-9a-f]{16}")
_SIG_NAME = re.compile(r"(?P<id>[0-9a-f]{16})(?:\.(?P<label>[0-9A-Za-z_-]{1,64}))?\.sig")
# Curve -> (hash the signature uses, our algorithm name); the hash follows the key size as OMS does.
_CURVES = {"secp256r1": ("SHA256", "ecdsa-p256-sha256"), "secp384r1": ("SHA384", "ecdsa-p384-sha384"),
           "secp521r1": ("SHA512", "ecdsa-p521-sha512")}


# ---------------------------------------------------------------------------------------------------- values

@dataclass(frozen=True)
class Resource:
    """One signed file: its archive path, sha256 (hex) and size. The OMS statement records path and sha256 only."""

    path: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class Signer:
    """Who signed: the public key's fingerprint, and for certificate signatures the leaf's subject."""

    fingerprint: str
    subject: str | None = None

    def __str__(self) -> str:
        return f"{self.subject} (key {self.fingerprint})" if self.subject else f"key {self.fingerprint}"


@dataclass(frozen=True)
class Info:
    """What a signature claims, read without any key (for ``inspect``). Nothing here is trusted."""

    method: str  # "key" or "certificate"
    signer: Signer | None  # None for a key signature without OMS's key hint
    algorithm: str | None  # from the certificate, or for a bare key the signature's size; None if unknown
    name: str
    resources: Mapping[str, str]  # archive path -> sha256


@dataclass(frozen=True)
class Verified:
    """A signature checked against trusted keys or CA roots: who signed what."""

    method: str
    signer: Signer
    algorithm: str
    name: str
    resources: Mapping[str, str]
    chain: tuple[str, ...] = ()  # certificate subjects, leaf first, root last (certificate method)
    channels: frozenset[str] | None = None  # the release channels the trusted key or root may sign; None: any


@dataclass(frozen=True)
class PublicKey:
    """A trusted EC public key."""

    key: Any = field(repr=False, compare=False)  # cryptography EllipticCurvePublicKey
    fingerprint: str
    algorithm: str
    channels: frozenset[str] | None = None  # from a "tvpack-channels:" line; None: any channel


@dataclass(frozen=True)
class CARoot:
    """A trusted CA root certificate."""

    certificate: Any = field(repr=False, compare=False)  # cryptography x509.Certificate
    subject: str
    fingerprint: str  # SHA256 of the DER certificate, hex
    channels: frozenset[str] | None = None  # from a "tvpack-channels:" line; None: any channel


@dataclass(frozen=True)
class Trust:
    """What the verifying side believes: public keys (``key`` method) and CA roots (``certificate`` method)."""

    keys: tuple[PublicKey, ...] = ()
    ca_roots: tuple[CARoot, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.keys or self.ca_roots)

    @classmethod
    def from_pem(cls, *pems: bytes) -> Trust:
        """Trust from PEM files of either kind: ``PUBLIC KEY`` blocks become keys, ``CERTIFICATE`` blocks CA roots
        (one file may hold several). This lets a trusted-keys folder mix keys and roots."""
        keys: list[PublicKey] = []
        roots: list[CARoot] = []
        for pem in pems:
            found = False
            if b"-----BEGIN PUBLIC KEY-----" in pem:
                keys.append(load_public_key(pem))
                found = True
            if b"-----BEGIN CERTIFICATE-----" in pem:
                roots.extend(load_ca_roots(pem))
                found = True
            if not found and b"PRIVATE KEY-----" in pem:
                load_public_key(pem)  # says what to do with a private key
            if not found:
                raise SignatureError("not a PEM public key or CA certificate (expected BEGIN PUBLIC KEY or CERTIFICATE)")
        return cls(tuple(keys), tuple(roots))


# ---------------------------------------------------------------------------------------------------- paths

def signature_path(manifest_id: str, label: str | None = None) -> str:
    """Archive path of a signature over manifest ``manifest_id``. A bundle with several signatures over one
    manifest gives the others a ``label`` (e.g. the first 12 hex digits of the signer's fingerprint)."""
    if not _MANIFEST_ID.fullmatch(manifest_id):
        raise ValueError(f"not a manifest id: {manifest_id!r}")
    name = f"{manifest_id}.{label}.sig" if label else f"{manifest_id}.sig"
    if not _SIG_NAME.fullmatch(name):
        raise ValueError(f"bad signature label: {label!r}")
    return f"{SIGNATURES_DIR}/{name}"


def manifest_id_of_signature(path: str) -> str | None:
    """The manifest id a signature archive path names, or None when ``path`` is not a signature path."""
    folder, _, name = path.rpartition("/")
    match = _SIG_NAME.fullmatch(name) if folder == SIGNATURES_DIR else None
    return match["id"] if match else None


# ---------------------------------------------------------------------------------------------------- keys

def load_public_key(pem: bytes) -> PublicKey:
    """A PEM ``PUBLIC KEY`` (as ``openssl ec -pubout`` writes it) on P-256, P-384 or P-521."""
    from cryptography.hazmat.primitives import serialization

    if b"PRIVATE KEY-----" in pem:
        raise SignatureError("this is a private key: give its public half (openssl pkey -in KEY -pubout -out KEY.pub); "
                             "the private key stays on the signing side")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM public key: {_first_line(exc)}") from None
    return PublicKey(key, _fingerprint(key), _algorithm(key, "public key"), channel_limit(pem))


_CHANNELS_LINE = re.compile(rb"^tvpack-channels:(.*)$", re.MULTILINE)
_CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def channel_limit(pem: bytes) -> frozenset[str] | None:
    """The channels a ``tvpack-channels: a, b`` line before the PEM block allows; None when there is no such line."""
    head = pem.split(b"-----BEGIN", 1)[0]
    lines = _CHANNELS_LINE.findall(head)
    if not lines:
        return None
    names = [n.strip() for line in lines for n in line.decode("utf-8", "replace").split(",") if n.strip()]
    bad = [n for n in names if not _CHANNEL_NAME.fullmatch(n)]
    if bad or not names:
        raise SignatureError(f"tvpack-channels: {bad[0] if bad else '(empty)'!r} is not a channel name")
    return frozenset(names)


def load_ca_roots(pem: bytes) -> tuple[CARoot, ...]:
    """Every certificate of a PEM file, each trusted as a CA root."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise SignatureError(f"not a PEM CA certificate: {_first_line(exc)}") from None
    limit = channel_limit(pem)
    return tuple(CARoot(c, c.subject.rfc4514_string(), c.fingerprint(hashes.SHA256()).hex(), limit) for c in certs)


def load_ca_root(pem: bytes) -> CARoot:
    """The single CA root certificate of a PEM file."""
    roots = load_ca_roots(pem)
    if len(roots) != 1:
        raise SignatureError(f"expected one CA certificate in the PEM file, found {len(roots)}")
    return roots[0]


def _load_private_key(pem: bytes, password: bytes | str | None):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(password, str):  # from a prompt or the environment
        password = password.encode()

    try:
        key = serialization.load_pem_private_key(pem, password)
    except TypeError as exc:  # cryptography says TypeError for "encrypted, no password" and the reverse
        if password is None:
            raise SignatureError("the signing key is encrypted: a password is needed") from None
        raise SignatureError(f"cannot load the signing key: {_first_line(exc)}") from None
    except ValueError:
        if password is not None and b"ENCRYPTED" in pem:
            raise SignatureError("cannot decrypt the signing key: wrong password") from None
        raise SignatureError("the signing key is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError("the signing key is not an elliptic-curve key (P-256, P-384 or P-521)")
    _algorithm(key.public_key(), "signing key")
    return key


def _algorithm(public_key, what: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in _CURVES:
        raise SignatureError(f"the {what} is not an elliptic-curve key on P-256, P-384 or P-521")
    return _CURVES[public_key.curve.name][1]


def _ecdsa(public_key, *, deterministic: bool = False):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.ECDSA(getattr(hashes, _CURVES[public_key.curve.name][0])(), deterministic_signing=deterministic)


def _sign_bytes(key, data: bytes) -> bytes:
    """ECDSA with RFC 6979 nonces where the OpenSSL under ``cryptography`` has them: the same key and statement give
    the same signature, so a signed bundle is as reproducible as an unsigned one. Verifiers cannot tell the
    difference; an older cryptography or OpenSSL signs with random nonces."""
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return key.sign(data, _ecdsa(key.public_key(), deterministic=True))
    except (UnsupportedAlgorithm, TypeError):  # TypeError: a cryptography without the keyword
        return key.sign(data, _ecdsa(key.public_key()))


def _key_hint(public_key) -> str:
    """OMS's key identifier: sha256 of the PEM SubjectPublicKeyInfo (= ``sha256sum key.pub``)."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _fingerprint(public_key) -> str:
    return f"SHA256:{_key_hint(public_key)}"


# ---------------------------------------------------------------------------------------------------- statement

def _sort_key(path: str) -> tuple[str, ...]:
    # OMS sorts resources as PurePosixPath objects (by component); doing the same keeps our bytes equal to theirs.
    return PurePosixPath(path).parts


def _check_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path or "\0" in path:
        raise SignatureError(f"not a safe relative archive path in a signature: {path!r}")


def statement(resources: Iterable[Resource], *, name: str = "tvpack-bundle") -> dict:
    """The in-toto statement OMS signs over ``resources`` (files serialization, sha256)."""
    items: dict[str, str] = {}
    for res in resources:
        _check_path(res.path)
        digest = res.sha256.lower()
        if not _HEX64.fullmatch(digest):
            raise SignatureError(f"{res.path}: not a sha256 hex digest: {res.sha256!r}")
        if res.path in items:
            raise SignatureError(f"{res.path}: listed twice")
        if res.path.startswith(SIGNATURES_DIR + "/"):
            raise SignatureError(f"{res.path}: a signature cannot sign another signature")
        items[res.path] = digest
    if not items:
        raise SignatureError("nothing to sign: no resources")
    ordered = sorted(items, key=_sort_key)
    root = hashlib.sha256(b"".join(bytes.fromhex(items[p]) for p in ordered)).hexdigest()
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": root}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "resources": [{"name": p, "digest": items[p], "algorithm": "sha256"} for p in ordered],
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": list(IGNORE_PATHS)},
        },
    }


def _pae(payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what the signature covers (type and payload, length-prefixed)."""
    return b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)


# ---------------------------------------------------------------------------------------------------- sign

def sign(resources: Iterable[Resource], *, key_pem: bytes, password: bytes | str | None = None,
         cert_chain_pem: bytes | None = None, name: str = "tvpack-bundle") -> bytes:
    """The bytes of a ``.sig`` file signing ``resources`` with an EC private key.

    With ``cert_chain_pem`` (PEM certificates: the key's leaf first, then intermediates) the signature carries the
    chain (OMS ``certificate`` method); otherwise it names the key by its hint (OMS ``key`` method).
    ``name`` is the statement's subject name: informative only, OMS uses the model directory's name.
    """
    key = _load_private_key(key_pem, password)
    payload = json.dumps(statement(resources, name=name), separators=(",", ":")).encode()
    material: dict[str, Any]
    if cert_chain_pem is None:
        material = {"publicKey": {"hint": _key_hint(key.public_key())}, "tlogEntries": []}
    else:
        chain = _load_chain(cert_chain_pem)
        if chain[0].public_key() != key.public_key():
            raise SignatureError("the first certificate of the chain is not the signing key's certificate")
        from cryptography.hazmat.primitives import serialization

        ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        material = {"x509CertificateChain": {"certificates": [{"rawBytes": _b64(d)} for d in ders]}, "tlogEntries": []}
    sig = _sign_bytes(key, _pae(payload))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material,
        "dsseEnvelope": {"payload": _b64(payload), "payloadType": PAYLOAD_TYPE,
                         "signatures": [{"sig": _b64(sig), "keyid": ""}]},
    }
    return json.dumps(bundle, separators=(",", ":")).encode()


def _load_chain(pem: bytes) -> list:
    from cryptography import x509

    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise SignatureError(f"not a PEM certificate chain: {_first_line(exc)}") from None
    return chain


# ---------------------------------------------------------------------------------------------------- read

@dataclass(frozen=True)
class _Parsed:
    method: str
    payload: bytes
    sig: bytes
    key_hint: str | None
    chain: tuple  # x509.Certificate, leaf first
    name: str
    resources: Mapping[str, str]


def _parse(sig_bytes: bytes) -> _Parsed:
    """Decode a .sig file and its statement, checking every structural rule; no cryptography yet."""
    try:
        bundle = json.loads(sig_bytes)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError("signature file is not JSON (truncated or garbage)") from None
    if not isinstance(bundle, dict) or "dsseEnvelope" not in bundle:
        raise SignatureError("not an OMS signature: no DSSE envelope in the Sigstore bundle")
    if bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise SignatureError(f"not an OMS signature: Sigstore bundle media type {bundle.get('mediaType')!r}, "
                             f"expected {BUNDLE_MEDIA_TYPE}")
    try:
        env = bundle["dsseEnvelope"]
        if env["payloadType"] != PAYLOAD_TYPE:
            raise SignatureError(f"not an OMS signature: DSSE payload type {env['payloadType']!r}")
        if len(env["signatures"]) != 1:
            raise SignatureError(f"the DSSE envelope holds {len(env['signatures'])} signatures; expected one")
        payload = _unb64(env["payload"])
        sig = _unb64(env["signatures"][0]["sig"])
        material = bundle["verificationMaterial"]
        if "x509CertificateChain" in material:
            method, key_hint = "certificate", None
            chain = _parse_chain(material["x509CertificateChain"]["certificates"])
        elif "publicKey" in material:
            method, key_hint, chain = "key", material["publicKey"].get("hint") or None, ()
        else:
            raise SignatureError("not an OMS signature: no public key or certificate chain in its verification material")
    except (KeyError, TypeError, IndexError, AttributeError):
        raise SignatureError("malformed OMS signature: its Sigstore bundle misses required fields") from None
    name, resources = _parse_statement(payload)
    return _Parsed(method, payload, sig, key_hint, chain, name, resources)


def _parse_chain(entries) -> tuple:
    from cryptography import x509

    if not entries:
        raise SignatureError("malformed OMS signature: empty certificate chain")
    try:
        return tuple(x509.load_der_x509_certificate(_unb64(e["rawBytes"])) for e in entries)
    except ValueError:
        raise SignatureError("malformed OMS signature: a certificate of its chain cannot be read") from None


def _parse_statement(payload: bytes) -> tuple[str, dict[str, str]]:
    try:
        stmt = json.loads(payload)
        if stmt["_type"] != STATEMENT_TYPE:
            raise SignatureError(f"not an OMS signature: statement type {stmt['_type']!r}")
        if stmt["predicateType"] != PREDICATE_TYPE:
            raise SignatureError(f"not an OMS signature: predicate type {stmt['predicateType']!r}, "
                                 f"expected {PREDICATE_TYPE}")
        (subject,) = stmt["subject"]
        predicate = stmt["predicate"]
        serialization = predicate["serialization"]
        if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
            raise SignatureError(f"unsupported OMS serialization {serialization.get('method')}/"
                                 f"{serialization.get('hash_type')}: tvpack signs whole files with sha256")
        resources: dict[str, str] = {}
        order = []
        for item in predicate["resources"]:
            path, digest = item["name"], item["digest"]
            _check_path(path)
            if item["algorithm"] != "sha256" or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise SignatureError(f"{path}: the signature's digest is not a sha256 hex digest")
            if path in resources:
                raise SignatureError(f"{path}: listed twice in the signature")
            resources[path] = digest
            order.append(digest)
        root = hashlib.sha256(b"".join(bytes.fromhex(d) for d in order)).hexdigest()
        if subject["digest"]["sha256"] != root:
            raise SignatureError("malformed OMS signature: subject digest does not match its resources")
        return str(subject["name"]), resources
    except (ValueError, UnicodeDecodeError):
        raise SignatureError("malformed OMS signature: its statement is not JSON") from None
    except (KeyError, TypeError, AttributeError):
        raise SignatureError("malformed OMS signature: its statement misses required fields") from None


def describe(sig_bytes: bytes) -> Info:
    """What a signature says about itself, without checking it (for ``inspect``: never trust it)."""
    parsed = _parse(sig_bytes)
    if parsed.method == "certificate":
        leaf = parsed.chain[0]
        try:
            algorithm = _algorithm(leaf.public_key(), "certificate's key")
        except SignatureError:
            algorithm = None
        signer = Signer(_fingerprint(leaf.public_key()), leaf.subject.rfc4514_string())
    else:
        algorithm = _algorithm_from_size(parsed.sig)
        signer = Signer(f"SHA256:{parsed.key_hint}") if parsed.key_hint else None
    return Info(parsed.method, signer, algorithm, parsed.name, dict(parsed.resources))


def _algorithm_from_size(sig: bytes) -> str | None:
    """A bare key signature does not name its curve, but its DER (r, s) do by their size: an integer below a P-256
    order has at most 256 bits, and both of a P-384 signature fit in 256 bits with probability 2**-256."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    try:
        bits = max(n.bit_length() for n in decode_dss_signature(sig))
    except ValueError:
        return None
    for limit, algorithm in ((256, "ecdsa-p256-sha256"), (384, "ecdsa-p384-sha384"), (521, "ecdsa-p521-sha512")):
        if bits <= limit:
            return algorithm
    return None


# ---------------------------------------------------------------------------------------------------- verify

def verify(sig_bytes: bytes, trust: Trust, *, now: datetime.datetime | None = None) -> Verified:
    """Check a signature against ``trust``; return who signed which files, or raise ``SignatureError``.

    Key signatures need one of ``trust.keys``; certificate signatures need a chain to one of ``trust.ca_roots``,
    valid at ``now`` (default: the current time; OMS itself checks at the leaf's notBefore), whose leaf may sign
    code (key usage digitalSignature and/or extended key usage codeSigning, as OMS asks).
    """
    if not trust:
        raise SignatureError("no trusted keys or CA roots to verify the signature with")
    parsed = _parse(sig_bytes)
    if parsed.method == "key":
        return _verify_key(parsed, trust)
    return _verify_certificate(parsed, trust, now)


def _check_envelope(public_key, parsed: _Parsed) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(parsed.sig, _pae(parsed.payload), _ecdsa(public_key))
    except InvalidSignature:
        return False
    return True


def _verify_key(parsed: _Parsed, trust: Trust) -> Verified:
    if not trust.keys:
        raise SignatureError("the signature is made with a bare key but only CA roots are trusted")
    hinted = [k for k in trust.keys if parsed.key_hint == k.fingerprint.removeprefix("SHA256:")]
    if parsed.key_hint and not hinted:
        raise SignatureError(f"signed by key SHA256:{parsed.key_hint}, which is not a trusted key")
    for key in hinted or trust.keys:
        if _check_envelope(key.key, parsed):
            return Verified("key", Signer(key.fingerprint), key.algorithm, parsed.name, dict(parsed.resources),
                            channels=key.channels)
    if hinted:
        raise SignatureError(f"bad signature: the envelope does not verify with key {hinted[0].fingerprint}")
    raise SignatureError("bad signature: it verifies with none of the trusted keys")


def _verify_certificate(parsed: _Parsed, trust: Trust, now: datetime.datetime | None) -> Verified:
    from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

    if not trust.ca_roots:
        raise SignatureError("the signature is made with a certificate but no CA root is trusted")
    leaf, intermediates = parsed.chain[0], list(parsed.chain[1:])
    subject = leaf.subject.rfc4514_string()
    when = now or datetime.datetime.now(datetime.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    # Say "expired" plainly before the chain builder's generic "no valid chain".
    for cert in parsed.chain:
        if when > cert.not_valid_after_utc:
            raise SignatureError(f"certificate {cert.subject.rfc4514_string()} expired on "
                                 f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if when < cert.not_valid_before_utc:
            raise SignatureError(f"certificate {cert.subject.rfc4514_string()} is not valid before "
                                 f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")

    # The leaf's key usages are checked below, by OMS's rule; the web-PKI default would demand clientAuth.
    ee_policy = ExtensionPolicy.permit_all()
    verifier = (PolicyBuilder().store(Store([r.certificate for r in trust.ca_roots])).time(when)
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
                .build_client_verifier())
    try:
        chain = verifier.verify(leaf, intermediates).chain
    except VerificationError as exc:
        reason = _first_line(exc)
        if "candidates exhausted" in reason or "no valid chain" in reason or "issuer" in reason:
            raise SignatureError(f"certificate {subject} does not chain to a trusted CA root") from None
        raise SignatureError(f"certificate chain of {subject} refused: {reason}") from None
    if _is_ca(leaf):  # as Sigstore and the web PKI: a CA issues certificates, it does not sign artefacts
        raise SignatureError(f"certificate {subject} is a CA certificate (basicConstraints CA:TRUE): a signature "
                             "must be made with an end-entity (CA:FALSE) certificate")
    if not _usage_allows_signing(leaf):
        raise SignatureError(f"certificate {subject} may not sign code (key usage must allow digitalSignature and "
                             "extended key usage, when given, codeSigning)")
    public_key = leaf.public_key()
    algorithm = _algorithm(public_key, f"key of certificate {subject}")
    if not _check_envelope(public_key, parsed):
        raise SignatureError(f"bad signature: the envelope does not verify with the key of certificate {subject}")
    root = next((r for r in trust.ca_roots if r.certificate == chain[-1]), None)
    return Verified("certificate", Signer(_fingerprint(public_key), subject), algorithm, parsed.name,
                    dict(parsed.resources), tuple(c.subject.rfc4514_string() for c in chain),
                    root.channels if root is not None else None)


def _is_ca(cert) -> bool:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _usage_allows_signing(leaf) -> bool:
    """OMS accepts key usage digitalSignature or extended key usage codeSigning. We also refuse a leaf whose
    extended key usage names other purposes only (a TLS server certificate from the same CA must not sign models)."""
    from cryptography import x509

    def extension(kind):
        try:
            return leaf.extensions.get_extension_for_class(kind).value
        except x509.ExtensionNotFound:
            return None

    usage, extended = extension(x509.KeyUsage), extension(x509.ExtendedKeyUsage)
    if usage is None and extended is None:
        return False
    if usage is not None and not usage.digital_signature:
        return False
    return extended is None or x509.oid.ExtendedKeyUsageOID.CODE_SIGNING in extended


# ---------------------------------------------------------------------------------------------------- coverage

def check_covers(verified: Verified | Info, resources: Iterable[Resource]) -> None:
    """Refuse unless the signature lists exactly ``resources`` (the bundle's files, signatures excluded) with the
    same sha256 values; the error names the first file that differs."""
    have = {}
    for res in resources:
        have[res.path] = res.sha256.lower()
    signed = verified.resources
    for path in sorted(set(signed) | set(have), key=_sort_key):
        if path not in have:
            raise SignatureError(f"{path}: signed, but the bundle does not have it")
        if path not in signed:
            raise SignatureError(f"{path}: in the bundle, but the signature does not cover it")
        if signed[path] != have[path]:
            raise SignatureError(f"{path}: sha256 {have[path][:12]}... differs from the signed {signed[path][:12]}...")


# ---------------------------------------------------------------------------------------------------- helpers

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("malformed OMS signature: bad base64") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
