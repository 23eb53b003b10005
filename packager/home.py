"""Where torch.hub keeps checkpoints, resolved exactly as ``torch.hub.get_dir()`` does.

torch.hub: ``$TORCH_HOME/hub`` if TORCH_HOME is set (even to an empty string), else
``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``; ``~`` is expanded on the whole
TORCH_HOME value. ``torch.hub.set_dir()`` overrides all of it in-process, so when torch is already
imported we honour that too. Importing this module never imports torch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from . import env

DEFAULT_CACHE_DIR = "~/.cache"


def torch_home() -> Path:
    """``$TORCH_HOME`` as torch resolves it (``torch.hub._get_torch_home``)."""
    value = env.torch_home_env()
    if value is None:
        xdg = env.xdg_cache_home_env()
        value = os.path.join(DEFAULT_CACHE_DIR if xdg is None else xdg, "torch")
    return Path(os.path.expanduser(value))


def hub_dir(torch_home_override: str | os.PathLike | None = None) -> Path:
    """The hub directory: ``<TORCH_HOME>/hub`` or ``torch.hub.set_dir``'s value.

    ``torch_home_override`` (the CLI's ``--torch-home``) plays the role of ``$TORCH_HOME``.
    """
    if torch_home_override is not None:
        return Path(os.path.expanduser(os.fspath(torch_home_override))) / "hub"
    hub = sys.modules.get("torch.hub")
    explicit = getattr(hub, "_hub_dir", None) if hub is not None else None
    if explicit is not None:
        return Path(explicit)
    return torch_home() / "hub"


def checkpoints_dir(torch_home_override: str | os.PathLike | None = None) -> Path:
    """Where ``load_state_dict_from_url`` stores and looks for ``basename(url)``."""
    return hub_dir(torch_home_override) / "checkpoints"


def tvpack_cache_dir() -> Path:
    """tvpack's own cache (the registry snapshot, the test zoo): ``$XDG_CACHE_HOME/tvpack``, else
    ``~/.cache/tvpack``. Never inside TORCH_HOME, which may be read-only or shared."""
    xdg = env.xdg_cache_home_env()
    return Path(os.path.expanduser(xdg if xdg else DEFAULT_CACHE_DIR)) / "tvpack"
