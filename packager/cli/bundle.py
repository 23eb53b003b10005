"""``tvpack bundle``, ``inspect``, ``verify``, ``install``: portable archives of checkpoints."""
from __future__ import annotations

import os

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
    with_backbones_option,
)
from ._config import build_config, reporter
from .app import main
from .channels import release_line, release_option
from .oci import format_option, is_oci, plain_http_option, registry_options
from .signing import cert_chain_option, load_signer, signature_lines, trust_options

quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


@main.command("bundle")
@selectors_argument
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              callback=output_file_callback,
              help="The bundle to write (an uncompressed tar; replaced atomically), or oci://HOST/REPO[:TAG] to "
                   "push it to a registry as an image straight from the cache.")
@torch_home_option
@registry_option
@click.option("--mirror", "mirrors", multiple=True, metavar="URL",
              help="Fetch missing weights from this mirror first (repeatable; env TVPACK_MIRROR).")
@endpoint_url_option
@click.option("--no-upstream", is_flag=True, help="Never fall back to download.pytorch.org.")
@click.option("--no-fetch", is_flag=True, help="Use only what is cached; missing weights are an error.")
@click.option("--offline", is_flag=True, help="Never use the network (also TVPACK_OFFLINE=1).")
@with_backbones_option
@all_option
@click.option("--for", "site_file", type=click.Path(dir_okay=False), metavar="SITE",
              help="A delta bundle for a site: SITE is its inventory (tvpack inventory), an earlier bundle or a "
                   "lockfile; checkpoints it holds with the same name and sha256 are described, not carried.")
@click.option("--split", "split_size", metavar="SIZE",
              help="Write FILE.000, FILE.001, ... of at most SIZE each (4G, 700M binary; 25GB decimal) and "
                   "FILE.sha256 for `sha256sum -c`.")
@click.option("--sign-key", type=click.Path(dir_okay=False), default=None, metavar="KEY",
              help="Sign the bundle with this EC private key (PEM) as it is written.")
@cert_chain_option
@click.option("--channel", metavar="NAME", help="Make a release of this channel (needs --sequence); a site installs "
              "it only signed by a key it trusts for NAME, never an older or an expired one.")
@click.option("--sequence", type=click.IntRange(min=0), metavar="N", help="The release's number in its channel.")
@click.option("--expires", metavar="WHEN", help="When the release expires: 90d, 12h, 2w or an ISO-8601 date/time.")
@click.option("--revoke", "revokes", multiple=True, metavar="SHA256[=REASON]",
              help="The release revokes this checkpoint at every site that installs it (repeatable).")
@lock_timeout_option
@json_option
@quiet_option
@plain_http_option
@format_option
def bundle_cmd(selectors, output, torch_home, registry, mirrors, endpoint_url, no_upstream, no_fetch, offline,
               with_backbones, all_weights, site_file, split_size, sign_key, cert_chain, channel, sequence, expires, revokes,
               lock_timeout, as_json, quiet, plain_http, image_format):
    """Write the selected weights, their transform specs and meta into one archive.

    The archive is a TORCH_HOME overlay: `tar -xf FILE -C "$TORCH_HOME"` alone gives
    vanilla torchvision a working offline cache; `tvpack install FILE` does the same with
    verification. Byte-identical for the same selection and files (mtime from
    SOURCE_DATE_EPOCH, 0 if unset). With --for, `tvpack install` on the site first checks
    that it holds every checkpoint not carried. With --split, `cat FILE.0* > FILE` gives
    the same bytes as an unsplit bundle; every command reads the parts in place.
    """
    from ..bundle import bundle, open_bundle
    from ..formats.manifest import is_checkpoint_path
    from ..formats.volumes import parse_size

    if cert_chain and not sign_key:
        raise click.UsageError("--cert-chain goes with --sign-key")
    if is_oci(output) and (site_file is not None or split_size is not None):
        raise click.UsageError("--for and --split write files; an OCI image shares layers with what a registry "
                               "already holds instead")
    if image_format != "image" and not is_oci(output):
        raise click.UsageError("--format is the layout of an image written to -o oci://...")
    release = release_option(channel, sequence, expires, revokes)
    signer = load_signer(sign_key, cert_chain) if sign_key else None  # before writing: a wrong password fails fast
    part_size = parse_size(split_size) if split_size is not None else None
    # how missing weights are fetched, and where progress and notices go: one value
    config = build_config(mirrors=mirrors, no_upstream=no_upstream, offline=offline, lock_timeout=lock_timeout,
                          endpoint_url=endpoint_url, quiet=quiet or as_json)
    site = None
    if site_file is not None:
        from ..delta import read_site, version_notes

        site = read_site(site_file)
        for note in version_notes(site):
            config.reporter.notice(f"note: {note}")
    selection = {"all_weights": all_weights, "registry": registry, "torch_home": torch_home, "fetch": not no_fetch,
                 "with_backbones": with_backbones, "release": release, "config": config}
    if is_oci(output):
        from .oci import bundle_to_registry

        return bundle_to_registry(output, plain_http=plain_http, as_json=as_json, image_format=image_format,
                                  sign=signer.members if signer else None, selectors=selectors, **selection)
    path = bundle(selectors, output, sign=signer.members if signer else None, site=site, split=part_size,
                  **selection)
    with open_bundle(path) as opened:
        signed = f"; signed by {signer.signer}" if signer else ""
        at_site = len(opened.site_files)
        carried = sum(is_checkpoint_path(p) for p in opened.files) - at_site
        saved = sum(size for size, _sha in opened.site_files.values())
        if as_json:
            echo_json({"path": str(path), "manifest_id": opened.manifest_id, "size": opened.file_size,
                       "weights": [e.name for e in opened.entries],
                       "signatures": [m.path for m in opened.signatures], "parts": [str(p) for p in opened.parts],
                       "carried": carried, "at_site": sorted(p.rsplit("/", 1)[-1] for p in opened.site_files),
                       "bytes_not_carried": saved})
            return
        where = str(path)
        if part_size is not None:
            where = (f"{plural(len(opened.parts), 'part')} of at most {split_size} ({opened.parts[0].name} .. "
                     f"{opened.parts[-1].name}) and {path.name}")
        delta = f", {at_site} expected at the site ({human_bytes(saved)} not carried)" if site is not None else ""
        click.echo(f"wrote {where}: {len(opened.entries)} weights, {plural(carried, 'checkpoint file')} carried{delta}, "
                   f"{human_bytes(opened.file_size)} (manifest {opened.manifest_id}){signed}")
        if release is not None:
            click.echo(release_line(release) + ("" if signer else "; unsigned: sign it (tvpack sign) before "
                                                "shipping, sites refuse an unsigned release"))


@main.command("inspect")
@click.argument("file", type=click.Path())
@json_option
@plain_http_option
def inspect_cmd(file, as_json, plain_http):
    """Show what a bundle holds: weights, models, sizes, headline metrics, transforms.

    Checks the archive's structure and manifest (not the hashes: see `tvpack verify`), and lists
    the signatures it carries (signer, algorithm) without checking them. --json prints the manifest
    itself. FILE may be oci://HOST/REPO[:TAG] (reads only the image's manifest layer), or a TORCH_HOME
    (or hub directory): then each installed weights and its current manifest.
    """
    if not is_oci(file) and os.path.isdir(file):
        from .cache import inspect_installed

        return inspect_installed(file, as_json)
    from ..bundle import open_bundle
    from ..formats.manifest import is_checkpoint_path
    from ..formats.release import release_of
    from ..signing import bundle_signatures
    from .oci import open_registry_image

    with (open_registry_image(file, plain_http=plain_http) if is_oci(file) else open_bundle(file)) as opened:
        if as_json:
            echo_json(opened.manifest)
            return
        site = opened.site_files
        rows = [[e.name, ",".join(e.models), e.filename, human_bytes(e.size), "at site" if e.at_site else "carried",
                 e.headline_metric or "", e.transform_summary] for e in opened.entries]
        click.echo(table(["weights", "model(s)", "file", "size", "where", "metric", "transforms"], rows, right=[3]))
        made = opened.created_by
        checkpoints = sum(is_checkpoint_path(p) for p in opened.files)  # not the ML-BOM
        files = f"{plural(checkpoints, 'file')}, {human_bytes(opened.size)}"
        if site:
            saved = sum(size for size, _sha in site.values())
            files = (f"{plural(checkpoints - len(site), 'file')} carried ({human_bytes(opened.size)}) and {len(site)} "
                     f"expected at the site ({human_bytes(saved)} saved)")
        if len(opened.parts) > 1:
            files += f", in {plural(len(opened.parts), 'part')} {opened.parts[0].name} .. {opened.parts[-1].name}"
        click.echo(f"\n{len(opened.entries)} weights in {files}; manifest {opened.manifest_id}; made by tvpack "
                   f"{made.get('packager', '?')} with torch {made.get('torch', '?')}, torchvision "
                   f"{made.get('torchvision', '?')}")
        release = release_of(opened.manifest)
        if release is not None:
            click.echo(release_line(release))
        report = bundle_signatures(opened)
        click.echo(f"signatures: {len(report.checks)}" if report.checks else "signatures: none (unsigned)")
        for line in signature_lines(report):
            click.echo(line)


@main.command("verify")
@click.argument("file", type=click.Path(dir_okay=False))
@trust_options
@torch_home_option
@json_option
@quiet_option
@plain_http_option
def verify_cmd(file, keys, ca_roots, torch_home, as_json, quiet, plain_http):
    """Check a bundle: structure, manifest, every sha256, and that every checkpoint loads with
    torch.load(weights_only=True). Exit status 0 only if all hold.

    With --key / --ca-root (or a configured trust policy: TVPACK_TRUSTED_KEYS, <hub>/tvpack/trusted/)
    at least one signature must also be valid for them and cover exactly the bundle's files; the
    signer is named. Signatures are checked first, from the manifest's hashes: no second read.
    FILE may be oci://HOST/REPO[:TAG]: its layers are fetched into a temporary directory and checked alike."""
    from ..signing import trust_policy, verify_signed
    from .oci import verify_registry_image

    trust, said = trust_policy(keys, ca_roots, torch_home=torch_home), reporter(quiet or as_json)
    signed = verify_registry_image(file, trust, plain_http=plain_http, reporter=said) if is_oci(file) \
        else verify_signed(file, trust, reporter=said)
    report = signed.contents
    if as_json:
        echo_json(signed.to_dict())
        return
    site = (f"; {plural(report.at_site, 'file')} expected at the site {'is' if report.at_site == 1 else 'are'} "
            "checked by install there") if report.at_site else ""
    click.echo(f"ok: {file}: {report.weights} weights, {plural(report.members - 1, 'file')}, {human_bytes(report.bytes)}"
               f" verified (manifest {report.manifest_id}){site}; {_signed_summary(signed.signatures)}")


def _signed_summary(report) -> str:
    """Who signed, and every signature that is not valid (one of two can be bad while the other passes)."""
    if not report.checks:
        return "unsigned"
    if not report.checked:
        return f"{len(report.checks)} signature(s) not checked (give --key PUB or --ca-root PEM)"
    said = ["signed by " + ", ".join(report.signers)] if report.valid else []
    invalid = [c for c in report.checks if c.verified is None]
    if invalid:
        said.append(f"{len(invalid)} of {len(report.checks)} signatures not valid: "
                    + "; ".join(f"{c.name}: {c.problem}" for c in invalid))
    return "; ".join(said)


@main.command("install")
@click.argument("file", type=click.Path(dir_okay=False))
@torch_home_option
@click.option("--force", is_flag=True, help="Replace cached files whose contents differ from the bundle's.")
@click.option("--allow-rollback", is_flag=True, help="Install a release older than the channel's here (recorded).")
@click.option("--allow-expired", is_flag=True, help="Install a release past its expiry (recorded).")
@trust_options
@json_option
@quiet_option
@plain_http_option
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=4, show_default=True,
              help="oci://: layers fetched at once.")
@registry_options
def install_cmd(file, torch_home, force, allow_rollback, allow_expired, keys, ca_roots, as_json, quiet, plain_http,
                jobs, transfer):
    """Verify a bundle, then place its checkpoints into <TORCH_HOME>/hub/checkpoints.

    Each file is written atomically; a file already there with the same sha256 is kept; a
    different one is refused unless --force. The manifest is kept under hub/tvpack/manifests/,
    its signatures under hub/tvpack/signatures/. With --key / --ca-root, or when a trust policy
    is configured (TVPACK_TRUSTED_KEYS, <hub>/tvpack/trusted/), a valid signature is required and
    checked before anything is written. FILE may be oci://HOST/REPO[:TAG]: only the layers of
    checkpoints not already cached are fetched, then checked and placed exactly as from a file.
    A delta bundle (bundle --for) is refused, with nothing written, unless every checkpoint it
    expects at the site is there with its sha256. FILE may be the first part or the .sha256 of a
    split bundle. A channel release (bundle --channel) must be signed by a key trusted for its channel, newer
    than or the same as the channel's release here, and not expired (see `tvpack channels`).
    """
    from ..channels import ReleaseOptions
    from ..signing import install_signed, trust_policy
    from .oci import install_from_registry

    trust = trust_policy(keys, ca_roots, torch_home=torch_home)
    options = {"torch_home": torch_home, "force": force, "reporter": reporter(quiet or as_json),
               "release": ReleaseOptions(allow_rollback=allow_rollback, allow_expired=allow_expired)}
    signed = install_from_registry(file, trust, plain_http=plain_http, jobs=jobs, transfer=transfer, **options) \
        if is_oci(file) \
        else install_signed(file, trust, **options)
    report = signed.installed
    if as_json:
        echo_json({**signed.to_dict(), "bundle": file} if is_oci(file) else signed.to_dict())
        return
    if signed.signatures.valid:
        click.echo("signature valid: signed by " + ", ".join(signed.signatures.signers))
    for placed in report.files:
        click.echo(f"{placed.status:9}  {placed.path}  ({human_bytes(placed.size)})")
    labels = {"installed": "installed", "replaced": "replaced", "repaired": "repaired", "unchanged": "unchanged",
              "present": "already at the site as expected"}
    counts = {label: sum(p.status == s for p in report.files) for s, label in labels.items()}
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; manifest {report.manifest}")
