"""The tar format of bundles: a deterministic writer and a strict reader that trusts nothing.

Writing is deterministic (mtime from ``SOURCE_DATE_EPOCH`` or 0, uid/gid 0, no user or group
names, mode 0644, ustar headers with pax records only for long names or sizes over 8 GiB). Each
member's bytes are copied by the kernel (``copy_file_range``) where it can.
Where each member goes (header offset and bytes, data offset, size, padding, end of archive) is computed once,
by :func:`tar_layout`: the bundle writer, split volumes, OCI layers and pulls, and signature appends iterate its
:class:`TarLayout` rather than adding up headers and paddings themselves.

Reading (:class:`TarArchive`) accepts regular files only (no links, devices, FIFOs or
directories), relative paths under ``hub/`` without ``..``, each member once, zero padding and a
proper end of archive; it reads positionally from a source of :mod:`packager.formats.volumes` (one
file, or the parts of a split bundle read in place), so many members can be hashed at once and a bundle split into
volumes reads in place. What the members must be is the manifest's business
(:mod:`packager.formats.manifest`), not this module's.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

from ..errors import BundleError, VolumeError
from ..fsutil import WriteBehind, write_all

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default record: the archive is padded to a multiple of it
CHUNK = 8 << 20  # read/hash/write granularity (two such buffers in flight at most)
KERNEL_STEP = 64 << 20  # bytes per copy_file_range call: progress (and write-behind) in steps of this
HASH_JOBS = min(2, os.cpu_count() or 1)  # members hashed at once
MAX_PAX = 1 << 20
_USTAR_MAX_SIZE = 0o77777777777  # 8 GiB - 1: larger sizes go into a pax record
_ZERO_BLOCK = bytes(BLOCK)
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))

# tar type flags we name in refusals; everything but a regular file is refused.
_TYPE_NAMES = {
    b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
    b"5": "a directory", b"6": "a FIFO", b"7": "a contiguous file", b"g": "a global pax header",
    b"L": "a GNU long-name record", b"K": "a GNU long-link record", b"S": "a GNU sparse file",
}



@dataclass(frozen=True)
class Member:
    """A regular file inside the archive."""

    path: str
    offset: int  # of its data
    size: int



# -- tar headers (writing) -------------------------------------------------------------------------
def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:  # the length counts its own digits
        length = len(str(length)) + len(body)
    return str(length).encode("ascii") + body


def _ustar_block(name: bytes, prefix: bytes, size: int, mtime: int, typeflag: bytes) -> bytes:
    header = bytearray(BLOCK)
    header[0:len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b" " * 8
    header[156:157] = typeflag
    header[257:265] = b"ustar\x0000"
    # uname / gname stay empty
    header[329:337] = b"0000000\0"
    header[337:345] = b"0000000\0"
    header[345:345 + len(prefix)] = prefix
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _split_ustar(raw: bytes) -> tuple[bytes, bytes] | None:
    """(name, prefix) when ``raw`` fits the ustar fields, else None."""
    if len(raw) <= 100:
        return raw, b""
    for cut in range(min(len(raw) - 1, 155), 0, -1):
        if raw[cut:cut + 1] == b"/" and len(raw) - cut - 1 <= 100:
            return raw[cut + 1:], raw[:cut]
    return None


def tar_header(path: str, size: int, mtime: int) -> bytes:
    """The header block(s) for one regular file: ustar, plus a pax header when needed."""
    raw = path.encode("utf-8")
    split = _split_ustar(raw) if raw.isascii() else None
    records = b""
    if split is None:
        records += _pax_record("path", raw)
        split = (raw[:100].decode("utf-8", "ignore").encode("ascii", "ignore")[:100] or b"pax-path", b"")
    ustar_size = size
    if size > _USTAR_MAX_SIZE:
        records += _pax_record("size", str(size).encode("ascii"))
        ustar_size = 0
    out = b""
    if records:
        pad = -len(records) % BLOCK
        out = _ustar_block(b"././@PaxHeader", b"", len(records), mtime, b"x") + records + bytes(pad)
    return out + _ustar_block(split[0], split[1], ustar_size, mtime, b"0")


# -- the layout: where each member lies -------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """Where one member lies in a tar as tvpack writes it: its header block(s) at ``offset``, its data right
    after them, then zeros to the next block."""

    path: str
    size: int
    offset: int  # of its first header block
    header: bytes = field(repr=False)

    @property
    def data_offset(self) -> int:
        return self.offset + len(self.header)

    @property
    def padding(self) -> int:
        return -self.size % BLOCK

    @property
    def end(self) -> int:
        """Where the next member's header starts."""
        return self.data_offset + self.size + self.padding


@dataclass(frozen=True)
class TarLayout:
    """The whole shape of a tar tvpack writes, computed once (:func:`tar_layout`): each member's span in order,
    then ``trailer`` zero bytes from ``end`` to ``size`` (the end-of-archive blocks, and for a bundle the padding
    to a whole record). Every writer of tvpack's tars (bundle files, split volumes, OCI layers, pulls, signature
    appends) iterates this instead of adding up headers and paddings itself."""

    spans: tuple[Span, ...]
    start: int  # where the first member's header goes
    end: int  # where the end-of-archive blocks go
    size: int  # where the archive ends

    @property
    def trailer(self) -> int:
        return self.size - self.end

    def __iter__(self):
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)

    def span(self, path: str) -> Span:
        for span in self.spans:
            if span.path == path:
                return span
        raise KeyError(path)


END_OF_ARCHIVE = 2 * BLOCK  # the two zero blocks that close a tar


def tar_layout(members: Iterable[tuple], mtime: int = 0, *, start: int = 0, record: bool = True) -> TarLayout:
    """The layout of a tar of ``members`` in this order, each ``(path, size)`` or ``(path, size, mtime)`` (header
    lengths do not depend on the mtime, only the header bytes do). ``start``: the offset of the first header (an
    append after existing members); ``record``: pad the end to a whole tar record (a bundle file) rather than stop
    after the end-of-archive blocks (an OCI layer)."""
    spans, offset = [], start
    for member in members:
        path, size = member[0], member[1]
        header = tar_header(path, size, member[2] if len(member) > 2 else mtime)
        span = Span(path, size, offset, header)
        spans.append(span)
        offset = span.end
    size = offset + END_OF_ARCHIVE
    if record:
        size += -size % RECORD
    return TarLayout(tuple(spans), start, offset, size)


def source_date_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` (reproducible builds), 0 when unset."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    try:
        epoch = int(value)
    except ValueError:
        raise BundleError(f"SOURCE_DATE_EPOCH must be an integer number of seconds, got {value!r}") from None
    if not 0 <= epoch <= 0o77777777777:
        raise BundleError(f"SOURCE_DATE_EPOCH out of range: {epoch}")
    return epoch


# -- member paths ----------------------------------------------------------------------------------
def path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe relative member path under ``hub/``, or None."""
    if not path:
        return "an empty path"
    if "\0" in path or any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return "a control character"
    if "\\" in path:
        return "a backslash"
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        return "an absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "a '..' component"
    if any(part in ("", ".") for part in parts):
        return "an empty or '.' component"
    if parts[0] != "hub" or len(parts) < 3:
        return "a path outside hub/"
    if len(path.encode("utf-8", "surrogateescape")) > 1024 or any(len(p) > 255 for p in parts):
        return "an over-long name"
    return None


def check_path(path: str, where: str) -> str:
    problem = path_problem(path)
    if problem:
        raise BundleError(f"{where} {path!r} has {problem}; refusing it")
    return path



# -- reading ---------------------------------------------------------------------------------------
def _number(field_bytes: bytes, what: str, where: str) -> int:
    if field_bytes[:1] and field_bytes[0] & 0x80:  # base-256 (GNU / star) for big values
        if field_bytes[0] == 0xFF:
            raise BundleError(f"{where}: negative {what}")
        return int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise BundleError(f"{where}: malformed {what} field") from None


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        if length <= 0 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise BundleError(f"{where}: malformed pax header")
        key, sep, value = data[space + 1:pos + length - 1].partition(b"=")
        if not sep:
            raise BundleError(f"{where}: malformed pax header")
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{where}: pax header is not UTF-8") from None
        pos += length
    return records




class TarArchive:
    """The members of a tar file, every header checked; no payload hashing, no manifest."""

    def __init__(self, source):
        self.source = source  # packager.formats.volumes: a FileSource or Volumes (a split bundle)
        self.path = Path(getattr(source, "path", None) or source.listing_path)
        self.file_size = source.size
        self.members: list[Member] = []
        self._scan()

    def fail(self, problem: str, *, spans=()):
        # In a split bundle, damage is almost always one badly copied part: name the part to copy
        # again (hashing every part against NAME.sha256, on failure only) rather than the symptom.
        # ``spans``: (start, end) byte ranges that failed their check, when known (members whose hash is wrong).
        diagnose = getattr(self.source, "diagnose", None)
        verdict = diagnose(spans) if diagnose is not None else None
        if verdict:
            raise VolumeError(verdict)
        raise BundleError(f"{self.path.name}: {problem}")

    def _read(self, offset: int, size: int) -> bytes:
        return self.source.read_at(size, offset)

    def _number(self, field_bytes: bytes, what: str, where: str) -> int:
        try:
            return _number(field_bytes, what, where)
        except BundleError as exc:
            self.fail(exc.message)

    def _scan(self) -> None:
        offset = 0
        pax: dict[str, str] = {}
        seen: set[str] = set()
        while True:
            block = self._read(offset, BLOCK)
            if offset == 0 and (len(block) < BLOCK or block == _ZERO_BLOCK):
                self.fail("not a tar archive (empty or too short)")
            if len(block) < BLOCK:
                self.fail("truncated archive (it ends without an end-of-archive marker)")
            if block == _ZERO_BLOCK:
                if pax:
                    self.fail("truncated archive (a pax header is not followed by its member)")
                self._check_tail(offset)
                return
            where = f"tar header at byte {offset}"
            try:
                stored = int(block[148:156].split(b"\0", 1)[0].strip(b" ") or b"-1", 8)
            except ValueError:
                stored = -1
            unsigned = sum(block[:148]) + 256 + sum(block[156:])
            signed = unsigned - 2 * (sum(b for b in block[:148] if b > 127) + sum(b for b in block[156:] if b > 127))
            magic = block[257:263]
            if stored not in (unsigned, signed) or magic not in (b"ustar\0", b"ustar "):
                if offset == 0:
                    packed = next((name for sig, name in _COMPRESSED if block.startswith(sig)), None)
                    if packed:
                        self.fail(f"not a tar archive but {packed}-compressed data; tvpack bundles are "
                                  f"plain tar: decompress it first")
                    self.fail("not a tar archive (no POSIX tar header at the start)")
                self.fail(f"corrupt {where} (checksum or magic mismatch)")
            typeflag = block[156:157]
            size = self._number(block[124:136], "size", where)
            if typeflag == b"x":
                if size > MAX_PAX:
                    self.fail(f"{where}: pax header of {size} bytes is too large")
                data = self._read(offset + BLOCK, size)
                if len(data) < size:
                    self.fail("truncated archive (inside a pax header)")
                self._check_zero_pad(offset + BLOCK + size)
                pax = _parse_pax(data, f"{self.path.name}: {where}")
                if any(key.startswith("GNU.sparse") for key in pax):
                    self.fail(f"{where}: sparse files are not allowed in a bundle")
                offset += BLOCK + round_up(size)
                continue
            name = block[0:100].split(b"\0", 1)[0]
            prefix = block[345:500].split(b"\0", 1)[0] if magic == b"ustar\0" else b""
            raw = prefix + b"/" + name if prefix else name
            try:
                path = pax.get("path") or raw.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"{where}: member name is not UTF-8")
            if "size" in pax:
                size = int(pax["size"]) if pax["size"].isdigit() else -1
                if size < 0:
                    self.fail(f"{where}: malformed pax size")
            pax = {}
            if typeflag not in (b"0", b"\0"):
                kind = _TYPE_NAMES.get(typeflag, f"an unsupported member type {typeflag!r}")
                self.fail(f"member {path!r} is {kind}; a bundle holds regular files only")
            problem = path_problem(path)
            if problem:
                self.fail(f"member {path!r} has {problem}; refusing it")
            mode = self._number(block[100:108], "mode", where)
            if mode & ~0o777:
                self.fail(f"member {path!r} has mode {mode:o} (setuid, setgid or sticky bits)")
            if path in seen:
                self.fail(f"member {path!r} appears twice")
            seen.add(path)
            data_offset = offset + BLOCK
            if data_offset + size > self.file_size:
                self.fail(f"truncated archive (member {path!r} needs {size} bytes, "
                          f"{max(self.file_size - data_offset, 0)} remain)")
            self._check_zero_pad(data_offset + size)
            self.members.append(Member(path, data_offset, size))
            offset = data_offset + round_up(size)

    def _check_zero_pad(self, end: int) -> None:
        pad = -end % BLOCK
        if pad and self._read(end, pad).strip(b"\0"):
            self.fail(f"non-zero padding after byte {end}")

    def _check_tail(self, offset: int) -> None:
        """Everything from the first zero block on must be zeros (at least two blocks of them)."""
        if self.file_size - offset < 2 * BLOCK:
            self.fail("truncated archive (incomplete end-of-archive marker)")
        while offset < self.file_size:
            chunk = self._read(offset, min(self.file_size - offset, 1 << 20))
            if not chunk:
                self.fail("truncated archive")
            if chunk.strip(b"\0"):
                self.fail("data after the end-of-archive marker")
            offset += len(chunk)

    # -- payload ----------------------------------------------------------------------------------
    def hash_member(self, member: Member, pool: ThreadPoolExecutor, sink: int | None = None, bar=None) -> str:
        """sha256 of a member's data, optionally writing it to ``sink`` (a raw fd) as it streams.

        A pipeline over two buffers: while this thread hashes chunk k, ``pool``'s thread writes
        chunk k and reads chunk k+1 into the other buffer (hashlib and the I/O calls release the
        GIL). The bytes written are exactly the bytes hashed, even if the archive changes under us.
        """
        size = member.size
        chunk = max(min(CHUNK, size), 1)
        buffers = (bytearray(chunk), bytearray(chunk))

        def read(k: int):
            start = k * chunk
            if start >= size:
                return None
            view = memoryview(buffers[k % 2])[:min(chunk, size - start)]
            done = 0
            while done < len(view):
                n = self.source.readinto_at(view[done:], member.offset + start + done)
                if not n:
                    self.fail(f"truncated archive (inside {member.path!r})")
                done += n
            return view

        behind = WriteBehind(sink) if sink is not None else None

        def write_then_read(view, k_next: int):
            if sink is not None:
                write_all(sink, view)
                behind.wrote(len(view))
            return read(k_next)

        digest = hashlib.sha256()
        current, k = read(0), 0
        while current is not None:
            job = pool.submit(write_then_read, current, k + 1)
            try:
                digest.update(current)
            finally:
                following = job.result()  # never leave the helper touching a buffer we give up
            if bar is not None:
                bar.update(len(current))
            current, k = following, k + 1
        return digest.hexdigest()

    def open_member(self, member: Member) -> BinaryIO:
        return io.BufferedReader(MemberFile(self.source, member.offset, member.size), 1 << 20)


def each_member(items: Sequence[tuple], work) -> list:
    """``[work(*item, io_pool) for item in items]``, up to HASH_JOBS items at a time.

    Hashing is the CPU cost of reading a bundle; members are independent, so on a multi-core
    machine two are hashed at once (each with its own I/O thread). Results keep the input order;
    the first failure is raised once every started item has stopped.
    """
    def run(item):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvpack-io") as pool:
            return work(*item, pool)

    if HASH_JOBS <= 1 or len(items) <= 1:
        return [run(item) for item in items]
    with ThreadPoolExecutor(max_workers=HASH_JOBS, thread_name_prefix="tvpack-hash") as outer:
        futures = [outer.submit(run, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # those not started yet; the running ones finish before we return
            raise


def round_up(n: int) -> int:
    return n + (-n % BLOCK)


class MemberFile(io.RawIOBase):
    """A read-only, seekable window on ``size`` bytes at ``offset`` of a source: an archive
    member (positional reads, no shared file offset). ``readinto`` fills the caller's buffer directly,
    and torch.load reads through ``readinto`` into each storage, so unbuffered, tensor bytes are
    copied once, from the page cache."""

    def __init__(self, source, offset: int, size: int):
        super().__init__()
        self._source, self._offset, self._size, self._pos = source, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        got = self._source.readinto_at(view[:n], self._offset + self._pos)
        self._pos += got
        return got

    def fileno(self) -> int:  # not a whole file: nothing may read the descriptor directly
        raise io.UnsupportedOperation("fileno")



# -- writing -----------------------------------------------------------------------------------------
def copy_file(src_fd: int, dst_fd: int, size: int, bar=None) -> None:
    """Copy ``size`` bytes from the current offset of ``src_fd`` to ``dst_fd``, in the kernel when it
    can (copy_file_range, then sendfile), else through one large buffer."""
    remaining = size
    for call in ("copy_file_range", "sendfile"):
        func = getattr(os, call, None)
        if func is None:
            continue
        try:
            while remaining:
                step = min(remaining, KERNEL_STEP)
                n = func(src_fd, dst_fd, step) if call == "copy_file_range" else func(dst_fd, src_fd, None, step)
                if n == 0:
                    raise BundleError("a checkpoint shrank while it was being bundled")
                remaining -= n
                if bar is not None:
                    bar.update(n)
            return
        except OSError as exc:
            if remaining != size:  # failed midway: not a capability problem
                raise BundleError(f"copying into the bundle failed: {exc.strerror or exc}") from None
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while remaining:
        n = os.readv(src_fd, [view[:min(CHUNK, remaining)]])
        if n == 0:
            raise BundleError("a checkpoint shrank while it was being bundled")
        write_all(dst_fd, view[:n])
        remaining -= n
        if bar is not None:
            bar.update(n)




def copy_hashing(src_fd: int, write, size: int, bar) -> str:
    """Copy ``size`` bytes from ``src_fd`` to ``write`` (a callable taking a buffer) while hashing
    them; returns the sha256 of exactly the bytes written."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    remaining = size
    while remaining:
        n = os.readv(src_fd, [view[:min(CHUNK, remaining)]])
        if n == 0:
            raise BundleError("a checkpoint shrank while it was being bundled")
        digest.update(view[:n])
        write(view[:n])
        remaining -= n
        if bar is not None:
            bar.update(n)
    return digest.hexdigest()

