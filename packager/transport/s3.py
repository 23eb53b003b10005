"""S3-compatible object storage as a mirror: read objects in ranges, write them verified.

Everything goes through boto3, imported on first use (``pip install 'tvpack[s3]'``). The endpoint
and credentials come from boto3's usual sources (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/...``) unless an
explicit ``endpoint_url`` is given (the CLI's ``--endpoint-url``, see :func:`configure`).

Writes never expose half an object under its final key. Small objects go up in one PutObject;
large ones in a multipart upload that tvpack drives itself, so that each part carries the
SHA-256 of the bytes actually sent (the server rejects a part whose bytes differ) and the whole
object's SHA-256 is compared with the expected one *before* the upload is completed; on any
mismatch or failure the upload is aborted and nothing appears. After the upload a HEAD checks
size, the ``sha256`` metadata and the server's own ``ChecksumSHA256`` when it reports one.

Every answer botocore reads whole (XML: errors, listings, upload replies) is capped at :data:`ANSWER_LIMIT`
bytes (:func:`_cap_answers`): an endpoint that sends forever costs a bounded read and a one-line error, not the
machine's memory. Object bodies are streamed, never read whole.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator
from urllib.parse import urlparse

from ..errors import DownloadError, IntegrityError, MirrorError
from .engine import Body, fetch, read_timeout
from .http import aborter, retryable
from .stream import Result, Retryable, StoredObject

MiB = 1024 * 1024
# Objects of at least this size go up in parts; S3 wants parts of 5 MiB..5 GiB, at most 10000.
MULTIPART_THRESHOLD = 32 * MiB
PART_SIZE = 16 * MiB
PARTS_IN_FLIGHT = 3
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * MiB
READ_CHUNK = 1 * MiB
SHA256_METADATA = "sha256"  # stored as x-amz-meta-sha256
# the most botocore may read of an answer it parses whole (a listing page of 1000 keys is well under 1 MiB)
ANSWER_LIMIT = 8 * MiB



class ObjectNotFound(DownloadError):
    """The bucket or key does not exist (a mirror without that file: try the next one)."""


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (the key may be empty)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise MirrorError(f"not an S3 url: {url!r} (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


def join(url: str, relpath: str) -> str:
    """``join("s3://b/prefix", "models/x.pth")`` -> ``"s3://b/prefix/models/x.pth"``."""
    return url.rstrip("/") + "/" + relpath.lstrip("/")


def _boto3():
    try:
        import boto3
        import botocore  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MirrorError("s3:// mirrors need boto3", hint="pip install 'tvpack[s3]'") from exc
    return boto3


class S3Clients:
    """The S3 clients of whoever holds this (an :class:`S3Source`, an :class:`S3Target`), for one endpoint (None:
    the environment's, boto3 reads it): made on first use and shared by the holder's threads (boto3 clients are
    thread-safe). No process-wide cache: a client lives as long as its holder."""

    def __init__(self, endpoint_url: str | None = None):
        self.endpoint_url = endpoint_url or None
        self._made: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def get(self, *, max_pool_connections: int = 64, timeouts: tuple[float, float] | None = None):
        endpoint = self.endpoint_url
        key = (max_pool_connections, timeouts)
        with self._lock:
            found = self._made.get(key)
            if found is None:
                found = self._made[key] = _new_client(endpoint, max_pool_connections, timeouts)
            return found


def clients_of(endpoint_url: "str | S3Clients | None") -> S3Clients:
    return endpoint_url if isinstance(endpoint_url, S3Clients) else S3Clients(endpoint_url)


def client(endpoint_url: "str | S3Clients | None" = None, *, max_pool_connections: int = 64,
           timeouts: tuple[float, float] | None = None):
    """A thread-safe S3 client: ``endpoint_url`` an endpoint (None: the environment's; a new client) or the
    :class:`S3Clients` of a holder (its client, made once).

    ``timeouts`` (connect, read): a client for the engine's reads, which makes one attempt per call
    (the engine retries); without, botocore's own retries (writes, heads, listings)."""
    return clients_of(endpoint_url).get(max_pool_connections=max_pool_connections, timeouts=timeouts)


def _new_client(endpoint: str | None, max_pool_connections: int, timeouts: tuple[float, float] | None):
    boto3 = _boto3()
    from botocore.config import Config

    connect, read = timeouts or (10, 60)
    config = Config(
        retries={"max_attempts": 1 if timeouts else 5, "mode": "standard"},
        connect_timeout=connect,
        read_timeout=read,
        max_pool_connections=max_pool_connections,
    )
    try:
        session = boto3.session.Session()
        made = session.client("s3", endpoint_url=endpoint, config=config)
    except Exception as exc:  # noqa: BLE001 - botocore's configuration errors (a missing profile...)
        raise MirrorError(f"cannot set up S3 access: {exc}") from None
    _cap_answers(made)
    return made


def _cap_answers(s3) -> None:
    """Cap what botocore reads whole of an answer at :data:`ANSWER_LIMIT` bytes.

    botocore reads a non-streaming answer (every error, every XML reply) with ``b"".join(raw.stream())`` before
    any hook of ours runs, so the cap sits in the one place every answer passes: the endpoint's HTTP session,
    whose answers get a ``raw`` that counts what ``stream()`` yields (streamed object bodies use ``read()``
    and pass as they are). The session is botocore's ``client._endpoint.http_session``, not a public attribute:
    when a botocore release moves it, answers stay uncapped, as they were before."""
    endpoint = getattr(s3, "_endpoint", None)
    inner = getattr(endpoint, "http_session", None)
    if inner is None or not callable(getattr(inner, "send", None)) or isinstance(inner, _CappedSession):
        return
    endpoint.http_session = _CappedSession(inner)


class _CappedSession:
    def __init__(self, inner):
        self._inner = inner

    def send(self, request):
        response = self._inner.send(request)
        response.raw = _CappedRaw(response.raw, urlparse(request.url).netloc)
        return response

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _answer_too_large(message: str):
    """A botocore error (so :func:`_translate` words it like any other) saying ``message``."""
    from botocore.exceptions import BotoCoreError

    class AnswerTooLarge(BotoCoreError):
        fmt = "{message}"

    return AnswerTooLarge(message=message)


class _CappedRaw:
    """An urllib3 response whose ``stream()`` stops with an error past :data:`ANSWER_LIMIT` bytes."""

    def __init__(self, raw, host: str):
        self._raw, self._host = raw, host

    def stream(self, *args, **kwargs):
        seen = 0
        for chunk in self._raw.stream(*args, **kwargs):
            seen += len(chunk)
            if seen > ANSWER_LIMIT:
                self._raw.close()
                raise _answer_too_large(f"the S3 endpoint {self._host} answered more than {ANSWER_LIMIT // MiB} MiB; "
                                        "gave up reading it")
            yield chunk

    def __getattr__(self, name):
        return getattr(self._raw, name)


def _status(exc) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


def _translate(exc: Exception, url: str, action: str, *, reading: bool) -> Exception:
    """A botocore exception as one of ours, with a one-line message."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    base = DownloadError if reading else MirrorError
    if isinstance(exc, NoCredentialsError):  # reading: a DownloadError, so the next mirror is tried
        return base(f"cannot {action} {url}: no S3 credentials",
                           hint="set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, ClientError):
        code, status = _status(exc)
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
            what = "bucket" if code == "NoSuchBucket" or "bucket" in action else "object"
            if reading:
                return ObjectNotFound(f"{url}: no such {what} (S3 {status or code})")
            return MirrorError(f"cannot {action} {url}: no such {what}")
        if code in ("PreconditionFailed", "412") or status == 412:
            return base(f"{url} changed on the server while it was being read (S3 412)")
        return base(f"cannot {action} {url}: S3 {status} {code}".rstrip())
    if isinstance(exc, BotoCoreError):
        return base(f"cannot {action} {url}: {exc}")
    return exc


def _call(action: str, url: str, fn: Callable, *, reading: bool = False, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise _translate(exc, url, action, reading=reading) from exc


# -- reading ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectInfo:
    url: str
    size: int
    etag: str
    sha256: str | None  # from our metadata, when a tvpack export wrote the object
    checksum_sha256: str | None  # the server's ChecksumSHA256 (base64; composite for multipart)


def head(url: str, *, endpoint_url: str | None = None) -> ObjectInfo | None:
    """What the store says about ``url``, or None when there is no such object."""
    bucket, key = parse_url(url)
    s3 = client(endpoint_url)
    try:
        resp = _call("read", url, s3.head_object, reading=True, Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ObjectNotFound:
        return None
    metadata = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
    return ObjectInfo(
        url=url,
        size=int(resp["ContentLength"]),
        etag=str(resp.get("ETag", "")).strip('"'),
        sha256=(metadata.get(SHA256_METADATA) or "").lower() or None,
        checksum_sha256=resp.get("ChecksumSHA256"),
    )


def open_stream(url: str, *, offset: int = 0, etag: str | None = None, endpoint_url: str | None = None,
                chunk_size: int = READ_CHUNK) -> tuple[Iterator[bytes], int, str]:
    """Read ``url`` from byte ``offset``: ``(chunks, total_size, etag)``.

    ``total_size`` is the whole object's size (not what is left). Pass the ``etag`` of a previous
    attempt when resuming so that an object replaced in between fails (DownloadError) instead of
    splicing two versions. A missing object raises :class:`ObjectNotFound` (a DownloadError).
    The caller verifies the bytes; this only moves them.
    """
    bucket, key = parse_url(url)
    s3 = client(endpoint_url)
    kwargs = {"Bucket": bucket, "Key": key}
    if offset:
        kwargs["Range"] = f"bytes={offset}-"
    if etag:
        kwargs["IfMatch"] = f'"{etag}"'
    try:
        resp = _call("read", url, s3.get_object, reading=True, **kwargs)
    except DownloadError as exc:
        # Asking for bytes past the end (a complete earlier attempt) is not a failure of the mirror.
        if offset and "InvalidRange" in str(exc):
            info = head(url, endpoint_url=endpoint_url)
            if info is not None and info.size == offset:
                return iter(()), info.size, info.etag
        raise
    length = int(resp["ContentLength"])
    content_range = resp.get("ContentRange")  # "bytes 100-999/1000"
    total = int(content_range.rsplit("/", 1)[1]) if content_range else length + offset
    if offset and not content_range:
        resp["Body"].close()
        raise DownloadError(f"{url}: the server ignored the byte range (asked from {offset})")
    body = resp["Body"]

    def chunks() -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError

        try:
            while True:
                try:
                    data = body.read(chunk_size)
                except (BotoCoreError, OSError) as exc:
                    raise DownloadError(f"reading {url} failed: {exc}") from exc
                if not data:
                    return
                yield data
        finally:
            body.close()

    return chunks(), total, str(resp.get("ETag", "")).strip('"')


class _Reader:
    """File-like view (``read``, context manager) of :func:`open_stream`'s chunks."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            data = next(self._chunks, b"")
            if not data:
                break
            self._buffer += data
        if size < 0:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_url(url: str, *, offset: int = 0, endpoint_url: str | None = None) -> tuple[_Reader, int]:
    """``(file-like reader, total_size)`` for :mod:`packager.download` (same errors as open_stream)."""
    chunks, total, _ = open_stream(url, offset=offset, endpoint_url=endpoint_url)
    return _Reader(chunks), total


def read_bytes(url: str, *, endpoint_url: str | None = None, cap: int = 16 << 20) -> bytes | None:
    """A small object's content (a mirror index, a checksum file: at most ``cap`` bytes, more is a
    DownloadError), or None when it does not exist."""
    from .bodies import capped_join

    try:
        chunks, _, _ = open_stream(url, endpoint_url=endpoint_url)
    except ObjectNotFound:
        return None
    return capped_join(chunks, cap, "an object read whole (a mirror index or checksum file)", url)


# -- writing ----------------------------------------------------------------------------------

def put_bytes(url: str, data: bytes, *, content_type: str = "application/octet-stream",
              endpoint_url: str | None = None) -> None:
    """Write a small object in one request; the server checks its SHA-256."""
    bucket, key = parse_url(url)
    s3 = client(endpoint_url)
    _call("write", url, s3.put_object, Bucket=bucket, Key=key, Body=data, ContentType=content_type,
          ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(hashlib.sha256(data).digest()))


def delete(url: str, *, endpoint_url: str | None = None) -> None:
    bucket, key = parse_url(url)
    _call("delete", url, client(endpoint_url).delete_object, Bucket=bucket, Key=key)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def part_size_for(size: int, part_size: int = PART_SIZE) -> int:
    """``part_size`` grown (doubling) until ``size`` fits in S3's 10000 parts."""
    part_size = max(part_size, MIN_PART_SIZE)
    while -(-size // part_size) > MAX_PARTS:
        part_size *= 2
    return part_size


def expected_checksum(sha256_hex: str, part_digests: list[bytes] | None) -> str:
    """The ChecksumSHA256 an S3 server reports: of the bytes, or of the part digests (multipart)."""
    if part_digests is None:
        return _b64(bytes.fromhex(sha256_hex))
    return _b64(hashlib.sha256(b"".join(part_digests)).digest())


def checksum_matches(reported: str | None, expected: str) -> bool:
    # AWS appends "-<parts>" to composite checksums; some servers do not.
    return reported is None or reported.split("-", 1)[0] == expected


def upload(stream: BinaryIO, size: int, url: str, *, sha256: str, endpoint_url: str | None = None,
           multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE,
           progress: Callable[[int], None] | None = None, content_type: str = "application/octet-stream",
           ) -> ObjectInfo:
    """Upload exactly ``size`` bytes from ``stream`` to ``url``, verified against ``sha256``.

    The bytes are hashed as they are read; a mismatch (or a short stream) aborts the upload
    before anything is visible at ``url`` (IntegrityError). ``progress(n)`` is called with each
    number of bytes sent.
    """
    bucket, key = parse_url(url)
    s3 = client(endpoint_url)
    sha256 = sha256.lower()
    extra = {"Metadata": {SHA256_METADATA: sha256}, "ContentType": content_type}
    if size < multipart_threshold:
        data = _read_exact(stream, size, url)
        _check_hash(hashlib.sha256(data).hexdigest(), sha256, url)
        _call("write", url, s3.put_object, Bucket=bucket, Key=key, Body=data,
              ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(hashlib.sha256(data).digest()), **extra)
        if progress:
            progress(size)
        expected = expected_checksum(sha256, None)
    else:
        expected = _multipart(s3, stream, size, url, bucket, key, sha256, part_size_for(size, part_size),
                              progress, extra)
    info = head(url, endpoint_url=endpoint_url)
    problem = None
    if info is None:
        problem = ("object", "present after upload", "missing")
    elif info.size != size:
        problem = ("size", str(size), str(info.size))
    elif info.sha256 != sha256:
        problem = ("sha256 metadata", sha256, str(info.sha256))
    elif not checksum_matches(info.checksum_sha256, expected):
        problem = ("server ChecksumSHA256", expected, str(info.checksum_sha256))
    if problem:
        if info is not None:
            delete(url, endpoint_url=endpoint_url)
        what, want, got = problem
        raise IntegrityError(f"{url}: {what} after upload", expected=want, got=got)
    return info


def _read_exact(stream: BinaryIO, size: int, url: str) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = stream.read(min(READ_CHUNK * 8, size - len(buf)))
        if not data:
            raise IntegrityError(f"source of {url} is short", expected=f"{size} bytes", got=f"{len(buf)} bytes")
        buf += data
    return bytes(buf)


def _check_hash(got: str, expected: str, url: str) -> None:
    if got != expected:
        raise IntegrityError(f"source bytes for {url}", expected=f"sha256 {expected}", got=got)


def _multipart(s3, stream, size, url, bucket, key, sha256, part_size, progress, extra) -> str:
    created = _call("write", url, s3.create_multipart_upload, Bucket=bucket, Key=key,
                    ChecksumAlgorithm="SHA256", **extra)
    upload_id = created["UploadId"]
    whole = hashlib.sha256()
    digests: list[bytes] = []
    try:
        # Parts are read and hashed in order here; at most PARTS_IN_FLIGHT are in memory and
        # being sent at once.
        with ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT) as pool:
            futures = []
            remaining = size
            while remaining > 0:
                if len(futures) >= PARTS_IN_FLIGHT:
                    futures[-PARTS_IN_FLIGHT].result()  # wait for room; re-raises its failure
                data = _read_exact(stream, min(part_size, remaining), url)
                remaining -= len(data)
                whole.update(data)
                digest = hashlib.sha256(data).digest()
                digests.append(digest)
                futures.append(pool.submit(_upload_part, s3, url, bucket, key, upload_id, len(futures) + 1,
                                           data, _b64(digest), progress))
                del data
            parts = [future.result() for future in futures]
        _check_hash(whole.hexdigest(), sha256, url)
        _call("write", url, s3.complete_multipart_upload, Bucket=bucket, Key=key, UploadId=upload_id,
              MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # the original error matters more; an orphan upload costs only storage
            pass
        raise
    return expected_checksum(sha256, digests)


def _upload_part(s3, url, bucket, key, upload_id, number, data, checksum, progress):
    resp = _call("write", url, s3.upload_part, Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                 Body=data, ChecksumSHA256=checksum)
    if progress:
        progress(len(data))
    return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}


# -- reading: a source of the engine ---------------------------------------------------------------
def transfer_s3(url, part, verifier, policy, on_bytes, on_total, cancel=None, notify=None) -> Result:
    return fetch(S3Source(url, policy), part, verifier, policy, on_bytes=on_bytes, on_total=on_total,
                 cancel=cancel, notify=notify)


class S3Source:
    """An S3 object as a :class:`~.engine.Source`: ranged GETs, its ETag the validator (``If-Match``).

    The engine retries (one policy for every store), so the reading client makes one attempt per
    call, with the policy's timeouts; a connection that fails, times out or answers 5xx is
    Retryable, a missing object or a refusal is not."""

    segmentable = True  # a large object comes in ranged GETs (``open(..., end=)``)

    def __init__(self, url: str, policy, endpoint_url: "str | S3Clients | None" = None):
        self.url = url
        self.policy = policy
        self.endpoint_url = clients_of(endpoint_url)  # its clients, for its endpoint

    def open(self, offset: int, validator: str | None, timeout: tuple[float, float], end: int | None = None) -> Body:
        try:
            s3 = client(self.endpoint_url, timeouts=(self.policy.connect_timeout, read_timeout(self.policy)))
        except MirrorError as exc:  # boto3 missing: this mirror cannot be read, the next one may
            raise DownloadError(f"{self.url}: {exc.message}", hint=exc.hint) from None
        if offset and not validator:  # nothing proves the object is unchanged: start over
            offset = 0
        try:
            resp = self._get(s3, offset, validator, end)
        except _Changed:
            offset, resp = 0, self._get(s3, 0, None)  # replaced since the part began: once more from zero
        if resp is None:  # the part already holds the whole object
            info = head(self.url, endpoint_url=self.endpoint_url)
            if info is None or info.size != offset:
                raise DownloadError(f"{self.url}: the server refused the byte range (asked from {offset})")
            return Body(offset, offset, info.etag, lambda view: 0)
        content_range = resp.get("ContentRange")  # "bytes 100-999/1000"
        total = int(content_range.rsplit("/", 1)[1]) if content_range else int(resp["ContentLength"]) + offset
        if (offset or end is not None) and not content_range:
            if end is not None and validator:  # the engine tells a server ignoring ranges from a changed object
                offset = 0
            else:
                resp["Body"].close()
                raise DownloadError(f"{self.url}: the server ignored the byte range (asked from {offset})")
        body = resp["Body"]
        raw = getattr(body, "_raw_stream", None)
        return Body(offset, total, str(resp.get("ETag", "")).strip('"'), _body_reader(body, raw),
                    abort=aborter(raw), close=body.close)

    def _get(self, s3, offset: int, etag: str | None, end: int | None = None):
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs = {"Bucket": parse_url(self.url)[0], "Key": parse_url(self.url)[1]}
        if offset or end is not None:
            kwargs["Range"] = f"bytes={offset}-" + (f"{end - 1}" if end is not None else "")
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        try:
            return s3.get_object(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            code, status = _status(exc)
            if offset and (code in ("PreconditionFailed", "412") or status == 412):
                raise _Changed() from None
            if offset and code == "InvalidRange":
                return None
            if status >= 500 or status in (408, 429) or _is_connection_error(exc):
                raise Retryable(self._reason(exc, status), stalled=_is_timeout(exc)) from None
            raise _translate(exc, self.url, "read", reading=True) from exc


    def _reason(self, exc, status: int) -> str:
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

        endpoint = urlparse(str(getattr(exc, "kwargs", {}).get("endpoint_url") or "")).netloc or "the S3 endpoint"
        if isinstance(exc, ReadTimeoutError):
            return f"no answer from {endpoint} for {read_timeout(self.policy):g}s"
        if isinstance(exc, ConnectTimeoutError):
            return f"connect timeout to {endpoint}"
        return f"S3 {status}" if status else f"cannot reach {endpoint} ({type(exc).__name__})"


def _is_timeout(exc) -> bool:
    from botocore.exceptions import ReadTimeoutError

    return isinstance(exc, ReadTimeoutError)


class _Changed(Exception):
    """The object is not the one the part was taken from (If-Match failed)."""


def _is_connection_error(exc) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(exc, (BotoConnectionError, HTTPClientError))


def _body_reader(body, raw):
    """``read_into(view)`` returning what has arrived (urllib3's ``read1``), so the watchdog sees a trickle."""
    from botocore.exceptions import BotoCoreError

    read1 = getattr(raw, "read1", None)

    def read(view) -> int:
        try:
            data = read1(len(view)) if read1 is not None else body.read(min(len(view), READ_CHUNK))
        except BotoCoreError as exc:
            raise Retryable(f"reading failed: {exc}") from None
        view[: len(data)] = data
        return len(data)
    return retryable(read)


# -- writing: a bucket prefix as a mirror destination ---------------------------------------------
class S3Target:
    """``s3://bucket/prefix`` as a place to publish objects."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, multipart_threshold: int | None = None,
                 part_size: int | None = None):
        bucket, prefix = parse_url(url)
        self.base = f"s3://{bucket}/{prefix}".rstrip("/")
        self.description = self.base
        self.endpoint_url = clients_of(endpoint_url)  # its clients, for its endpoint
        self.multipart_threshold = multipart_threshold or MULTIPART_THRESHOLD
        self.part_size = part_size or PART_SIZE

    def location(self, rel: str) -> str:
        return join(self.base, rel)

    def prepare(self) -> None:
        bucket, _ = parse_url(self.base)
        s3_client = client(self.endpoint_url)
        _call("open bucket", f"s3://{bucket}", s3_client.head_bucket, Bucket=bucket)

    def present(self, obj: StoredObject) -> bool:
        info = head(self.location(obj.path), endpoint_url=self.endpoint_url)
        if info is None or info.size != obj.size:
            return False
        full = expected_checksum(obj.sha256, None)
        if info.checksum_sha256 and "-" not in info.etag:
            # One-part object: the server's checksum is of the whole content, so it decides.
            return info.checksum_sha256 == full
        # A multipart object's checksum is of its parts; trust the sha256 our own verified upload
        # recorded (a later overwrite by another tool drops that metadata).
        return info.sha256 == obj.sha256

    def put(self, obj: StoredObject, progress: Callable[[int], None]) -> None:
        with obj.opener() as src:
            upload(src, obj.size, self.location(obj.path), sha256=obj.sha256,
                            endpoint_url=self.endpoint_url, multipart_threshold=self.multipart_threshold,
                            part_size=self.part_size, progress=progress)

    def read_text(self, rel: str) -> str | None:
        data = read_bytes(self.location(rel), endpoint_url=self.endpoint_url)
        return None if data is None else data.decode("utf-8", errors="replace")

    def write_text(self, rel: str, text: str) -> None:
        content_type = "application/json" if rel.endswith(".json") else "text/plain"
        put_bytes(self.location(rel), text.encode(), content_type=content_type,
                           endpoint_url=self.endpoint_url)

    def index_lock(self):
        return contextlib.nullcontext()
