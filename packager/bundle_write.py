"""Writing a bundle archive: each member along the one tar layout, checkpoints copied by the kernel where the
verification index vouches for them (else hashed while copied), into one file (a temp file renamed into place)
or into split parts (:class:`~packager.formats.volumes.SplitWriter`). :mod:`packager.bundle` decides what goes in."""
from __future__ import annotations

import os
from pathlib import Path

from . import cache
from .errors import BundleError
from .formats.archive import Span, TarLayout, copy_file, copy_hashing, tar_layout
from .formats.manifest import manifest_path_for
from .formats.volumes import SplitWriter
from .fsutil import WriteBehind, atomic_writer, write_all


def write_file(output: Path, manifest_bytes: bytes, unique, signatures, mtime: int, bar) -> None:
    """The archive into a temp file beside ``output``, fsynced and renamed into place when complete (a power loss
    leaves no empty file under the final name)."""
    with atomic_writer(output) as fd:
        _write_archive(_FileSink(fd), manifest_bytes, unique, signatures, mtime, bar)


def _layout(manifest_bytes: bytes, unique, signatures, mtime: int) -> TarLayout:
    """Where every member of the archive goes: the manifest, each checkpoint, the signatures (one computation of
    the tar layout, :func:`~packager.formats.archive.tar_layout`, for the writers and the part count)."""
    return tar_layout([(manifest_path_for(manifest_bytes), len(manifest_bytes)),
                       *((arcname, size) for arcname, _p, size, _s in unique),
                       *((arcname, len(data)) for arcname, data in signatures)], mtime)


def archive_size(manifest_bytes: bytes, unique, signatures, mtime: int) -> int:
    """The exact size of the archive :func:`_write_archive` writes."""
    return _layout(manifest_bytes, unique, signatures, mtime).size


def _write_archive(sink, manifest_bytes: bytes, unique, signatures, mtime: int, bar) -> None:
    """Each member along the layout (header, data, zero padding), then the end-of-archive zeros padded to a record."""
    layout = _layout(manifest_bytes, unique, signatures, mtime)
    contents = [manifest_bytes, *unique, *(data for _arcname, data in signatures)]
    for span, content in zip(layout, contents):
        if isinstance(content, bytes):
            sink.write(span.header + content + bytes(span.padding))
        else:
            _arcname, path, _size, sha = content
            _write_checkpoint(sink, span, path, sha, bar)
    sink.write(bytes(layout.trailer))


class _FileSink:
    """The archive written to one open file: checkpoints copied by the kernel where it can, the file's dirty pages
    kept bounded as it grows (:class:`~packager.fsutil.WriteBehind`)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.behind = WriteBehind(fd)

    def write(self, data) -> None:
        write_all(self.fd, memoryview(data))
        self.behind.wrote(len(data))

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def copy(self, src_fd: int, size: int, bar) -> None:
        copy_file(src_fd, self.fd, size, _Copied(bar, self.behind))

    def copy_hashing(self, src_fd: int, size: int, bar) -> str:
        return copy_hashing(src_fd, self.write, size, bar)


class _Copied:
    """The progress of a kernel copy: to the bar, and to the write-behind."""

    def __init__(self, bar, behind: WriteBehind):
        self.bar, self.behind = bar, behind

    def update(self, n: int) -> None:
        self.behind.wrote(n)
        if self.bar is not None:
            self.bar.update(n)


class _SplitSink:
    """The archive written through a :class:`SplitWriter` into parts of a fixed size."""

    def __init__(self, writer: SplitWriter):
        self.writer = writer

    def write(self, data) -> None:
        self.writer.write(data)

    def tell(self) -> int:
        return self.writer.tell()

    def copy(self, src_fd: int, size: int, bar) -> None:
        self.writer.write_from(src_fd, os.lseek(src_fd, 0, os.SEEK_CUR), size)
        if bar is not None:
            bar.update(size)

    def copy_hashing(self, src_fd: int, size: int, bar) -> str:
        return copy_hashing(src_fd, self.writer.write, size, bar)


def _write_checkpoint(sink, span: Span, path: Path, sha: str, bar) -> None:
    size = span.size
    with open(path, "rb", buffering=0) as src:
        st = os.fstat(src.fileno())
        if st.st_size != size:
            raise BundleError(f"{path} changed while it was being bundled; run the bundle again")
        sink.write(span.header)
        # The manifest's hash is only as good as the index entry behind it: copy in the kernel
        # when the index vouches for exactly this file (size and mtime), else hash while copying.
        entry = cache.index_entry(path)
        if entry and entry.get("sha256") == sha and entry.get("mtime_ns") == st.st_mtime_ns:
            sink.copy(src.fileno(), size, bar)
        elif sink.copy_hashing(src.fileno(), size, bar) != sha:
            raise BundleError(f"{path} changed while it was being bundled; run the bundle again")
        after = os.fstat(src.fileno())
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise BundleError(f"{path} changed while it was being bundled; run the bundle again")
    sink.write(bytes(span.padding))


def write_split(writer: SplitWriter, manifest_bytes: bytes, unique, signatures, mtime: int, bar) -> None:
    """The archive through ``writer`` into parts of its fixed size."""
    _write_archive(_SplitSink(writer), manifest_bytes, unique, signatures, mtime, bar)


__all__ = ["archive_size", "write_file", "write_split"]
