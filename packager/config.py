"""How a call moves bytes: one frozen value instead of a dozen keywords on every function.

The CLI builds one :class:`Config` per command from its options (and the environment it reads once, in
:mod:`packager.env`) and passes it to fetch, bundle, mirror export, install and pull; a library caller
builds one the same way, or passes nothing and gets the environment's defaults at call time. Nothing else
carries these settings: no ContextVar, no module global, no ``os.environ`` write.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from . import env
from .report import SILENT, Reporter, reporter_for
from .transport import DEFAULT_POLICY, Policy

__all__ = ["Config", "config_from"]


@dataclass(frozen=True)
class Config:
    """``mirrors``: tried in order before upstream (None: ``TVPACK_MIRROR``); ``upstream``: then the weights' own
    url; ``offline``: never use the network (None: ``TVPACK_OFFLINE``); ``jobs``: transfers at once; ``policy``:
    timeouts, retries and backoff (:class:`packager.transport.Policy`); ``lock_timeout``: seconds to wait for
    another process's lock before giving up (None: ``TVPACK_LOCK_TIMEOUT``, else wait up to 15 minutes and go
    ahead); ``s3_endpoint``: the S3 endpoint of ``s3://`` mirrors and destinations (None: boto3's own,
    ``AWS_ENDPOINT_URL``); ``live``: discover torchvision's catalog live instead of its snapshot (None: the
    library decides); ``reporter``: where progress and notices go (:mod:`packager.report`; silent by default)."""

    mirrors: tuple[str, ...] | None = None
    upstream: bool = True
    offline: bool | None = None
    jobs: int = 4
    policy: Policy = DEFAULT_POLICY
    lock_timeout: float | None = None
    s3_endpoint: str | None = None
    live: bool | None = None
    reporter: Reporter = field(default=SILENT, compare=False)

    def __post_init__(self):
        if self.mirrors is not None:  # any sequence of str or paths: kept as a tuple of str (hashable, frozen)
            object.__setattr__(self, "mirrors", tuple(os.fspath(m) for m in self.mirrors))

    @property
    def transfer_policy(self) -> Policy:
        """``policy`` with the S3 endpoint in it (the transports read it there)."""
        if self.s3_endpoint and self.policy.s3_endpoint_url != self.s3_endpoint:
            return replace(self.policy, s3_endpoint_url=self.s3_endpoint)
        return self.policy

    @property
    def endpoint_url(self) -> str | None:
        return self.s3_endpoint or self.policy.s3_endpoint_url

    def is_offline(self) -> bool:
        return env.offline() if self.offline is None else self.offline

    def mirror_list(self) -> list[str]:
        """The mirrors to try, the environment's when none were given."""
        return list(env.mirrors() if self.mirrors is None else self.mirrors)

    def resolved_lock_timeout(self) -> float | None:
        return self.lock_timeout if self.lock_timeout is not None else env.lock_timeout()

    def but(self, **changes) -> "Config":
        return replace(self, **changes)


_KEYWORDS = {"mirrors", "upstream", "offline", "jobs", "policy", "lock_timeout", "live", "reporter"}


def config_from(config: Config | None = None, *, progress: bool = False, endpoint_url: str | None = None,
                **keywords) -> Config:
    """The config of one call: ``config`` (default: every setting from the environment at call time) with the
    older keyword arguments laid over it where given (not None), so that ``fetch(mirrors=[...], jobs=8)`` and
    ``fetch(config=Config(mirrors=(...), jobs=8))`` are the same call. ``progress=True`` means bars on stderr
    (:class:`packager.report.TqdmReporter`) unless a ``reporter`` is given; ``endpoint_url`` is ``s3_endpoint``."""
    unknown = set(keywords) - _KEYWORDS
    if unknown:
        raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
    config = config if config is not None else Config()
    changes = {name: value for name, value in keywords.items() if value is not None}
    if "policy" in changes and changes["policy"].s3_endpoint_url and not config.s3_endpoint and not endpoint_url:
        endpoint_url = changes["policy"].s3_endpoint_url
    if endpoint_url:
        changes["s3_endpoint"] = endpoint_url
    if progress and "reporter" not in changes:
        changes["reporter"] = reporter_for(None, progress=True)
    return replace(config, **changes) if changes else config
