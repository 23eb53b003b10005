"""Pull an image back into the bundle it holds, byte for byte (see :mod:`packager.oci`)."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..bundle import open_bundle
from ..errors import BundleError, OCIError
from ..formats.archive import Span
from ..formats.image import bundle_layout, check_header, layer_layout
from ..fsutil import WriteBehind, adopt, human_bytes, left_behind, pwrite_all, reserve_space, short_name, temp_path
from ..report import Reporter, reporter_for
from ..transport.oci import RegistryClient
from .remote import RemoteImage, as_reference, client_for, each_layer, locked, progress_bar, read_image, stream_blob
from .staging import unlink_quietly, write_error


# -- pull ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PullReport:
    reference: str
    digest: str
    path: Path
    manifest_id: str
    size: int
    weights: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "path": str(self.path),
                "manifest_id": self.manifest_id, "size": self.size, "weights": list(self.weights)}


class _Output:
    """The file a pull writes: bytes placed at their offsets by any number of threads, its dirty pages kept bounded
    as they go (:class:`~packager.fsutil.WriteBehind`)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.behind = WriteBehind(fd)

    def place(self, data, offset: int) -> None:
        pwrite_all(self.fd, data, offset)
        self.behind.wrote(len(data))


class _LayerWriter:
    """Takes one checkpoint layer's bytes in order (on the transport's worker thread, after they were
    hashed for the digest) and writes the member they hold (header, data, padding) at ``offset`` of
    ``out``, checking on the way that the tar around the data is exactly what tvpack writes; the data's
    sha256 is computed on one more thread while the bytes are written. The transport reuses its buffers once
    ``write`` returns, so every use of them ends before it does."""

    def __init__(self, out: _Output, span: Span, where: str, place: bool = True):
        self.out, self.offset, self.path, self.size, self.where = out, span.offset, span.path, span.size, where
        self.place = place  # False: check and hash only (the bytes are placed by a :class:`_LayerTarget`)
        layout = layer_layout([(span.path, span.size)])
        (in_layer,) = layout.spans
        self.header_len = len(in_layer.header)
        self.data_end = self.header_len + span.size
        self.member_end = in_layer.end
        self.total = layout.size
        self.pos = 0
        self.head = bytearray()
        self.content = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvpack-oci-sha")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        start, end = self.pos, self.pos + len(view)
        if end > self.total:
            raise OCIError(f"{self.where}: the layer of {self.path} is longer than a tar of it")
        if start < self.header_len:
            self.head += view[:self.header_len - start]
            if len(self.head) == self.header_len:
                check_header(bytes(self.head), self.path, self.size, self.where)
        tail = max(start, self.data_end)
        if tail < end and view[tail - start:].tobytes().count(0) != end - tail:
            raise OCIError(f"{self.where}: not a tvpack layer: non-zero bytes after {self.path} in its layer")
        lo, hi = max(start, self.header_len), min(end, self.data_end)
        job = self._pool.submit(self.content.update, view[lo - start:hi - start]) if lo < hi else None
        try:
            hi = min(end, self.member_end)
            if self.place and start < hi:
                self.out.place(view[:hi - start], self.offset + start)
        finally:
            if job is not None:
                job.result()  # the buffer is the transport's again once this returns
        self.pos = end

    def finish(self) -> str:
        """The data's sha256 (hex), once every byte of the layer arrived."""
        self.close()
        if self.pos != self.total:
            raise OCIError(f"{self.where}: the layer of {self.path} ended early")
        return self.content.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _RawWriter(_LayerWriter):
    """The same for a ModelPack layer, which is the checkpoint itself: the member's header (as the bundle
    writer makes it) and padding are written here, the layer's bytes are the data."""

    def __init__(self, out: _Output, span: Span, where: str, place: bool = True):
        super().__init__(out, span, where, place)
        out.place(span.header, span.offset)
        out.place(bytes(span.padding), span.data_offset + span.size)
        self.data_offset, self.total = span.data_offset, span.size

    def write(self, data: bytes) -> None:
        if self.pos + len(data) > self.total:
            raise OCIError(f"{self.where}: the layer of {self.path} is longer than the file")
        self.content.update(data)  # here, not on the hashing thread: the transport may reuse its buffer
        if self.place:
            self.out.place(data, self.data_offset + self.pos)
        self.pos += len(data)


class _LayerTarget:
    """Where a layer fetched in ranges puts its bytes: the member it holds at its offsets of ``out`` (a ModelPack
    layer: the data), the rest of the layer (the tar's end, zeros) kept aside to be checked in order."""

    def __init__(self, out: _Output, span: Span, raw: bool):
        self.out = out
        if raw:
            self.base, self.placed, total = span.data_offset, span.size, span.size
        else:
            (in_layer,) = layer_layout([(span.path, span.size)]).spans
            self.base, self.placed, total = span.offset, in_layer.end, layer_layout([(span.path, span.size)]).size
        self.tail = bytearray(max(0, total - self.placed))

    def write_at(self, pos: int, view) -> None:
        end = pos + len(view)
        if pos < self.placed:
            self.out.place(view[:self.placed - pos], self.base + pos)
        if end > self.placed:
            lo = max(pos, self.placed)
            self.tail[lo - self.placed:end - self.placed] = view[lo - pos:]

    def read_at(self, pos: int, n: int) -> bytes:
        if pos < self.placed:
            return os.pread(self.out.fd, min(n, self.placed - pos), self.base + pos)
        return bytes(self.tail[pos - self.placed:pos - self.placed + n])

    def sync(self) -> None:
        pass  # the pull fsyncs the whole file once


def _stream_layer(client, repository: str, layer, out: _Output, span: Span, where: str, bar, raw: bool = False,
                  update=None, cancel=None) -> str:
    """One checkpoint layer streamed into its member of the bundle being written (a large one in ranges, at
    their offsets); the checkpoint's sha256."""
    kind = _RawWriter if raw else _LayerWriter
    if isinstance(client, RegistryClient):
        checker = kind(out, span, where, place=False)
        try:
            if client.blob_ranges(repository, layer.digest, _LayerTarget(out, span, raw), size=layer.size,
                                  observe=checker.write, on_bytes=update or (bar.update if bar is not None else None),
                                  cancel=cancel):
                return checker.finish()
        finally:
            checker.close()
    writers = [kind(out, span, where)]

    def restart():  # another endpoint (a mirror failed): the member again, from its start
        writers[-1].close()
        writers.append(kind(out, span, where))

    try:
        stream_blob(client, repository, layer.digest, lambda data: writers[-1].write(data), restart=restart,
                    size=layer.size, on_bytes=update or (bar.update if bar is not None else None), cancel=cancel)
    finally:
        writers[-1].close()
    return writers[-1].finish()


def pull(ref, output, *, plain_http: bool = False, progress: bool = False,
         client: RegistryClient | None = None, jobs: int = 4, reporter: Reporter | None = None) -> PullReport:
    """Write the bundle an image holds to ``output`` (a temp file beside it, renamed when complete and
    checked): byte for byte the bundle that was pushed. Every layer is checked as it streams in (its
    digest, its tar, the checkpoint's sha256 against the bundle manifest); nothing is left on failure.

    An interrupted pull (Ctrl-C, SIGTERM) keeps its temp file; the next pull of the same image to the same
    ``output`` takes it over and fetches only the layers whose checkpoint is not already there in full
    (each one re-hashed and compared with the bundle manifest before it counts).

    Up to ``jobs`` layers are fetched at once, each written at its own offsets of the temp file. Progress and
    notices go to ``reporter`` (:mod:`packager.report`; ``progress=True``: bars on stderr)."""
    reporter = reporter_for(reporter, progress)
    ref = as_reference(ref)
    client = client_for(ref, client, plain_http, reporter)
    # 1. the image manifest and its manifest layer, checked: where every member of the bundle goes
    image = read_image(ref, client=client)
    where = str(image.reference)
    output = Path(output)
    layout = bundle_layout(((p, image.size_of(p)) for p in image.order), image.mtime)
    # 2. the temp file: an interrupted pull's of this image, or a new one (refused before the first request
    # when the disk cannot take the rest)
    tmp, adopted = _temp_file(output, image)
    with reserve_space(tmp, layout.size - (_size_of(tmp) if adopted else 0)):
        pass
    bar = progress_bar(reporter, sum(layer.size for layer in image.layers.values()), f"pull {output.name}")
    try:
        # 3. each member at its place, then the end of the archive
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | (0 if adopted else os.O_EXCL), 0o644)
        try:
            missing = []
            for span in layout:
                if span.path in image.inline:
                    pwrite_all(fd, span.header + image.inline[span.path] + bytes(span.padding), span.offset)
                elif adopted and _holds_member(fd, span, image):
                    if bar is not None:
                        bar.update(image.layers[span.path].size)
                else:
                    missing.append(span)
            _pull_layers(_Output(fd), missing, image, client, bar, jobs)
            pwrite_all(fd, bytes(layout.trailer), layout.end)
            os.ftruncate(fd, layout.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        # 4. read back by the bundle reader, as any bundle file is, then renamed into place
        weights = _bundle_weights(tmp, where)
        os.replace(tmp, output)
    except OSError as exc:
        unlink_quietly(tmp)
        raise write_error(exc, output.parent) from None
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: what arrived is kept for the next pull of this image
        if _size_of(tmp):
            reporter.notice(f"kept {human_bytes(_size_of(tmp))} in {tmp}: pulling {where} to {output} again "
                            "continues from there")
        else:
            unlink_quietly(tmp)
        raise
    except BaseException:
        unlink_quietly(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    return PullReport(where, image.reference.digest, output, image.info.manifest_id, layout.size, weights)


def _temp_file(output: Path, image: RemoteImage) -> tuple[Path, bool]:
    """The temp file to pull into, and whether it is an interrupted pull's (adopted: see :func:`_adopt_pull`)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {output.parent}: {exc.strerror or exc}") from None
    suffix = f".{image.reference.digest.split(':')[1][:16]}{PULL_SUFFIX}"
    tmp = _adopt_pull(output, suffix)
    return (tmp, True) if tmp is not None else (temp_path(output, suffix), False)


def _pull_layers(out: _Output, spans: list[Span], image: RemoteImage, client, bar, jobs: int) -> None:
    """The checkpoint layers of ``spans``, up to ``jobs`` at once (each its own blob at its own offsets;
    :func:`~.remote.each_layer`)."""
    update = locked(bar.update) if bar is not None else None

    def one(span: Span, worker_client) -> None:
        _pull_layer(out, span, image, worker_client, bar, update)  # each client stops on the shared Cancel

    each_layer(spans, one, client, jobs)


def _pull_layer(out: _Output, span: Span, image: RemoteImage, client, bar, update=None, cancel=None) -> None:
    """One checkpoint's layer streamed into its place in ``out``: digest, tar and the checkpoint's sha256 checked."""
    where = str(image.reference)
    layer = image.layers[span.path]
    sha = _stream_layer(client, image.reference.repository, layer, out, span, where, bar, image.raw, update, cancel)
    if sha != layer.sha256:
        raise OCIError(f"{where}: {span.path} refused: its sha256 is {sha}, the bundle manifest says {layer.sha256}")


def _bundle_weights(path: Path, where: str) -> tuple[str, ...]:
    """The weights of the bundle pulled into ``path``, once the bundle reader accepts it."""
    try:
        with open_bundle(path) as opened:
            return tuple(e.name for e in opened.entries)
    except BundleError as exc:
        raise OCIError(f"{where}: the image does not make a valid bundle: {exc.message}") from None


PULL_SUFFIX = ".tvpack-pull"


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _adopt_pull(output: Path, suffix: str) -> Path | None:
    """The temp file of an interrupted pull of the same image to ``output``, renamed to this process's own
    temp name (one adopter wins); temp files of other images' interrupted pulls to ``output`` are removed.
    Only a file whose owner is gone (or is this process) is taken: pulls write the same bytes at the same
    offsets, so even a mistaken take-over could not mix two bundles."""
    prefix = f".{short_name(output.name)}."
    try:
        names = sorted(os.listdir(output.parent))
    except OSError:
        return None
    found = None
    for name in names:
        if not (name.startswith(prefix) and name.endswith(PULL_SUFFIX)):
            continue
        pid, old = name[len(prefix):].split(".", 1)[0], output.parent / name
        if not pid.isdigit() or not left_behind(int(pid), old, ours=True):
            continue
        if not name.endswith(suffix):
            unlink_quietly(old)  # another image's: of no use to this pull
        elif found is None:
            mine = temp_path(output, suffix)
            if adopt(old, mine):
                found = mine
    return found


def _holds_member(fd: int, span: Span, image: RemoteImage) -> bool:
    """Whether an adopted temp file already holds this checkpoint's member in full: the exact header, and data
    whose sha256 is the one the bundle manifest states (its padding is zeros: written so, or a hole)."""
    if os.pread(fd, len(span.header), span.offset) != span.header:
        return False
    hasher = hashlib.sha256()
    pos, end = span.data_offset, span.data_offset + span.size
    while pos < end:
        chunk = os.pread(fd, min(8 << 20, end - pos), pos)
        if not chunk:
            return False
        hasher.update(chunk)
        pos += len(chunk)
    return hasher.hexdigest() == image.layers[span.path].sha256


__all__ = ["PULL_SUFFIX", "PullReport", "pull"]
