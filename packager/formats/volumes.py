"""Bundles split across removable media: ``NAME.000``, ``NAME.001``, ... plus ``NAME.sha256``.

The format is deliberately the one coreutils already speaks, so a site can check a copy with nothing
but ``cd DIR && sha256sum -c NAME.sha256`` and rebuild the bundle with ``cat NAME.0* > NAME``:

* every part is exactly ``part_size`` bytes except the last, which holds 1..``part_size`` bytes
  (a bundle that is an exact multiple of ``part_size`` has no empty trailing part);
* parts are numbered with three digits from ``.000``, so there are at most 1000 of them and a
  shell glob sorts them in order; a bundle that fits in one part is still ``NAME.000`` plus
  ``NAME.sha256``, so readers see one uniform layout;
* ``NAME.sha256`` lists every part, in order, as ``<sha256 hex>  NAME.NNN`` (file names only).

Writing (:class:`SplitWriter`, :func:`split_file`) hashes each part as it is written, keeps
everything under hidden temporary names, and only on ``commit()`` fsyncs and renames the parts into
place, ``NAME.sha256`` last: a ``NAME.sha256`` beside the parts means the set is complete.

Reading (:func:`open_volumes`, :func:`open_source`) never concatenates: the site's disk may not hold
the bundle twice. :class:`Volumes` and :class:`FileSource` share one small positional interface
(``size``, ``name``, ``parts``, ``read_at``, ``readinto_at``, ``diagnose``, ``check_all``,
``close``) so the tar reader can take either. Opening checks what is cheap (the listing, every part
present, sizes, no unlisted part); hashing every part would read the data a second time, so it is
left to :meth:`Volumes.diagnose` (called when a member hash or a tar header fails, to name the part
to copy again) and :meth:`Volumes.check_all` (deep verification).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError, UsageError, VolumeError
from ..fsutil import fsync_dir, temp_path, write_all

MAX_PARTS = 1000  # three digits: .000 .. .999
CHUNK = 8 << 20  # 8 MiB: large enough that syscalls do not dominate, small enough to stay in cache
_MAX_LISTING = 1 << 20  # a NAME.sha256 for 1000 parts is under 100 KB
_PART_SUFFIX = re.compile(r"\.(\d{3})$")
_ANY_PART_SUFFIX = re.compile(r"\.\d+$")
_LISTING_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")

# ---------------------------------------------------------------------------------------------- sizes

_BINARY = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE = re.compile(r"\s*(\d+)\s*(?:([KMGT])(I?B)?|B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a size such as ``4G``, ``4GiB``, ``25GB``, ``700M``, ``512K``, ``1T`` or ``1000000``.

    A bare unit letter is binary, as in coreutils ``split -b 4G`` (4 GiB = 4 * 2**30); ``iB`` is
    binary too; ``B`` after the letter is decimal (``25GB`` = 25 * 10**9, a disc's label). Letters
    may be lower case. Only whole numbers; zero and negative sizes are refused.
    """
    match = _SIZE.fullmatch(str(text))
    if match is None:
        raise UsageError(f"invalid size {text!r}: use a whole number of bytes or K, M, G, T (binary) or KB, MB, GB, TB "
                         "(decimal), e.g. 4G or 25GB")
    number, unit, suffix = match.groups()
    unit = (unit or "").upper()
    decimal = unit and suffix is not None and suffix.upper() == "B"
    size = int(number) * (_DECIMAL[unit] if decimal else _BINARY[unit])
    if size <= 0:
        raise UsageError(f"invalid size {text!r}: must be at least one byte")
    return size


def part_name(name: str, index: int) -> str:
    """``NAME.000`` for index 0."""
    return f"{name}.{index:03d}"


def listing_name(name: str) -> str:
    """``NAME.sha256``: the list of parts and their digests."""
    return f"{name}.sha256"


def _where(index: int, count: int, name: str) -> str:
    """``part 3 of 7, NAME.002``: how every message names a part (people count from 1, files from 0)."""
    return f"part {index + 1} of {count}, {part_name(name, index)}"


# -------------------------------------------------------------------------------------------- writing

class SplitWriter:
    """A write-only stream that lands in ``output.000``, ``output.001``, ... each ``part_size`` bytes.

    ``write(data)`` appends; ``write_from(fd, offset, length)`` appends bytes of an open file with
    the kernel's ``copy_file_range`` where it can (e.g. a checkpoint copied into a bundle).
    ``commit()`` makes the parts and ``output.sha256`` appear; ``abort()`` removes everything
    written. As a context manager it commits on success and aborts on an exception.
    """

    def __init__(self, output, part_size: int):
        output = Path(output)
        if isinstance(part_size, bool) or not isinstance(part_size, int) or part_size <= 0:
            raise UsageError(f"invalid part size {part_size!r}: must be a positive number of bytes")
        if any(ch in output.name for ch in "\n\r\\"):
            # sha256sum escapes such names in its listing; keep the listing plain instead
            raise UsageError(f"cannot split into {output.name!r}: the name holds a newline or backslash")
        self.output = output
        self.name = output.name
        self.part_size = part_size
        self.size = 0  # bytes written so far
        self.digests: list[str] = []  # of the finished parts
        self.parts: list[Path] = []  # final names, filled by commit()
        self._temps: list[Path] = []
        self._renamed: list[Path] = []  # parts a failing commit already put in place, to take back
        self._fd: int | None = None
        self._hash = None
        self._in_part = 0  # bytes in the current part
        self._state = "open"
        self._kernel_copy = hasattr(os, "copy_file_range")

    # --- the current part

    def _part_path(self, index: int) -> Path:
        return self.output.with_name(part_name(self.name, index))

    def _start_part(self) -> None:
        index = len(self._temps)
        if index >= MAX_PARTS:
            raise UsageError(f"a part size of {self.part_size} bytes needs more than {MAX_PARTS} parts: "
                             "choose a larger size")
        tmp = temp_path(self._part_path(index))
        try:
            self._fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise BundleError(f"cannot write {self._part_path(index)}: {exc.strerror or exc}") from None
        self._temps.append(tmp)
        self._hash = hashlib.sha256()
        self._in_part = 0

    def _finish_part(self) -> None:
        """fsync and close the current part (a rename is only durable if the data is)."""
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as exc:
            raise self._write_error(exc) from None
        finally:
            os.close(fd)
        self.digests.append(self._hash.hexdigest())

    def _write_error(self, exc: OSError) -> BundleError:
        self._state = "failed"  # the part's hash may cover bytes that never reached the disk: only abort() now
        return BundleError(f"cannot write {self._part_path(len(self._temps) - 1)}: {exc.strerror or exc}")

    def _room(self) -> int:
        """Bytes the current part can still take, starting a new part when it is full."""
        if self._state != "open":
            raise ValueError(f"SplitWriter for {self.name} is {self._state}")
        if self._fd is not None and self._in_part == self.part_size:
            self._finish_part()
        if self._fd is None:
            self._start_part()
        return self.part_size - self._in_part

    # --- file-like API

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            room = self._room()
            piece, view = view[:room], view[room:]
            self._hash.update(piece)
            try:
                while piece:
                    done = os.write(self._fd, piece)
                    piece = piece[done:]
                    self._in_part += done
                    self.size += done
            except OSError as exc:
                raise self._write_error(exc) from None
        return total

    def write_from(self, src_fd: int, offset: int, length: int) -> int:
        """Append ``length`` bytes of open file ``src_fd`` from ``offset``: each chunk is read once
        into memory to be hashed, then copied by the kernel (``copy_file_range``) from the page
        cache, or written from memory when the kernel cannot copy between these files."""
        buf = bytearray(min(CHUNK, max(length, 1)))
        done_total = 0
        while done_total < length:
            n = min(len(buf), length - done_total, self._room())
            view = memoryview(buf)[:n]
            try:
                got = os.preadv(src_fd, [view], offset + done_total)
            except OSError as exc:
                self._state = "failed"
                raise BundleError(f"cannot read the file being split: {exc.strerror or exc}") from None
            if got <= 0:
                self._state = "failed"
                raise BundleError(f"source file ended {length - done_total} bytes early while splitting")
            view = view[:got]
            self._hash.update(view)
            self._copy(src_fd, offset + done_total, view)
            done_total += got
        return done_total

    def _copy(self, src_fd: int, src_offset: int, view: memoryview) -> None:
        n = len(view)
        copied = 0
        try:
            if self._kernel_copy:
                try:
                    while copied < n:
                        got = os.copy_file_range(src_fd, self._fd, n - copied, src_offset + copied)
                        if got == 0:
                            break
                        copied += got
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    self._kernel_copy = False  # this pair of files cannot: write from memory from now on
            piece = view[copied:]
            while piece:
                got = os.write(self._fd, piece)
                piece = piece[got:]
        except OSError as exc:
            raise self._write_error(exc) from None
        self._in_part += n
        self.size += n

    def flush(self) -> None:
        """Nothing is buffered in user space; durability comes from ``commit()``."""

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    # --- outcome

    def commit(self) -> list[Path]:
        """fsync the parts, rename them into place, then write ``NAME.sha256`` (last: its presence
        means the set is complete) and fsync the directory. Parts of an earlier split of the same
        NAME beyond the new last part are removed, so the directory holds exactly one set."""
        if self._state != "open":
            raise ValueError(f"SplitWriter for {self.name} is {self._state}")
        if self.size == 0:
            self.abort()
            raise BundleError(f"nothing was written to {self.name}: refusing to write an empty split")
        try:
            if self._fd is not None:
                self._finish_part()
            directory = self.output.parent
            listing = directory / listing_name(self.name)
            lines = "".join(f"{digest}  {part_name(self.name, i)}\n" for i, digest in enumerate(self.digests))
            listing_tmp = temp_path(listing)
            self._temps.append(listing_tmp)
            _write_durably(listing_tmp, lines.encode("utf-8"))
            # an old listing must not describe a mix of old and new parts while the renames happen
            _unlink_quietly(listing)
            finals = [self._part_path(i) for i in range(len(self.digests))]
            for tmp, final in zip(self._temps, finals):
                os.replace(tmp, final)
                self._renamed.append(final)
            for stale in _parts_on_disk(directory, self.name):
                if stale not in finals:
                    _unlink_quietly(stale)
            os.replace(listing_tmp, listing)
            fsync_dir(directory)
        except OSError as exc:
            self.abort()
            raise BundleError(f"cannot write the parts of {self.output}: {exc.strerror or exc}") from None
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self.parts = finals
        return finals

    def abort(self) -> None:
        """Remove every temporary file, and the parts a failing commit had already renamed into place
        (with the old listing gone they describe nothing). Safe to call more than once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in (*self._temps, *self._renamed):
            _unlink_quietly(path)
        self._temps, self._renamed = [], []
        if self._state == "open":
            self._state = "aborted"

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._state == "open":
            self.commit()
        elif self._state != "committed":  # an exception, or a failure the caller caught and swallowed
            self.abort()


# copy_file_range refuses some pairs of files (other filesystems on old kernels, special files): fall back
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _parts_on_disk(directory: Path, name: str) -> list[Path]:
    """Files ``NAME.<digits>`` in directory, sorted."""
    prefix = name + "."
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(directory / n for n in names if n.startswith(prefix) and _ANY_PART_SUFFIX.fullmatch(n[len(name):]))


def split_file(path, part_size: int, output=None) -> list[Path]:
    """Split an existing file (a bundle) into ``output.000``, ... plus ``output.sha256``; ``output``
    defaults to ``path`` itself (``bundle.tar`` -> ``bundle.tar.000``...). The data is read once."""
    path = Path(path)
    output = Path(output) if output is not None else path
    try:
        kind = _kind(os.stat(path).st_mode)
        if kind:  # never open a FIFO: open() would block until a writer appears
            raise BundleError(f"{path} is {kind}, not a bundle file")
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if isinstance(part_size, int) and part_size > 0 and -(-info.st_size // part_size) > MAX_PARTS:
            raise UsageError(f"a part size of {part_size} bytes needs {-(-info.st_size // part_size)} parts, more "
                             f"than {MAX_PARTS}: choose a larger size")
        with SplitWriter(output, part_size) as writer:
            writer.write_from(fd, 0, info.st_size)
        return writer.parts
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------- reading

def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "not a regular file"


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill view from offset (short only at end of file)."""
    total = 0
    while total < len(view):
        got = os.preadv(fd, [view[total:]], offset + total)
        if got <= 0:
            break
        total += got
    return total


class FileSource:
    """A single-file bundle behind the same interface as :class:`Volumes`."""

    def __init__(self, path):
        self.path = Path(path)
        self.name = self.path.name
        self.parts = [self.path]
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise BundleError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        kind = _kind(info.st_mode)
        if kind:  # never open a FIFO: open() would block until a writer appears
            raise BundleError(f"{self.path} is {kind}, not a bundle file")
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise BundleError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        self.size = os.fstat(self._fd).st_size

    def readinto_at(self, view, offset: int) -> int:
        """Fill ``view`` with bytes from ``offset``; fewer only at the end of the bundle. Thread-safe."""
        view = memoryview(view).cast("B")
        if offset < 0:
            raise ValueError("negative offset")
        if self._fd is None:
            raise ValueError(f"{self.name} is closed")
        return _pread_full(self._fd, view[:max(0, min(len(view), self.size - offset))], offset)

    def read_at(self, n: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(n, self.size - offset)))
        got = self.readinto_at(buf, offset)
        return bytes(buf[:got])

    def diagnose(self, spans=()) -> str | None:
        """A single file has no parts to blame, unless it is named as a part (``NAME.NNN``) with no ``NAME.sha256``
        beside it: then it is one part of a split bundle, copied without the others."""
        suffix = _PART_SUFFIX.search(self.name)
        if suffix is None:
            return None
        stem, index = self.name[:suffix.start()], int(suffix.group(1))
        if self.path.with_name(listing_name(stem)).exists():
            return None
        others = [part_name(stem, i) for i in range(3) if i != index][:2]
        return (f"{self.name} is {'the first part' if index == 0 else f'part {index + 1}'} of a split bundle, not a "
                f"whole bundle: the other parts ({', '.join(others)}, ...) and {listing_name(stem)} are missing "
                f"beside it: copy them all into {self.path.parent}")

    def check_all(self) -> None:
        """Nothing to check beyond what the bundle's own hashes check."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r}, size={self.size})"


@dataclass(frozen=True)
class Listing:
    """``NAME.sha256`` parsed: the bundle name and each part's digest, in order."""

    name: str
    digests: tuple[str, ...]


def parse_listing(text: str, where: str) -> Listing:
    """Parse ``sha256sum`` output listing ``NAME.000`` .. ``NAME.NNN`` consecutively, nothing else."""
    name = None
    digests: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")  # survived a trip through a Windows machine
        if not line.strip():
            continue
        match = _LISTING_LINE.fullmatch(line)
        if match is None:
            raise VolumeError(f"{where} line {lineno} is not '<sha256>  <part file name>'")
        digest, file = match.group(1).lower(), match.group(2)
        suffix = _PART_SUFFIX.search(file)
        if "/" in file or suffix is None:
            raise VolumeError(f"{where} line {lineno} lists {file!r}, not a part file name such as NAME.000")
        stem, number = file[:suffix.start()], int(suffix.group(1))
        if name is None:
            name = stem
        if stem != name or number != len(digests):
            expected = part_name(name, len(digests))
            raise VolumeError(f"{where} line {lineno} lists {file}, expected {expected}: the parts must be listed "
                              "in order from .000")
        digests.append(digest)
    if name is None:
        raise VolumeError(f"{where} lists no parts")
    return Listing(name, tuple(digests))


class Volumes:
    """The parts of a split bundle read in place as one stream of ``size`` bytes (see :func:`open_volumes`)."""

    def __init__(self, directory: Path, listing: Listing, sizes: list[int]):
        self.directory = directory
        self.name = listing.name
        self.digests = listing.digests
        self.parts = [directory / part_name(self.name, i) for i in range(len(listing.digests))]
        self.listing_path = directory / listing_name(self.name)
        self.part_size = sizes[0]
        self.size = sum(sizes)
        self._sizes = sizes
        self._fds: list[int | None] = [None] * len(self.parts)
        self._lock = threading.Lock()
        self._closed = False
        self._last_byte: int | None = None  # of the latest read: where a reader that just failed was looking

    def _where(self, index: int) -> str:
        return _where(index, len(self.parts), self.name)

    def _fd(self, index: int) -> int:
        """The part's descriptor, opened on first use (a bundle of 1000 parts must not need 1000
        descriptors at once just to be opened)."""
        fd = self._fds[index]
        if fd is not None:
            return fd
        with self._lock:
            if self._closed:
                raise ValueError(f"volumes of {self.name} are closed")
            fd = self._fds[index]
            if fd is None:
                try:
                    fd = os.open(self.parts[index], os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
                    info = os.fstat(fd)
                except OSError as exc:
                    raise VolumeError(f"{self._where(index)}, cannot be read ({exc.strerror or exc}): "
                                      "copy it again") from None
                if not stat.S_ISREG(info.st_mode) or info.st_size != self._sizes[index]:
                    os.close(fd)
                    raise VolumeError(f"{self._where(index)}, changed while the bundle was being read")
                self._fds[index] = fd
        return fd

    def readinto_at(self, view, offset: int) -> int:
        """Fill ``view`` with bundle bytes from ``offset``, across part boundaries; fewer only at the
        end of the bundle. Positional reads on per-part descriptors: safe from many threads."""
        view = memoryview(view).cast("B")
        if offset < 0:
            raise ValueError("negative offset")
        want = max(0, min(len(view), self.size - offset))
        done = 0
        while done < want:
            index, within = divmod(offset + done, self.part_size)
            n = min(want - done, self._sizes[index] - within)
            got = _pread_full(self._fd(index), view[done:done + n], within)
            if got < n:
                raise VolumeError(f"{self._where(index)}, became short while the bundle was being read: copy it again")
            done += n
        if done:
            self._last_byte = offset + done - 1
        return done

    def read_at(self, n: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(n, self.size - offset)))
        got = self.readinto_at(buf, offset)
        return bytes(buf[:got])

    def _part_digest(self, index: int) -> str:
        hasher = hashlib.sha256()
        buf = bytearray(min(CHUNK, self._sizes[index]))
        view = memoryview(buf)
        fd = self._fd(index)
        offset = 0
        while offset < self._sizes[index]:
            got = _pread_full(fd, view[:min(len(buf), self._sizes[index] - offset)], offset)
            if got == 0:
                break
            hasher.update(view[:got])
            offset += got
        return hasher.hexdigest()

    def diagnose(self, spans=()) -> str | None:
        """Called when reading the bundle failed: the one-line verdict naming the part to blame. The first part that
        does not match ``NAME.sha256`` (see :meth:`_bad_part`). When every part matches, the part where reading
        failed does not belong to this bundle (a part of another split whose line in ``NAME.sha256`` was rewritten
        to match): the part that every failed span (``(start, end)`` of members whose hash is wrong) shares, else
        the one the latest read was in. None when nothing says where."""
        verdict = self._bad_part()
        if verdict:
            return verdict
        sets = [set(range(start // self.part_size, min(max(start, end - 1) // self.part_size, len(self.parts) - 1) + 1))
                for start, end in spans]
        suspects = sorted(set.intersection(*sets) or set.union(*sets)) if sets else []
        if not suspects and self._last_byte is not None:
            suspects = [min(self._last_byte // self.part_size, len(self.parts) - 1)]
        if not suspects:
            return None
        listing = self.listing_path.name
        if len(suspects) == 1:
            who, verb, each = self._where(suspects[0]), "does", "it matches its line"
        else:
            who = f"one of parts {suspects[0] + 1}..{suspects[-1] + 1} of {len(self.parts)} " \
                  f"({part_name(self.name, suspects[0])} .. {part_name(self.name, suspects[-1])})"
            verb, each = "does", "each matches its line"
        return (f"{who}, {verb} not belong to this bundle: the archive breaks inside, although {each} in {listing} "
                f"(a part of another split with its line rewritten to match, or a bundle damaged before it was "
                f"split): copy the parts and {listing} of one split again")

    def _bad_part(self) -> str | None:
        """Hash every part against ``NAME.sha256``; the one-line verdict naming the first bad part
        (and the part whose bytes it holds, when it holds another listed part's), or None when every
        part matches (then any fault is in the bundle itself, not in the copy)."""
        for index, expected in enumerate(self.digests):
            try:
                got = self._part_digest(index)
            except VolumeError as exc:
                return exc.message
            except OSError as exc:
                return f"{self._where(index)}, cannot be read ({exc.strerror or exc}): copy it again"
            if got == expected:
                continue
            if got in self.digests:
                other = self.digests.index(got)
                return (f"{self._where(index)}, is corrupt: it holds the bytes of {self._where(other)} "
                        "(parts swapped or renamed): copy both again")
            return f"{self._where(index)}, is corrupt: copy it again"
        return None

    def check_all(self) -> None:
        """Raise :class:`VolumeError` naming the first part that does not match ``NAME.sha256``."""
        verdict = self._bad_part()
        if verdict:
            raise VolumeError(verdict)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, [None] * len(self.parts)
        for fd in fds:
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> Volumes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Volumes({str(self.listing_path)!r}, parts={len(self.parts)}, size={self.size})"


def _listing_for(path: Path) -> Path:
    """The ``NAME.sha256`` for a path naming it or the first part."""
    if path.name.endswith(".sha256"):
        return path
    suffix = _PART_SUFFIX.search(path.name)
    if suffix is None:
        raise VolumeError(f"{path} is neither NAME.000 nor NAME.sha256 of a split bundle")
    stem = path.name[:suffix.start()]
    if suffix.group(1) != "000":
        raise VolumeError(f"{path.name} is part {int(suffix.group(1)) + 1} of a split bundle: give the first part, "
                          f"{part_name(stem, 0)}, or {listing_name(stem)}")
    return path.with_name(listing_name(stem))


def open_volumes(path) -> Volumes:
    """Open a split bundle from its first part ``NAME.000`` or its ``NAME.sha256``.

    Checks, without reading the data: ``NAME.sha256`` is present and lists ``NAME.000``..``NAME.NNN``
    in order; every listed part is present and a regular file; sizes (all but the last equal, none
    larger than the first, the last not empty); no unlisted ``NAME.NNN`` beside them. Each failure
    is one :class:`VolumeError` line naming the part, e.g. "part 3 of 7, NAME.002, is missing: copy it again".
    """
    path = Path(path)
    listing_path = _listing_for(path)
    directory = listing_path.parent
    try:
        info = os.stat(listing_path)
    except FileNotFoundError:
        raise VolumeError(f"{listing_path.name} is missing beside {path.name}: copy it too, it lists the parts "
                          "and their sha256") from None
    except OSError as exc:
        raise VolumeError(f"cannot read {listing_path}: {exc.strerror or exc}") from None
    kind = _kind(info.st_mode)
    if kind:
        raise VolumeError(f"{listing_path} is {kind}, not a list of parts")
    if info.st_size > _MAX_LISTING:
        raise VolumeError(f"{listing_path} is {info.st_size} bytes: too large for a list of at most {MAX_PARTS} parts")
    try:
        raw = listing_path.read_bytes()
    except OSError as exc:
        raise VolumeError(f"cannot read {listing_path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise VolumeError(f"{listing_path.name} is not a text list of parts") from None
    listing = parse_listing(text, listing_path.name)
    if listing.name != listing_path.name[:-len(".sha256")]:
        raise VolumeError(f"{listing_path.name} lists the parts of {listing.name}: the files were renamed; "
                          f"give {listing_name(listing.name)} its original name")
    count = len(listing.digests)
    sizes: list[int] = []
    for index in range(count):
        part = directory / part_name(listing.name, index)
        try:
            part_info = os.stat(part)
        except FileNotFoundError:
            raise VolumeError(f"{_where(index, count, listing.name)}, is missing: copy it again") from None
        except OSError as exc:
            raise VolumeError(f"{_where(index, count, listing.name)}, cannot be read ({exc.strerror or exc}): "
                              "copy it again") from None
        kind = _kind(part_info.st_mode)
        if kind:
            raise VolumeError(f"{_where(index, count, listing.name)}, is {kind}, not a part file")
        sizes.append(part_info.st_size)
    _check_sizes(sizes, listing.name)
    listed = {directory / part_name(listing.name, i) for i in range(count)}
    for extra in _parts_on_disk(directory, listing.name):
        if extra not in listed:
            raise VolumeError(f"{extra.name} is not listed in {listing_path.name}: remove it, or copy "
                              f"{listing_path.name} again if it is from another split")
    return Volumes(directory, listing, sizes)


def _check_sizes(sizes: list[int], name: str) -> None:
    """Every part but the last has one size, the last 1..that size. The expected size is the one
    most parts agree on (the first part's on a tie), so a truncated first part is the one named."""
    count = len(sizes)
    if count > 1:
        common = Counter(sizes[:-1]).most_common()
        top = common[0][1]
        expected = sizes[0] if sizes[0] in {size for size, n in common if n == top} else common[0][0]
    else:
        expected = sizes[0]
    for index, size in enumerate(sizes):
        last = index == count - 1
        where = _where(index, count, name)
        if size == 0 or (size < expected and not last):
            raise VolumeError(f"{where}, is short ({size} bytes, expected {expected if not last else 'at least 1'}): "
                              "copy it again")
        if size > expected:
            raise VolumeError(f"{where}, is too large ({size} bytes, expected at most {expected}): copy it again")


def open_source(path) -> FileSource | Volumes:
    """A bundle to read, single file or split, chosen by looking at ``path`` (never opening it first):

    * ``NAME.sha256``, or ``NAME.NNN`` with ``NAME.sha256`` beside it: the split bundle;
    * ``NAME`` that does not exist but ``NAME.sha256`` does: the split bundle too;
    * ``NAME.000`` without ``NAME.sha256`` but with ``NAME.001``: refused (the listing is required);
    * any other regular file: a :class:`FileSource`. FIFOs, sockets and devices are refused at once.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.exists(path.with_name(listing_name(path.name))):
            return open_volumes(path.with_name(listing_name(path.name)))
        raise BundleError(f"no such bundle: {path}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    kind = _kind(info.st_mode)
    if kind:
        raise BundleError(f"{path} is {kind}, not a bundle" + ("" if kind == "a directory" else " file"))
    if path.name.endswith(".sha256"):
        return open_volumes(path)
    suffix = _PART_SUFFIX.search(path.name)
    if suffix is not None:
        stem = path.name[:suffix.start()]
        if os.path.exists(path.with_name(listing_name(stem))):
            return open_volumes(path)
        if os.path.exists(path.with_name(part_name(stem, 1))):
            raise VolumeError(f"{listing_name(stem)} is missing beside {path.name}: copy it too, it lists the parts "
                              "and their sha256")
    return FileSource(path)


__all__ = ["CHUNK", "MAX_PARTS", "FileSource", "Listing", "SplitWriter", "Volumes", "listing_name", "open_source",
           "open_volumes", "parse_listing", "parse_size", "part_name", "split_file"]
