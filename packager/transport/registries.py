"""Where an image is pulled from: containers-registries.conf v2, as podman, CRI-O, skopeo and buildah read it.

A site configures its mirrors (a Harbor proxy-cache project, a distribution pull-through cache,
Dragonfly's dfdaemon, Spegel) once, for every container tool on the machine, in ``registries.conf``::

    [[registry]]
    prefix = "registry.example.com/models"      # which references this entry is about (longest wins)
    location = "registry.example.com/models"    # where they really are (default: the prefix)
    insecure = false                            # plain HTTP or an unverified certificate allowed
    blocked = false                             # refuse every pull and push of these references

    [[registry.mirror]]                         # tried in order, before the location
    location = "mirror.site.local:5000/models"
    insecure = true
    pull-from-mirror = "all"                    # or "digest-only", "tag-only"

Pure resolution: :func:`pull_endpoints` turns a reference into the ordered places to try (mirrors, then
the location), :func:`push_endpoint` into the one place to push (never a mirror); a blocked registry is
a one-line :class:`~packager.errors.OCIError`. :func:`load` finds and merges the files the way
containers/image does: ``$CONTAINERS_REGISTRIES_CONF``, else the user's
``$XDG_CONFIG_HOME/containers/registries.conf`` (default ``~/.config/...``), else
``/etc/containers/registries.conf``; then the ``registries.conf.d`` drop-in directories (``*.conf``, in
name order; a later ``[[registry]]`` with the same prefix replaces an earlier one). A user's own
registries.conf turns off the system's drop-ins, as in containers/image. v1 files
(``[registries.insecure]``, ``[registries.block]``) are read too.

Nothing here opens a connection or trusts a mirror: what a mirror serves is checked against its
digest by the caller, exactly as what the location serves.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import env
from ..errors import OCIError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Endpoint", "Mirror", "Registry", "RegistriesConf", "config_files", "load", "parse", "pull_endpoints",
           "push_endpoint"]

SYSTEM_CONF = Path("/etc/containers/registries.conf")
SYSTEM_DROP_INS = Path("/etc/containers/registries.conf.d")
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")

_WILDCARD = re.compile(r"\*\.[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"


@dataclass(frozen=True)
class Registry:
    """One ``[[registry]]`` table, normalised: ``location`` is empty only under a wildcard prefix
    (the reference's own host is then the location)."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()
    mirror_by_digest_only: bool = False
    source: str = ""  # the file it came from, for messages


@dataclass(frozen=True)
class RegistriesConf:
    registries: tuple[Registry, ...] = ()
    files: tuple[Path, ...] = ()  # the files read, in order


@dataclass(frozen=True)
class Endpoint:
    """One place to ask for an image: ``host`` and ``repository`` (rewritten for a mirror or a location),
    the tag or digest to ask for, whether plain HTTP / an unverified certificate is allowed there, and
    whether it is a mirror (untrusted, skippable) or the location itself."""

    host: str
    repository: str
    tag: str | None
    digest: str | None
    insecure: bool
    mirror: bool

    @property
    def name(self) -> str:
        """``host/repository`` as registries.conf and podman write it."""
        return f"{self.host}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag and not self.digest else "") + (f"@{self.digest}" if self.digest else "")


# -- finding and reading the files --------------------------------------------------------------------

def _user_conf() -> Path:
    config_home = env.xdg_config_home() or str(Path(env.home_dir() or Path.home()) / ".config")
    return Path(config_home) / "containers" / "registries.conf"


def config_files() -> list[Path]:
    """The files :func:`load` reads, in order (those that do not exist are left out)."""
    explicit = env.containers_registries_conf()
    user = _user_conf()
    if explicit:
        main, dirs = Path(explicit), [SYSTEM_DROP_INS, user.with_name("registries.conf.d")]
    elif user.is_file():  # the user's file replaces the system's, and the system's drop-ins with it
        main, dirs = user, [user.with_name("registries.conf.d")]
    else:
        main, dirs = SYSTEM_CONF, [SYSTEM_DROP_INS, user.with_name("registries.conf.d")]
    files = [main] if main.is_file() else []
    for folder in dirs:
        try:
            files += sorted(p for p in folder.iterdir() if p.name.endswith(".conf") and p.is_file())
        except OSError:  # no such directory, or not one
            continue
    return files


def load(files: list[Path] | None = None) -> RegistriesConf:
    """Read and merge ``files`` (default :func:`config_files`): a later file's ``[[registry]]`` replaces
    an earlier one with the same prefix. A file that cannot be read or parsed is a one-line OCIError."""
    files = config_files() if files is None else [Path(f) for f in files]
    merged: dict[str, Registry] = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OCIError(f"{path}: cannot read this registries.conf: {getattr(exc, 'strerror', None) or exc}") from None
        for registry in parse(text, str(path)):
            merged[registry.prefix] = registry
    return RegistriesConf(tuple(merged[prefix] for prefix in sorted(merged)), tuple(files))


# -- parsing -------------------------------------------------------------------------------------------

def _bad(source: str, what: str) -> OCIError:
    return OCIError(f"{source}: {what}")


def _location(value, source: str, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(source, f"{what} must be a string")
    location = value.rstrip("/")
    if location.startswith(("http://", "https://")):
        raise _bad(source, f"{what} {value!r}: no URI scheme here (write host[:port][/namespace])")
    if any(c.isspace() for c in location):
        raise _bad(source, f"{what} {value!r} is not a registry location")
    return location


def _flag(table: dict, key: str, source: str, what: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise _bad(source, f"{what}: {key} must be true or false")
    return value


def _mirror(table, source: str, what: str) -> Mirror:
    if not isinstance(table, dict):
        raise _bad(source, f"{what}: [[registry.mirror]] must be a table")
    location = _location(table.get("location", ""), source, f"{what} mirror location")
    if not location:
        raise _bad(source, f"{what}: a mirror has no location")
    pull_from = table.get("pull-from-mirror", "") or "all"
    if pull_from not in PULL_FROM_MIRROR:
        raise _bad(source, f"{what}: mirror {location}: pull-from-mirror {pull_from!r} is not one of "
                           f"{', '.join(PULL_FROM_MIRROR)}")
    return Mirror(location, _flag(table, "insecure", source, f"mirror {location}"), pull_from)


def _registry(table, source: str) -> Registry:
    if not isinstance(table, dict):
        raise _bad(source, "[[registry]] must be a table")
    prefix = _location(table.get("prefix", ""), source, "prefix")
    location = _location(table.get("location", ""), source, "location")
    if not prefix and not location:
        raise _bad(source, "a [[registry]] has neither prefix nor location")
    prefix = prefix or location
    if prefix.startswith("*"):
        if not _WILDCARD.fullmatch(prefix):
            raise _bad(source, f"prefix {prefix!r}: a wildcard prefix is *.domain (no port, path or other *)")
        if location:
            raise _bad(source, f"prefix {prefix!r}: a wildcard prefix takes no location")
    elif "*" in prefix:
        raise _bad(source, f"prefix {prefix!r}: '*' only as the leading label (*.example.com)")
    location = location or ("" if prefix.startswith("*") else prefix)
    what = f"registry {prefix}"
    mirrors = table.get("mirror", [])
    if not isinstance(mirrors, list):
        raise _bad(source, f"{what}: mirror must be an array of tables ([[registry.mirror]])")
    by_digest = _flag(table, "mirror-by-digest-only", source, what)
    parsed = tuple(_mirror(m, source, what) for m in mirrors)
    if by_digest and any("pull-from-mirror" in m for m in mirrors if isinstance(m, dict)):
        raise _bad(source, f"{what}: mirror-by-digest-only and a mirror's pull-from-mirror cannot both be set")
    return Registry(prefix, location, _flag(table, "insecure", source, what), _flag(table, "blocked", source, what),
                    parsed, by_digest, source)


def _v1(tables: dict, source: str) -> list[Registry]:
    """v1's ``[registries.insecure]`` / ``[registries.block]`` lists, as containers/image converts them."""
    flags: dict[str, dict[str, bool]] = {}
    for kind, key in (("insecure", "insecure"), ("block", "blocked")):
        section = tables.get(kind, {})
        names = section.get("registries", []) if isinstance(section, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _bad(source, f"[registries.{kind}] registries must be a list of strings")
        for name in names:
            flags.setdefault(_location(name, source, f"registries.{kind} entry"), {})[key] = True
    return [Registry(name, name, f.get("insecure", False), f.get("blocked", False), source=source)
            for name, f in flags.items()]


def parse(text: str, source: str = "registries.conf") -> list[Registry]:
    """The ``[[registry]]`` tables of one file (v2, or v1's insecure and block lists). Other settings
    (short names, search registries, aliases, credential helpers) do not concern fully qualified
    references and are left to the tools that use them."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _bad(source, f"not valid TOML ({exc})") from None
    v1 = document.get("registries")
    if v1 is not None and "registry" in document:
        raise _bad(source, "mixes v1 [registries.*] tables with v2 [[registry]] tables")
    if v1 is not None:
        if not isinstance(v1, dict):
            raise _bad(source, "registries must be a table of [registries.search/insecure/block]")
        return _v1(v1, source)
    tables = document.get("registry", [])
    if not isinstance(tables, list):
        raise _bad(source, "registry must be an array of tables ([[registry]])")
    registries = [_registry(t, source) for t in tables]
    seen: dict[str, Registry] = {}
    for registry in registries:
        if registry.prefix in seen:
            raise _bad(source, f"prefix {registry.prefix} is defined twice")
        seen[registry.prefix] = registry
        for other in registries:
            if registry.location and registry.location == other.location and \
                    (registry.insecure, registry.blocked) != (other.insecure, other.blocked):
                raise _bad(source, f"registry {registry.location} is defined twice with different insecure or blocked "
                                   "settings")
    return registries


# -- resolution ----------------------------------------------------------------------------------------

def _match(name: str, prefix: str) -> int:
    """Where in ``name`` (``host/repo[:tag][@digest]``) a match of ``prefix`` ends, or -1.

    A prefix matches at a boundary: ``example.com/foo`` matches ``example.com/foo``, ``example.com/foo/bar``,
    ``example.com/foo:tag`` and ``example.com/foo@sha256:...`` but not ``example.com/foobar``. A host-only
    prefix does not match the same host on another port (containers/image does, and calls it unintended).
    ``*.example.com`` matches any subdomain of example.com (not example.com itself), with any port and path.
    """
    if prefix.startswith("*."):
        host = name.split("/", 1)[0].split(":", 1)[0]
        return len(name.split("/", 1)[0]) if host.endswith(prefix[1:]) else -1
    if not name.startswith(prefix):
        return -1
    if len(name) == len(prefix):
        return len(prefix)
    follows = name[len(prefix)]
    if follows in "/@" or (follows == ":" and "/" in prefix):
        return len(prefix)
    return -1


def _split(name: str) -> tuple[str, str, str | None, str | None]:
    """``host/repo[:tag][@digest]`` -> (host, repository, tag, digest)."""
    name, _, digest = name.partition("@")
    host, _, path = name.partition("/")
    repository, tag = path, None
    if ":" in path.rsplit("/", 1)[-1]:
        repository, _, tag = path.rpartition(":")
    return host, repository, tag, digest or None


def _name(host: str, repository: str, tag: str | None, digest: str | None) -> str:
    return f"{host}/{repository}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _find(conf: RegistriesConf, name: str) -> Registry | None:
    """The ``[[registry]]`` whose prefix is the longest that matches ``name``."""
    best = None
    for registry in conf.registries:
        if _match(name, registry.prefix) >= 0 and (best is None or len(registry.prefix) > len(best.prefix)):
            best = registry
    return best


def _rewrite(name: str, prefix: str, location: str, insecure: bool, mirror: bool) -> Endpoint:
    end = _match(name, prefix)
    host, repository, tag, digest = _split(location + name[end:] if location else name)
    if not host or not repository:
        raise OCIError(f"registries.conf rewrites {name} to {location + name[end:]!r}, which names no repository")
    return Endpoint(host, repository, tag, digest, insecure, mirror)


def _blocked(registry: Registry, name: str) -> OCIError:
    return OCIError(f"{name}: registry {registry.location or registry.prefix} is blocked in {registry.source}")


def pull_endpoints(host: str, repository: str, tag: str | None = None, digest: str | None = None,
                   conf: RegistriesConf | None = None) -> list[Endpoint]:
    """Where to pull ``host/repository[:tag][@digest]`` from, in order: the mirrors that apply to it
    (``pull-from-mirror``: ``digest-only`` mirrors only for a reference by digest, ``tag-only`` only for
    one by tag), then the location. Nothing configured: the reference itself. ``conf``: default :func:`load`."""
    conf = load() if conf is None else conf
    name = _name(host, repository, tag, digest)
    registry = _find(conf, name)
    if registry is None:
        return [Endpoint(host, repository, tag, digest, False, False)]
    if registry.blocked:
        raise _blocked(registry, name)
    endpoints = []
    for mirror in registry.mirrors:
        wanted = "digest-only" if registry.mirror_by_digest_only else mirror.pull_from_mirror
        if (wanted == "digest-only" and not digest) or (wanted == "tag-only" and digest):
            continue
        endpoints.append(_rewrite(name, registry.prefix, mirror.location, mirror.insecure, True))
    endpoints.append(_rewrite(name, registry.prefix, registry.location, registry.insecure, False))
    return endpoints


def push_endpoint(host: str, repository: str, tag: str | None = None, digest: str | None = None,
                  conf: RegistriesConf | None = None) -> Endpoint:
    """Where to push ``host/repository[:tag]``: the location (a mirror is only ever read from)."""
    conf = load() if conf is None else conf
    name = _name(host, repository, tag, digest)
    registry = _find(conf, name)
    if registry is None:
        return Endpoint(host, repository, tag, digest, False, False)
    if registry.blocked:
        raise _blocked(registry, name)
    return _rewrite(name, registry.prefix, registry.location, registry.insecure, False)


def describe(conf: RegistriesConf) -> str:
    """Which files were read (for --debug and error hints)."""
    return ", ".join(map(os.fspath, conf.files)) or "no registries.conf"
