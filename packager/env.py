"""Every environment variable tvpack reads, in one place.

Values are read at call time (not import time) so that tests and long-lived processes see changes.
"""
from __future__ import annotations

import os

from .errors import UsageError

TRUTHY = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUTHY


def _list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def debug() -> bool:
    """``TVPACK_DEBUG=1``: show tracebacks."""
    return _flag("TVPACK_DEBUG")


def offline() -> bool:
    """``TVPACK_OFFLINE=1``: never open a network connection."""
    return _flag("TVPACK_OFFLINE")


def registries() -> list[str]:
    """``TVPACK_REGISTRY``: comma-separated modules holding extra WeightsEnums and builders."""
    return _list("TVPACK_REGISTRY")


def mirrors() -> list[str]:
    """``TVPACK_MIRROR``: comma-separated mirror URLs, tried in order before upstream."""
    return _list("TVPACK_MIRROR")


def torch_home_env() -> str | None:
    return os.environ.get("TORCH_HOME")


def xdg_cache_home_env() -> str | None:
    return os.environ.get("XDG_CACHE_HOME")


def no_snapshot() -> bool:
    """``TVPACK_NO_SNAPSHOT=1``: discover torchvision's weights live instead of reading the snapshot."""
    return _flag("TVPACK_NO_SNAPSHOT")


def lock_timeout() -> float | None:
    """``TVPACK_LOCK_TIMEOUT=SECONDS``: how long to wait for another process's lock on a file
    before giving up with an error (unset: wait up to 15 minutes, then go ahead without it)."""
    value = os.environ.get("TVPACK_LOCK_TIMEOUT", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise UsageError(f"TVPACK_LOCK_TIMEOUT must be a number of seconds, got {value!r}")
    return seconds


def trusted_keys() -> list[str]:
    """``TVPACK_TRUSTED_KEYS``: comma-separated PEM files (public keys or CA roots); set, signatures are mandatory.
    Set but naming no file (``""``, ``" , "``) is an error, never "no policy": a policy emptied by a templating or
    quoting slip must not let unsigned bundles in without a word."""
    keys = _list("TVPACK_TRUSTED_KEYS")
    if not keys and "TVPACK_TRUSTED_KEYS" in os.environ:
        raise UsageError(f"TVPACK_TRUSTED_KEYS is set but names no key file ({os.environ['TVPACK_TRUSTED_KEYS']!r})",
                         hint="give comma-separated PEM files, or unset it for no trust policy")
    return keys


def signing_key_password() -> str | None:
    """``TVPACK_SIGNING_KEY_PASSWORD``: the password of an encrypted signing key (else tvpack prompts on a terminal)."""
    return os.environ.get("TVPACK_SIGNING_KEY_PASSWORD")


# -- OCI registry credentials: the files docker, podman, skopeo and oras read ----------------------------

def _path_var(name: str) -> str | None:
    return os.environ.get(name) or None  # set but empty means unset, as podman and docker treat it


def registry_auth_file() -> str | None:
    """``REGISTRY_AUTH_FILE``: the containers auth file podman, skopeo and buildah read and write."""
    return _path_var("REGISTRY_AUTH_FILE")


def xdg_runtime_dir() -> str | None:
    """``XDG_RUNTIME_DIR``: the containers auth file defaults to ``$XDG_RUNTIME_DIR/containers/auth.json``."""
    return _path_var("XDG_RUNTIME_DIR")


def docker_config_dir() -> str | None:
    """``DOCKER_CONFIG``: the directory holding docker's ``config.json`` (default ``~/.docker``)."""
    return _path_var("DOCKER_CONFIG")


def home_dir() -> str | None:
    """``HOME``: where ``~/.docker`` and ``~/.config/containers`` are (the password database otherwise)."""
    return _path_var("HOME")


# -- registry mirrors: the containers-registries.conf podman, CRI-O, skopeo and buildah share -------------

def containers_registries_conf() -> str | None:
    """``CONTAINERS_REGISTRIES_CONF``: the registries.conf to read instead of the user's or the system's."""
    return _path_var("CONTAINERS_REGISTRIES_CONF")


def xdg_config_home() -> str | None:
    """``XDG_CONFIG_HOME``: the user's registries.conf is ``$XDG_CONFIG_HOME/containers/registries.conf``
    (default ``~/.config``)."""
    return _path_var("XDG_CONFIG_HOME")
