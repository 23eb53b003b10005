"""Mirror export: publish checkpoints from the cache or a bundle in the upstream layout.

A mirror holds files as :mod:`packager.transport.urls` maps them (``https://download.pytorch.org/
<path>`` at ``<mirror>/<path>``, any other url at ``<mirror>/<basename>``), so a published
directory, web server or bucket is a drop-in ``--mirror``. Where the bytes go is a transport
target (:func:`packager.transport.open_target`: a directory or ``s3://bucket/prefix``).
"""
from __future__ import annotations

import datetime
import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from . import signing
from .bundle import open_bundle
from .cache import ensure_cached, file_sha256
from .config import Config, config_from
from .errors import BundleError, IntegrityError, MirrorError, TvpackError, UsageError
from .home import checkpoints_dir
from .registry import filename_from_url
from .snapshot import resolve
from .transport import open_target
from .transport.urls import mirror_path

# -- export ------------------------------------------------------------------------------------
#
# Exporting writes, for each checkpoint, ``<DEST>/<mirror_path(url)>``, a ``<file>.sha256`` beside
# it (sha256sum format) and finally ``<DEST>/index.json``, so that serving DEST makes it a
# drop-in ``--mirror``. Files already there with the right size and sha256 are skipped.

INDEX_NAME = "index.json"
INDEX_FORMAT = "tvpack-mirror"
INDEX_FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".sha256"
_COPY_CHUNK = 1 << 20

STATUS_WRITTEN = "exported"
STATUS_SKIPPED = "skipped"


@dataclass(frozen=True)
class ExportItem:
    """One checkpoint to publish: what it is, where it goes and how to read its bytes."""

    weights: tuple[str, ...]  # every weights name served by this file
    url: str
    path: str  # inside the mirror
    size: int
    sha256: str
    source: str  # for messages: a cache path or "<bundle>:<member>"
    opener: Callable[[], BinaryIO] = field(repr=False, compare=False)


@dataclass(frozen=True)
class ExportResult:
    weights: tuple[str, ...]
    path: str
    location: str  # the file or object written (or that would be)
    size: int | None
    sha256: str | None
    status: str  # "exported", "skipped"; with dry_run "would export", "would skip", "would fetch"

    def to_dict(self) -> dict:
        return {"weights": list(self.weights), "path": self.path, "location": self.location,
                "size": self.size, "sha256": self.sha256, "status": self.status}


@dataclass(frozen=True)
class MirrorReport:
    destination: str
    index: str
    results: tuple[ExportResult, ...]
    dry_run: bool = False

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def to_dict(self) -> dict:
        return {"destination": self.destination, "index": self.index, "dry_run": self.dry_run,
                "results": [r.to_dict() for r in self.results]}


def safe_relpath(path: str) -> str:
    """``path`` if it stays inside a mirror root and clear of tvpack's own files.

    Relative, no ``..`` or empty parts, no hidden parts (temp files start with a dot), and never
    ``index.json`` or a ``.sha256`` sidecar name.
    """
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts)
            or any(p.startswith(".") for p in parts)):
        raise MirrorError(f"refusing unsafe mirror path {path!r}")
    if path == INDEX_NAME or path.endswith(SIDECAR_SUFFIX):
        raise MirrorError(f"refusing mirror path {path!r}: it would overwrite tvpack's own index or sidecars")
    return path


def sidecar_text(path: str, sha256: str) -> str:
    """``<hex>  <basename>``: ``sha256sum -c`` run in the file's directory checks it."""
    return f"{sha256}  {posixpath.basename(path)}\n"


# -- sources -----------------------------------------------------------------------------------

def _merge_items(items: list[ExportItem]) -> list[ExportItem]:
    """One item per mirror path; two weights sharing one file are listed together."""
    by_path: dict[str, ExportItem] = {}
    for item in items:
        safe_relpath(item.path)
        other = by_path.get(item.path)
        if other is None:
            by_path[item.path] = item
        elif other.sha256 != item.sha256:
            raise MirrorError(f"two different files map to mirror path {item.path!r} "
                              f"({other.url} and {item.url})")
        else:
            names = tuple(dict.fromkeys(other.weights + item.weights))
            by_path[item.path] = ExportItem(names, other.url, other.path, other.size, other.sha256,
                                            other.source, other.opener)
    return list(by_path.values())


def _file_opener(path: Path) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


def items_from_cache(refs, *, torch_home=None, dry_run=False, config: Config | None = None,
                     **keywords) -> tuple[list[ExportItem], list]:
    """Export items for ``refs`` from the local cache, fetching what is missing (unless dry_run) as ``config``
    (or its fields as keywords) says. Returns ``(items, missing_refs)``; ``missing_refs`` is non-empty only
    with ``dry_run``.
    """
    if dry_run:
        ckpt = checkpoints_dir(torch_home)
        present = [ref for ref in refs if (ckpt / ref.filename).is_file()]
        missing = [ref for ref in refs if not (ckpt / ref.filename).is_file()]
        paths = {ref.name: ckpt / ref.filename for ref in present}
    else:
        missing = []
        present = list(refs)
        paths = ensure_cached(present, torch_home=torch_home, config=config_from(config, **keywords))
    items = []
    for ref in present:
        path = Path(paths[ref.name])
        sha256 = file_sha256(path)
        if ref.sha256 and ref.sha256.lower() != sha256:
            raise IntegrityError(f"{path}", expected=ref.sha256.lower(), got=sha256)
        items.append(ExportItem((ref.name,), ref.url, mirror_path(ref.url), path.stat().st_size, sha256,
                                str(path), _file_opener(path)))
    return items, missing


def items_from_bundle(bundle) -> list[ExportItem]:
    """Export items for every checkpoint of an opened bundle (:func:`packager.bundle.open_bundle`).

    The bundle reader has checked the archive's structure and that the manifest matches its
    members; the bytes themselves are checked against the manifest's sha256 as they are copied,
    so a damaged bundle never reaches the mirror. Keep the bundle open while the items are used.
    """
    if bundle.site_files:  # refuse before publishing anything: the mirror would lack these weights
        raise BundleError(f"{bundle.path.name} is a delta bundle: {len(bundle.site_files)} of its checkpoints are "
                          "expected at the site, not carried; publish from that site's cache or a full bundle")
    items = []
    for entry in bundle.entries:
        filename = filename_from_url(entry.url)
        if entry.filename != filename:
            # torch.hub caches basename(url): a file stored under another name serves nobody.
            raise BundleError(f"{bundle.path.name}: {entry.name} is stored as {entry.filename!r}, "
                              f"but its url names {filename!r}")
        opener = (lambda path=entry.path: bundle.open_member(path))
        items.append(ExportItem((entry.name,), entry.url, mirror_path(entry.url), entry.size, entry.sha256,
                                f"{bundle.path.name}:{entry.path}", opener))
    if not items:
        raise BundleError(f"{bundle.path}: the bundle holds no weights")
    return items


# -- the export --------------------------------------------------------------------------------

def _load_index(target) -> dict:
    text = target.read_text(INDEX_NAME)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise MirrorError(f"{target.location(INDEX_NAME)} exists but is not a tvpack mirror index; "
                          "refusing to overwrite it")
    return data


def _write_index(target, results: list[ExportResult], urls: dict[str, str]) -> None:
    with target.index_lock():
        entries = {e["weights"]: e for e in _load_index(target).get("weights", []) if isinstance(e, dict)
                   and "weights" in e}
        for result in results:
            for name in result.weights:
                entries[name] = {"weights": name, "path": result.path, "size": result.size,
                                 "sha256": result.sha256, "url": urls[result.path]}
        data = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "updated": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "weights": [entries[name] for name in sorted(entries)],
        }
        target.write_text(INDEX_NAME, json.dumps(data, indent=2) + "\n")


def _export_one(target, item: ExportItem, dry_run: bool, advance: Callable[[int], None]) -> ExportResult:
    def result(status: str) -> ExportResult:
        return ExportResult(item.weights, item.path, target.location(item.path), item.size, item.sha256, status)

    sidecar = item.path + SIDECAR_SUFFIX
    if target.present(item):
        if not dry_run and target.read_text(sidecar) != sidecar_text(item.path, item.sha256):
            target.write_text(sidecar, sidecar_text(item.path, item.sha256))
        advance(item.size)
        return result("would skip" if dry_run else STATUS_SKIPPED)
    if dry_run:
        advance(item.size)
        return result("would export")
    sent = 0

    def on_bytes(n: int) -> None:
        nonlocal sent
        sent += n
        advance(n)

    try:
        target.put(item, on_bytes)
    except BaseException:
        advance(-sent)
        raise
    target.write_text(sidecar, sidecar_text(item.path, item.sha256))
    return result(STATUS_WRITTEN)


def export_items(items: list[ExportItem], to: str, *, dry_run: bool = False, multipart_threshold: int | None = None,
                 part_size: int | None = None, extra_results: Iterable[ExportResult] = (),
                 config: Config | None = None, **keywords) -> MirrorReport:
    """Publish ``items`` to ``to`` (directory, ``file://`` or ``s3://``) and update its index.json; ``config`` (or
    its fields as keywords, ``endpoint_url`` its S3 endpoint): ``jobs`` at once, progress to its reporter."""
    config = config_from(config, **keywords)
    items = _merge_items(items)
    target = open_target(to, endpoint_url=config.endpoint_url, multipart_threshold=multipart_threshold,
                         part_size=part_size)
    if not dry_run:
        target.prepare()
    bar = config.reporter.progress(sum(item.size for item in items), "mirror", transient=False)

    def advance(n: int) -> None:
        if n:
            bar.update(n)

    results: dict[str, ExportResult] = {}
    errors: list[BaseException] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, config.jobs)) as pool:
            futures = {pool.submit(_export_one, target, item, dry_run, advance): item for item in items}
            for future in as_completed(futures):
                try:
                    results[futures[future].path] = future.result()
                except TvpackError as exc:
                    errors.append(exc)
    finally:
        bar.close()
    ordered = [results[item.path] for item in items if item.path in results]
    if ordered and not dry_run:
        # Record what did make it even when something else failed: the index never lists a file
        # that is not there.
        _write_index(target, ordered, {item.path: item.url for item in items})
    if errors:
        if len(errors) == 1:
            raise errors[0]
        first = errors[0]
        raise MirrorError(f"{len(errors)} of {len(items)} files failed; first: "
                          f"{first.format() if isinstance(first, TvpackError) else first}")
    return MirrorReport(target.description, target.location(INDEX_NAME), (*ordered, *extra_results), dry_run)


def export_mirror(selectors: Iterable[str] = (), *, to: str, refs=None, all_weights: bool = False,
                  registry=(), from_bundle: str | os.PathLike | None = None, torch_home=None,
                  with_backbones: bool = False, dry_run: bool = False, multipart_threshold: int | None = None,
                  part_size: int | None = None, keys: Iterable = (), ca_roots: Iterable = (),
                  config: Config | None = None, **keywords) -> MirrorReport:
    """Export weights to a mirror at ``to``: a directory, ``file://`` url or ``s3://bucket/prefix``.

    The checkpoints come from the local cache (``selectors`` / ``refs`` / ``all_weights``; what
    is missing is fetched first, through the mirrors and upstream) or, with ``from_bundle``,
    straight out of a tvpack bundle with no network beyond the destination. ``to`` then serves as
    ``--mirror``: same layout as download.pytorch.org, ``<file>.sha256`` beside each file and an
    ``index.json``. Files already there with the right size and sha256 are skipped.

    A bundle's signatures are checked as ``install`` checks them, before anything is published:
    against ``keys`` / ``ca_roots`` when given, else the configured trust policy (when one exists).
    How: ``config`` (:class:`packager.config.Config`) or its fields as keywords (``mirrors``, ``upstream``,
    ``offline``, ``jobs``, ``policy``, ``lock_timeout``, ``live``, ``reporter``, ``progress``, and
    ``endpoint_url``: the S3 endpoint that serves ``to`` and the s3:// mirrors missing checkpoints come from).
    """
    selectors = list(selectors)
    keys, ca_roots = list(keys), list(ca_roots)
    config = config_from(config, **keywords)
    outputs = {"dry_run": dry_run, "multipart_threshold": multipart_threshold, "part_size": part_size,
               "config": config}
    if from_bundle is not None:
        if selectors or refs or all_weights:
            raise UsageError("--from-bundle takes no selectors: it publishes the whole bundle")
        trust = signing.trust_policy(keys, ca_roots, torch_home=torch_home)
        with open_bundle(from_bundle) as bundle:
            if trust:
                signing.require_signed(signing.bundle_signatures(bundle, trust.trust), trust, bundle.path.name)
            return export_items(items_from_bundle(bundle), to, **outputs)
    if keys or ca_roots:
        raise UsageError("--key and --ca-root check a bundle's signatures: they go with --from-bundle")
    if refs is None:
        refs = resolve(selectors, registry=registry, all_weights=all_weights, with_backbones=with_backbones,
                       live=config.live)
    target = open_target(to, endpoint_url=config.endpoint_url)
    if not dry_run:
        # Credentials and the bucket (or a writable directory) are checked before anything is fetched: a
        # missing key should not cost a download of every checkpoint first.
        target.prepare()
    items, missing = items_from_cache(list(refs), torch_home=torch_home, dry_run=dry_run, config=config)
    planned = [ExportResult((ref.name,), mirror_path(ref.url), target.location(mirror_path(ref.url)),
                            ref.size_hint, ref.sha256, "would fetch") for ref in missing]
    return export_items(items, to, extra_results=planned, **outputs)
