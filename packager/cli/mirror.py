"""``tvpack mirror``: publish checkpoints to an internal mirror (directory, nginx root or S3)."""
from __future__ import annotations

import click

from ..fsutil import human_bytes
from ._common import (
    echo_json,
    json_option,
    lock_timeout_option,
    registry_option,
    selectors_argument,
    table,
    torch_home_option,
    with_backbones_option,
)
from ._config import build_config
from .app import main
from .signing import trust_options


@main.command("mirror")
@selectors_argument
@click.option("--to", "dest", required=True, metavar="DEST",
              help="Where to publish: a directory (/srv/mirror, file://...) or s3://bucket/prefix.")
@click.option("--from-bundle", "bundle_file", type=click.Path(dir_okay=False, exists=True), default=None,
              metavar="FILE", help="Publish every checkpoint of this bundle (no network beyond DEST).")
@click.option("--all", "all_weights", is_flag=True, help="Select every weights of every model.")
@with_backbones_option
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Files transferred in parallel.")
@registry_option
@torch_home_option
@click.option("--mirror", "mirrors", multiple=True, metavar="URL",
              help="Fetch missing checkpoints from this mirror first (repeatable; env TVPACK_MIRROR).")
@click.option("--no-upstream", is_flag=True, help="Never fetch missing checkpoints from download.pytorch.org.")
@click.option("--endpoint-url", default=None, metavar="URL",
              help="S3 endpoint (default: AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, else AWS).")
@trust_options
@lock_timeout_option
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, only the summary.")
@click.option("--dry-run", is_flag=True, help="Show what would be published; write and fetch nothing.")
def mirror_cmd(selectors, dest, bundle_file, all_weights, with_backbones, jobs, registry, torch_home, mirrors,
               no_upstream, endpoint_url, keys, ca_roots, lock_timeout, as_json, quiet, dry_run):
    """Publish checkpoints to DEST in download.pytorch.org's layout, ready to serve as --mirror.

    \b
    DEST gets <path> for https://download.pytorch.org/<path> (models/..., models/quantized/...),
    <basename> for any other url, a <file>.sha256 beside each file and an index.json. Serve a
    directory with any web server (nginx, see the README) or use s3:// directly; then on the
    machines inside:  tvpack fetch --mirror http://mirror.internal/ --no-upstream resnet50

    \b
    Sources: the local cache (SELECTOR... or --all; missing checkpoints are fetched first), or
    --from-bundle FILE on the air-gapped side. Files already at DEST with the right size and
    sha256 are skipped, so re-running only sends what changed. A bundle's signatures are checked
    first, as install checks them: with --key / --ca-root, or under the configured trust policy
    (TVPACK_TRUSTED_KEYS, <hub>/tvpack/trusted/) an unsigned or untrusted bundle publishes nothing.

    \b
    Examples:
      tvpack mirror resnet50 'vit_*' --to /srv/torchvision-mirror
      tvpack mirror --all --to s3://ml-artifacts/torchvision --jobs 8
      tvpack mirror --from-bundle vision.tvpack --to s3://ml-artifacts/torchvision
    """
    from ..mirror import export_mirror

    if bundle_file is not None and (selectors or all_weights):
        raise click.UsageError("--from-bundle publishes the whole bundle: give no SELECTOR or --all")
    if bundle_file is None and not selectors and not all_weights:
        raise click.UsageError("give SELECTOR..., --all or --from-bundle FILE")
    config = build_config(mirrors=mirrors, no_upstream=no_upstream, jobs=jobs, lock_timeout=lock_timeout,
                          endpoint_url=endpoint_url, quiet=quiet or as_json)
    report = export_mirror(selectors, to=dest, all_weights=all_weights, registry=registry, from_bundle=bundle_file,
                           torch_home=torch_home, with_backbones=with_backbones, dry_run=dry_run, keys=keys,
                           ca_roots=ca_roots, config=config)
    if as_json:
        echo_json(report.to_dict())
        return
    if not quiet:
        click.echo(table(
            ["weights", "path", "size", "status"],
            [[", ".join(r.weights), r.path, human_bytes(r.size), r.status] for r in report.results],
            right=[2],
        ))
        click.echo()
    if dry_run:
        counts = {}
        for r in report.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in counts.items()) or "nothing"
        click.echo(f"dry run: {summary}; nothing written to {report.destination}")
        return
    written = [r for r in report.results if r.status == "exported"]
    click.echo(f"{len(written)} exported ({human_bytes(sum(r.size or 0 for r in written))}), "
               f"{report.count('skipped')} skipped -> {report.destination} (index: {report.index})")
