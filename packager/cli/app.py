"""The ``tvpack`` group: global options, and every error turned into one line and an exit code."""
from __future__ import annotations

import os

import click

from .. import __version__, env
from ..errors import TvpackError


class TvpackGroup(click.Group):
    """Turns errors into one line on stderr and an exit code; tracebacks only with --debug.

    A :class:`TvpackError` shows its own message (exit 1, or 2 for usage); an ``OSError`` that no
    library layer translated shows the system's words and the path; anything else is a bug and
    says how to see the traceback.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("tvpack: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if env.debug():
                raise
            click.echo(f"tvpack: error: {_one_line(exc)}", err=True)
            ctx.exit(getattr(exc, "exit_code", 1) if isinstance(exc, TvpackError) else 1)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, TvpackError):
        return exc.format()
    if isinstance(exc, RecursionError):  # hostile input that a parser recursed into (deeply nested JSON)
        return "input is nested too deeply to be tvpack data (a hostile or corrupt file?)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"unexpected {type(exc).__name__}: {exc} (this is a bug; rerun with --debug for the traceback)"


@click.group(cls=TvpackGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tvpack")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (also TVPACK_DEBUG=1).")
@click.option("--live-registry", is_flag=True,
              help="Discover torchvision's weights live (imports torch) instead of reading the registry snapshot"
                   " (also TVPACK_NO_SNAPSHOT=1).")
def main(debug: bool, live_registry: bool) -> None:
    """Fetch, verify, bundle and load torchvision pre-trained checkpoints offline.

    \b
    Selectors name weights:
      resnet50                          the model's DEFAULT weights
      resnet50:IMAGENET1K_V1            one member (also resnet50:DEFAULT)
      resnet50:all                      every weights of the model
      ResNet50_Weights.IMAGENET1K_V2    the get_weight() form
      'resnet*'  'quantized_*'          shell globs on model names (DEFAULT of each)

    Environment: TORCH_HOME / XDG_CACHE_HOME (where the cache lives, as torch.hub),
    TVPACK_REGISTRY, TVPACK_MIRROR, TVPACK_OFFLINE, TVPACK_DEBUG, TVPACK_NO_SNAPSHOT,
    TVPACK_TRUSTED_KEYS, TVPACK_SIGNING_KEY_PASSWORD.
    """
    if debug:
        os.environ["TVPACK_DEBUG"] = "1"
    if live_registry:
        os.environ["TVPACK_NO_SNAPSHOT"] = "1"
