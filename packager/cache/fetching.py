"""Fetching checkpoints into ``<hub>/checkpoints/``, under locks, placed atomically.

Correctness never rests on the locks (they can be silent no-ops on NFS or Lustre): every transfer writes
its own uniquely named part file in the same directory, which is fsynced and verified before ``os.replace``
gives it the final name. The per-file lock (``<hub>/tvpack/locks/<file>.lock``) only stops N threads or
processes from doing the same transfer N times; its holder writes who it is into it, so a waiting fetch can
say what it waits for.

A part file is named ``<file>.<host>.<pid>.<token>.tvpack-part``; one whose owner is gone (killed,
interrupted) is taken over by the next fetch and resumed with a Range request.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..config import Config, config_from
from ..errors import CacheError, DownloadError, IntegrityError, MirrorError, OfflineError, TvpackError, UsageError
from ..formats.lockfile import read_lockfile, select_locked
from ..fsutil import SpaceLedger, adopt, fsync_dir, left_behind, share_with_group, temps_of
from ..locking import describe_holder
from ..registry import WeightsRef
from ..report import Reporter
from ..snapshot import resolve
from ..transport import (
    DEFAULT_POLICY,
    Cancel,
    Cancelled,
    Connections,
    Policy,
    Verifier,
    discard_part,
    part_state_path,
    transfer,
)
from ..transport.urls import candidate_urls, normalize_mirror
from .index import _stat, file_sha256, record_verified
from .layout import _HOST, _PART_NAME, PART_SUFFIX, HubLayout, _lock, _makedirs, _stem

STALE_FOREIGN_PART = 3600.0  # seconds before another host's part file counts as abandoned
LOCK_WAIT = 900.0  # seconds to wait for another fetch of the same file before going ahead anyway


@contextmanager
def _fetch_lock(hub: Path, name: str, run: "_Run"):
    """Hold the file's lock. While waiting, say once who holds it.

    With a lock timeout (``--lock-timeout``), giving up is a CacheError naming the holder.
    Without one, after ``LOCK_WAIT`` seconds go ahead without the lock: a lock that is never
    released (a soft lock left by a killed process on a filesystem without flock, a hung holder)
    must not hang every later fetch; going ahead only risks duplicate work, never a wrong file.
    """
    lock = _lock(hub, name)
    seen: list = []

    def waiting(holder) -> None:
        seen.append(holder)
        run.notify(f"waiting for {name}: {describe_holder(holder)}")

    timeout = run.lock_timeout if run.lock_timeout is not None else LOCK_WAIT
    try:
        got = lock.acquire(timeout=timeout, on_wait=waiting, check=run.cancel.check)
    except OSError as exc:
        raise CacheError(f"cannot lock {lock.path}: {exc.strerror or exc}") from None
    if not got:
        if run.lock_timeout is not None:
            holder = lock.holder() or (seen[0] if seen else None)
            raise CacheError(f"gave up after {run.lock_timeout:g}s waiting for the lock on {name}: "
                             f"{describe_holder(holder)} (--lock-timeout / TVPACK_LOCK_TIMEOUT)")
        run.notify(f"still waiting for {name} after {timeout:.0f}s; going ahead without the lock")
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


# -- what a file should be -------------------------------------------------------------------------

def _exact_size(ref: WeightsRef) -> int | None:
    # A pinned ref (lockfile, manifest) carries the exact size; the registry's is a rounded MB.
    return ref.size_hint if ref.sha256 else None


def _problem(ref: WeightsRef, sha256: str, size: int) -> str | None:
    """Why a file with this hash and size is not ``ref``'s, or None when it is."""
    exact = _exact_size(ref)
    if exact is not None and size != exact:
        return f"size {size}, expected {exact}"
    if ref.sha256 and sha256 != ref.sha256.lower():
        return f"sha256 {sha256}, pinned {ref.sha256}"
    prefix = ref.hash_prefix
    if prefix and not sha256.startswith(prefix):
        return f"sha256 starts {sha256[:len(prefix)]}, name promises {prefix}"
    return None


# -- fetching --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchResult:
    """What happened to one weights: ``status`` is cached, downloaded, missing, would-download,
    corrupt (dry-run/offline: present but wrong) or failed (``error`` says why)."""

    ref: WeightsRef
    path: Path
    status: str
    size: int | None = None
    sha256: str | None = None
    source: str | None = None
    resumed_from: int = 0
    error: str | None = None
    received: int = 0  # bytes that came over the wire in this run (a resume counts only what was missing)

    def to_dict(self) -> dict:
        return {
            "weights": self.ref.name, "url": self.ref.url, "path": str(self.path), "status": self.status,
            "size": self.size, "sha256": self.sha256, "source": self.source,
            "resumed_from": self.resumed_from, "received": self.received, "error": self.error,
        }


def _marker(part: Path) -> Path:
    """Where a transfer of this process marks ``part`` in use: ``<hub>/tvpack/locks/<part name>.inuse``, ``flock``-ed
    while the transfer may write the part (beside it, not on it: the engine removes and re-creates a part it
    starts afresh). Threads of this process, and other processes where flock works, see the mark; no
    process-wide record of parts in use is kept."""
    return HubLayout(part.parent.parent).locks / f"{part.name}.inuse"


def _mark(part: Path) -> int | None:
    """The descriptor holding ``part``'s mark; None when another holds it (or no mark can be made here)."""
    try:
        fd = os.open(_marker(part), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        return None
    share_with_group(_marker(part), fd=fd)  # a killed run's mark stays: usable by the group, as its part is
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _marked(part: Path) -> bool:
    try:
        fd = os.open(_marker(part), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # never marked, or its transfer is over
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _unmark(part: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.unlink(_marker(part))
    except OSError:
        pass
    os.close(fd)


def _part_abandoned(part: Path, match: re.Match, held: bool = True) -> bool:
    """Whether nobody writes ``part`` any more. A part of this very process is free when no transfer of ours marks
    it in use (:func:`_mark`) and ``held``: the caller holds the lock of the part's file (not gone ahead without
    it)."""
    if match["host"] != _HOST:
        try:
            return time.time() - part.stat().st_mtime > STALE_FOREIGN_PART
        except OSError:
            return False
    pid = int(match["pid"])
    return left_behind(pid, part, ours=pid == os.getpid() and held and not _marked(part))


def _parts_of(ckpt: Path, filename: str) -> list[Path]:
    out = []
    try:
        names = os.listdir(ckpt)
    except OSError:
        return out
    stem = _stem(filename)
    for name in names:
        match = _PART_NAME.match(name)
        if match and match["file"] == stem:
            out.append(ckpt / name)
    return out


def _claim_part(ckpt: Path, filename: str, notify: Callable[[str], None] = lambda message: None,
                held: bool = True) -> tuple[Path, int | None]:
    """A part file for this process: an abandoned one taken over (to resume), else a new name; and the descriptor
    that marks it in use (:func:`_mark`; the caller gives it back with :func:`_unmark` when the transfer is over).

    Taking over is an ``os.replace`` to our own unique name, so two claimants never share a file.
    A part we could not write (another user's, not shared with the group) is left alone.
    """
    mine = ckpt / f"{_stem(filename)}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{PART_SUFFIX}"
    in_use = _mark(mine)  # before the name exists: nobody ever sees it unmarked while we may write it
    candidates = []
    for part in _parts_of(ckpt, filename):
        match = _PART_NAME.match(part.name)
        try:
            size = part.stat().st_size
        except OSError:
            continue
        if _part_abandoned(part, match, held):
            candidates.append((size, part))
    for _size, part in sorted(candidates, reverse=True):
        if not os.access(part, os.R_OK | os.W_OK):
            notify(f"ignoring {part.name}: a partial download left by another user that you cannot write "
                   "(starting afresh; 'tvpack cache prune' by its owner removes it)")
            continue
        if not adopt(part, mine):  # another claimant was first
            continue
        try:
            os.replace(part_state_path(part), part_state_path(mine))
        except OSError:
            pass
        for temp, _pid in temps_of(part_state_path(part)):  # the record its killed owner was writing
            with contextlib.suppress(OSError):
                temp.unlink()
        return mine, in_use
    return mine, in_use


class _Bars:
    """A fetch's progress through its reporter (:mod:`packager.report`): one total and one per running transfer."""

    def __init__(self, reporter: Reporter, total_bytes: int | None):
        self.reporter = reporter
        self.total = reporter.progress(total_bytes or None, "total", transient=False)

    def open(self, desc: str):
        return self.reporter.progress(None, desc)

    def close(self, bar) -> None:
        bar.close()

    def finish(self) -> None:
        self.total.close()


def _check_present(path: Path, ref: WeightsRef) -> tuple[str, str | None, int | None]:
    """(state, sha256, size) of the file at the final name: absent, ok, corrupt or pin-mismatch
    (a good copy of what its name promises, but not the bytes a lockfile pins)."""
    st = _stat(path)
    if st is None:
        return "absent", None, None
    size = st.st_size
    exact = _exact_size(ref)
    if exact is not None and size != exact and not ref.hash_prefix:
        return "corrupt", None, size  # nothing else to learn from hashing it
    sha = file_sha256(path)
    if _problem(ref, sha, size) is None:
        return "ok", sha, size
    if ref.sha256 and ref.hash_prefix and sha.startswith(ref.hash_prefix):
        return "pin-mismatch", sha, size
    return "corrupt", sha, size


class _Run:
    """What the transfers of one fetch share: the cancel flag, the lock timeout, the stderr
    notices, the disk space promised to transfers in progress (the ledger), the connections its large files
    may open beyond one each (``policy.connections - 1`` in all), and the cache directories, made (once) only
    when something has to be written."""

    def __init__(self, hub: Path, bars: "_Bars", lock_timeout: float | None, policy: Policy = DEFAULT_POLICY):
        self.hub = hub
        self.bars = bars
        self.lock_timeout = lock_timeout
        self.cancel = Cancel()
        self.ledger = SpaceLedger()
        self.connections = Connections(policy.connections - 1)
        self._prepared = False
        self._mutex = threading.Lock()

    def notify(self, message: str) -> None:
        self.bars.reporter.notice(message)

    def prepare(self) -> None:
        with self._mutex:
            if not self._prepared:
                for path in (HubLayout(self.hub).checkpoints, HubLayout(self.hub).locks):
                    _makedirs(path)
                self._prepared = True


def _fetch_one(ref: WeightsRef, hub: Path, *, mirrors, upstream: bool, policy: Policy, run: _Run) -> FetchResult:
    ckpt = HubLayout(hub).checkpoints
    final = ckpt / ref.filename
    state, sha, size = _check_present(final, ref)
    if state == "ok":
        return FetchResult(ref, final, "cached", size, sha)
    if state == "pin-mismatch":
        raise IntegrityError(f"{final} does not match the lockfile", expected=ref.sha256, got=sha,
                             hint="remove it with 'tvpack cache rm' or update the lockfile")
    run.prepare()  # from here on we write: a read-only cache fails here, in one line
    with _fetch_lock(hub, ref.filename, run) as held:
        state, sha, size = _check_present(final, ref)  # someone may have fetched it meanwhile
        if state == "ok":
            return FetchResult(ref, final, "cached", size, sha)
        if state == "pin-mismatch":
            raise IntegrityError(f"{final} does not match the lockfile", expected=ref.sha256, got=sha,
                                 hint="remove it with 'tvpack cache rm' or update the lockfile")
        urls = candidate_urls(ref.url, mirrors, upstream=upstream)
        if not urls:
            raise DownloadError(f"{ref.name}: no mirror given and upstream disabled (--no-upstream)")
        part, in_use = _claim_part(ckpt, ref.filename, run.notify, held)
        errors: list[str] = []
        integrity: IntegrityError | None = None
        bar = run.bars.open(ref.filename)
        received = [0]
        try:
            for url in urls:
                verifier = Verifier(url, hash_prefix=ref.hash_prefix, sha256=ref.sha256, size=_exact_size(ref))
                on_bytes, on_total = _progress_callbacks(bar, run.bars.total, received)
                try:
                    result = transfer(url, part, verifier, policy=policy, on_bytes=on_bytes, on_total=on_total,
                                      cancel=run.cancel, notify=run.notify, ledger=run.ledger,
                                      connections=run.connections)
                except IntegrityError as exc:
                    integrity = integrity or exc
                    errors.append(exc.format())
                    continue
                except (DownloadError, MirrorError) as exc:  # this source cannot serve it (no credentials, say): next
                    errors.append(exc.format())
                    continue
                try:
                    os.replace(part, final)
                except OSError as exc:
                    raise CacheError(f"cannot place {final}: {exc.strerror or exc}") from None
                discard_part(part)
                record_verified(final, result.sha256, weights=ref.name, url=ref.url)
                return FetchResult(ref, final, "downloaded", result.size, result.sha256, url, result.resumed_from,
                                   received=received[0])
        finally:
            run.bars.close(bar)
            _unmark(part, in_use)
        if integrity is not None and len(urls) == 1:
            raise integrity
        raise DownloadError(f"{ref.name}: every source failed: " + "; ".join(errors))


def _progress_callbacks(bar, total_bar, received: list[int]):
    def on_bytes(n: int) -> None:
        received[0] += n
        bar.update(n)
        total_bar.update(n)

    def on_total(total: int | None, offset: int) -> None:
        if offset < 0:  # a restart: take back the bytes counted for the old part
            bar.reset(total=total)
            total_bar.update(offset)
            return
        bar.reset(total=total)
        bar.update(offset)
        total_bar.update(offset)

    return on_bytes, on_total


def _select(selectors, refs, all_weights, registry, lock, with_backbones, live) -> list[WeightsRef]:
    if refs is not None:
        return list(refs)
    if lock is not None:
        return select_locked(read_lockfile(lock), selectors)
    return resolve(selectors, registry=registry, all_weights=all_weights, with_backbones=with_backbones, live=live)


def _dedupe(refs: Sequence[WeightsRef]) -> list[WeightsRef]:
    """One transfer per file name (two weights can share a file)."""
    seen: dict[str, WeightsRef] = {}
    for ref in refs:
        seen.setdefault(ref.filename, ref)
    return list(seen.values())


CANCEL_GRACE = 2.0  # seconds the workers get to stop (parts kept, locks released) after Ctrl-C / SIGTERM


def _in_parallel(work, items: list, jobs: int, cancel: Cancel) -> list:
    """``[work(item) for item in items]`` on ``jobs`` threads, in order.

    Ctrl-C or SIGTERM (an exception in the waiting main thread) cancels the run: transfers stop
    between chunks or have their blocked read aborted, and get ``CANCEL_GRACE`` seconds to keep
    their part files and release their locks; then the exception goes on. The threads are daemons
    so that one stuck in a connect cannot hold the process (a ThreadPoolExecutor would wait for it).
    """
    results: list = [None] * len(items)
    next_index = iter(range(len(items)))
    mutex = threading.Lock()
    finished = threading.Condition()
    running = [jobs]

    def worker() -> None:
        try:
            while not cancel.cancelled:
                with mutex:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    results[i] = work(items[i])
                except Cancelled:
                    return
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    results[i] = _Crashed(exc)
        finally:
            with finished:
                running[0] -= 1
                finished.notify_all()

    for n in range(jobs):
        threading.Thread(target=worker, name=f"tvpack-fetch-{n}", daemon=True).start()
    # Waiting on a condition, not Thread.join: a join interrupted by Ctrl-C marks a live thread
    # as finished (CPython 3.11), and the grace period would then not wait for it.
    try:
        with finished:
            while running[0]:
                finished.wait(0.2)
    except BaseException:
        cancel.cancel()
        with finished:
            finished.wait_for(lambda: not running[0], timeout=CANCEL_GRACE)
        raise
    for result in results:
        if isinstance(result, _Crashed):
            raise result.exc
    return results


@dataclass(frozen=True)
class _Crashed:
    exc: BaseException


def plan(refs: Sequence[WeightsRef], *, torch_home=None) -> list[FetchResult]:
    """What a fetch would do, without network: cached (verified), corrupt or would-download."""
    layout = HubLayout.of(torch_home)
    out = []
    for ref in refs:
        final = layout.checkpoint(ref.filename)
        state, sha, size = _check_present(final, ref)
        if state == "ok":
            out.append(FetchResult(ref, final, "cached", size, sha))
        elif state == "absent":
            out.append(FetchResult(ref, final, "would-download", _exact_size(ref) or ref.size_hint))
        else:
            out.append(FetchResult(ref, final, "corrupt", size, sha,
                                   error="does not match the lockfile" if state == "pin-mismatch"
                                   else "hash or size mismatch"))
    return out


def fetch_results(selectors: Iterable[str] = (), *, refs: Sequence[WeightsRef] | None = None,
                  all_weights: bool = False, registry: Sequence[str] = (), torch_home=None, lock=None,
                  with_backbones: bool = False, dry_run: bool = False, raise_errors: bool = True,
                  config: Config | None = None, **keywords) -> list[FetchResult]:
    """Like :func:`fetch`, returning one :class:`FetchResult` per weights.

    With ``raise_errors=False`` failures are returned as ``status="failed"`` results instead.
    """
    config = config_from(config, **keywords)
    selected = _select(list(selectors), refs, all_weights, registry, lock, with_backbones, config.live)
    offline, mirrors, jobs = config.is_offline(), config.mirror_list(), config.jobs
    if not offline:
        for mirror in mirrors:
            normalize_mirror(mirror)  # a malformed mirror is a usage error before any work
    if dry_run:
        return plan(selected, torch_home=torch_home)
    if offline:
        results = plan(selected, torch_home=torch_home)
        missing = [r for r in results if r.status != "cached"]
        if missing:
            names = ", ".join(f"{r.ref.name} ({'missing' if r.status == 'would-download' else r.status})"
                              for r in missing)
            if raise_errors:
                raise OfflineError(f"offline mode: {len(missing)} of {len(results)} weights not cached: {names}")
            return [r if r.status == "cached" else replace(r, status="missing" if r.status == "would-download"
                                                           else r.status, error=r.error or "offline: not cached")
                    for r in results]
        return results
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    hub = HubLayout.of(torch_home).hub
    policy, upstream = config.transfer_policy, config.upstream
    unique = _dedupe(selected)
    total = sum((_exact_size(r) or r.size_hint or 0) for r in unique)
    bars = _Bars(config.reporter, total)
    run = _Run(hub, bars, config.resolved_lock_timeout(), policy)
    done: dict[str, FetchResult] = {}
    try:
        def work(ref):
            try:
                return _fetch_one(ref, hub, mirrors=mirrors, upstream=upstream, policy=policy, run=run)
            except TvpackError as exc:
                return exc

        outcomes = _in_parallel(work, unique, min(jobs, len(unique) or 1), run.cancel)
    finally:
        bars.finish()
    if any(not isinstance(o, TvpackError) and o.status == "downloaded" for o in outcomes):
        # Once for all renames: each file's bytes were fsynced before its rename, so a crash can
        # only lose a rename (the file is fetched again), never expose wrong bytes.
        fsync_dir(HubLayout(hub).checkpoints)
    errors = []
    for ref, outcome in zip(unique, outcomes):
        if isinstance(outcome, TvpackError):
            errors.append((ref, outcome))
            done[ref.filename] = FetchResult(ref, HubLayout(hub).checkpoint(ref.filename), "failed",
                                             error=outcome.format())
        else:
            done[ref.filename] = outcome
    if errors and raise_errors:
        if len(errors) == 1:
            raise errors[0][1]
        first = errors[0][1]
        raise type(first)(f"{len(errors)} of {len(unique)} weights failed; first: {first.format()}") \
            if type(first) in (DownloadError, CacheError) else first
    out = []
    for ref in selected:
        result = done[ref.filename]
        out.append(result if result.ref == ref else replace(result, ref=ref))
    return out


def fetch(selectors: Iterable[str] = (), *, refs: Sequence[WeightsRef] | None = None, all_weights: bool = False,
          registry: Sequence[str] = (), torch_home=None, lock=None, with_backbones: bool = False,
          dry_run: bool = False, config: Config | None = None, **keywords) -> list[Path]:
    """Fetch weights into the torch.hub cache; returns the final paths, in the order of the refs.

    ``selectors`` are resolved through the registry (torchvision plus ``registry`` modules);
    ``refs`` skips that; ``lock`` (a ``tvpack.lock`` path) fetches exactly the pinned files and
    refuses any whose full sha256 differs, without importing torch. ``dry_run`` transfers nothing and
    returns where files would be. How (:class:`packager.config.Config`, or its fields as keywords:
    ``mirrors``, ``upstream``, ``offline``, ``jobs``, ``policy``, ``lock_timeout``, ``live``, ``reporter``,
    ``progress``): ``mirrors`` (None: the ``TVPACK_MIRROR`` variable) are tried in order, then upstream
    unless ``upstream=False``; ``offline`` (None: ``TVPACK_OFFLINE``) verifies what is cached and raises
    OfflineError naming what is missing; ``lock_timeout``: seconds to wait for another process fetching the
    same file before giving up (None: ``TVPACK_LOCK_TIMEOUT``, else up to ``LOCK_WAIT`` and then without the
    lock); ``live``: discover torchvision's catalog live instead of reading the snapshot.
    """
    return [r.path for r in fetch_results(
        selectors, refs=refs, all_weights=all_weights, registry=registry, torch_home=torch_home, lock=lock,
        with_backbones=with_backbones, dry_run=dry_run, config=config_from(config, **keywords))]


def ensure_cached(refs: Sequence[WeightsRef], *, torch_home=None, config: Config | None = None,
                  **keywords) -> dict[str, Path]:
    """Make sure each ref's verified file is in the cache; ``{ref.name: path}``.

    Offline (or ``TVPACK_OFFLINE``), raises OfflineError listing what is missing.
    """
    results = fetch_results(refs=list(refs), torch_home=torch_home, config=config_from(config, **keywords))
    return {r.ref.name: r.path for r in results}
