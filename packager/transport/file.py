"""Local files: ``file://`` urls and plain paths (a directory mirror), read (a source of the engine) and written."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Callable

from ..errors import DownloadError, IntegrityError, MirrorError
from ..fsutil import atomic_write_text, atomic_writer, hash_file, write_all
from .engine import Body, fetch
from .stream import Result, StoredObject


def transfer_file(url, source: Path, part, verifier, policy, on_bytes, on_total, cancel=None, notify=None) -> Result:
    return fetch(FileSource(url, source), part, verifier, policy, on_bytes=on_bytes, on_total=on_total,
                 cancel=cancel, notify=notify)


class FileSource:
    """A local file as a :class:`~.engine.Source`; its size and mtime are the validator."""

    def __init__(self, url: str, path: Path):
        self.url = url
        self.path = path

    def open(self, offset: int, validator: str | None, timeout: tuple[float, float]) -> Body:
        try:
            src = open(self.path, "rb")
        except FileNotFoundError:
            raise DownloadError(f"{self.url}: no such file") from None
        except OSError as exc:
            raise DownloadError(f"{self.url}: cannot read: {exc.strerror or exc}") from None
        try:
            st = os.fstat(src.fileno())
            version = f"{st.st_size}-{st.st_mtime_ns}"
            if offset > st.st_size or (validator is not None and validator != version):
                offset = 0  # the file is not the one the part was taken from
            src.seek(offset)
        except BaseException:
            src.close()
            raise
        return Body(offset, st.st_size, version, self._reader(src), close=src.close)

    def _reader(self, src):
        def read_into(view) -> int:
            try:
                return src.readinto(view)
            except OSError as exc:
                raise DownloadError(f"{self.url}: cannot read: {exc.strerror or exc}") from None
        return read_into


# -- writing: a directory as an object store ---------------------------------------------------
_COPY_CHUNK = 1 << 20


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

    def present(self, obj: StoredObject) -> bool:
        dest = self.root / obj.path
        try:
            if not dest.is_file() or dest.stat().st_size != obj.size:
                return False
            return hash_file(dest) == obj.sha256
        except OSError:
            return False

    def put(self, obj: StoredObject, progress: Callable[[int], None]) -> None:
        """Copy while hashing into a unique temp file beside the target; replace only if verified."""
        dest = self.root / obj.path
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # readable by a web server, whatever the umask
            with atomic_writer(dest, mode=0o644, open_mode=0o600) as fd, obj.opener() as src:
                digest = hashlib.sha256()
                count = 0
                while True:
                    data = src.read(_COPY_CHUNK)
                    if not data:
                        break
                    count += len(data)
                    digest.update(data)
                    write_all(fd, memoryview(data))
                    progress(len(data))
                check_copy(obj, count, digest.hexdigest())
        except OSError as exc:
            raise MirrorError(f"cannot write {dest}: {exc.strerror or exc}") from exc

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

    @contextlib.contextmanager
    def index_lock(self):
        # Two exporters into one directory must not lose each other's index entries. The lock only
        # serialises the read-merge-write; the write itself is atomic either way. An flock on the
        # directory itself: no lock file is left in what is published.
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def check_copy(obj: StoredObject, count: int, digest: str) -> None:
    if count != obj.size:
        raise IntegrityError(f"{obj.source}", expected=f"{obj.size} bytes", got=f"{count} bytes")
    if digest != obj.sha256:
        raise IntegrityError(f"{obj.source}: sha256 mismatch", expected=obj.sha256, got=digest)
