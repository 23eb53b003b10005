"""``tvpack sign``, and the signing and trust options that bundle, verify, install and cache verify share."""
from __future__ import annotations

import sys

import click

from ..fsutil import human_bytes
from ._common import echo_json, json_option
from .app import main


def trust_options(func):
    """``--key PUB`` and ``--ca-root PEM``: trust exactly these for this command (else the configured policy)."""
    options = [
        click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False), metavar="PUB",
                     help="Trust this PEM public key (repeatable; replaces TVPACK_TRUSTED_KEYS and "
                          "<hub>/tvpack/trusted/ for this command)."),
        click.option("--ca-root", "ca_roots", multiple=True, type=click.Path(dir_okay=False), metavar="PEM",
                     help="Trust certificate signatures that chain to this CA root (repeatable)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def cert_chain_option(func):
    return click.option("--cert-chain", "cert_chain", multiple=True, type=click.Path(dir_okay=False), metavar="PEM",
                        help="The signing key's certificate, then its intermediates (PEM; repeatable, in order): "
                             "a certificate signature, verified with --ca-root.")(func)


def load_signer(key: str, cert_chain=()):
    """The signing key, its password from TVPACK_SIGNING_KEY_PASSWORD or, on a terminal, a prompt."""
    from .. import env
    from ..errors import SignatureError
    from ..signing import Signer, key_is_encrypted

    password = env.signing_key_password()
    if password is None:
        try:
            with open(key, "rb") as f:
                encrypted = key_is_encrypted(f.read())
        except OSError:
            encrypted = False  # Signer.load words the error
        if encrypted:
            if not sys.stdin.isatty():
                raise SignatureError(f"the signing key {key} is encrypted: set TVPACK_SIGNING_KEY_PASSWORD "
                                     "(there is no terminal to ask for it)")
            password = click.prompt(f"Password for {key}", hide_input=True, err=True)
    return Signer.load(key, cert_chain=cert_chain, password=password)


def signature_lines(report) -> list[str]:
    """One line per signature: who, which algorithm, and whether it was checked."""
    lines = []
    for check in report.checks:
        who = check.signer or "unknown signer"
        algorithm = f", {check.algorithm}" if check.algorithm else ""
        if check.verified is not None:
            state = "valid"
        elif check.problem:
            state = f"INVALID: {check.problem}"
        else:
            state = "not checked (tvpack verify --key PUB or --ca-root PEM)"
        lines.append(f"  {check.name}  {who}{algorithm}  {state}")
    return lines


@main.command("sign")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--key", "key", required=True, type=click.Path(dir_okay=False), metavar="KEY",
              help="EC private key (PEM, P-256 or P-384; encrypted: TVPACK_SIGNING_KEY_PASSWORD or a prompt).")
@cert_chain_option
@click.option("--label", default=None, metavar="LABEL",
              help="Name the signature <manifest-id>.LABEL.sig (default: <manifest-id>.sig, or the key's "
                   "fingerprint when that is taken).")
@click.option("--plain-http", is_flag=True, help="Talk to an oci:// registry over plain HTTP.")
@json_option
def sign_cmd(file, key, cert_chain, label, plain_http, as_json):
    """Sign a bundle: append an OpenSSF model signing (OMS) signature over its manifest and files.

    The checkpoint bytes are neither read nor rewritten: the signature lists the sha256 values the
    manifest states, and is appended as hub/tvpack/signatures/<manifest-id>.sig. Anyone can check
    it with `tvpack verify FILE --key PUB`, or after `tar -xf FILE -C DIR` with the OMS tool:
    `model_signing verify key DIR --signature DIR/hub/tvpack/signatures/<id>.sig --public_key PUB`.

    FILE may be oci://HOST/REPO[:TAG|@DIGEST], an image pushed by tvpack: the signature is attached
    to the image's manifest digest as an OCI 1.1 referrer (the digest does not change); install, pull,
    verify and inspect of the image find it.
    """
    if file.startswith("oci://"):
        from ..oci import attach_signature

        attached = attach_signature(file, load_signer(key, cert_chain), label=label, plain_http=plain_http)
        if as_json:
            echo_json(attached.to_dict())
        else:
            click.echo(f"signed {attached.reference}: {attached.signature} by {attached.signer}, attached as "
                       f"{attached.digest} ({attached.via})")
        return
    from ..signing import sign_bundle

    result = sign_bundle(file, load_signer(key, cert_chain), label=label)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(f"signed {file}: {result.signature} by {result.signer}"
               + (f" ({result.algorithm})" if result.algorithm else "")
               + (f", the file grew by {human_bytes(result.added)}" if result.added else
                  ", the file kept its size (the signature fits in the archive's end padding)"))
