"""``tvpack inventory`` and ``tvpack split``: what a site holds, and bundles cut for removable media."""
from __future__ import annotations

import shlex

import click

from ..fsutil import human_bytes, plural
from ._common import echo_json, json_option, output_file_callback, torch_home_option
from .app import main


def _output_or_stdout(ctx, param, value):
    return value if value == "-" else output_file_callback(ctx, param, value)


@main.command("inventory")
@torch_home_option
@click.option("--deep", is_flag=True, help="Hash every checkpoint again instead of trusting the verification index.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
              callback=_output_or_stdout, help="Where to write the inventory (SITE.json); '-' for standard output.")
@click.option("--allow-empty", is_flag=True,
              help="Describe a TORCH_HOME that does not exist yet as an empty site (else a missing one is an error).")
def inventory_cmd(torch_home, deep, output, allow_empty):
    """List what this site's TORCH_HOME holds, for a delta bundle made elsewhere.

    Every checkpoint with its size and sha256 (from the verification index when the file is
    unchanged since it was hashed; --deep hashes again), the installed bundle manifests, and
    the versions of tvpack, torch and torchvision here. Plain JSON, one checkpoint per line:
    review it, carry it to the connected side, and run `tvpack bundle ... --for SITE.json`.
    """
    from ..delta import inventory, write_inventory
    from ..formats.inventory import encode

    site = inventory(torch_home=torch_home, deep=deep, allow_empty=allow_empty)
    if output == "-":
        click.echo(encode(site).decode("ascii"), nl=False)
        return
    path = write_inventory(site, output)
    v = site.versions
    click.echo(f"wrote {path}: {plural(len(site.checkpoints), 'checkpoint')} ({human_bytes(site.total_size)}), "
               f"{plural(len(site.manifests), 'installed manifest')} in {site.torch_home}; "
               f"tvpack {v.tvpack}, torch "
               f"{v.torch or 'not installed'}, torchvision {v.torchvision or 'not installed'}")


@main.command("split")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--size", "size", required=True, metavar="SIZE",
              help="Largest part: 4G, 700M (binary), 25GB (decimal) or a number of bytes.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="NAME", callback=output_file_callback,
              help="Name the parts NAME.000, NAME.001, ... and NAME.sha256 (default: FILE's own name).")
@json_option
def split_cmd(file, size, output, as_json):
    """Split a bundle into parts for removable media, plus a sha256sum listing.

    `cd DIR && sha256sum -c NAME.sha256` checks a copy with coreutils alone, `cat NAME.0* >
    NAME` rebuilds the bundle, and `tvpack verify|inspect|install NAME.000` read the parts in
    place (a missing, short or corrupt part is named). The bundle itself is left as it is.
    """
    from ..delta import split_bundle
    from ..formats.volumes import listing_name, parse_size

    parts = split_bundle(file, parse_size(size), output)
    listing = parts[0].with_name(listing_name(parts[0].name[:-len(".000")]))
    if as_json:
        echo_json({"parts": [{"path": str(p), "size": p.stat().st_size} for p in parts], "listing": str(listing)})
        return
    for part in parts:
        click.echo(f"{part}  ({human_bytes(part.stat().st_size)})")
    click.echo(f"{plural(len(parts), 'part')} and {listing}; check a copy with: cd {shlex.quote(str(listing.parent))} && "
               f"sha256sum -c {shlex.quote(listing.name)}")
