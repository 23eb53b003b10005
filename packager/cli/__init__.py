"""The ``tvpack`` command: click commands only; each parses, calls the library and prints.

The group and its error handling are in :mod:`.app`; commands live in small modules by concept
(``registry``, ``cache``, ``bundle``, ``loader``, ``mirror``, ``signing``, ``oci``), each registering on ``main`` when
imported here. Command modules import the library inside each command, so ``tvpack --help`` and
commands that only need data never import torch.
"""
from __future__ import annotations

import sys

from . import bundle, cache, channels, delta, doctor, loader, mirror, oci, registry, signing  # noqa: F401 - each registers its commands
from .app import main


def run() -> None:  # pragma: no cover - console entry point
    main(prog_name="tvpack")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
