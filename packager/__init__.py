"""tvpack: torchvision checkpoints for machines that cannot reach the internet.

The public API is imported lazily so that ``import packager`` (and ``tvpack --help``) never pays
for importing torch.

Some public functions share their name with the submodule that defines them (``packager.bundle``
is the function ``bundle`` in ``packager/bundle.py``). When a submodule is first loaded, the import
system binds it on its parent (``setattr(packager, "bundle", <module>)``), which would replace the
function for everyone, whatever imported it. The package's module class below refuses that one
binding for public names: ``packager.bundle`` is always the function, in any import order. The
module stays in ``sys.modules``; code that wants it imports from it (``from .bundle import ...``),
since ``from packager import bundle`` names the function.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "WeightsRef": "registry",
    "Config": "config",
    "Catalog": "registry",
    "Registry": "discovery",
    "get_registry": "discovery",
    "get_catalog": "snapshot",
    "resolve": "snapshot",
    "hub_dir": "home",
    "checkpoints_dir": "home",
    "fetch": "cache",
    "ensure_cached": "cache",
    "scan_cache": "cache",
    "verify_cache": "cache",
    "prune_cache": "cache",
    "remove_from_cache": "cache",
    "write_lockfile": "cache",
    "read_lockfile": "formats.lockfile",
    "bundle": "bundle",
    "open_bundle": "bundle",
    "install": "bundle",
    "verify_bundle": "bundle",
    "install_bundle": "bundle",
    "inventory": "delta",
    "write_inventory": "delta",
    "read_site": "delta",
    "split_bundle": "delta",
    "load_model": "loader",
    "load_weights": "loader",
    "export_mirror": "mirror",
    "Signer": "signing",
    "sign_bundle": "signing",
    "trust_policy": "signing",
    "TrustPolicy": "signing",
    "verify_signed": "signing",
    "install_signed": "signing",
}

__all__ = sorted([*_API, "errors", "__version__"])


class _Package(types.ModuleType):
    """The package module: a submodule import never rebinds a public name (see the docstring)."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return  # the import system binding packager.<submodule>: the public function keeps the name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(f".{_API[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value  # once resolved, a plain attribute
        return value
    if name == "errors":
        return importlib.import_module(".errors", __name__)
    raise AttributeError(f"module 'packager' has no attribute {name!r}")


def __dir__():
    return __all__
