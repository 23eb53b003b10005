"""The OCI distribution client: :mod:`.reference` (references, digests, media types), :mod:`.auth`
(credentials, login, challenges, tokens), :mod:`.session` (how a request is sent: retries and notices,
credentials scoped to their origin, redirects, caps, the watchdog), :mod:`.client`
(:class:`RegistryClient`: ping, manifests, tags, uploads) and :mod:`.blobs` (blob GETs, a source of
the transfer engine). Importing this package never imports torch."""
from __future__ import annotations

from .auth import Auth, Credentials, auth_file_for_login, credential_files, find_credentials, save_login
from .client import USER_AGENT, Manifest, Policy, RegistryClient, login
from .reference import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Reference,
    digest_of,
    is_loopback,
    parse_reference,
)

__all__ = [
    "DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST", "MANIFEST_MEDIA_TYPES", "MAX_MANIFEST_SIZE", "OCI_INDEX",
    "OCI_MANIFEST", "USER_AGENT", "Auth", "Credentials", "Manifest", "Policy", "Reference", "RegistryClient",
    "auth_file_for_login", "credential_files", "digest_of", "find_credentials", "is_loopback", "login",
    "parse_reference", "save_login",
]
