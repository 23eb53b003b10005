"""tvpack: torchvision checkpoints for machines that cannot reach the internet.

The public API is imported lazily so that ``import packager`` (and ``tvpack --help``) never pays
for importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "WeightsRef": "registry",
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


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(f".{_API[name]}", __name__)
        return getattr(module, name)
    if name == "errors":
        return importlib.import_module(".errors", __name__)
    raise AttributeError(f"module 'packager' has no attribute {name!r}")


def __dir__():
    return __all__
