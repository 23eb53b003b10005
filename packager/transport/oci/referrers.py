"""OCI 1.1 referrers: what is attached to a manifest (signatures), found through the registry's referrers
API (``GET /v2/<name>/referrers/<digest>``), or where a registry has none (Debian's distribution 2.8),
through the distribution spec's referrers tag schema: an image index tagged ``sha256-<hex>``.

    found = referrers(client, "models/small", digest)      # [descriptor, ...], or None: no referrers API
    tag = referrers_tag(digest)                             # "sha256-<hex>"
"""
from __future__ import annotations

import json

from ...errors import OCIError
from ..bodies import read_capped
from .reference import OCI_INDEX, _check_digest

INDEX_CAP = 4 << 20
NO_API = (400, 404, 405, 501)  # what registries without the API answer for its path


def referrers_tag(digest: str) -> str:
    """The tag of the referrers index of ``digest`` under the tag schema."""
    return _check_digest(digest).replace(":", "-")


def _descriptors(data: bytes, what: str) -> list[dict]:
    try:
        index = json.loads(data)
    except ValueError:
        raise OCIError(f"{what}: the referrers index is not JSON") from None
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise OCIError(f"{what}: the referrers index has no manifests list")
    return manifests


def referrers(client, repository: str, digest: str) -> list[dict] | None:
    """The descriptors the registry's referrers API lists for ``digest``, or None when it has no such API
    (HTTP 404, or 400/405/501 from registries that do not route the path: a registry with the API answers an
    empty index instead). ``client``: a RegistryClient, or a
    MirroredClient (each endpoint asked in turn)."""
    each = getattr(client, "_each", None)
    if each is not None:  # through mirrors
        return each(repository, "referrers", lambda c, repo, _endpoint: referrers(c, repo, digest))
    what = f"oci://{client.host}/{repository}@{digest} (referrers)"
    response = client._request("GET", client._url(repository, "referrers", _check_digest(digest)), what=what,
                               repository=repository, ok=(200, *NO_API), headers={"Accept": OCI_INDEX})
    if response.status_code in NO_API:
        response.close()
        return None
    return _descriptors(read_capped(response, INDEX_CAP, "referrers index", error=OCIError), what)


def tag_index(client, repository: str, digest: str) -> list[dict]:
    """The descriptors of the referrers tag schema's index for ``digest`` (empty when there is none)."""
    tag = referrers_tag(digest)
    if client.manifest_digest(repository, tag, (OCI_INDEX,)) is None:
        return []
    return _descriptors(client.get_manifest(repository, tag, (OCI_INDEX,)).data, f"{repository}:{tag}")


__all__ = ["INDEX_CAP", "referrers", "referrers_tag", "tag_index"]
