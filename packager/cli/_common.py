"""Options and output helpers shared by the command modules."""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Sequence

import click


def _nonempty_dir(ctx, param, value):
    if value is not None and not str(value).strip():
        raise click.BadParameter("an empty path would mean the current directory; give a directory")
    return value


def output_file_callback(ctx, param, value):
    """``-o FILE``: a file path; '-' (stdout is for listings) and 'dir/' (a directory meant) are refused."""
    if value is None:
        return value
    text = str(value)
    if not text.strip():
        raise click.BadParameter("empty file name")
    if text == "-":
        raise click.BadParameter("'-' (standard output) is not supported; give a file name")
    if text.endswith(("/", os.sep)):
        raise click.BadParameter(f"{text!r} names a directory; give a file name (e.g. {text}NAME)")
    return value


torch_home_option = click.option(
    "--torch-home", "torch_home", type=click.Path(file_okay=False), default=None, callback=_nonempty_dir,
    help="Use this directory as TORCH_HOME (default: as torch.hub resolves it).",
)
endpoint_url_option = click.option(  # passed down as a value (the transfer Policy's s3_endpoint_url)
    "--endpoint-url", "endpoint_url", metavar="URL", default=None,
    help="S3 endpoint for s3:// mirrors in this command (default: AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, else AWS).",
)
registry_option = click.option(
    "--registry", "registry", multiple=True, metavar="MODULE",
    help="Import MODULE for extra WeightsEnums and builders (repeatable; env TVPACK_REGISTRY).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
with_backbones_option = click.option(
    "--with-backbones", is_flag=True,
    help="Also select each builder's default weights_backbone (needed to fine-tune offline).",
)
all_option = click.option("--all", "all_weights", is_flag=True, help="Select every weights of every model.")
lock_timeout_option = click.option(
    "--lock-timeout", "lock_timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
    help="Give up (one line naming the holder) after SECONDS waiting for another tvpack process that is "
         "fetching the same file (default: wait up to 15 minutes, then fetch anyway; env TVPACK_LOCK_TIMEOUT).",
)
selectors_argument = click.argument("selectors", nargs=-1, metavar="[SELECTOR...]")  # optional: --all, --lock, --from-bundle


JSON_WRITTEN = "tvpack.json_written"  # in click's context meta, shared by the group and its commands


def echo_json(data) -> None:
    """The command's one JSON document on stdout (remembered: a failure after it adds no second document)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[JSON_WRITTEN] = True


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Sequence[int] = ()) -> str:
    rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def progress_enabled(quiet: bool) -> bool:
    """Progress bars go to stderr, only when it is a terminal and not --quiet."""
    return not quiet and sys.stderr.isatty()
