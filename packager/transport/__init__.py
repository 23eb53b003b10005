"""Transport: one transfer of bytes to or from a kind of store, picked by url scheme.

Reading (:func:`transfer`) streams an object into a part file, hashing while it streams, resuming
and retrying: one engine (:mod:`.engine`, over the machinery of :mod:`.stream`) reads every
:class:`~.engine.Source` (:mod:`.http`, :mod:`.file`, :mod:`.s3`, OCI blobs), a large one in ranges over
several connections (:mod:`.segments`). Writing (:func:`open_target`) publishes verified objects to a
directory or a bucket. :mod:`.urls` maps a weights url to its mirror locations. Importing this package never imports
torch, requests or boto3.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import DownloadError, MirrorError, UsageError
from .engine import Body, NoticeFn, Source, fetch, stream
from .segments import Connections
from .stream import (
    DEFAULT_POLICY,
    Cancel,
    Cancelled,
    Policy,
    ProgressFn,
    Result,
    TotalFn,
    Verifier,
    discard_part,
    open_part,
    part_state_path,
)

__all__ = ["DEFAULT_POLICY", "Body", "Cancel", "Cancelled", "Connections", "Policy", "Result", "Source", "Verifier",
           "discard_part", "fetch", "open_part", "open_target", "part_state_path", "source_of", "stream", "transfer"]


def source_of(url: str, *, policy: Policy = DEFAULT_POLICY, session=None):
    """The :class:`~.engine.Source` that reads ``url`` (http(s)://, s3://, file:// or a path)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        from .http import HttpSource

        return HttpSource(url, session, max_redirects=policy.max_redirects)
    if parsed.scheme == "s3":
        try:
            from .s3 import S3Source
        except ImportError:
            raise DownloadError(f"{url}: s3:// mirrors need the s3 extra (pip install 'tvpack[s3]')") from None
        return S3Source(url, policy, policy.s3_endpoint_url)
    if parsed.scheme in ("file", ""):
        from .file import FileSource

        return FileSource(url, Path(unquote(parsed.path) if parsed.scheme == "file" else url))
    raise DownloadError(f"{url}: unsupported url scheme {parsed.scheme!r}")


def transfer(url: str, part: Path, verifier: Verifier, *, policy: Policy = DEFAULT_POLICY,
             session=None, on_bytes: ProgressFn | None = None, on_total: TotalFn | None = None,
             cancel: Cancel | None = None, notify: NoticeFn | None = None, ledger=None, connections=None) -> Result:
    """Fetch ``url`` into ``part`` (appending to what is there), fsync and verify it.

    One engine for every scheme (:func:`.engine.fetch` over :func:`source_of`). Raises
    DownloadError (after retries, or at once for a 4xx and other errors that cannot heal),
    IntegrityError (bytes wrong: the part is removed), CacheError (the disk cannot take it),
    Cancelled (``cancel`` was set: stopped between chunks or by aborting a blocked read). On
    DownloadError and Cancelled the part is kept so that a later call resumes it. ``notify`` is
    told, in one line, what each retry waits for. ``ledger``: the run's :class:`~packager.fsutil.SpaceLedger`;
    ``connections``: the run's :class:`~.segments.Connections` (the extra connections its large files share).
    """
    return fetch(source_of(url, policy=policy, session=session), part, verifier, policy, on_bytes=on_bytes,
                 on_total=on_total, cancel=cancel, notify=notify, ledger=ledger, connections=connections)


def open_target(dest: str, *, endpoint_url: str | None = None, multipart_threshold: int | None = None,
                part_size: int | None = None):
    """A writable mirror destination for ``dest`` (a directory, ``file://`` or ``s3://`` url)."""
    raw = dest
    dest = str(dest).strip()
    if not dest:
        raise UsageError("empty mirror destination (--to): give a directory, file:// or s3:// url")
    try:
        urlparse(dest).port  # noqa: B018 - an unparsable url (bad IPv6 brackets, port) fails here
    except ValueError as exc:
        raise UsageError(f"bad mirror destination {raw!r}: {exc}") from None
    if dest.startswith("s3://"):
        from .s3 import S3Target

        return S3Target(dest, endpoint_url=endpoint_url, multipart_threshold=multipart_threshold,
                        part_size=part_size)
    parsed = urlparse(dest)
    if parsed.scheme == "file":
        if not parsed.path:
            raise UsageError(f"bad mirror destination {raw!r}: no directory path")
        from .file import DirectoryTarget

        return DirectoryTarget(Path(unquote(parsed.path)))
    if "://" in dest:
        raise MirrorError(f"cannot export to {dest}: use a directory (the one your web server serves), "
                          "file:// or s3://")
    from .file import DirectoryTarget

    return DirectoryTarget(Path(dest).expanduser().resolve())

