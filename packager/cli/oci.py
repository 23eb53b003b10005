"""``tvpack push``, ``pull``, ``login``; and the ``oci://`` side of ``bundle -o``, ``inspect`` and ``install``."""
from __future__ import annotations

import sys

import click

from ..fsutil import human_bytes, plural
from ._common import echo_json, json_option, output_file_callback, transfer_options
from ._config import reporter
from .app import main

quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
plain_http_option = click.option(
    "--plain-http", is_flag=True,
    help="Talk to an oci:// registry over plain HTTP (a registry without TLS, e.g. on loopback).")
mount_from_option = click.option(
    "--mount-from", "mount_from", multiple=True, metavar="REPO",
    help="Repository of the same registry to mount shared blobs from instead of uploading them (repeatable; "
         "repositories pushed to before are tried anyway).")
platform_option = click.option(
    "--platform", default="linux/amd64", show_default=True, metavar="OS/ARCH",
    help="The platform the image config names (container runtimes pull a single-platform image only onto "
         "matching nodes); the layers are data and the same for every platform.")

format_option = click.option(
    "--format", "image_format", type=click.Choice(["image", "modelpack"]), default="image", show_default=True,
    help="image: one uncompressed tar layer per checkpoint (what containerd and podman image volumes and COPY --from "
         "read); modelpack: a CNCF ModelPack artifact, one raw layer per checkpoint (CRI-O, KServe, modctl). "
         "pull, install and inspect read both.")

def registry_options(func):
    """--offline, the timeouts and the connections of the registry client (``transfer``), shared by push, pull and
    login."""
    return transfer_options(read_timeout=30.0, retries=4)(func)


def registry_client(reference_or_host: str, *, plain_http: bool, transfer=None, offline=None):
    """The client for a command's registry, with the command's transfer options (``transfer``; offline: None
    reads TVPACK_OFFLINE)."""
    from ..transport.oci import RegistryClient, parse_reference

    host = parse_reference(reference_or_host).host if is_oci(reference_or_host) else reference_or_host
    if transfer is not None:
        offline = transfer.offline if offline is None else offline
    policy = transfer.registry_policy() if transfer is not None else None
    return RegistryClient(host, plain_http=plain_http, policy=policy, offline=True if offline else None)


def is_oci(text) -> bool:
    return isinstance(text, str) and text.startswith("oci://")


def _print_push(report, as_json: bool) -> None:
    if as_json:
        echo_json(report.to_dict())
        return
    counts = {s: sum(b.status == s for b in report.blobs) for s in ("pushed", "mounted", "exists")}
    done = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if report.status == "unchanged":
        click.echo(f"unchanged: {report.reference} (the registry already holds this image)")
    elif report.status == "tagged":
        click.echo(f"tagged: {report.reference} (every blob was already there)")
    else:
        click.echo(f"pushed {report.reference}: {plural(len(report.blobs), 'blob')} ({done}), "
                   f"{human_bytes(report.uploaded)} uploaded of {human_bytes(report.size)}")


@main.command("push")
@click.argument("bundle_file", metavar="BUNDLE", type=click.Path(dir_okay=False))
@click.argument("reference", metavar="oci://HOST/REPO[:TAG]")
@plain_http_option
@mount_from_option
@platform_option
@format_option
@json_option
@quiet_option
@registry_options
def push_cmd(bundle_file, reference, plain_http, mount_from, platform, image_format, as_json, quiet, transfer):
    """Push a bundle to an OCI registry as an image: one uncompressed tar layer per checkpoint
    (hub/checkpoints/<file>) and one for the bundle manifest.

    \b
    Blobs the registry already has are not sent again (so a re-push of an unchanged bundle, or of
    one sharing checkpoints with an image pushed before, moves only what is new). The same bundle
    always gives the same image digest. Credentials: see `tvpack login`.

    \b
    Example:
      tvpack push vision.tvpack oci://registry.example.com/ml/vision:2026-11
    """
    from ..oci import push_bundle

    _check_reference(reference)
    client = registry_client(reference, plain_http=plain_http, transfer=transfer)
    report = push_bundle(bundle_file, reference, platform=platform, plain_http=plain_http, mount_from=mount_from,
                         reporter=reporter(quiet or as_json), client=client, format=image_format)
    _print_push(report, as_json)


@main.command("pull")
@click.argument("reference", metavar="oci://HOST/REPO[:TAG|@DIGEST]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              callback=output_file_callback, help="The bundle to write (replaced atomically).")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Layers fetched at once.")
@plain_http_option
@json_option
@quiet_option
@registry_options
def pull_cmd(reference, output, jobs, plain_http, as_json, quiet, transfer):
    """Pull an image pushed by tvpack back into a bundle file, byte for byte the bundle pushed.

    Every layer's digest, its tar and each checkpoint's sha256 are checked as they stream in;
    on any failure nothing is written.
    """
    from ..oci import pull

    _check_reference(reference)
    report = pull(reference, output, plain_http=plain_http, reporter=reporter(quiet or as_json),
                  client=registry_client(reference, plain_http=plain_http, transfer=transfer), jobs=jobs)
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(f"wrote {report.path}: {len(report.weights)} weights, {human_bytes(report.size)} "
               f"(manifest {report.manifest_id}) from {report.reference}")


@main.command("login")
@click.argument("host", metavar="HOST[:PORT]")
@click.option("-u", "--username", default=None, help="User name (asked for when not given).")
@click.option("--password-stdin", is_flag=True, help="Read the password (or token) from standard input.")
@plain_http_option
@registry_options
def login_cmd(host, username, password_stdin, plain_http, transfer):
    """Check credentials against a registry, then store them in the containers auth file
    (REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json), where podman, skopeo and
    tvpack look first. ~/.docker/config.json is read too but never written.

    \b
    Example:
      echo "$TOKEN" | tvpack login registry.example.com -u robot --password-stdin
    """
    from ..errors import UsageError
    from ..transport.oci import login

    if "/" in host or host.startswith("oci:"):
        raise UsageError(f"{host}: give the registry host (HOST[:PORT]), not a reference")
    if username is None:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for the user name: give -u USER")
        username = click.prompt("Username")
    if password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif not sys.stdin.isatty():
        raise UsageError("no terminal to ask for the password: pipe it in with --password-stdin")
    else:
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise UsageError("a user name and a password are required")
    checker = registry_client(host, plain_http=plain_http, transfer=transfer)
    path = login(host, username, password, plain_http=plain_http, policy=checker.policy, offline=checker.offline)
    click.echo(f"login succeeded: credentials for {host} stored in {path}")


def _check_reference(reference: str) -> None:
    from ..transport.oci import parse_reference

    parse_reference(reference)  # a malformed reference is a usage error before anything is read


# -- the oci:// side of commands in cli/bundle.py -------------------------------------------------------
def bundle_to_registry(reference: str, *, plain_http: bool, as_json: bool, config, sign=None,
                       image_format: str = "image", **select) -> None:
    """``tvpack bundle SELECTORS -o oci://REF``: the image straight from the cache, no bundle file; ``config``: the
    command's :class:`packager.config.Config`."""
    from ..bundle import plan_bundle
    from ..oci import image_of_plan, push_as

    _check_reference(reference)
    client = registry_client(reference, plain_http=plain_http, offline=config.offline)  # --offline: refuses
    plan = plan_bundle(config=config, **select)
    with image_of_plan(plan, sign=sign) as image:
        report = push_as(image, reference, format=image_format, plain_http=plain_http, reporter=config.reporter,
                         client=client)
    _print_push(report, as_json)


def open_registry_image(reference: str, *, plain_http: bool):
    """For ``tvpack inspect oci://REF``: the bundle an image holds, reading only its manifest layer."""
    from ..oci import open_image

    _check_reference(reference)
    return open_image(reference, plain_http=plain_http)


def install_from_registry(reference: str, trust, *, plain_http: bool, transfer=None, **options):
    """For ``tvpack install oci://REF``: the (signed) bundle install path over the image's layers (``transfer``:
    the command's transfer options)."""
    from ..oci import install

    _check_reference(reference)
    client = registry_client(reference, plain_http=plain_http, transfer=transfer) if transfer is not None else None
    return install(reference, trust=trust, plain_http=plain_http, client=client, **options)


def verify_registry_image(reference: str, trust, *, plain_http: bool, reporter):
    """For ``tvpack verify oci://REF``: the (signed) bundle verification over the image's layers."""
    from ..oci import verify

    _check_reference(reference)
    return verify(reference, trust=trust, plain_http=plain_http, reporter=reporter)
