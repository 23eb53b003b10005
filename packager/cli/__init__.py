"""The ``tvpack`` command: click commands only; each calls the library and prints.

Subcommands live in small modules by concept (``registry``, ``cache``, ``bundle``, ``loader``,
``mirror``) and are attached here. Nothing here imports torch: ``tvpack --help`` stays fast.
"""
from __future__ import annotations

import os
import sys

import click

from .. import __version__, env
from ..errors import TvpackError


class TvpackGroup(click.Group):
    """Turns a :class:`TvpackError` into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TvpackError as exc:
            if env.debug():
                raise
            click.echo(f"tvpack: error: {exc.format()}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("tvpack: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=TvpackGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tvpack")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (also TVPACK_DEBUG=1).")
def main(debug: bool) -> None:
    """Fetch, verify, bundle and load torchvision pre-trained checkpoints offline.

    \b
    Selectors name weights:
      resnet50                          the model's DEFAULT weights
      resnet50:IMAGENET1K_V1            one member (also resnet50:DEFAULT)
      resnet50:all                      every weights of the model
      ResNet50_Weights.IMAGENET1K_V2    the get_weight() form
      'resnet*'  'quantized_*'          shell globs on model names (DEFAULT of each)

    Environment: TORCH_HOME / XDG_CACHE_HOME (where the cache lives, as torch.hub),
    TVPACK_REGISTRY, TVPACK_MIRROR, TVPACK_OFFLINE, TVPACK_DEBUG.
    """
    if debug:
        os.environ["TVPACK_DEBUG"] = "1"


def _attach() -> None:
    from . import registry as _registry_cmds  # noqa: F401

    for module in ("cache", "bundle", "loader", "mirror"):
        try:
            __import__(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != f"{__name__}.{module}":
                raise


_attach()


def run() -> None:  # pragma: no cover - console entry point
    main(prog_name="tvpack")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
