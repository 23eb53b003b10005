"""``tvpack channels`` (what this site remembers of each release channel), ``tvpack sbom`` (a bundle's ML-BOM),
and the release options of ``bundle`` (``--channel --sequence --expires --revoke``)."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import click

from ._common import echo_json, json_option, table, torch_home_option
from .app import main
from .oci import is_oci, plain_http_option

_SHA256 = re.compile(r"[0-9a-f]{64}")
WARN_WITHIN = timedelta(days=7)


def release_option(channel, sequence, expires, revokes):
    """The :class:`~packager.formats.release.Release` that ``bundle``'s release options describe, or None."""
    from ..formats.release import Release, Revocation, check_channel, parse_expires

    if channel is None:
        if sequence is not None or expires is not None or revokes:
            raise click.UsageError("--sequence, --expires and --revoke describe a release: give --channel NAME too")
        return None
    if sequence is None:
        raise click.UsageError("--channel needs --sequence N (the release's number in the channel)")
    revocations = {}
    for item in revokes:
        sha, _, reason = item.partition("=")
        sha = sha.strip().lower()
        if not _SHA256.fullmatch(sha):
            raise click.UsageError(f"--revoke {item!r}: give the checkpoint's sha256 (64 hex digits)[=REASON]")
        if sha in revocations:
            raise click.UsageError(f"--revoke names {sha[:12]}... twice")
        revocations[sha] = Revocation(sha, reason.strip())
    when = parse_expires(expires, datetime.now(timezone.utc)) if expires is not None else None
    return Release(check_channel(channel), sequence, when, tuple(revocations[s] for s in sorted(revocations)))


def release_line(release) -> str:
    """One line saying what a release is: ``release 42 of prod, expires 2027-01-05, revokes 1 checkpoint (...)``."""
    from ..formats.release import format_day

    parts = [str(release)]
    parts.append(f"expires {format_day(release.expires)}" if release.expires else "never expires")
    if release.revokes:
        listed = ", ".join(f"{r.sha256[:12]}...{f' ({r.reason})' if r.reason else ''}" for r in release.revokes)
        parts.append(f"revokes {len(release.revokes)} checkpoint{'s' * (len(release.revokes) != 1)}: {listed}")
    return "release: " + ", ".join(parts)


@main.command("channels")
@torch_home_option
@json_option
def channels_cmd(torch_home, as_json):
    """Show the release channels this TORCH_HOME follows: for each, the release installed, its signer, when it was
    installed, when it expires and how many checkpoints it revoked here. Warns (on stderr) about a release that
    has expired or expires within 7 days."""
    from ..channels import records
    from ..formats.release import parse_time
    from ..home import hub_dir

    found = records(hub_dir(torch_home))
    now = datetime.now(timezone.utc)
    for record in found:
        if record.expires is None:
            continue
        expires = parse_time(record.expires, "expires")
        if expires <= now:
            click.echo(f"tvpack: warning: release {record.sequence} of {record.channel} expired on "
                       f"{record.expires}; a newer release is due", err=True)
        elif expires - now <= WARN_WITHIN:
            click.echo(f"tvpack: warning: release {record.sequence} of {record.channel} expires on "
                       f"{record.expires}, within {WARN_WITHIN.days} days", err=True)
    if as_json:
        echo_json([{"channel": r.channel, "sequence": r.sequence, "manifest": r.manifest, "signer": r.signer,
                    "installed": r.installed, "expires": r.expires, "revoked": len(r.revoked),
                    "overrides": [o.to_dict() for o in r.overrides]} for r in found])
        return
    if not found:
        click.echo("no release channels here (install a bundle made with --channel)")
        return
    rows = [[r.channel, r.sequence, r.manifest, r.signer, r.installed, r.expires or "never", len(r.revoked),
             len(r.overrides)] for r in found]
    click.echo(table(["channel", "sequence", "manifest", "signer", "installed", "expires", "revoked", "overrides"],
                     rows, right=[1, 6, 7]))


@main.command("sbom")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the BOM to FILE (atomically) instead of printing it.")
@plain_http_option
def sbom_cmd(source, output, plain_http):
    """Print the CycloneDX ML-BOM of a bundle, an OCI image (oci://HOST/REPO[:TAG]) or a TORCH_HOME.

    A bundle's BOM is its member hub/tvpack/sbom/<sha256[:16]>.cdx.json, listed in the manifest and so covered
    by its signatures (printed as it is). For a TORCH_HOME, a BOM of every weights its installed manifests
    describe is made now."""
    from pathlib import Path

    from ..fsutil import atomic_write_bytes

    if is_oci(source):
        from .oci import open_registry_image

        with open_registry_image(source, plain_http=plain_http) as opened:
            data = _bom_of_bundle(opened)
    elif Path(source).is_dir():
        data = _bom_of_torch_home(Path(source))
    else:
        from ..bundle import open_bundle

        with open_bundle(source) as opened:
            data = _bom_of_bundle(opened)
    if output is None:
        click.echo(data.decode("utf-8"), nl=False)
        return
    atomic_write_bytes(output, data)
    click.echo(f"wrote {output} ({len(data)} bytes)", err=True)


def _bom_of_bundle(opened) -> bytes:
    from ..formats.sbom import bom_of, build_bom

    path = bom_of(opened.files)
    if path is None:  # a bundle made before BOMs: one made from its manifest now
        return build_bom(opened.manifest["weights"], created_by=opened.created_by,
                         release=opened.manifest.get("release"))
    with opened.open_member(path) as f:
        return f.read()


def _bom_of_torch_home(home) -> bytes:
    from ..errors import BundleError
    from ..formats.manifest import created_by, decode_manifest, parse_manifest
    from ..formats.sbom import build_bom
    from ..home import hub_dir

    items = {}
    for path in sorted((hub_dir(home) / "tvpack" / "manifests").glob("*.json")):
        document = decode_manifest(path.read_bytes())
        parse_manifest(document, str(path))
        for item in document["weights"]:
            items.setdefault((item["name"], item["sha256"]), item)
    if not items:
        raise BundleError(f"{home} has no installed bundles (no manifests under hub/tvpack/manifests)")
    return build_bom(list(items.values()), created_by=created_by())
