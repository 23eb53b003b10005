"""The one :class:`packager.config.Config` and :class:`packager.report.TqdmReporter` a command builds from its
options, once, and passes down as values."""
from __future__ import annotations

from typing import Sequence

from ._common import progress_enabled
from .app import live_registry


def reporter(quiet: bool = False):
    """Notices on stderr always; bars too when stderr is a terminal and not ``--quiet`` / ``--json``."""
    from ..report import TqdmReporter

    return TqdmReporter(bars=progress_enabled(quiet))


def build_config(*, mirrors: Sequence[str] = (), no_upstream: bool = False, offline: bool | None = None,
                 jobs: int = 4, policy=None, lock_timeout: float | None = None, endpoint_url: str | None = None,
                 quiet: bool = False):
    """The command's settings as one value: ``--mirror`` (none given: TVPACK_MIRROR), ``--no-upstream``,
    ``--offline`` (not given: TVPACK_OFFLINE), ``--jobs``, the transfer policy, ``--lock-timeout``,
    ``--endpoint-url``, ``--live-registry`` and the reporter."""
    from ..config import Config
    from ..transport import DEFAULT_POLICY

    return Config(mirrors=tuple(mirrors) or None, upstream=not no_upstream, offline=True if offline else None,
                  jobs=jobs, policy=policy or DEFAULT_POLICY, lock_timeout=lock_timeout, s3_endpoint=endpoint_url,
                  live=live_registry(), reporter=reporter(quiet))
