"""Options and output helpers shared by the command modules."""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from dataclasses import dataclass, fields
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
class ByteSize(click.ParamType):
    """A size in bytes: ``1048576``, ``64M``, ``16MiB``, ``1G`` (K, M, G: powers of 1024)."""

    name = "size"
    _UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", str(value))
        if match is None:
            self.fail(f"{value!r} is not a size (e.g. 1048576, 8M, 64MiB)", param, ctx)
        size = int(match[1]) * self._UNITS[match[2].lower()]
        if size < 1:
            self.fail("a size must be at least 1 byte", param, ctx)
        return size


@dataclass(frozen=True)
class Transfer:
    """The transfer options of a command (:func:`transfer_options`): how hard to try, how many connections."""

    offline: bool | None
    connect_timeout: float
    read_timeout: float
    retries: int
    speed_limit: float
    speed_time: float
    max_time: float | None
    connections: int
    segment_size: int
    segment_threshold: int

    def policy(self, endpoint_url: str | None = None):
        """The transfer engine's :class:`~packager.transport.Policy` (``endpoint_url``: for s3:// mirrors)."""
        from ..transport import Policy

        return Policy(**self._common(), s3_endpoint_url=endpoint_url)

    def registry_policy(self):
        """The registry client's :class:`~packager.transport.oci.Policy`."""
        from ..transport.oci import Policy

        return Policy(**self._common())

    def _common(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "offline"}


def transfer_options(*, read_timeout: float = 60.0, retries: int = 5):
    """The options of every command that transfers (``--offline``, timeouts, retries, speed limits,
    ``--connections`` and the segment sizes), handed to the command as one value: ``transfer`` (a
    :class:`Transfer`). ``read_timeout`` and ``retries``: this command's defaults."""
    options = [
        click.option("--offline", is_flag=True, default=None,
                     help="No network: refuse to connect (env TVPACK_OFFLINE=1)."),
        click.option("--connect-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
                     metavar="SECONDS", help="Seconds to wait for a connection."),
        click.option("--read-timeout", type=click.FloatRange(min=0.1), default=read_timeout, show_default=True,
                     metavar="SECONDS", help="Seconds without an answer or a byte before a request is retried."),
        click.option("--retries", type=click.IntRange(0, 100), default=retries, show_default=True,
                     help="Further attempts (per file, per range) on connection errors, timeouts, 429 and 5xx."),
        click.option("--speed-limit", type=click.FloatRange(min=0), default=1024, show_default=True,
                     metavar="BYTES", help="An attempt receiving fewer than BYTES per second for --speed-time "
                                           "seconds (or no answer for that long) is aborted and retried (0: never)."),
        click.option("--speed-time", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
                     metavar="SECONDS", help="The window --speed-limit is measured over."),
        click.option("--max-time", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
                     help="Give up on a file after SECONDS from one source, retries included (default: no limit)."),
        click.option("--connections", type=click.IntRange(1, 64), default=8, show_default=True, metavar="N",
                     help="Connections per large file: it comes in ranges over up to N connections at once "
                          "(a run opens at most N - 1 beyond one per file; 1: one stream)."),
        click.option("--segment-size", type=ByteSize(), default="16M", show_default=True, metavar="SIZE",
                     help="The size of each range of a large file (e.g. 8M)."),
        click.option("--segment-threshold", type=ByteSize(), default="64M", show_default=True, metavar="SIZE",
                     help="Files of at least SIZE come in ranges; smaller ones in one stream."),
    ]
    names = [f.name for f in fields(Transfer)]

    def decorate(func):
        @functools.wraps(func)
        def command(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in names}
            return func(*args, transfer=Transfer(**values), **kwargs)

        for option in reversed(options):
            command = option(command)
        return command
    return decorate


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
