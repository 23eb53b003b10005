"""Install, verify and inspect the bundle an image holds, through the bundle reader and
:mod:`packager.signing` (see :mod:`packager.oci`)."""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from pathlib import Path
from typing import Callable

from .. import cache, signing
from ..bundle import Bundle, open_bundle
from ..errors import OCIError
from ..formats.image import LayerInfo, bundle_layout, check_header, layer_layout
from ..formats.volumes import FileSource
from ..fsutil import reserve_space
from ..home import hub_dir, tvpack_cache_dir
from ..report import Reporter, reporter_for
from ..transport.oci import RegistryClient
from ..transport.stream import cancelled_by_interrupt
from .image import ImageSource
from .remote import RemoteImage, as_reference, client_for, each_layer, locked, progress_bar, read_image
from .staging import rmdir_quietly, unlink_quietly, write_error
from .staging import staging as staging_dir


# -- inspect and install ------------------------------------------------------------------------------
def _pieces(image: RemoteImage, data_of: Callable[[str, int], object]) -> list[tuple[int, object]]:
    """The pieces of the bundle an image holds; ``data_of(path, size)`` gives each checkpoint's data."""
    pieces: list[tuple[int, object]] = []
    layout = bundle_layout(((path, image.size_of(path)) for path in image.order), image.mtime)
    for span in layout:
        data = image.inline[span.path] if span.path in image.inline else data_of(span.path, span.size)
        pieces += [(len(span.header), span.header), (span.size, data), (span.padding, bytes(span.padding))]
    return pieces + [(layout.trailer, bytes(layout.trailer))]


def open_image(ref, *, plain_http: bool = False, client: RegistryClient | None = None) -> "Bundle":
    """The bundle an image holds, opened without fetching a checkpoint (only the image manifest and the
    manifest layer): entries, manifest, sizes; reading a checkpoint is an :class:`OCIError`."""
    image = read_image(ref, client=client, plain_http=plain_http)
    return open_bundle(ImageSource(str(image.reference), _pieces(image, lambda path, size: None)))


class _LazyLayer:
    """A checkpoint's data in a layer fetched on the first read (install_bundle reads the data of what
    it installs, and refuses a conflict before reading anything); one fetch at a time, as the
    registry client serves one thread."""

    def __init__(self, fetch: Callable[[], tuple[FileSource, int]], lock: threading.Lock):
        self._fetch, self._lock = fetch, lock
        self._source: FileSource | None = None
        self._base = 0

    def readinto_at(self, view, offset: int) -> int:
        if self._source is None:
            with self._lock:
                if self._source is None:
                    self._source, self._base = self._fetch()
        return self._source.readinto_at(view, self._base + offset)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()


@contextlib.contextmanager
def _fetching(image: RemoteImage, client: RegistryClient, hub: Path | None, reporter: Reporter, *,
              staging_hub: Path | None = None, jobs: int = 4):
    """An :class:`ImageSource` over ``image``: a checkpoint already under ``hub`` with the right sha256 is read
    where it is; the other layers are fetched when the first of them is read (up to ``jobs`` at once, as pull
    fetches them: :func:`~.remote.each_layer`; digest-checked, resumable, large ones in ranges), their tar
    checked around the data, into this run's private staging directory under ``staging_hub`` (default ``hub``;
    see :func:`packager.oci.staging.staging`). Staged layers are removed at the end (kept after an interrupt, for
    the next run on the image to continue)."""
    staging_hub = staging_hub if staging_hub is not None else hub
    with staging_dir(staging_hub, image.reference.digest.split(":")[1],
                     notify=reporter.notice) as staging:
        with _fetching_into(image, client, staging, hub, reporter, jobs) as source:
            yield source


class _Layers:
    """The layers an install fetches into ``staging``: all of them, in parallel, when the first is read."""

    def __init__(self, image: RemoteImage, client, staging: Path, bar, jobs: int):
        self.image, self.client, self.staging, self.jobs = image, client, staging, jobs
        self.update = locked(bar.update) if bar is not None else None
        self.where = str(image.reference)
        self.pending: dict[str, int] = {}  # path -> size of the checkpoint, not fetched yet
        self.fetched: dict[str, tuple[FileSource, int]] = {}
        self.failed: BaseException | None = None
        self.owned: list = []
        self.staged: list[Path] = []
        self.lock = threading.Lock()

    def lazy(self, path: str, size: int) -> "_LazyLayer":
        self.pending[path] = size
        return _LazyLayer(functools.partial(self.get, path), self.lock)

    def get(self, path: str) -> tuple[FileSource, int]:
        """``path``'s staged layer (called under ``self.lock``): the first call fetches every pending layer."""
        if path not in self.fetched:
            if self.failed is not None:
                raise self.failed
            todo, self.pending = list(self.pending.items()), {}
            try:
                each_layer(todo, self._fetch, self.client, self.jobs)
            except BaseException as exc:
                self.failed = exc
                raise
        return self.fetched[path]

    def _fetch(self, item: tuple[str, int], client) -> None:
        path, size = item
        layer = self.image.layers[path]
        blob = self.staging / f"{layer.digest.split(':')[1]}.tar"
        part = blob.with_name(blob.name + ".part")
        self.staged.extend((blob, part))
        if blob.is_file():  # kept by an interrupted run: pull_blob checks a complete part before a request
            os.replace(blob, part)
        try:
            client.pull_blob(self.image.reference.repository, layer.digest, blob, size=layer.size, part=part,
                             on_bytes=self.update, cancel=client.cancel)
        except OSError as exc:  # writing the staged layer (reading the registry raises OCIError)
            unlink_quietly(part)
            raise write_error(exc, self.staging) from None
        source = FileSource(blob)
        self.owned.append(source)
        self.fetched[path] = (source, 0) if self.image.raw else self._checked(source, path, size, layer)

    def _checked(self, source: FileSource, path: str, size: int, layer: LayerInfo) -> tuple[FileSource, int]:
        """A tvpack layer's tar around the data, as tvpack writes it (a ModelPack layer is the checkpoint itself)."""
        (span,) = layer_layout([(path, size)]).spans
        check_header(source.read_at(len(span.header), 0), path, size, self.where)
        tail = source.read_at(layer.size - span.data_offset - size, span.data_offset + size)
        if tail.count(0) != len(tail):
            raise OCIError(f"{self.where}: not a tvpack layer: non-zero bytes after {path} in its layer")
        return source, span.data_offset


@contextlib.contextmanager
def _fetching_into(image: RemoteImage, client: RegistryClient, staging: Path, hub: Path | None, reporter: Reporter,
                   jobs: int = 4):
    bar = progress_bar(reporter, sum(layer.size for layer in image.layers.values()), f"fetch {image.reference.repository}")
    layers = _Layers(image, client, staging, bar, jobs)
    cancel = client.cancel  # layers are fetched on the reader's worker threads: Ctrl-C reaches them through this

    def data_of(path: str, size: int):
        layer = image.layers[path]
        dest = hub.joinpath(*path.split("/")[1:]) if hub is not None else None
        if dest is not None and dest.is_file() and not dest.is_symlink() \
                and cache.file_sha256(dest) == image.expected[path][1]:
            if bar is not None:
                bar.update(layer.size)
            source = FileSource(dest)  # already there: install_bundle finds it unchanged
        else:
            source = layers.lazy(path, size)
            to_fetch.append(layer.size)
        layers.owned.append(source)
        return source, 0

    to_fetch: list[int] = []
    keep = False
    try:
        with cancelled_by_interrupt(cancel), ImageSource(str(image.reference), _pieces(image, data_of)) as source, \
                reserve_space(staging / "layer", sum(to_fetch)):
            yield source
    except KeyboardInterrupt:
        keep = True
        raise
    finally:
        if bar is not None:
            bar.close()
        for source in layers.owned:
            source.close()
        if not keep:
            for blob in layers.staged:
                unlink_quietly(blob)
            rmdir_quietly(staging)  # empty unless an adopted run left layers of no use now: prune takes those


def install(ref, *, trust=None, torch_home=None, force: bool = False, plain_http: bool = False,
            progress: bool = False, client: RegistryClient | None = None,
            release=None, jobs: int = 4, reporter: Reporter | None = None) -> "signing.SignedInstallReport":
    """Install the bundle an image holds into ``<hub dir>/checkpoints``, as
    :func:`packager.signing.install_signed` installs a bundle file (the signature checks of ``trust``,
    then :func:`packager.bundle.install_bundle`: its decisions, checks and placement), over the image's
    layers: a checkpoint the cache already holds with the right sha256 is not fetched; the other layers are
    fetched when install_bundle first reads one (after the signature checks; a conflict it refuses costs no
    transfer), up to ``jobs`` at once as :func:`~.pull.pull` fetches them (a large one in ranges), into this run's
    staging directory (:func:`packager.oci.staging.staging`); a second install of the same image waits for the
    first and then finds its files in place. Progress and notices go to ``reporter`` (``progress=True``: stderr)."""
    reporter = reporter_for(reporter, progress)
    ref = as_reference(ref)
    client = client_for(ref, client, plain_http, reporter)
    image = read_image(ref, client=client)
    hub = hub_dir(torch_home)
    with _fetching(image, client, hub, reporter, jobs=jobs) as source:
        return signing.install_signed(source, trust if trust is not None else signing.NO_TRUST_POLICY,
                                      torch_home=torch_home, force=force, release=release, reporter=reporter)


def verify(ref, *, trust=None, plain_http: bool = False, progress: bool = False,
           client: RegistryClient | None = None, reporter: Reporter | None = None) -> "signing.SignedVerifyReport":
    """:func:`packager.signing.verify_signed` of the bundle an image holds (signatures, structure, every
    sha256, the weights-only pickle check), its layers fetched into a temporary directory of tvpack's
    cache and removed afterwards."""
    reporter = reporter_for(reporter, progress)
    ref = as_reference(ref)
    client = client_for(ref, client, plain_http, reporter)
    image = read_image(ref, client=client)
    with _fetching(image, client, None, reporter, staging_hub=tvpack_cache_dir() / "oci-verify") as source:
        return signing.verify_signed(source, trust if trust is not None else signing.NO_TRUST_POLICY,
                                     reporter=reporter)


__all__ = ["install", "open_image", "verify"]
