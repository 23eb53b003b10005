"""``tvpack fetch``, ``tvpack lock`` and ``tvpack cache ls|verify|prune|rm``."""
from __future__ import annotations

import time

import click

from ..fsutil import human_bytes, plural
from ._common import (
    all_option,
    echo_json,
    endpoint_url_option,
    json_option,
    lock_timeout_option,
    output_file_callback,
    registry_option,
    selectors_argument,
    table,
    torch_home_option,
    transfer_options,
    with_backbones_option,
)
from ._config import build_config, reporter
from .app import main
from .signing import trust_options

quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars and no per-file lines.")


def _network_options(func):
    """Mirror, parallelism and lock options shared by fetch and lock, and the transfer options (``transfer``)."""
    options = [
        endpoint_url_option,
        click.option("--mirror", "mirrors", multiple=True, metavar="URL",
                     help="Try this mirror first: http(s)://, file:// or a directory holding models/... "
                          "as download.pytorch.org does (repeatable, in order; env TVPACK_MIRROR)."),
        click.option("--no-upstream", is_flag=True, help="Only use the mirrors, never the weights' own url."),
        click.option("--jobs", "-j", type=click.IntRange(1, 64), default=4, show_default=True,
                     help="Files transferred in parallel."),
        transfer_options(),
        lock_timeout_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func




def _describe(result) -> str:
    if result.status == "downloaded":
        how = f"from {result.source}"
        if result.resumed_from:
            how += f", resumed at {human_bytes(result.resumed_from)}"
        return how
    if result.status in ("failed", "missing", "corrupt"):
        return result.error or ""
    return ""


@main.command("fetch")
@selectors_argument
@all_option
@torch_home_option
@registry_option
@_network_options
@click.option("--lock", "lockfile", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Fetch exactly the weights pinned in FILE (tvpack lock) and refuse any file whose sha256 "
                   "differs; needs no registry (SELECTORs then filter the lockfile).")
@with_backbones_option
@click.option("--dry-run", is_flag=True, help="Show the plan (cached, to download, bytes); transfer nothing.")
@json_option
@quiet_option
def fetch_cmd(selectors, all_weights, torch_home, registry, endpoint_url, mirrors, no_upstream, jobs, transfer,
              lock_timeout, lockfile, with_backbones, dry_run, as_json, quiet):
    """Download weights into the torch.hub cache, verified, so torchvision never downloads.

    Each file lands at <hub dir>/checkpoints/<basename(url)>, checked against the sha256 prefix in
    its name (and the full sha256 with --lock). Interrupted transfers resume; parallel runs share
    one transfer per file.

    \b
    Examples:
      tvpack fetch resnet50 'vit_b_*'
      tvpack fetch --mirror http://mirror.internal/ --no-upstream resnet50:all
      tvpack fetch --lock tvpack.lock
      tvpack fetch --offline --lock tvpack.lock     # check a machine has everything
    """
    from ..cache import fetch_results
    from ..errors import OfflineError, TvpackError, UsageError

    if lockfile and all_weights:
        raise UsageError("--lock and --all cannot be combined")
    config = build_config(mirrors=mirrors, no_upstream=no_upstream, offline=transfer.offline, jobs=jobs,
                          policy=transfer.policy(), lock_timeout=lock_timeout, endpoint_url=endpoint_url,
                          quiet=quiet or as_json)
    results = fetch_results(selectors, all_weights=all_weights, registry=registry, torch_home=torch_home,
                            lock=lockfile, with_backbones=with_backbones, dry_run=dry_run, raise_errors=False,
                            config=config)
    bad = [r for r in results if r.status in ("failed", "missing")]
    if as_json:
        echo_json([r.to_dict() for r in results])
    elif dry_run:
        _print_plan(results)
    elif not quiet:
        for r in results:
            click.echo(f"{r.status:<10}  {r.ref.name}  {r.path}  {_describe(r)}".rstrip())
    if not as_json and not dry_run:
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        got = sum(r.received for r in results if r.status == "downloaded")  # a resume counts what was missing
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        click.echo(f"{len(results)} weights: {summary}; {human_bytes(got)} transferred", err=quiet)
    if bad:
        missing = [r for r in bad if r.status == "missing"]
        if missing:
            raise OfflineError(f"offline mode: {len(missing)} of {len(results)} weights not cached: "
                               + ", ".join(r.ref.name for r in missing))
        if len(bad) == 1:
            raise TvpackError(bad[0].error or f"{bad[0].ref.name} failed")
        raise TvpackError(f"{len(bad)} of {len(results)} weights failed; first: {bad[0].ref.name}: {bad[0].error}")


def _print_plan(results) -> None:
    rows = []
    for r in results:
        rows.append([r.status, r.ref.name, r.path.name, human_bytes(r.size), r.error or ""])
    click.echo(table(["plan", "weights", "file", "size", "note"], rows, right=[3]))
    todo = [r for r in results if r.status == "would-download"]
    cached = [r for r in results if r.status == "cached"]
    known = sum(r.size or 0 for r in todo)
    unknown = sum(1 for r in todo if r.size is None)
    size = human_bytes(known) + (f" (+{unknown} of unknown size)" if unknown else "")
    click.echo(f"\n{len(cached)} cached, {len(todo)} to download ({size}), "
               f"{len(results) - len(cached) - len(todo)} present but wrong")


@main.command("lock")
@selectors_argument
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="tvpack.lock", show_default=True,
              callback=output_file_callback,
              help="Lockfile to write.")
@all_option
@torch_home_option
@registry_option
@_network_options
@with_backbones_option
@json_option
@quiet_option
def lock_cmd(selectors, output, all_weights, torch_home, registry, endpoint_url, mirrors, no_upstream, jobs, transfer,
             lock_timeout, with_backbones, as_json, quiet):
    """Pin weights to their exact bytes: write a lockfile (url, size, full sha256 per file).

    Missing files are fetched first. Later, `tvpack fetch --lock FILE` fetches exactly these files
    and refuses any whose sha256 differs (like pip's --require-hashes).
    """
    from ..cache import write_lockfile
    from ..formats.lockfile import read_lockfile

    config = build_config(mirrors=mirrors, no_upstream=no_upstream, offline=transfer.offline, jobs=jobs,
                          policy=transfer.policy(), lock_timeout=lock_timeout, endpoint_url=endpoint_url,
                          quiet=quiet or as_json)
    path = write_lockfile(selectors, output, registry=registry, all_weights=all_weights,
                          with_backbones=with_backbones, torch_home=torch_home, config=config)
    refs = read_lockfile(path)
    if as_json:
        echo_json({"lockfile": str(path), "weights": [r.to_dict() for r in refs]})
        return
    if not quiet:
        for ref in refs:
            click.echo(f"{ref.sha256}  {ref.name}  {ref.filename}")
    click.echo(f"wrote {path}: {len(refs)} weights, {human_bytes(sum(r.size_hint or 0 for r in refs))}")


@main.group("cache")
def cache_group():
    """Inspect and tidy the checkpoint cache (<TORCH_HOME>/hub/checkpoints)."""


@cache_group.command("ls")
@torch_home_option
@registry_option
@click.option("--no-registry", is_flag=True,
              help="Name weights from tvpack's index and bundle manifests only (do not import torchvision).")
@json_option
def ls_cmd(torch_home, registry, no_registry, as_json):
    """Every file in the cache: weights, size, status, modified time; totals. Then each installed weights and
    its current manifest (the highest release of a channel, else the most recent install).

    \b
    status: verified    hashed and matching its name's sha256 prefix (and manifest pins)
            unverified  not hashed since it last changed (tvpack cache verify hashes it)
            corrupt     its sha256 contradicts its name or a manifest
            partial     an interrupted or running download (tvpack cache prune)
            unknown     no known weights and nothing to check it against
            broken      a dangling symlink (its target is gone)
    """
    from ..cache import HubLayout, scan_hub
    from ..channels import revoked_files

    hub = scan_hub(HubLayout.of(torch_home), registry=registry, use_registry=not no_registry)
    info = hub.cache
    revoked = revoked_files(info.hub_dir)  # kept in <hub>/tvpack/revoked/, never loaded
    if as_json:
        echo_json({**info.to_dict(), **installed_json(hub), "revoked": [r.to_dict() for r in revoked]})
        return
    rows = [[f.name, ",".join(f.weights) or "-", human_bytes(f.size), f.status,
             f.to_dict()["modified"].replace("T", " ")] for f in info.files]
    rows += [[r.path.name, r.reason, human_bytes(r.size), "revoked", r.record.at.replace("T", " ")] for r in revoked]
    if rows:
        click.echo(table(["file", "weights", "size", "status", "modified"], rows, right=[2]))
        click.echo("")
    counts = ", ".join(f"{n} {s}" for s, n in info.counts().items() if n)
    click.echo(f"{plural(len(info.files), 'file')}, {human_bytes(info.size)} in {info.hub_dir / 'checkpoints'}"
               + (f" ({counts})" if counts else ""))
    if revoked:
        click.echo(f"{len(revoked)} revoked, {human_bytes(sum(r.size for r in revoked))} kept in "
                   f"{revoked[0].path.parent} (tvpack cache prune --revoked deletes them)")
    if hub.weights or hub.problems:
        click.echo("")
        echo_installed(hub)


def _why_current(hub, weights) -> str:
    manifest = hub.manifest(weights.current) if weights.current else None
    if weights.reason == "release":
        return f"highest: {manifest.release}"
    if weights.reason == "installed":
        return "installed last, " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.record.installed))
    if weights.reason == "identical":
        return f"described alike by {plural(len(weights.manifests), 'manifest')}"
    if weights.reason == "ambiguous":
        return "AMBIGUOUS: " + ", ".join(weights.manifests)
    return "only manifest" + (f" ({manifest.release})" if manifest and manifest.release else "")


def _revoked(hub) -> dict[str, str]:
    """{weights name: "revoked by release N of CHANNEL: reason"} for each installed weights whose current file a
    channel revoked here: it is no longer what loads (the loader refuses it, torchvision no longer finds it)."""
    from ..channels import revocation_of

    found = {}
    for weights in hub.weights.values():
        said = revocation_of(hub.layout.hub, sha256=weights.entry.sha256) if weights.entry else None
        if said is not None:
            found[weights.name] = said
    return found


def installed_json(hub) -> dict:
    """The installed state of a :class:`packager.cache.HubInfo` for --json: manifests and each weights' current
    (``"revoked"``: why, when a channel revoked its file here; else null)."""
    revoked = _revoked(hub)
    return {"manifests": [m.to_dict() for m in hub.manifests],
            "installed": [{**w.to_dict(), "revoked": revoked.get(w.name)} for w in hub.weights.values()]}


def inspect_installed(directory, as_json: bool) -> None:
    """``tvpack inspect TORCH_HOME`` (or a hub directory): its installed weights and their current manifests."""
    from pathlib import Path

    from ..cache import HubLayout, scan_hub
    from ..errors import CacheError

    directory = Path(directory)
    layout = HubLayout(directory) if HubLayout(directory).tvpack.is_dir() else HubLayout(directory / "hub")
    if not layout.manifests.is_dir():
        raise CacheError(f"{directory} holds no installed tvpack bundle (no {layout.manifests})")
    hub = scan_hub(layout, checkpoints=False)
    if as_json:
        echo_json({"hub_dir": str(layout.hub), **installed_json(hub)})
        return
    echo_installed(hub)


def echo_installed(hub) -> None:
    """Each installed weights with its current manifest and why it is the one (cache ls, inspect TORCH_HOME)."""
    revoked = _revoked(hub)
    rows = [[w.name, "REVOKED" if w.name in revoked else w.current or "-", w.entry.filename if w.entry else "-",
             revoked.get(w.name) or _why_current(hub, w)] for w in hub.weights.values()]
    if rows:
        click.echo(table(["installed weights", "current manifest", "file", "why"], rows))
    for weights in hub.weights.values():
        if weights.problem:
            click.echo(f"tvpack: {weights.problem}")
    for line in hub.problems:
        click.echo(f"tvpack: {line}")
    click.echo(f"{len(hub.weights)} weights installed from {plural(sum(m.ok for m in hub.manifests), 'manifest')} in "
               f"{hub.layout.manifests}")


@cache_group.command("verify")
@selectors_argument
@click.option("--deep", is_flag=True, help="Also check each file loads with torch.load(weights_only=True).")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None,
              help="Files hashed in parallel (default: all cores).")
@click.option("--signatures", is_flag=True,
              help="Also require every installed manifest to carry a trusted signature and every file to match "
                   "what a signed manifest states (trust: --key/--ca-root, else the configured policy).")
@trust_options
@torch_home_option
@registry_option
@json_option
@quiet_option
def verify_cmd(selectors, deep, jobs, signatures, keys, ca_roots, torch_home, registry, as_json, quiet):
    """Re-hash cached files (all, or SELECTOR.../file names) and check them; exit 1 if any is bad."""
    from ..cache import verify_cache
    from ..errors import IntegrityError

    if signatures:
        return _verify_signatures(selectors, jobs, keys, ca_roots, torch_home, registry, as_json, quiet)
    if keys or ca_roots:
        raise click.UsageError("--key and --ca-root go with --signatures")

    results = verify_cache(selectors, torch_home=torch_home, registry=registry, deep=deep, jobs=jobs,
                           reporter=reporter(quiet or as_json))
    bad = [r for r in results if not r.ok]
    if as_json:
        echo_json([r.to_dict() for r in results])
    else:
        for r in results:
            if not quiet or not r.ok:
                click.echo(f"{'ok' if r.ok else 'BAD':<4} {r.path.name}  {r.detail or r.sha256}")
        click.echo(f"{plural(len(results), 'file')}, {human_bytes(sum(r.size for r in results))} verified; {len(bad)} bad",
                   err=quiet)
    if bad:
        raise IntegrityError(f"{len(bad)} of {len(results)} cached files failed verification",
                             expected="files matching their hashes", got=", ".join(r.path.name for r in bad))


def _verify_signatures(selectors, jobs, keys, ca_roots, torch_home, registry, as_json, quiet):
    from ..errors import SignatureError
    from ..signing import trust_policy, verify_installed

    report = verify_installed(trust_policy(keys, ca_roots, torch_home=torch_home), torch_home=torch_home,
                              selectors=selectors, registry=registry, jobs=jobs, reporter=reporter(quiet or as_json))
    if as_json:
        echo_json(report.to_dict())
    else:
        for m in report.manifests:
            state = "signed by " + ", ".join(m.signatures.signers) if m.problem is None else m.problem
            click.echo(f"{'ok' if m.problem is None else 'BAD':<4} manifest {m.manifest_id}  {state}")
        for f in report.files:
            if not quiet or not f.ok:
                click.echo(f"{'ok' if f.ok else 'BAD':<4} {f.path.name}  "
                           + (f.detail or "signed in manifest " + ", ".join(f.signed_in)))
    bad = [m.manifest_id for m in report.manifests if m.problem] + [f.path.name for f in report.files if not f.ok]
    if not as_json:
        click.echo(f"{plural(len(report.manifests), 'manifest')}, {plural(len(report.files), 'file')} checked against "
                   f"their signatures; {len(bad)} bad", err=quiet)
    if bad:
        raise SignatureError(f"{len(bad)} installed manifest(s) or file(s) fail the signature check: {', '.join(bad)}")


def _print_removals(removals, dry_run: bool, noun: str) -> None:
    for item in removals:
        click.echo(f"{'would remove' if dry_run else 'removed'}  {item.path}  {human_bytes(item.size)}  ({item.reason})")
    total = sum(item.size for item in removals)
    click.echo(f"{'would free' if dry_run else 'freed'} {human_bytes(total)} ({plural(len(removals), noun)})")


@cache_group.command("prune")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed and the bytes freed.")
@click.option("--revoked", is_flag=True, help="Also delete the revoked checkpoints kept in <hub>/tvpack/revoked/.")
@torch_home_option
@json_option
def prune_cmd(dry_run, revoked, torch_home, as_json):
    """Remove abandoned partial downloads, temporary files and lock files of runs that died holding them."""
    from ..cache import prune_cache
    from ..channels import prune_revoked
    from ..home import hub_dir

    removals = prune_cache(torch_home=torch_home, dry_run=dry_run)
    removals += prune_revoked(hub_dir(torch_home), dry_run=dry_run) if revoked else []
    if as_json:
        echo_json({"dry_run": dry_run, "removed": [r.to_dict() for r in removals],
                   "bytes": sum(r.size for r in removals)})
        return
    _print_removals(removals, dry_run, "file")


@cache_group.command("rm")
@click.argument("selectors", nargs=-1, required=True, metavar="SELECTOR|FILE...")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@torch_home_option
@registry_option
@json_option
def rm_cmd(selectors, dry_run, torch_home, registry, as_json):
    """Remove the cached files of the selected weights (or file names in checkpoints/)."""
    from ..cache import remove_from_cache

    removals = remove_from_cache(selectors, torch_home=torch_home, registry=registry, dry_run=dry_run)
    if as_json:
        echo_json({"dry_run": dry_run, "removed": [r.to_dict() for r in removals],
                   "bytes": sum(r.size for r in removals)})
        return
    _print_removals(removals, dry_run, "file")
