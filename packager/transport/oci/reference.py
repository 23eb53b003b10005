"""OCI references (``oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]``), digests, media types and host helpers.

Pure values: no network, no files.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from ...errors import OCIError, UsageError

MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
MAX_MANIFEST_SIZE = 4 * MiB  # what distribution itself accepts; a larger "manifest" is hostile

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Reference:
    """``oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]``. ``tag`` is ``latest`` when neither is
    given; with a digest, the digest is what is fetched (a tag beside it is only a label)."""

    host: str  # "registry.example.com", "127.0.0.1:5000", "[::1]:5000"
    repository: str  # "a/b/c"
    tag: str | None = "latest"
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = f"oci://{self.host}/{self.repository}"
        if self.tag and not (self.digest and self.tag == "latest"):
            text += f":{self.tag}"
        return text + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """Parse ``oci://HOST[:PORT]/REPO[:TAG][@sha256:HEX]``; a malformed one is a :class:`UsageError`."""
    if not text.startswith("oci://"):
        raise UsageError(f"{text}: not an OCI reference (expected oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST])")
    rest = text[len("oci://"):]
    host, _, path = rest.partition("/")
    if not _HOST.fullmatch(host) or not path:
        raise UsageError(f"{text}: expected oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]")
    digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise UsageError(f"{text}: a digest is sha256: and 64 lowercase hex digits")
    tag = None
    name, colon, maybe_tag = path.rpartition(":")
    if colon:
        path, tag = name, maybe_tag
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{text}: {tag!r} is not a valid tag")
    if not _REPOSITORY.fullmatch(path):
        raise UsageError(f"{text}: {path!r} is not a valid repository name (lowercase, '/'-separated)")
    return Reference(host, path, tag if tag or digest else "latest", digest)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest or ""):
        raise OCIError(f"unsupported or malformed digest {digest!r} (tvpack handles sha256:<64 hex>)")
    return digest


def is_loopback(host: str) -> bool:
    name = _split_host(host)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _split_host(host: str) -> tuple[str, str | None]:
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] or None if rest.startswith(":") else None
    name, _, port = host.partition(":")
    return name, port or None

