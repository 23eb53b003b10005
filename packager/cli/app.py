"""The ``tvpack`` group: global options, and every error turned into one line and an exit code."""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from dataclasses import dataclass

import click

from .. import env
from ..errors import TvpackError
from ._common import JSON_WRITTEN, echo_json


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, timeout, systemd) raised in the main thread: it unwinds exactly as
    Ctrl-C does, so every cleanup that Ctrl-C runs (part files kept, temp files removed, workers
    stopped) runs for it too; exit 143 (128 + SIGTERM)."""


@dataclass(frozen=True)
class Settings:
    """The group's options, built once and carried in click's context object (``ctx.obj``) to whoever reads
    them; never written to ``os.environ``. ``debug``: tracebacks (``--debug`` or ``TVPACK_DEBUG=1``);
    ``live_registry``: discover torchvision's catalog live (``--live-registry`` or ``TVPACK_NO_SNAPSHOT=1``)."""

    debug: bool = False
    live_registry: bool = False


def settings(ctx: click.Context | None = None) -> Settings:
    """The settings of the running command (the environment's alone outside a ``tvpack`` invocation)."""
    ctx = ctx if ctx is not None else click.get_current_context(silent=True)
    found = ctx.find_object(Settings) if ctx is not None else None
    return found if found is not None else Settings(debug=env.debug(), live_registry=env.no_snapshot())


def live_registry() -> bool | None:
    """``live=`` for the library (:func:`packager.snapshot.get_catalog`): True with ``--live-registry``, else None
    (the library decides: a user module or torchvision already imported reads live)."""
    return True if settings().live_registry else None


def _raise_terminated(signum, frame):
    raise Terminated()


class TvpackGroup(click.Group):
    """Turns errors into one line on stderr and an exit code; tracebacks only with --debug.

    A :class:`TvpackError` shows its own message (exit 1, or 2 for usage); an ``OSError`` that no
    library layer translated shows the system's words and the path; anything else is a bug and
    says how to see the traceback. With ``--json`` the same error is also a JSON object on stdout
    (so stdout always parses), whatever the command. Ctrl-C exits 130, SIGTERM 143; a closed stdout
    (``tvpack cache verify | head -1``) ends quietly with 141, as SIGPIPE would.
    """

    def invoke(self, ctx):
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        as_json = "--json" in ctx.args  # the subcommand's own arguments, before it parses them
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as exc:  # click shows these itself (usage, exit 2)
            if as_json and not ctx.meta.get(JSON_WRITTEN):
                _echo_json_error(type(exc).__name__, exc.format_message(), exc.exit_code)
            raise
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            _echo_err("tvpack: terminated" if terminated else "tvpack: interrupted")
            ctx.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if _broken_pipe(exc):
                _silence_stdout()
                ctx.exit(128 + signal.SIGPIPE)
            if settings(ctx).debug:
                raise
            code = getattr(exc, "exit_code", 1) if isinstance(exc, TvpackError) else 1
            if as_json and not ctx.meta.get(JSON_WRITTEN):  # a report that says what failed is already out
                _echo_json_error(type(exc).__name__, _one_line(exc), code)
            click.echo(f"tvpack: error: {_one_line(exc)}", err=True)
            ctx.exit(code)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _echo_json_error(kind: str, message: str, exit_code: int) -> None:
    """With ``--json``, a failure is JSON on stdout too (the one line still goes to stderr), for every command
    alike: ``{"ok": false, "error": {"type": ..., "message": ..., "exit_code": ...}}``; unless the command already
    printed its document (``cache verify``'s report, with what failed in it): stdout holds one document."""
    echo_json({"ok": False, "error": {"type": kind, "message": message, "exit_code": exit_code}})


def _echo_err(line: str) -> None:
    try:
        click.echo(line, err=True)
    except OSError:
        pass


def _broken_pipe(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def _silence_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null so that the flush at exit does not
    raise a second BrokenPipeError (Python's documented recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (in-process runners)
        pass


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, TvpackError):
        return exc.format()
    if isinstance(exc, RecursionError):  # hostile input that a parser recursed into (deeply nested JSON)
        return "input is nested too deeply to be tvpack data (a hostile or corrupt file?)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"unexpected {type(exc).__name__}: {exc} (this is a bug; rerun with --debug for the traceback)"


def versions() -> dict:
    from ..formats.inventory import current_versions

    v = current_versions()
    return {"tvpack": v.tvpack, "torch": v.torch, "torchvision": v.torchvision, "python": v.python}


def version_line() -> str:
    """``tvpack 0.1.0, torch 2.14.1, torchvision 0.29.1, Python 3.13.5``: package metadata, no torch import."""
    v = versions()
    return ", ".join(f"{label} {v[key] or 'not installed'}" for key, label in
                     (("tvpack", "tvpack"), ("torch", "torch"), ("torchvision", "torchvision"), ("python", "Python")))


def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit()


@click.group(cls=TvpackGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, is_eager=True, expose_value=False, callback=_print_version,
              help="Show the versions of tvpack, torch, torchvision and Python (no torch import), and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (also TVPACK_DEBUG=1).")
@click.option("--live-registry", is_flag=True,
              help="Discover torchvision's weights live (imports torch) instead of reading the registry snapshot"
                   " (also TVPACK_NO_SNAPSHOT=1).")
@click.pass_context
def main(ctx: click.Context, debug: bool, live_registry: bool) -> None:
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
    TVPACK_TRUSTED_KEYS, TVPACK_SIGNING_KEY_PASSWORD, TVPACK_LOCK_TIMEOUT.
    """
    ctx.obj = Settings(debug=debug or env.debug(), live_registry=live_registry or env.no_snapshot())
