"""Reading an image through the mirrors registries.conf names: each request tried on the mirrors in order,
then on the location (:mod:`packager.transport.registries` says which and in what order).

    client = mirrored_client(ref, RegistryClient(ref.host))       # the location's client, as the CLI made it
    client.get_manifest(ref.repository, ref.reference)           # from the first endpoint that serves it
    client.pull_blob(ref.repository, digest, dest, size=size)      # likewise; the digest is checked whatever answered

A mirror is untrusted: every manifest and blob it serves is checked against its digest exactly as the
location's (the :class:`RegistryClient` does that for all of them). A mirror that is down, refuses, or
serves wrong bytes is skipped with one notice line and not asked again by this client; the location's
failure is the error. Each endpoint has a client of its own, so credentials are looked up for its own host:
upstream's are never sent to a mirror. Mirrors get one retry (a pull-through cache that is down should
cost seconds, not the location's patience). Pushes never come here: they go to the location only.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable

from ...errors import DownloadError, IntegrityError
from ..registries import Endpoint, RegistriesConf, pull_endpoints, push_endpoint
from .client import Manifest, RegistryClient
from .reference import MANIFEST_MEDIA_TYPES, Reference
from .session import stderr_notice

MIRROR_RETRIES = 1
SKIPPABLE = (DownloadError, IntegrityError)  # OCIError is a DownloadError; OfflineError and disk errors are not


class MirroredClient:
    """The reading half of a :class:`RegistryClient` for one image, over ``endpoints`` (mirrors, then the
    location): calls name the image's own repository, each endpoint is asked under its rewritten one."""

    def __init__(self, repository: str, endpoints: list[tuple[Endpoint, RegistryClient]],
                 notify: Callable[[str], None] = stderr_notice, *, _shared: tuple[list, threading.Lock] | None = None):
        self.repository = repository
        self.endpoints = endpoints
        self.notify = notify
        # mirrors given up on, in order: shared with this client's siblings, so each is given up once
        self.skipped, self._skipping = _shared or ([], threading.Lock())
        self.served_by: Endpoint | None = None  # the endpoint that answered the last request
        location = endpoints[-1][1]
        self.host, self.policy, self.offline = location.host, location.policy, location.offline
        self.cancel, self.plain_http = location.cancel, location.plain_http

    def sibling(self) -> "MirroredClient":
        """A client over the same endpoints for another thread (each endpoint's client a sibling of its own:
        :meth:`RegistryClient.sibling`), sharing which mirrors were given up on."""
        return MirroredClient(self.repository, [(e, c.sibling()) for e, c in self.endpoints], self.notify,
                              _shared=(self.skipped, self._skipping))

    def _next(self, after: int) -> int:
        """The index of the first endpoint after ``after`` not given up on (the location is never given up on)."""
        with self._skipping:
            return next(i for i in range(after + 1, len(self.endpoints)) if self.endpoints[i][0] not in self.skipped)

    def _each(self, repository: str, what: str, call, restart: Callable[[], object] | None = None):
        """``call(client, repository, endpoint)`` on each endpoint not given up on until one succeeds."""
        n, first = self._next(-1), True
        while True:
            endpoint, client = self.endpoints[n]
            if not first and restart is not None:
                restart()
            first = False
            try:
                result = call(client, endpoint.repository if repository == self.repository else repository, endpoint)
            except SKIPPABLE as exc:
                if not endpoint.mirror:
                    raise
                with self._skipping:  # the notice inside: a sibling's notice of a later mirror comes after it
                    if endpoint not in self.skipped:  # a sibling may have given it up meanwhile
                        self.skipped.append(endpoint)
                        following = next(e for e, _c in self.endpoints[n + 1:] if e not in self.skipped)
                        self.notify(f"mirror {endpoint.name} skipped ({getattr(exc, 'message', exc)}); "
                                    f"{what} from {'mirror ' if following.mirror else ''}{following.name}")
                n = self._next(n)
                continue
            self.served_by = endpoint
            return result

    def get_manifest(self, repository: str, reference: str, accept=MANIFEST_MEDIA_TYPES, **kwargs) -> Manifest:
        return self._each(repository, "the manifest",
                          lambda client, repo, _e: client.get_manifest(repo, reference, accept, **kwargs))

    def pull_blob(self, repository: str, digest: str, dest, **kwargs):
        """:meth:`RegistryClient.pull_blob` from the first endpoint that serves the right bytes: a part a mirror
        left is resumed from the next (same digest, same bytes; a wrong part fails its digest and is dropped)."""
        return self._each(repository, f"blob {digest[:19]}",
                          lambda client, repo, _e: client.pull_blob(repo, digest, dest, **kwargs))

    def stream_blob(self, repository: str, digest: str, write, *, restart: Callable[[], object] | None = None,
                    **kwargs) -> None:
        """:meth:`RegistryClient.stream_blob`. A mirror failing after bytes reached ``write`` is given up only
        when ``restart`` can reset the sink (it is called before the next endpoint is tried); without it, such
        a failure is the error."""
        delivered = [0]

        def counting(data):
            delivered[0] += len(data)
            return write(data)

        def call(client, repo, endpoint):
            delivered[0] = 0
            try:
                return client.stream_blob(repo, digest, counting, **kwargs)
            except SKIPPABLE as exc:
                if delivered[0] and restart is None:
                    raise _Delivered(exc) from None
                raise

        try:
            return self._each(repository, f"blob {digest[:19]}", call, restart)
        except _Delivered as wrapped:
            raise wrapped.error from None

    def manifest_digest(self, repository: str, reference: str, *args, **kwargs):
        return self._each(repository, "the manifest",
                          lambda client, repo, _e: client.manifest_digest(repo, reference, *args, **kwargs))

    def blob_exists(self, repository: str, digest: str, **kwargs):
        return self._each(repository, f"blob {digest[:19]}",
                          lambda client, repo, _e: client.blob_exists(repo, digest, **kwargs))


class _Delivered(Exception):
    """A mirror failed after part of a blob reached a sink that cannot be reset."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _mirror_policy(policy):
    return dataclasses.replace(policy, retries=min(policy.retries, MIRROR_RETRIES))


def mirrored_client(ref: Reference, location: RegistryClient, *, conf: RegistriesConf | None = None,
                    notify: Callable[[str], None] | None = None):
    """The client to read ``ref`` with: ``location`` itself when registries.conf names no mirror and no other
    location for it, else a :class:`MirroredClient` over the mirrors and the location (a blocked registry is a
    one-line OCIError)."""
    endpoints = pull_endpoints(ref.host, ref.repository, ref.tag, ref.digest, conf=conf)
    if len(endpoints) == 1 and endpoints[0].repository == ref.repository and _same(endpoints[0], ref, location):
        return location
    pairs = [(e, location if _same(e, ref, location) else _client(e, location)) for e in endpoints]
    return MirroredClient(ref.repository, pairs, notify or location.notify)


def push_target(ref: Reference, location: RegistryClient, *,
                conf: RegistriesConf | None = None) -> tuple[Reference, RegistryClient]:
    """Where a push of ``ref`` goes: registries.conf's location for it (never a mirror), and its client."""
    e = push_endpoint(ref.host, ref.repository, ref.tag, ref.digest, conf=conf)
    client = location if _same(e, ref, location) else _client(e, location)
    if (e.host, e.repository, e.tag, e.digest) == (ref.host, ref.repository, ref.tag, ref.digest):
        return ref, client
    return Reference(e.host, e.repository, e.tag if e.tag or e.digest else "latest", e.digest), client


def _same(endpoint: Endpoint, ref: Reference, location: RegistryClient) -> bool:
    """Whether ``location`` (the client made for ``ref``'s host) serves ``endpoint`` as it is."""
    return not endpoint.mirror and endpoint.host == ref.host and (not endpoint.insecure or location.plain_http)


def _client(endpoint: Endpoint, like: RegistryClient) -> RegistryClient:
    """A client for ``endpoint`` with ``like``'s timeouts and offline setting: plain HTTP where registries.conf
    says ``insecure``, credentials of its own host."""
    policy = _mirror_policy(like.policy) if endpoint.mirror else like.policy
    plain = endpoint.insecure or (like.plain_http and endpoint.host == like.host)
    return RegistryClient(endpoint.host, plain_http=plain, policy=policy, offline=like.offline, notify=like.notify,
                          cancel=like.cancel)


__all__ = ["MirroredClient", "mirrored_client", "push_target"]
