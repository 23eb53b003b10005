"""Mirrors: where else a weights url can be fetched from, and (export) how to build one.

A mirror holds files in the upstream layout: ``https://download.pytorch.org/<path>`` lives at
``<mirror>/<path>`` (``models/...``, ``models/quantized/...``), any other url at
``<mirror>/<basename>``. Mirrors are http(s) URLs, ``file://`` URLs, plain directories or
``s3://bucket/prefix``.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable
from urllib.parse import unquote, urlparse

from . import env
from .errors import IntegrityError, MirrorError, TvpackError, UsageError
from .fsutil import atomic_write_text, fsync_dir, temp_path

UPSTREAM_HOST = "download.pytorch.org"


def mirror_path(url: str) -> str:
    """The path of ``url`` inside a mirror (no leading slash)."""
    parsed = urlparse(url)
    if parsed.hostname == UPSTREAM_HOST:
        return parsed.path.lstrip("/")
    return os.path.basename(parsed.path)


MIRROR_SCHEMES = ("http", "https", "file", "s3")


def normalize_mirror(mirror: str) -> str:
    """A mirror spec as a URL: plain directories become ``file://`` URLs.

    Raises :class:`UsageError` for a spec that can never work (empty, unknown scheme, no host,
    unparsable), so a typo fails at once with the mirror named rather than once per file.
    """
    raw = mirror
    mirror = mirror.strip()
    if not mirror:
        raise UsageError("empty --mirror given (expected http(s)://, file://, s3:// or a directory)")
    if "://" not in mirror:
        return Path(mirror).expanduser().resolve().as_uri()
    try:
        parsed = urlparse(mirror)
        parsed.port  # noqa: B018 - validates the port (and IPv6 brackets) now
    except ValueError as exc:
        raise UsageError(f"bad mirror {raw!r}: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme not in MIRROR_SCHEMES:
        raise UsageError(f"bad mirror {raw!r}: unsupported scheme {parsed.scheme!r} "
                         f"(expected http(s)://, file://, s3:// or a directory)")
    if scheme in ("http", "https", "s3") and not parsed.netloc:
        raise UsageError(f"bad mirror {raw!r}: no {'bucket' if scheme == 's3' else 'host'}")
    return mirror


def candidate_urls(url: str, mirrors: Iterable[str] | None = None, *, upstream: bool = True) -> list[str]:
    """Where to try fetching ``url`` from, in order: each mirror, then upstream (unless disabled).

    ``mirrors=None`` means the ``TVPACK_MIRROR`` environment variable.
    """
    mirrors = env.mirrors() if mirrors is None else list(mirrors)
    out = []
    for mirror in mirrors:
        base = normalize_mirror(mirror).rstrip("/")
        out.append(f"{base}/{mirror_path(url)}")
    if upstream:
        out.append(url)
    return list(dict.fromkeys(out))


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


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            data = f.read(_COPY_CHUNK)
            if not data:
                return digest.hexdigest()
            digest.update(data)


class DirectoryTarget:
    """A local or network directory (``/path`` or ``file://``)."""

    def __init__(self, root: Path):
        self.root = root
        self.description = str(root)

    def location(self, rel: str) -> str:
        return str(self.root / rel)

    def prepare(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise MirrorError(f"mirror destination {self.root} exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MirrorError(f"cannot create mirror directory {self.root}: {exc.strerror or exc}") from exc

    def present(self, item: ExportItem) -> bool:
        dest = self.root / item.path
        try:
            if not dest.is_file() or dest.stat().st_size != item.size:
                return False
            return _hash_file(dest) == item.sha256
        except OSError:
            return False

    def put(self, item: ExportItem, progress: Callable[[int], None]) -> None:
        """Copy while hashing into a unique temp file beside the target; replace only if verified."""
        dest = self.root / item.path
        tmp = temp_path(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise MirrorError(f"cannot write to {dest.parent}: {exc.strerror or exc}") from exc
        try:
            digest = hashlib.sha256()
            count = 0
            with os.fdopen(fd, "wb") as out, item.opener() as src:
                while True:
                    data = src.read(_COPY_CHUNK)
                    if not data:
                        break
                    count += len(data)
                    digest.update(data)
                    out.write(data)
                    progress(len(data))
                out.flush()
                os.fsync(out.fileno())
            _check_copy(item, count, digest.hexdigest())
            os.chmod(tmp, 0o644)  # readable by a web server, whatever the umask
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise MirrorError(f"cannot write {dest}: {exc.strerror or exc}") from exc
            raise

    def read_text(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise MirrorError(f"cannot read {self.root / rel}: {exc}") from exc

    def write_text(self, rel: str, text: str) -> None:
        dest = self.root / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dest, text, mode=0o644)
        except OSError as exc:
            raise MirrorError(f"cannot write {dest}: {exc.strerror or exc}") from exc

    def index_lock(self):
        # Two exporters into one directory must not lose each other's index entries. The lock only
        # serialises the read-merge-write; the write itself is atomic either way.
        from filelock import FileLock

        return FileLock(str(self.root / ".tvpack-index.lock"), timeout=120)


class S3Target:
    """``s3://bucket/prefix`` through :mod:`packager.s3`."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, multipart_threshold: int | None = None,
                 part_size: int | None = None):
        from . import s3

        self._s3 = s3
        bucket, prefix = s3.parse_url(url)
        self.base = f"s3://{bucket}/{prefix}".rstrip("/")
        self.description = self.base
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold or s3.MULTIPART_THRESHOLD
        self.part_size = part_size or s3.PART_SIZE

    def location(self, rel: str) -> str:
        return self._s3.join(self.base, rel)

    def prepare(self) -> None:
        bucket, _ = self._s3.parse_url(self.base)
        s3_client = self._s3.client(self.endpoint_url)
        self._s3._call("open bucket", f"s3://{bucket}", s3_client.head_bucket, Bucket=bucket)

    def present(self, item: ExportItem) -> bool:
        info = self._s3.head(self.location(item.path), endpoint_url=self.endpoint_url)
        if info is None or info.size != item.size:
            return False
        full = self._s3.expected_checksum(item.sha256, None)
        if info.checksum_sha256 and "-" not in info.etag:
            # One-part object: the server's checksum is of the whole content, so it decides.
            return info.checksum_sha256 == full
        # A multipart object's checksum is of its parts; trust the sha256 our own verified upload
        # recorded (a later overwrite by another tool drops that metadata).
        return info.sha256 == item.sha256

    def put(self, item: ExportItem, progress: Callable[[int], None]) -> None:
        with item.opener() as src:
            self._s3.upload(src, item.size, self.location(item.path), sha256=item.sha256,
                            endpoint_url=self.endpoint_url, multipart_threshold=self.multipart_threshold,
                            part_size=self.part_size, progress=progress)

    def read_text(self, rel: str) -> str | None:
        data = self._s3.read_bytes(self.location(rel), endpoint_url=self.endpoint_url)
        return None if data is None else data.decode("utf-8", errors="replace")

    def write_text(self, rel: str, text: str) -> None:
        content_type = "application/json" if rel.endswith(".json") else "text/plain"
        self._s3.put_bytes(self.location(rel), text.encode(), content_type=content_type,
                           endpoint_url=self.endpoint_url)

    def index_lock(self):
        return contextlib.nullcontext()


def _check_copy(item: ExportItem, count: int, digest: str) -> None:
    if count != item.size:
        raise IntegrityError(f"{item.source}", expected=f"{item.size} bytes", got=f"{count} bytes")
    if digest != item.sha256:
        raise IntegrityError(f"{item.source}: sha256 mismatch", expected=item.sha256, got=digest)


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
        return S3Target(dest, endpoint_url=endpoint_url, multipart_threshold=multipart_threshold,
                        part_size=part_size)
    parsed = urlparse(dest)
    if parsed.scheme == "file":
        if not parsed.path:
            raise UsageError(f"bad mirror destination {raw!r}: no directory path")
        return DirectoryTarget(Path(unquote(parsed.path)))
    if "://" in dest:
        raise MirrorError(f"cannot export to {dest}: use a directory (the one your web server serves), "
                          "file:// or s3://")
    return DirectoryTarget(Path(dest).expanduser().resolve())


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


def items_from_cache(refs, *, torch_home=None, mirrors=None, upstream=True, offline=None, jobs=4,
                     progress=False, dry_run=False) -> tuple[list[ExportItem], list]:
    """Export items for ``refs`` from the local cache, fetching what is missing (unless dry_run).

    Returns ``(items, missing_refs)``; ``missing_refs`` is non-empty only with ``dry_run``.
    """
    from .cache import ensure_cached, file_sha256
    from .home import checkpoints_dir

    if dry_run:
        ckpt = checkpoints_dir(torch_home)
        present = [ref for ref in refs if (ckpt / ref.filename).is_file()]
        missing = [ref for ref in refs if not (ckpt / ref.filename).is_file()]
        paths = {ref.name: ckpt / ref.filename for ref in present}
    else:
        missing = []
        present = list(refs)
        paths = ensure_cached(present, torch_home=torch_home, mirrors=mirrors, upstream=upstream,
                              offline=offline, jobs=jobs, progress=progress)
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
    from .errors import BundleError
    from .registry import filename_from_url

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
    except ValueError:
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


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="mirror", file=sys.stderr,
                leave=True, dynamic_ncols=True)


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


def export_items(items: list[ExportItem], to: str, *, jobs: int = 4, endpoint_url: str | None = None,
                 dry_run: bool = False, progress: bool = False, multipart_threshold: int | None = None,
                 part_size: int | None = None, extra_results: Iterable[ExportResult] = ()) -> MirrorReport:
    """Publish ``items`` to ``to`` (directory, ``file://`` or ``s3://``) and update its index.json."""
    items = _merge_items(items)
    target = open_target(to, endpoint_url=endpoint_url, multipart_threshold=multipart_threshold,
                         part_size=part_size)
    if not dry_run:
        target.prepare()
    bar = _progress_bar(sum(item.size for item in items), progress)
    bar_lock = threading.Lock()

    def advance(n: int) -> None:
        if bar is not None and n:
            with bar_lock:
                bar.update(n)

    results: dict[str, ExportResult] = {}
    errors: list[BaseException] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(_export_one, target, item, dry_run, advance): item for item in items}
            for future in as_completed(futures):
                try:
                    results[futures[future].path] = future.result()
                except TvpackError as exc:
                    errors.append(exc)
    finally:
        if bar is not None:
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
                  registry=(), from_bundle: str | os.PathLike | None = None, torch_home=None, mirrors=None,
                  upstream: bool = True, offline: bool | None = None, with_backbones: bool = False,
                  jobs: int = 4, endpoint_url: str | None = None, dry_run: bool = False, progress: bool = False,
                  multipart_threshold: int | None = None, part_size: int | None = None) -> MirrorReport:
    """Export weights to a mirror at ``to``: a directory, ``file://`` url or ``s3://bucket/prefix``.

    The checkpoints come from the local cache (``selectors`` / ``refs`` / ``all_weights``; what
    is missing is fetched first, through ``mirrors`` and upstream) or, with ``from_bundle``,
    straight out of a tvpack bundle with no network beyond the destination. ``to`` then serves as
    ``--mirror``: same layout as download.pytorch.org, ``<file>.sha256`` beside each file and an
    ``index.json``. Files already there with the right size and sha256 are skipped.
    """
    selectors = list(selectors)
    if from_bundle is not None:
        if selectors or refs or all_weights:
            raise UsageError("--from-bundle takes no selectors: it publishes the whole bundle")
        from .bundle import open_bundle

        with open_bundle(from_bundle) as bundle:
            return export_items(items_from_bundle(bundle), to, jobs=jobs, endpoint_url=endpoint_url,
                                dry_run=dry_run, progress=progress, multipart_threshold=multipart_threshold,
                                part_size=part_size)
    if refs is None:
        from .registry import resolve

        refs = resolve(selectors, registry=registry, all_weights=all_weights, with_backbones=with_backbones)
    with contextlib.ExitStack() as stack:
        if endpoint_url:
            from . import s3

            # The endpoint also serves s3:// mirrors the missing checkpoints come from.
            stack.enter_context(s3.configured(endpoint_url=endpoint_url))
        items, missing = items_from_cache(list(refs), torch_home=torch_home, mirrors=mirrors,
                                          upstream=upstream, offline=offline, jobs=jobs, progress=progress,
                                          dry_run=dry_run)
    target_for_names = open_target(to, endpoint_url=endpoint_url)
    planned = [ExportResult((ref.name,), mirror_path(ref.url), target_for_names.location(mirror_path(ref.url)),
                            ref.size_hint, ref.sha256, "would fetch") for ref in missing]
    return export_items(items, to, jobs=jobs, endpoint_url=endpoint_url, dry_run=dry_run, progress=progress,
                        multipart_threshold=multipart_threshold, part_size=part_size, extra_results=planned)
