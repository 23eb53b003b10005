"""What crosses the air gap, and no more: a site's inventory, delta bundles planned from it, split volumes.

On the air-gapped site, :func:`inventory` lists what its TORCH_HOME holds (every checkpoint with its
size and sha256, the installed bundle manifests, the versions of tvpack, torch and torchvision);
:func:`write_inventory` writes it as ``SITE.json`` (:mod:`packager.formats.inventory`). On the
connected side, :func:`read_site` reads that file, or an earlier bundle, or a lockfile (what was
shipped last time), and ``bundle(..., site=...)`` (:func:`packager.bundle.bundle`) then leaves out
the checkpoints the site already holds with the same name and sha256::

    site = inventory(torch_home="/srv/torch")                  # on the site
    write_inventory(site, "SITE.json")
    bundle(["resnet50", "vit_b_16"], "update.tar", site=read_site("SITE.json"))   # connected side
    install_bundle("update.tar", torch_home="/srv/torch")      # on the site: checks what it expects first

:func:`split_bundle` cuts an existing bundle into parts for removable media
(:mod:`packager.formats.volumes`); ``bundle(..., split=SIZE)`` writes parts directly.
"""
from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import cache
from .bundle import open_bundle
from .errors import BundleError, LockfileError
from .formats import inventory as inv
from .formats.lockfile import read_lockfile
from .formats.manifest import MAX_MANIFEST, decode_manifest, parse_manifest
from .formats.volumes import Volumes, listing_name, open_source, split_file
from .fsutil import atomic_write_bytes
from .home import hub_dir

HASH_JOBS = min(2, os.cpu_count() or 1)  # files hashed at once by --deep (hashlib releases the GIL)
_JSON_PEEK = 64


# -- the site's side ---------------------------------------------------------------------------------
def _is_checkpoint_name(name: str) -> bool:
    """A file torch.hub would load: not a hidden temp file, not a partial download of tvpack or torch.hub."""
    return not (name.startswith(".") or name.endswith((cache.PART_SUFFIX, cache.PART_SUFFIX + ".json"))
                or cache.TORCH_HUB_PARTIAL.search(name))


def _checkpoint_files(directory: Path) -> list[tuple[str, Path, int]]:
    """(name, path, size) of each regular checkpoint file in ``directory``, by name."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BundleError(f"cannot read {directory}: {exc.strerror or exc}") from None
    found = []
    for entry in entries:
        if not _is_checkpoint_name(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=True)
        except OSError:
            continue  # removed meanwhile, or a dangling link: nothing torch could load either
        if stat.S_ISREG(info.st_mode):
            found.append((entry.name, Path(entry.path), info.st_size))
    return found


def _digest(path: Path, deep: bool) -> str:
    """sha256 of a cached file: from the verification index when unchanged (unless ``deep``), else
    hashed now; either way the index then vouches for it."""
    if not deep:
        return cache.file_sha256(path)
    digest = cache.hash_file(path)
    cache.record_verified(path, digest)
    return digest


def _installed_manifests(hub: Path) -> list[inv.InstalledManifest]:
    """The installed bundle manifests that are intact (content matching the id in their name): an edited or
    damaged one the loader skips too, so the site does not have it."""
    info = cache.scan_hub(cache.HubLayout(hub), checkpoints=False)
    return [inv.InstalledManifest(m.manifest_id, tuple(e.name for e in m.entries)) for m in info.manifests if m.ok]


def inventory(*, torch_home=None, deep: bool = False, created: str | None = None,
              allow_empty: bool = False) -> inv.Inventory:
    """What the TORCH_HOME here holds: each checkpoint's size and sha256 (the verification index's
    when the file is unchanged since it was hashed, else hashed now; ``deep`` hashes every file
    again), the installed manifests, and the versions of tvpack, torch and torchvision (read from
    package metadata: torch is not imported).

    A TORCH_HOME without a hub directory is refused unless ``allow_empty``: a mistyped path would
    otherwise describe an empty site, and the bundle made for it would carry everything."""
    hub = hub_dir(torch_home)
    if not allow_empty and not hub.is_dir():
        what = "does not exist" if not hub.parent.exists() else f"holds no torch.hub cache ({hub} is not a directory)"
        raise BundleError(f"{hub.parent} {what}: check the path, or pass --allow-empty (allow_empty=True) to "
                          f"describe a site that holds nothing yet")
    files = _checkpoint_files(cache.HubLayout(hub).checkpoints)
    with ThreadPoolExecutor(max_workers=HASH_JOBS) as pool:
        try:
            digests = list(pool.map(lambda item: _digest(item[1], deep), files))
        except OSError as exc:
            raise BundleError(f"cannot read {exc.filename or hub / 'checkpoints'}: {exc.strerror or exc}") from None
    checkpoints = [inv.Checkpoint(name, size, sha) for (name, _path, size), sha in zip(files, digests)]
    return inv.make_inventory(checkpoints, _installed_manifests(hub), torch_home=hub.parent, created=created)


def write_inventory(site: inv.Inventory, output) -> Path:
    """``SITE.json`` written atomically (a reader sees the old file or the new one)."""
    output = Path(output)
    try:
        atomic_write_bytes(output, inv.encode(site), durable=False)
    except OSError as exc:
        raise BundleError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


# -- the connected side ------------------------------------------------------------------------------
def read_site(path) -> inv.Inventory:
    """What a site holds, from ``path``: its inventory (``tvpack inventory``), an earlier bundle
    (single file or split: every checkpoint its manifest describes, carried or expected at the site,
    is at the site once it was installed), an installed manifest, or a lockfile (what was shipped)."""
    path = Path(path)
    head = _peek(path)
    if head is None or not head.lstrip().startswith(b"{"):
        with open_bundle(path) as opened:  # a bundle, single or split; its errors name what is wrong
            return _site_of(((e.filename, e.size, e.sha256) for e in opened.entries), str(path))
    try:
        if path.stat().st_size > MAX_MANIFEST:
            raise BundleError(f"{path}: too large for a site inventory, manifest or lockfile")
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        kind = json.loads(data).get("format")
    except (ValueError, AttributeError, RecursionError):
        kind = None
    if kind == inv.FORMAT:
        return inv.parse(data, path.name)
    if kind == "tvpack-lock":
        try:
            refs = read_lockfile(path)
        except LockfileError as exc:
            raise BundleError(exc.message) from None
        return _site_of(((r.filename, r.size_hint, r.sha256) for r in refs), str(path))
    if kind == "tvpack-bundle":
        entries, _members = parse_manifest(decode_manifest(data), str(path))
        return _site_of(((e.filename, e.size, e.sha256) for e in entries), str(path))
    raise BundleError(f"{path} is neither a site inventory (tvpack inventory), a tvpack bundle or manifest, nor a "
                      "lockfile")


def _peek(path: Path) -> bytes | None:
    """The first bytes of ``path``; None when it is not a regular file here (a split bundle's name)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            return f.read(_JSON_PEEK)
    except FileNotFoundError:
        if not os.path.exists(path.with_name(listing_name(path.name))):
            raise BundleError(f"no such file: {path} (give the site's inventory, an earlier bundle or a "
                              "lockfile)") from None
        return None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None


def _site_of(files, where: str) -> inv.Inventory:
    """An inventory holding ``files`` ((name, size, sha256); a file listed twice must agree)."""
    by_name: dict[str, inv.Checkpoint] = {}
    for name, size, sha in files:
        checkpoint = inv.Checkpoint(name, size, sha)
        if by_name.setdefault(name, checkpoint) != checkpoint:
            raise BundleError(f"{where} lists {name} twice with different sizes or hashes")
    return inv.Inventory(versions=inv.Versions(), checkpoints=tuple(by_name.values()))


def version_notes(site: inv.Inventory) -> list[str]:
    """Where the site's torch or torchvision differ from this side's (weights may then load differently)."""
    here = inv.current_versions()
    notes = []
    for key in ("torch", "torchvision"):
        theirs, ours = getattr(site.versions, key), getattr(here, key)
        if theirs and ours and theirs != ours:
            notes.append(f"the site has {key} {theirs}, this side {ours}")
    return notes


# -- removable media ---------------------------------------------------------------------------------
def split_bundle(path, part_size: int, output=None) -> list[Path]:
    """Split a bundle file into ``output.000``, ... of at most ``part_size`` bytes plus
    ``output.sha256`` (``output`` defaults to the bundle's own path). Its structure and manifest are
    checked first, so only a bundle is split; the data is read once."""
    path = Path(path)
    with open_source(path) as source:
        if isinstance(source, Volumes):
            raise BundleError(f"{path} is already split into {len(source.parts)} parts; to split it with another "
                              f"size, join them first (cat {source.name}.0* > {source.name})")
    with open_bundle(path):
        pass
    target = Path(output) if output is not None else path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {target.parent}: {exc.strerror or exc}") from None
    return split_file(path, part_size, target)


__all__ = ["inventory", "read_site", "split_bundle", "version_notes", "write_inventory"]
