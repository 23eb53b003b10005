"""``tvpack doctor``: what this machine's tvpack would use, one line per question, without importing torch.

Each check reads what the library itself reads (the same functions), so the answer cannot drift from
the behaviour. A check that finds a problem says so in its line; doctor itself never fails.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from .. import env
from ..fsutil import plural
from ._common import echo_json, json_option, torch_home_option
from .app import main, settings, version_line, versions

# what `make test` (Makefile: system-deps) and the container tests need from the system
TEST_TOOLS = ("nginx", "docker-registry", "htpasswd", "skopeo", "umoci", "podman")
# where podman, skopeo and buildah look for registries.conf, first found wins
REGISTRIES_CONF = ("~/.config/containers/registries.conf", "/etc/containers/registries.conf")
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SHARED_CREDENTIALS_FILE",
                 "AWS_CONFIG_FILE")


def _torch_home(torch_home) -> dict:
    from ..home import hub_dir

    hub = hub_dir(torch_home)
    if torch_home is not None:
        origin = "--torch-home"
    elif env.torch_home_env() is not None:
        origin = "TORCH_HOME"
    elif env.xdg_cache_home_env() is not None:
        origin = "$XDG_CACHE_HOME/torch"
    else:
        origin = "default ~/.cache/torch"
    checkpoints = hub / "checkpoints"
    count = sum(1 for p in checkpoints.iterdir() if p.is_file()) if checkpoints.is_dir() else 0
    state = plural(count, "checkpoint file") if hub.is_dir() else "not created yet"
    return {"path": str(hub.parent), "origin": origin, "hub": str(hub), "checkpoints": count,
            "line": f"{hub.parent} ({origin}; {state})"}


def _trust(torch_home) -> dict:
    from ..errors import TvpackError
    from ..home import hub_dir
    from ..signing import configured_policy, trusted_dir

    folder = trusted_dir(hub_dir(torch_home))
    try:
        policy = configured_policy(torch_home)
    except TvpackError as exc:
        return {"enforced": None, "error": exc.message, "line": f"unreadable: {exc.message}"}
    if not policy:
        return {"enforced": False, "folder": str(folder),
                "line": f"none: unsigned bundles are accepted (no TVPACK_TRUSTED_KEYS, "
                        f"nothing in {folder})"}
    keys, roots = len(policy.trust.keys), len(policy.trust.ca_roots)
    return {"enforced": True, "keys": keys, "ca_roots": roots, "origin": policy.origin, "folder": str(folder),
            "line": f"signatures required: {plural(keys, 'key')}, {plural(roots, 'CA root')} from {policy.origin}"}


def _mirrors() -> dict:
    mirrors, offline = env.mirrors(), env.offline()
    where = ", ".join(mirrors) + " (TVPACK_MIRROR), then upstream" if mirrors else "none (TVPACK_MIRROR unset): upstream only"
    return {"mirrors": mirrors, "offline": offline,
            "line": where + ("; TVPACK_OFFLINE=1: no network at all" if offline else "")}


def _registries_conf() -> dict:
    candidates = [os.environ["CONTAINERS_REGISTRIES_CONF"]] if os.environ.get("CONTAINERS_REGISTRIES_CONF") else []
    candidates += [os.path.expanduser(p) for p in REGISTRIES_CONF]
    found = next((p for p in candidates if Path(p).is_file()), None)
    return {"path": found, "searched": candidates,
            "line": f"found: {found}" if found else f"none found ({', '.join(candidates)})"}


def _credentials() -> dict:
    from ..transport.oci import auth_file_for_login, credential_files

    files = [str(p) for p in credential_files()]
    found = [p for p in files if Path(p).is_file()]
    shown = ", ".join(f"{p}{'' if p in found else ' (absent)'}" for p in files)
    return {"oci_files": files, "oci_found": found, "login_writes": str(auth_file_for_login()),
            "line": f"{shown}; first found wins; tvpack login writes {auth_file_for_login()}"}


def _s3() -> dict:
    set_vars = [name for name in AWS_VARIABLES if os.environ.get(name)]
    files = [p for p in ("~/.aws/credentials", "~/.aws/config") if Path(os.path.expanduser(p)).is_file()]
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    parts = [f"endpoint {endpoint}" if endpoint else "endpoint AWS (AWS_ENDPOINT_URL unset)",
             f"set: {', '.join(set_vars)}" if set_vars else "no AWS_* variables set",
             f"files: {', '.join(files)}" if files else "no ~/.aws files"]
    return {"endpoint": endpoint, "variables_set": set_vars, "files": files, "line": "boto3: " + "; ".join(parts)}


def _snapshot() -> dict:
    from ..snapshot import snapshot_path, source_key

    if settings().live_registry:
        return {"state": "off",
                "line": "off (--live-registry or TVPACK_NO_SNAPSHOT=1): every command discovers torchvision live"}
    key = source_key()
    if key is None:
        return {"state": "no-torchvision", "line": "torchvision is not installed"}
    path = snapshot_path(key)
    if path.is_file():
        return {"state": "current", "path": str(path), "line": f"current: {path}"}
    return {"state": "missing", "path": str(path),
            "line": f"not written for this torchvision yet: the next list/fetch imports torch once and writes {path}"}


def _test_tools() -> dict:
    found = {tool: shutil.which(tool) or (f"/usr/sbin/{tool}" if os.access(f"/usr/sbin/{tool}", os.X_OK) else None)
             for tool in TEST_TOOLS}  # /usr/sbin: nginx, off a normal user's PATH
    missing = [tool for tool, path in found.items() if not path]
    line = ("all found: " if not missing else f"missing {', '.join(missing)} (`make test` installs nginx, "
            "docker-registry, htpasswd, skopeo and umoci with apt-get as root; podman, for the container runtime "
            "tests, is yours to install); found: ")
    return {"tools": found, "missing": missing, "line": line + ", ".join(t for t, p in found.items() if p)}


@main.command("doctor")
@torch_home_option
@json_option
def doctor(torch_home, as_json):
    """Say what tvpack here would use: versions, TORCH_HOME, trust policy, mirrors, registries.conf,
    credentials, the registry snapshot, and what `make test` needs. One line each; never imports torch."""
    from ..home import tvpack_cache_dir

    checks = {
        "versions": {**versions(), "line": version_line()},
        "torch_home": _torch_home(torch_home),
        "tvpack_cache": {"path": str(tvpack_cache_dir()), "line": str(tvpack_cache_dir())},
        "trust_policy": _trust(torch_home),
        "mirrors": _mirrors(),
        "registries_conf": _registries_conf(),
        "credentials": _credentials(),
        "s3": _s3(),
        "snapshot": _snapshot(),
        "make_test": _test_tools(),
    }
    if as_json:
        echo_json(checks)
        return
    labels = {"versions": "versions", "torch_home": "TORCH_HOME", "tvpack_cache": "tvpack cache",
              "trust_policy": "trust policy", "mirrors": "mirrors", "registries_conf": "registries.conf",
              "credentials": "OCI credentials", "s3": "S3 credentials", "snapshot": "registry snapshot",
              "make_test": "make test needs"}
    width = max(map(len, labels.values()))
    for key, check in checks.items():
        click.echo(f"{labels[key]:<{width}}  {check['line']}")
