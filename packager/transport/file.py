"""Local files: ``file://`` urls and plain paths (a directory mirror), read and written."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Callable

from ..errors import DownloadError, IntegrityError, MirrorError
from ..fsutil import atomic_write_text, fsync_dir, hash_file, reserve_space, temp_path
from .stream import (
    Pipeline,
    Result,
    StoredObject,
    discard_part,
    disk_error,
    finish,
    open_part,
    prehash,
    write_state,
)


def transfer_file(url, source: Path, part, verifier, policy, on_bytes, on_total, cancel=None) -> Result:
    try:
        src = open(source, "rb")
    except FileNotFoundError:
        raise DownloadError(f"{url}: no such file") from None
    except OSError as exc:
        raise DownloadError(f"{url}: cannot read: {exc.strerror or exc}") from None
    with src:
        total = os.fstat(src.fileno()).st_size
        if verifier.size is not None and total != verifier.size:
            raise IntegrityError(f"{url}: wrong size", expected=f"{verifier.size} bytes", got=f"{total} bytes")
        offset = prehash(part, verifier, policy.chunk_size)
        if offset > total:
            discard_part(part)
            offset = 0
            verifier.reset()
        first = offset
        if on_total is not None:
            on_total(total, offset)
        with reserve_space(part, total - offset) as reservation:
            try:
                write_state(part, {"url": url, "total": total})
                f = open_part(part, "ab" if offset else "wb")
            except OSError as exc:
                raise disk_error(exc, part) from exc
            with f:
                src.seek(offset)
                try:
                    Pipeline(f, verifier, on_bytes, policy.chunk_size, cancel=cancel,
                             reservation=reservation).run(src.readinto)
                except OSError as exc:
                    raise disk_error(exc, part) from exc
                try:
                    digest = finish(part, f, verifier)
                except IntegrityError:
                    if first:  # perhaps the old part: once more from zero
                        discard_part(part)
                        return transfer_file(url, source, part, verifier, policy, on_bytes, on_total, cancel)
                    raise
                except OSError as exc:
                    raise disk_error(exc, part) from exc
    return Result(url, digest, verifier.count, first, 1)


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
        tmp = temp_path(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise MirrorError(f"cannot write to {dest.parent}: {exc.strerror or exc}") from exc
        try:
            digest = hashlib.sha256()
            count = 0
            with os.fdopen(fd, "wb") as out, obj.opener() as src:
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
            check_copy(obj, count, digest.hexdigest())
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
