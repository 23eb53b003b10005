"""Signed bundles: sign a bundle, check its signatures against what this side trusts, keep and re-check them.

The signature format is :mod:`packager.formats.signature` (OpenSSF model signing: a Sigstore bundle over an in-toto
statement of file digests); this module is where bundles, the cache and a trust policy meet it.

**What a signature covers.** Every file the manifest lists (checkpoints and extra members) and the manifest itself,
by archive path, with the sha256 the manifest states (the manifest's own: the hash of its bytes). So no data is read
to sign or to check a signature: the signature vouches for the manifest, the manifest's hashes vouch for the bytes,
and verify / install / the loader check those hashes as they read the bytes anyway (no second read). After
``tar -xf BUNDLE -C DIR`` the same files sit at the same paths, which is what lets ``model_signing verify`` check
our bundles.

**Where signatures live.** Tar members ``hub/tvpack/signatures/<manifest-id>[.<label>].sig`` after the payload (the
manifest cannot list them: they are made after it). The archive is a TORCH_HOME overlay, so ``install`` (and
``tar -xf``) puts them at ``<hub>/tvpack/signatures/``, beside ``<hub>/tvpack/manifests/<id>.json``.

**Trust policy.** ``--key PUB`` / ``--ca-root PEM`` (``trusted_keys=`` in the API) for one command, which then
trusts exactly those; else ``TVPACK_TRUSTED_KEYS`` (comma-separated PEM files) and every file in
``<hub>/tvpack/trusted/`` (PEM public keys or CA certificates). When any is configured, signatures are mandatory:
install, verify and the loader refuse a bundle that no trusted signature covers. A file that cannot be read or is
not PEM is an error, never skipped (a policy that silently shrank would be worse than none).

**Signing an existing bundle appends in place** (:func:`sign_bundle`): the checkpoint bytes are never rewritten or
read; only the end-of-archive blocks change. Copying to a temp file and renaming would be atomic but rewrites the
whole bundle (gigabytes), so instead every step leaves a bundle the strict reader accepts:

1. extend the file with zeros to its new size (``ftruncate``), ``fsync``: the old archive plus more end padding;
2. write the new member's header (one 512-byte block, no pax record: names are short) over the first end block,
   ``fsync``: a signature member whose data are still zeros, which reads as a garbage signature (refused when
   checked, harmless otherwise);
3. write the signature bytes, ``fsync``: done.

A crash leaves the old bundle or the old bundle plus a signature that does not verify; never a bundle the reader
refuses, never changed payload. Writing the data before the header would not do: a zero block followed by data is
"data after the end of the archive". An ``flock`` keeps two signers from appending at the same offset.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import env
from .bundle import Bundle, InstallReport, VerifyReport, install_bundle, open_bundle, verify_bundle
from .cache import HubLayout, ManifestInfo, read_manifest, scan_hub, verify_cache
from .errors import BundleError, SignatureError
from .formats import signature as sigfmt
from .formats.archive import BLOCK, round_up, source_date_epoch, tar_layout
from .formats.manifest import manifest_path_for
from .formats.signature import SIGNATURES_DIR, Info, Resource, Trust, Verified
from .formats.volumes import FileSource, open_source
from .fsutil import pwrite_all
from .home import hub_dir

# -- places and what is signed ------------------------------------------------------------------------------


def trusted_dir(hub: Path) -> Path:
    """``<hub>/tvpack/trusted/``: PEM public keys and CA roots this machine trusts."""
    return HubLayout(Path(hub)).trusted


def signatures_dir(hub: Path) -> Path:
    """``<hub>/tvpack/signatures/``: installed signatures, beside the installed manifests."""
    return HubLayout(Path(hub)).signatures


def manifest_id(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]


def bundle_resources(manifest_bytes: bytes, files: Mapping[str, tuple[int, str]]) -> list[Resource]:
    """What a signature over a bundle lists: the manifest (by the hash of its bytes) and every file it lists
    (``files``: archive path -> (size, sha256), as the manifest states them)."""
    manifest = Resource(manifest_path_for(manifest_bytes), hashlib.sha256(manifest_bytes).hexdigest(),
                        len(manifest_bytes))
    return [manifest, *(Resource(path, sha, size) for path, (size, sha) in sorted(files.items()))]


# -- trust --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrustPolicy:
    """What this side trusts, and where that came from (refusals name it)."""

    trust: Trust = Trust()
    origin: str = ""

    def __bool__(self) -> bool:
        return bool(self.trust)


NO_TRUST_POLICY = TrustPolicy()


def _pem(item, what: str) -> tuple[bytes, str]:
    """(PEM bytes, a name for messages) of a path or of PEM bytes given directly."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item), what
    path = Path(os.path.expanduser(os.fspath(item)))
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise SignatureError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _named(name: str, load, *args):
    """``load(*args)``, its refusal prefixed with the file it concerns."""
    try:
        return load(*args)
    except SignatureError as exc:
        raise SignatureError(f"{name}: {exc.message}") from None


def load_trust(keys: Iterable = (), ca_roots: Iterable = ()) -> Trust:
    """Public keys (``--key``) and CA root certificates (``--ca-root``): PEM file paths, or PEM bytes."""
    public, roots = [], []
    for key in keys:
        pem, name = _pem(key, "public key")
        public.append(_named(name, sigfmt.load_public_key, pem))
    for root in ca_roots:
        pem, name = _pem(root, "CA root")
        found = _named(name, sigfmt.load_ca_roots, pem)
        if not found:
            raise SignatureError(f"{name}: no CA certificate in it")
        roots.extend(found)
    return Trust(tuple(public), tuple(roots))


def _mixed_trust(items: Iterable, what: str) -> Trust:
    """Trust from PEM files that may each hold public keys or CA certificates."""
    keys, roots = [], []
    for item in items:
        pem, name = _pem(item, what)
        trust = _named(name, Trust.from_pem, pem)
        keys.extend(trust.keys)
        roots.extend(trust.ca_roots)
    return Trust(tuple(keys), tuple(roots))


def _configured(hub: Path) -> TrustPolicy:
    origins, keys, roots = [], [], []
    named = env.trusted_keys()
    folder = trusted_dir(hub)
    try:
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    except OSError as exc:
        raise SignatureError(f"cannot read the trusted keys folder {folder}: {exc.strerror or exc}") from None
    for items, what, origin in ((named, "trusted key (TVPACK_TRUSTED_KEYS)", "TVPACK_TRUSTED_KEYS"),
                                (files, "trusted key", str(folder))):
        if items:
            trust = _mixed_trust(items, what)
            keys.extend(trust.keys)
            roots.extend(trust.ca_roots)
            origins.append(origin)
    return TrustPolicy(Trust(tuple(keys), tuple(roots)), " and ".join(origins))


def configured_policy(torch_home=None) -> TrustPolicy:
    """The machine's policy: ``TVPACK_TRUSTED_KEYS`` and ``<hub>/tvpack/trusted/``; empty when neither is set."""
    return _configured(hub_dir(torch_home))


def trust_policy(keys: Iterable = (), ca_roots: Iterable = (), *, torch_home=None) -> TrustPolicy:
    """Explicit keys and CA roots when given (then exactly those are trusted), else the configured policy."""
    keys, ca_roots = list(keys), list(ca_roots)
    if keys or ca_roots:
        return TrustPolicy(load_trust(keys, ca_roots), "the given --key/--ca-root")
    return configured_policy(torch_home)


# -- checking signatures ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SignatureCheck:
    """One signature file: what it claims, and whether it is valid for the trust policy."""

    path: str  # archive path hub/tvpack/signatures/<name>
    info: Info | None  # None when it cannot be read at all
    verified: Verified | None = None
    problem: str | None = None  # why it is not valid (None: valid, or not checked)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def signer(self) -> str | None:
        who = self.verified.signer if self.verified else self.info.signer if self.info else None
        return str(who) if who else None

    @property
    def algorithm(self) -> str | None:
        return self.verified.algorithm if self.verified else self.info.algorithm if self.info else None

    def to_dict(self) -> dict:
        return {"path": self.path, "valid": self.verified is not None, "method": self.info and self.info.method,
                "signer": self.signer, "algorithm": self.algorithm, "problem": self.problem,
                "chain": list(self.verified.chain) if self.verified else []}


@dataclass(frozen=True)
class SignatureReport:
    """The signatures over one manifest. ``checked`` is False when there was nothing to check them against."""

    manifest_id: str
    checks: tuple[SignatureCheck, ...]
    checked: bool

    @property
    def valid(self) -> tuple[Verified, ...]:
        return tuple(c.verified for c in self.checks if c.verified is not None)

    @property
    def signers(self) -> list[str]:
        return list(dict.fromkeys(str(v.signer) for v in self.valid))

    def to_dict(self) -> dict:
        return {"manifest_id": self.manifest_id, "checked": self.checked, "signed_by": self.signers,
                "signatures": [c.to_dict() for c in self.checks]}


def check_signatures(manifest_bytes: bytes, files: Mapping[str, tuple[int, str]],
                     signatures: Iterable[tuple[str, bytes]], trust: Trust | None, *, now=None) -> SignatureReport:
    """Each signature (archive path, bytes) over the manifest ``manifest_bytes`` whose files are ``files``: read,
    and with a ``trust``, verified and checked to list exactly the manifest and its files with the same sha256.
    Nothing is raised for a bad signature: see :func:`require_signed`."""
    this_id = manifest_id(manifest_bytes)
    resources = bundle_resources(manifest_bytes, files)
    checks = []
    for path, data in signatures:
        try:
            info = sigfmt.describe(data)
        except SignatureError as exc:
            checks.append(SignatureCheck(path, None, None, exc.message))
            continue
        if not trust:
            checks.append(SignatureCheck(path, info))
            continue
        try:
            named = sigfmt.manifest_id_of_signature(path)
            if named != this_id:
                raise SignatureError(f"it is named for manifest {named}, not this one ({this_id})")
            verified = sigfmt.verify(data, trust, now=now)
            sigfmt.check_covers(verified, resources)
        except SignatureError as exc:
            checks.append(SignatureCheck(path, info, None, exc.message))
            continue
        checks.append(SignatureCheck(path, info, verified))
    return SignatureReport(this_id, tuple(checks), bool(trust))


def require_signed(report: SignatureReport, trust: TrustPolicy, what: str) -> SignatureReport:
    """``report`` when at least one signature is valid; else one line saying why not."""
    if report.valid:
        return report
    if not report.checks:
        raise SignatureError(f"{what} is not signed, and the trust policy ({trust.origin}) requires a trusted "
                             "signature")
    problems = "; ".join(f"{c.name}: {c.problem}" for c in report.checks)
    if len(report.checks) == 1:
        raise SignatureError(f"{what}: refusing signature {problems}")
    raise SignatureError(f"{what}: none of its {len(report.checks)} signatures is valid ({problems})")


def read_signatures(opened: Bundle) -> list[tuple[str, bytes]]:
    out = []
    for member in opened.signatures:
        with opened.open_member(member.path) as f:
            out.append((member.path, f.read()))
    return out


def bundle_signatures(opened: Bundle, trust: Trust | None = None, *, now=None) -> SignatureReport:
    """The signatures an opened bundle carries; checked when ``trust`` is given, else only described (inspect)."""
    return check_signatures(opened.manifest_bytes, opened.files, read_signatures(opened), trust, now=now)


def _checker(trust: TrustPolicy, found: list):
    """The ``check=`` hook of verify_bundle / install_bundle: runs on the opened bundle before any payload is read."""
    def check(opened: Bundle) -> None:
        report = bundle_signatures(opened, trust.trust if trust else None)
        if trust:
            require_signed(report, trust, opened.path.name)
        found.append(report)
        return report.valid  # who signed: install's release checks need it
    return check


@dataclass(frozen=True)
class SignedVerifyReport:
    contents: VerifyReport
    signatures: SignatureReport

    def to_dict(self) -> dict:
        return {**self.contents.to_dict(), "signatures": self.signatures.to_dict()}


@dataclass(frozen=True)
class SignedInstallReport:
    installed: InstallReport
    signatures: SignatureReport

    def to_dict(self) -> dict:
        return {**self.installed.to_dict(), "signatures": self.signatures.to_dict()}


def verify_signed(path, trust: TrustPolicy = NO_TRUST_POLICY, *, progress: bool = False,
                  reporter=None) -> SignedVerifyReport:
    """:func:`packager.bundle.verify_bundle`, after the signatures are checked against ``trust`` (when it trusts
    anything: then at least one must be valid). The payload is read once, by the content check."""
    found: list[SignatureReport] = []
    contents = verify_bundle(path, progress=progress, check=_checker(trust, found), reporter=reporter)
    return SignedVerifyReport(contents, found[0])


def install_signed(path, trust: TrustPolicy = NO_TRUST_POLICY, *, torch_home=None, force: bool = False,
                   progress: bool = False, release=None, reporter=None) -> SignedInstallReport:
    """:func:`packager.bundle.install_bundle`, refused before anything is written unless a signature is valid for
    ``trust`` (when it trusts anything). Signatures are installed beside the manifest."""
    found: list[SignatureReport] = []
    installed = install_bundle(path, torch_home=torch_home, force=force, progress=progress,
                               check=_checker(trust, found), release=release, reporter=reporter)
    return SignedInstallReport(installed, found[0])


def install(path, *, keys: Iterable = (), ca_roots: Iterable = (), torch_home=None, force: bool = False,
            progress: bool = False, reporter=None) -> SignedInstallReport:
    """Install under the trust policy: ``keys`` / ``ca_roots`` when given, else the configured one (none: unsigned
    bundles install as before)."""
    trust = trust_policy(keys, ca_roots, torch_home=torch_home)
    return install_signed(path, trust, torch_home=torch_home, force=force, progress=progress, reporter=reporter)


# -- signing ------------------------------------------------------------------------------------------------

def key_is_encrypted(pem: bytes) -> bool:
    """PKCS#8 ``ENCRYPTED PRIVATE KEY`` or a legacy ``Proc-Type: 4,ENCRYPTED`` key."""
    return b"ENCRYPTED" in pem


@dataclass(frozen=True)
class Signer:
    """A loaded signing key (and certificate chain), checked once, used for any number of bundles."""

    key_pem: bytes = field(repr=False)
    password: bytes | str | None = field(default=None, repr=False)
    cert_chain_pem: bytes | None = field(default=None, repr=False)
    signer: sigfmt.Signer | None = None  # who: key fingerprint, certificate subject
    algorithm: str | None = None

    @classmethod
    def load(cls, key, *, cert_chain: Sequence = (), password: bytes | str | None = None) -> Signer:
        """``key``: an EC private key (PEM path or bytes); ``cert_chain``: PEM files, the key's certificate first,
        then intermediates; ``password``: for an encrypted key (default: ``TVPACK_SIGNING_KEY_PASSWORD``)."""
        key_pem, key_name = _pem(key, "signing key")
        chain = b"".join(_pem(item, "certificate chain")[0] for item in cert_chain)
        if password is None:
            password = env.signing_key_password()
        # One signature over a dummy statement proves the key, password and chain go together before any bundle
        # is written, and names the signer.
        probe = _named(key_name, lambda: sigfmt.sign([Resource("hub/probe", "0" * 64)], key_pem=key_pem,
                                                     password=password, cert_chain_pem=chain or None))
        info = sigfmt.describe(probe)
        return cls(key_pem, password, chain or None, info.signer, info.algorithm)

    def sign(self, manifest_bytes: bytes, files: Mapping[str, tuple[int, str]]) -> bytes:
        """The ``.sig`` bytes over a manifest and the files it lists (archive path -> (size, sha256))."""
        return sigfmt.sign(bundle_resources(manifest_bytes, files), key_pem=self.key_pem, password=self.password,
                           cert_chain_pem=self.cert_chain_pem, name=manifest_id(manifest_bytes))

    def members(self, manifest_bytes: bytes, files: Mapping[str, tuple[int, str]],
                label: str | None = None) -> list[tuple[str, bytes]]:
        """The ``sign=`` hook of :func:`packager.bundle.bundle`: one signature member, written after the payload."""
        return [(_signature_path(manifest_id(manifest_bytes), label), self.sign(manifest_bytes, files))]


def _signature_path(manifest_id_: str, label: str | None) -> str:
    try:
        return sigfmt.signature_path(manifest_id_, label)
    except ValueError:
        raise SignatureError(f"bad signature label {label!r}: use 1 to 64 letters, digits, '-' or '_'") from None


@dataclass(frozen=True)
class SignResult:
    path: Path
    manifest_id: str
    signature: str  # archive path of the new member
    signer: sigfmt.Signer | None
    algorithm: str | None
    added: int  # bytes the bundle grew by

    def to_dict(self) -> dict:
        return {"path": str(self.path), "manifest_id": self.manifest_id, "signature": self.signature,
                "signer": str(self.signer) if self.signer else None,
                "fingerprint": self.signer.fingerprint if self.signer else None,
                "subject": self.signer.subject if self.signer else None, "algorithm": self.algorithm,
                "bytes_added": self.added}


def _choose_name(opened: Bundle, signer: Signer, label: str | None) -> str:
    taken = {m.path for m in opened.signatures}
    fingerprint = signer.signer.fingerprint if signer.signer else None
    if label is None:
        for path, data in read_signatures(opened):
            try:
                info = sigfmt.describe(data)
            except SignatureError:
                continue
            if fingerprint and info.signer and info.signer.fingerprint == fingerprint:
                raise SignatureError(f"{opened.path.name} is already signed by {signer.signer} ({path}); "
                                     "give --label to add another signature by the same key")
    path = _signature_path(opened.manifest_id, label)
    if label is None and path in taken and fingerprint:
        path = _signature_path(opened.manifest_id, fingerprint.removeprefix("SHA256:")[:12])
    if path in taken:
        raise SignatureError(f"{opened.path.name} already has a signature {path}; choose another --label")
    return path


def sign_bundle(path, signer: Signer, *, label: str | None = None) -> SignResult:
    """Append a signature by ``signer`` to the bundle at ``path``, in place (see the module docstring for why that
    is crash-safe). Its name is ``<manifest-id>.sig``, or with ``label`` (default when that is taken: the first 12
    hex digits of the key's fingerprint) ``<manifest-id>.<label>.sig``. Reads headers and the manifest only."""
    import fcntl

    path = Path(path)
    with open_source(path) as source:
        if not isinstance(source, FileSource):
            raise SignatureError(f"{path.name} is split into volumes; sign the bundle before splitting it")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise SignatureError(f"cannot open {path} to append a signature: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SignatureError(f"{path} is being signed by another process; try again when it is done") from None
        except OSError:
            pass  # a filesystem without flock: the check below still catches a file replaced meanwhile
        with open_bundle(path) as opened:  # opened under the lock: the end we append at is current
            before = os.fstat(fd)
            now = os.stat(path)
            if (before.st_dev, before.st_ino) != (now.st_dev, now.st_ino):
                raise SignatureError(f"{path} was replaced while it was being signed; sign it again")
            end = max(m.offset + round_up(m.size) for m in opened.members)
            name = _choose_name(opened, signer, label)
            data = signer.sign(opened.manifest_bytes, opened.files)
            this_id = opened.manifest_id
        layout = tar_layout([(name, len(data))], source_date_epoch(), start=end)  # after the last member
        (span,) = layout.spans
        if len(span.header) != BLOCK:  # names are short enough for ustar; a pax record would break step 2's atomicity
            raise SignatureError(f"signature name {name!r} needs a pax header")
        new_size = layout.size
        try:
            if new_size > before.st_size:
                os.ftruncate(fd, new_size)
                os.fsync(fd)
            pwrite_all(fd, span.header, span.offset)
            os.fsync(fd)
            pwrite_all(fd, data + bytes(span.padding), span.data_offset)
            os.fsync(fd)
        except OSError as exc:
            raise SignatureError(f"cannot append the signature to {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    with open_bundle(path) as reopened:  # read it back the way every reader will
        if name not in {m.path for m in reopened.signatures} or dict(read_signatures(reopened))[name] != data:
            raise BundleError(f"{path}: the appended signature does not read back; the bundle changed meanwhile")
    return SignResult(path, this_id, name, signer.signer, signer.algorithm, max(0, new_size - before.st_size))


# -- installed signatures: cache verify --signatures, the loader ----------------------------------------------

@dataclass(frozen=True)
class InstalledManifest:
    """An installed manifest and its installed signatures."""

    manifest_id: str
    path: Path
    files: Mapping[str, tuple[int, str]]  # what it lists: archive path -> (size, sha256)
    signatures: SignatureReport | None
    problem: str | None  # None: at least one valid signature

    def to_dict(self) -> dict:
        return {"manifest_id": self.manifest_id, "path": str(self.path), "ok": self.problem is None,
                "problem": self.problem, "signed_by": self.signatures.signers if self.signatures else [],
                "signatures": self.signatures.to_dict()["signatures"] if self.signatures else []}


def installed_signatures(hub: Path, manifest_id_: str) -> list[tuple[str, bytes]]:
    """The installed signatures over one manifest, as (archive path, bytes)."""
    folder = signatures_dir(hub)
    out = []
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise SignatureError(f"cannot read {folder}: {exc.strerror or exc}") from None
    for name in names:
        arcname = f"{SIGNATURES_DIR}/{name}"
        if sigfmt.manifest_id_of_signature(arcname) == manifest_id_:
            try:
                with open(folder / name, "rb") as f:
                    out.append((arcname, f.read(sigfmt.MAX_SIGNATURE + 1)))
            except OSError as exc:
                raise SignatureError(f"cannot read {folder / name}: {exc.strerror or exc}") from None
    return out


def check_installed_manifest(path, trust: TrustPolicy, *, hub: Path | None = None) -> InstalledManifest:
    """Check an installed manifest (a path, or a :class:`packager.cache.ManifestInfo` from
    :func:`packager.cache.scan_hub`) and its installed signatures against ``trust``; never raises for a bad
    manifest or signature (the result says what is wrong)."""
    manifest = path if isinstance(path, ManifestInfo) else None
    path = manifest.path if manifest is not None else Path(path)
    hub = hub or path.parent.parent.parent
    if manifest is None:
        manifest = read_manifest(HubLayout(Path(hub)), path)
    this_id = manifest.manifest_id
    if manifest.problem is not None:
        return InstalledManifest(this_id, path, {}, None, manifest.problem)
    report = check_signatures(manifest.data, manifest.files, installed_signatures(hub, this_id), trust.trust)
    try:
        require_signed(report, trust, f"installed manifest {this_id}")
    except SignatureError as exc:
        return InstalledManifest(this_id, path, manifest.files, report, exc.message)
    return InstalledManifest(this_id, path, manifest.files, report, None)


@dataclass(frozen=True)
class FileCheck:
    path: Path
    size: int
    sha256: str | None
    ok: bool
    detail: str | None
    signed_in: tuple[str, ...] = ()  # manifest ids whose valid signature covers these exact bytes

    def to_dict(self) -> dict:
        return {"file": self.path.name, "path": str(self.path), "size": self.size, "sha256": self.sha256,
                "ok": self.ok, "detail": self.detail, "signed_in": list(self.signed_in)}


@dataclass(frozen=True)
class InstalledReport:
    manifests: tuple[InstalledManifest, ...]
    files: tuple[FileCheck, ...]

    @property
    def ok(self) -> bool:
        return all(m.problem is None for m in self.manifests) and all(f.ok for f in self.files)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "manifests": [m.to_dict() for m in self.manifests],
                "files": [f.to_dict() for f in self.files]}


def verify_installed(trust: TrustPolicy, *, torch_home=None, selectors: Sequence[str] = (), registry: Sequence[str] = (),
                     jobs: int | None = None, progress: bool = False, reporter=None) -> InstalledReport:
    """``cache verify --signatures``: every installed manifest must carry a valid signature for ``trust``, and every
    cached file (or those selected) must hash to what a validly signed manifest states. Each file is read once."""
    if not trust:
        raise SignatureError("nothing to check signatures against: give --key PUB or --ca-root PEM, set "
                             "TVPACK_TRUSTED_KEYS, or put PEM files in <hub>/tvpack/trusted/")
    hub = hub_dir(torch_home)
    manifests = [check_installed_manifest(m, trust, hub=hub)
                 for m in scan_hub(HubLayout(hub), checkpoints=False).manifests]
    results = verify_cache(selectors, torch_home=torch_home, registry=registry, jobs=jobs, progress=progress,
                           reporter=reporter)
    signed: dict[str, dict[str, str]] = {}  # checkpoint file name -> {manifest id: sha256}
    for manifest in manifests:
        if manifest.problem is None:
            for arcname, (_size, sha) in manifest.files.items():
                if arcname.startswith("hub/checkpoints/"):
                    signed.setdefault(arcname.rsplit("/", 1)[-1], {})[manifest.manifest_id] = sha
    files = []
    for result in results:
        claims = signed.get(result.path.name, {})
        matching = tuple(i for i, sha in claims.items() if sha == result.sha256)
        if not result.ok:
            detail = result.detail
        elif not claims:
            detail = "no trusted signature covers it"
        elif not matching:
            detail = f"sha256 {str(result.sha256)[:12]}... differs from what manifest {next(iter(claims))} signed"
        else:
            detail = None
        files.append(FileCheck(result.path, result.size, result.sha256, detail is None, detail, matching))
    if selectors:  # only the manifests that list a selected file
        names = {f.path.name for f in files}
        manifests = [m for m in manifests if any(a.rsplit("/", 1)[-1] in names for a in m.files)]
    manifests = [_check_extra_members(m, hub) for m in manifests]
    return InstalledReport(tuple(manifests), tuple(files))


def _check_extra_members(manifest: InstalledManifest, hub: Path) -> InstalledManifest:
    """A manifest's non-checkpoint members (small tvpack data) are hashed here; the cache check does checkpoints."""
    from dataclasses import replace

    from .cache import hash_file

    if manifest.problem is not None:
        return manifest
    for arcname, (_size, sha) in sorted(manifest.files.items()):
        if arcname.startswith("hub/checkpoints/"):
            continue
        dest = hub.joinpath(*arcname.split("/")[1:])
        try:
            digest = hash_file(dest)
        except OSError as exc:
            return replace(manifest, problem=f"{dest}: cannot read it: {exc.strerror or exc}")
        if digest != sha:
            return replace(manifest, problem=f"{dest}: sha256 {digest[:12]}... differs from the signed {sha[:12]}...")
    return manifest


def loader_policy(trusted_keys=None, require_signed: bool | None = None, *, hub: Path | None = None) -> TrustPolicy:
    """The loader's policy: ``trusted_keys`` (PEM paths or bytes: public keys or CA roots) when given; else, unless
    ``require_signed`` is False, the configured policy of ``hub``; ``require_signed=True`` with none is an error."""
    if trusted_keys:
        if isinstance(trusted_keys, (str, bytes, os.PathLike)):
            trusted_keys = [trusted_keys]
        return TrustPolicy(_mixed_trust(trusted_keys, "trusted key"), "trusted_keys")
    if require_signed is False:
        return NO_TRUST_POLICY
    trust = _configured(Path(hub) if hub is not None else hub_dir())
    if require_signed and not trust:
        raise SignatureError("require_signed=True, but nothing is trusted: pass trusted_keys=[...], set "
                             "TVPACK_TRUSTED_KEYS or put PEM files in <hub>/tvpack/trusted/")
    return trust


def covered_entries(entries: Iterable, trust: TrustPolicy, *, bundle_path=None,
                    hub: Path | None = None) -> tuple[dict[str, Verified], dict[str, str]]:
    """For the loader: which weights entries (:class:`packager.formats.manifest.BundleEntry`) a signature valid for
    ``trust`` covers, with their exact sha256. Entries of a bundle file (``bundle_path``) are checked against its
    signature members; installed entries (``hub``) against the installed signatures of the manifest they came from.
    Returns (name -> the covering signature, name -> why it is not covered)."""
    entries = list(entries)
    if (bundle_path is None) == (hub is None):
        raise SignatureError("signatures are checked for a bundle file or an installed TORCH_HOME, one at a time")
    reports: dict[str, SignatureReport | str] = {}  # manifest (as entries name it) -> report or problem
    if bundle_path is not None:
        with open_bundle(bundle_path) as opened:
            report = bundle_signatures(opened, trust.trust)
        for entry in entries:
            reports[entry.manifest] = report
    else:
        for where in {entry.manifest for entry in entries}:
            manifest = check_installed_manifest(Path(where), trust, hub=hub)
            reports[where] = manifest.problem if manifest.problem else manifest.signatures
    covered, why = {}, {}
    for entry in entries:
        report = reports[entry.manifest]
        if isinstance(report, str):
            why[entry.name] = report
            continue
        match = next((v for v in report.valid if v.resources.get(entry.path) == entry.sha256), None)
        if match is not None:
            covered[entry.name] = match
            continue
        try:
            require_signed(report, trust, "its manifest")
            why[entry.name] = f"no trusted signature covers {entry.path}"
        except SignatureError as exc:
            why[entry.name] = exc.message
    return covered, why


__all__ = ["InstalledReport", "NO_TRUST_POLICY", "TrustPolicy", "SignResult", "SignatureCheck", "SignatureReport",
           "SignedInstallReport", "SignedVerifyReport", "Signer", "bundle_resources", "bundle_signatures",
           "check_signatures", "configured_policy", "covered_entries", "install", "install_signed", "load_trust",
           "loader_policy", "require_signed", "sign_bundle", "trust_policy", "verify_installed", "verify_signed"]
