"""The offline loader: a bundle file or an installed TORCH_HOME back into eval-ready models.

    model, weights = load_model("vision.tvpack.tar", "resnet50")
    model, weights = load_model("/opt/torch-home", "ResNet50_Weights.IMAGENET1K_V2")
    batch = weights.transforms()(image)

A *source* is a bundle file (its manifest is the first tar member) or a TORCH_HOME (or hub
directory) where bundles were installed (every ``<hub>/tvpack/manifests/*.json``). The manifest
says, per weights, which file holds it, its sha256, its transforms spec and meta as JSON data.

What happens on a load, and why:

* **Never the network.** The builder's state-dict fetch (``WeightsEnum.get_state_dict`` and every
  ``load_state_dict_from_url``) is served from the source; anything else it asks for is an error.
* **Safe.** Bytes are checked against the manifest's sha256 before ``torch.load(weights_only=True)``
  (installed files through the verification index, so an unchanged file is not hashed again).
* **Exactly torchvision's model.** The real builder runs with the real weights member, so every
  override it derives from the weights applies (num_classes, ViT image_size, transform_input,
  quantization backend, weights_backbone=None, keypoints...). Where the installed torchvision lacks
  the member, or describes it differently, a stand-in member of the same enum carries the bundle's
  url, meta and transforms (the bundle wins; a :class:`DriftWarning` names the difference).
* **Fast.** While the builder runs, parameters and persistent buffers are swapped for meta-device
  tensors the moment they are registered, so their random initialisation costs nothing; the
  builder's ``load_state_dict`` then assigns the checkpoint's tensors in their place (memory-mapped
  from the cache file, or read once from the archive). Non-persistent buffers and plain tensor
  attributes are computed on the CPU exactly as torchvision computes them. If anything is still on
  the meta device afterwards, or the builder cannot run that way, the model is built again the
  plain way; quantized models (a calibration pass on real numbers) always are.
"""
from __future__ import annotations

import contextlib
import fnmatch
import inspect
import json
import logging
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import channels, home
from .bundle import open_bundle
from .cache import HubLayout, index_entry, record_verified, scan_hub
from .discovery import get_registry
from .errors import BundleError, IntegrityError, LoadError, SignatureError, TvpackError, VolumeError
from .formats.archive import MemberFile
from .formats.manifest import MANIFEST_DIR, BundleEntry
from .formats.volumes import open_source as open_bytes
from .fsutil import descriptor_path, file_identity, hash_stream, written_since
from .registry import parse_selector, select_described
from .snapshot import resolve
from .spec import SpecError, build_transforms, meta_from_json, meta_to_json, transform_spec

log = logging.getLogger(__name__)

# The builder runs with process-wide patches in place (module hooks, the state-dict fetch).
_BUILD_LOCK = threading.RLock()


class LoaderWarning(UserWarning):
    """Something about a source worth telling (a manifest skipped, drift); loading goes on."""


class DriftWarning(LoaderWarning):
    """The installed torchvision describes bundled weights differently; the bundle's description wins."""


# -- manifest entries --------------------------------------------------------------------------------
# One weights as a manifest describes it (plain JSON data, nothing imported): bundle.py's parser
# is the only reader of manifests, for bundle files and installed ones alike.
Entry = BundleEntry


# -- reading checkpoints -----------------------------------------------------------------------------

def _torch_load(f, what: str, *, map_location, mmap: bool) -> dict:
    """``torch.load(weights_only=True)``; memory-mapped when ``f`` is a path in the zip format."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not (mmap and "mmap" in str(exc)):
                raise
            state = torch.load(f, map_location=map_location, weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"{what}: refusing to load a checkpoint that is not plain tensors ({first[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - a checkpoint torch cannot read, for whatever reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LoadError(f"{what}: torch.load failed: {type(exc).__name__}: {first[:200]}") from None
    if not isinstance(state, Mapping):
        raise LoadError(f"{what}: the checkpoint holds a {type(state).__name__}, not a state dict")
    return state


# -- sources -----------------------------------------------------------------------------------------

class Source:
    """Weights entries plus the verified bytes behind them."""

    kind = "source"

    def __init__(self, location: Path, entries: Iterable[Entry]):
        self.location = location
        self.entries: dict[str, Entry] = {}
        for entry in entries:
            self.entries.setdefault(entry.name, entry)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location} ({len(self.entries)} weights)>"

    def describe(self) -> str:
        return f"{self.kind} {self.location}"

    # -- what is in it -------------------------------------------------------------------------
    def entry_for_url(self, url: str) -> Entry | None:
        for entry in self.entries.values():
            if entry.url == url:
                return entry
        filename = os.path.basename(url)
        for entry in self.entries.values():
            if entry.filename == filename:
                return entry
        return None

    def _missing_hint(self, name: str, registry: Sequence[str] = ()) -> str | None:
        return None

    def _choices(self) -> str:
        names = sorted(self.entries)
        return ", ".join(names) if names else "nothing"

    def find(self, name: str, *, registry: Sequence[str] = ()) -> tuple[Entry, str | None]:
        """(entry, model name or None) for a selector naming one weights (:func:`packager.registry.parse_selector`):
        a model name (its DEFAULT here), ``model:MEMBER``, ``model:DEFAULT``, ``Enum.MEMBER``, ``Enum.DEFAULT``."""
        selector = parse_selector(name)
        matches = select_described(selector, self.entries.values(),
                                   default=lambda found: self._default(selector.model or selector.enum, found, registry))
        if not matches:
            what = f"for model {name.strip()!r}" if selector.model is not None and selector.member is None \
                else repr(name.strip())
            raise LoadError(f"{self.describe()} holds no weights {what}; it holds: {self._choices()}",
                            hint=self._missing_hint(name, registry))
        if len(matches) > 1:
            raise LoadError(f"{name.strip()!r} names {len(matches)} weights in {self.describe()}; choose one of: "
                            + ", ".join(sorted(e.name for e in matches)))
        entry = matches[0]
        if selector.model is None:
            return entry, None
        return entry, next(m for m in entry.models if fnmatch.fnmatchcase(m, selector.model))

    def _default(self, what: str, candidates: list[Entry], registry) -> Entry:
        if not candidates:
            raise LoadError(f"{self.describe()} holds no weights for {what!r}; it holds: {self._choices()}",
                            hint=self._missing_hint(what, registry))
        default = _installed_default(candidates[0], registry)
        for entry in candidates:
            if entry.member == default:
                return entry
        if len(candidates) == 1:
            return candidates[0]
        choices = ", ".join(sorted(e.name for e in candidates))
        raise LoadError(f"{self.describe()} holds several weights for {what!r} and none is its DEFAULT here; "
                        f"choose one of: {choices}")

    # -- bytes ---------------------------------------------------------------------------------
    def state_dict(self, entry: Entry, *, map_location="cpu") -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the public verbs, bound to this source --------------------------------------------------
    def weights(self, name: str, *, registry: Sequence[str] = ()) -> "LoadedWeights":
        entry, _ = self.find(name, registry=registry)
        return LoadedWeights(entry, self, registry=registry)

    def load_model(self, name: str, *, registry: Sequence[str] = (), map_location="cpu", fast: bool = True,
                   **builder_kwargs):
        entry, model_name = self.find(name, registry=registry)
        weights = LoadedWeights(entry, self, registry=registry)
        model = _build(weights, model_name or (entry.models[0] if entry.models else None), registry=registry,
                       map_location=map_location, fast=fast, builder_kwargs=builder_kwargs)
        return model, weights


class InstalledSource(Source):
    """A hub directory holding installed bundles: for each weights, the entry of its *current* manifest, as
    :func:`packager.cache.scan_hub` reports it (a release of a channel, an install record; never a file mtime)."""

    kind = "cache"

    def __init__(self, hub: Path):
        self.hub = Path(hub)
        self.info = scan_hub(HubLayout(self.hub), checkpoints=False)
        self.skipped: list[str] = self.info.problems
        for message in self.skipped:  # one bad manifest must not make the others unusable
            warnings.warn(LoaderWarning(message), stacklevel=3)
        self.ambiguous = {name: w.problem for name, w in self.info.weights.items() if w.problem}
        entries = list(self.info.current_entries().values())
        for name in self.ambiguous:  # found by name, then refused in one line naming the manifests
            first = self.info.manifest(self.info.weights[name].manifests[0])
            entries.extend(e for e in first.entries if e.name == name)
        super().__init__(self.hub.parent, entries)

    def find(self, name: str, *, registry: Sequence[str] = ()) -> tuple[Entry, str | None]:
        entry, model = super().find(name, registry=registry)
        if entry.name in self.ambiguous:
            raise LoadError(self.ambiguous[entry.name])
        return entry, model

    def _missing_hint(self, name: str, registry: Sequence[str] = ()) -> str | None:
        if self.skipped:
            return f"{len(self.skipped)} manifest(s) were skipped, e.g. {self.skipped[0]}"
        # the weights' file may be in the cache, fetched rather than installed: say how to give it a manifest
        return _not_installed_hint(self.hub, name, registry)

    def checkpoint_path(self, entry: Entry) -> Path:
        return channels.unrevoked(self.hub, entry)  # <hub>/checkpoints/<file>; a revoked checkpoint is refused

    def state_dict(self, entry: Entry, *, map_location="cpu") -> dict:
        # The bytes hashed are the bytes loaded: one open file is hashed (or matched to the index by inode and
        # times), then loaded through its descriptor, never by path again: a file renamed over the checkpoint
        # meanwhile is not what loads. Written to while loading changes its times, and is refused.
        path, changed = self.checkpoint_path(entry), "the file changed after install; reinstall the bundle"
        try:
            f = open(path, "rb", buffering=0)
        except OSError:
            raise LoadError(f"{entry.name}: its checkpoint {path} is missing", hint="reinstall the bundle") from None
        with f:
            before = os.fstat(f.fileno())
            if before.st_size != entry.size:
                raise IntegrityError(f"checkpoint {path} ({entry.name}) size", expected=f"{entry.size} bytes",
                                     got=f"{before.st_size} bytes", hint=changed)
            if (digest := _open_file_sha256(path, f, before)) != entry.sha256:
                raise IntegrityError(f"checkpoint {path} ({entry.name}) sha256", expected=entry.sha256, got=digest,
                                     hint=changed)
            f.seek(0)
            by_fd = descriptor_path(f)
            state = _torch_load(by_fd or f, str(path), map_location=map_location, mmap=by_fd is not None)
            if written_since(before, os.fstat(f.fileno())):
                raise IntegrityError(f"checkpoint {path} ({entry.name})", expected="the verified file, unchanged",
                                     got="a file written to while it was loaded", hint="see docs/security.md")
        return state


def _open_file_sha256(path: Path, f, st: os.stat_result) -> str:
    """sha256 of the open file ``f`` (``st``: its fstat): the index's when it describes this very file, else
    hashed from ``f`` and recorded if ``path`` still names it."""
    known = index_entry(path) or {}
    if known.get("sha256") and [known.get(k) for k in ("inode", "size", "mtime_ns", "ctime_ns")] == \
            [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]:
        return known["sha256"]
    f.seek(0)
    digest, _ = hash_stream(f)
    with contextlib.suppress(OSError):
        if file_identity(os.stat(path)) == file_identity(st):
            record_verified(path, digest)
    return digest


class BundleSource(Source):
    """A bundle archive read in place. Its structure (regular files only, safe paths, each member
    once, exactly the listed members with their sizes, the manifest matching its id) is checked by
    :func:`packager.bundle.open_bundle`; each checkpoint's sha256 is checked here as it is loaded."""

    kind = "bundle"

    def __init__(self, path: Path):
        self.path = Path(path)
        with open_bundle(self.path) as opened:
            entries = opened.entries  # each names "<bundle>:<manifest path>" as where it was read
        super().__init__(self.path, entries)

    def _site_only(self) -> str:
        files = sorted({e.filename for e in self.entries.values() if e.at_site})
        return ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")

    def state_dict(self, entry: Entry, *, map_location="cpu") -> dict:
        from concurrent.futures import ThreadPoolExecutor

        what = f"{self.path}:{entry.path}"
        if entry.at_site:
            raise LoadError(f"{entry.name}: {self.path.name} is a delta bundle and does not carry {entry.filename}; "
                            f"it expects these at the site: {self._site_only()}",
                            hint="install the bundle there (tvpack install) and load from that TORCH_HOME")
        with open_bundle(self.path) as opened:
            member = opened.member(entry.path)
        if member.size != entry.size:
            raise IntegrityError(f"{what} ({entry.name}) size", expected=f"{entry.size} bytes",
                                 got=f"{member.size} bytes")
        # The member is contiguous in the archive: torch.load reads it in place, each tensor's bytes
        # straight into its storage (no extra copy), while a second thread hashes the same bytes
        # (hashlib releases the GIL). Nothing is returned unless the hash matches; the weights-only
        # unpickler is what makes reading not-yet-verified bytes harmless.
        with open_bytes(self.path) as source, ThreadPoolExecutor(1) as pool:
            hashing = pool.submit(hash_stream, MemberFile(source, member.offset, member.size), member.size)
            state, failure = None, None
            try:
                state = _torch_load(MemberFile(source, member.offset, member.size), what, map_location=map_location,
                                    mmap=False)
            except LoadError as exc:
                failure = exc
            got, n = hashing.result()
            span = (member.offset, member.offset + member.size)
            verdict = source.diagnose([span]) if (n, got) != (entry.size, entry.sha256) else None
        if verdict:  # a split bundle with a badly copied part: name the part
            raise VolumeError(verdict)
        if n != entry.size:
            raise BundleError(f"{what}: the archive is truncated ({n} of {entry.size} bytes)")
        if got != entry.sha256:
            raise IntegrityError(f"{what} ({entry.name}) sha256", expected=entry.sha256, got=got,
                                 hint="the bundle is damaged or was tampered with")
        if failure is not None:
            raise failure
        return state


def _not_installed_hint(hub: Path, name: str, registry: Sequence[str] = ()) -> str | None:
    try:
        refs = resolve([name], registry=registry)
    except TvpackError:
        return None
    present = [ref for ref in refs if HubLayout(hub).checkpoint(ref.filename).is_file()]
    if not present:
        return None
    ref = present[0]
    return (f"its file {ref.filename} is in the cache without a manifest (fetched, not installed); give it one with:"
            f" tvpack bundle {ref.name} --no-fetch --torch-home {hub.parent} -o b.tvpack.tar && tvpack install"
            f" b.tvpack.tar --torch-home {hub.parent}")


def open_source(source=None) -> Source:
    """A bundle file, or a TORCH_HOME / hub directory with installed bundles (None: the default)."""
    if isinstance(source, Source):
        return source
    if source is None:
        return InstalledSource(home.hub_dir())
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_file() or (not path.exists() and path.with_name(path.name + ".sha256").is_file()):
        return BundleSource(path)  # a bundle file, or split: NAME.000, NAME.sha256 or NAME beside its parts
    if path.is_dir():
        if HubLayout(path / "hub").manifests.is_dir():
            return InstalledSource(path / "hub")
        if HubLayout(path).manifests.is_dir():
            return InstalledSource(path)
        checkpoints = HubLayout(path / "hub").checkpoints
        found = sorted(p.name for p in checkpoints.glob("*") if p.is_file()) if checkpoints.is_dir() else []
        if found:
            raise LoadError(f"{path} holds {len(found)} checkpoint file(s) ({', '.join(found[:3])}"
                            f"{', ...' if len(found) > 3 else ''}) but no tvpack manifest: they were fetched, not"
                            " installed", hint=f"give them one with: tvpack bundle SELECTOR... --no-fetch --torch-home"
                            f" {path} -o b.tvpack.tar && tvpack install b.tvpack.tar --torch-home {path}")
        raise LoadError(f"{path} holds no installed tvpack bundle (no {MANIFEST_DIR}/)",
                        hint="install one with: tvpack install BUNDLE --torch-home DIR")
    raise LoadError(f"no such bundle file or directory: {path}")


# -- the weights object ------------------------------------------------------------------------------

def _installed_default(entry: Entry, registry) -> str | None:
    enum = _installed_enum(entry, registry)
    default = getattr(enum, "__members__", {}).get("DEFAULT") if enum is not None else None
    return default.name if default is not None else None


def _installed_enum(entry: Entry, registry):
    try:
        enum = get_registry(registry).enums.get(entry.enum)
    except TvpackError:
        raise
    return enum


def _json_normal(data):
    return json.loads(json.dumps(data, sort_keys=True))


def _differences(entry: Entry, member) -> list[str]:
    """How the installed member's description differs from the bundle's (empty: identical)."""
    found = []
    if member.url != entry.url:
        found.append(f"url (installed {member.url}, bundle {entry.url})")
    try:
        installed = _json_normal(meta_to_json(member.meta))
    except SpecError:
        installed = {}
    bundled = _json_normal(entry.meta)
    keys = sorted(k for k in set(installed) | set(bundled) if installed.get(k, ...) != bundled.get(k, ...))
    if keys:
        found.append("meta " + ", ".join(keys))
    try:
        spec = _json_normal(transform_spec(member))
    except SpecError:
        spec = None
    if spec != _json_normal(entry.transforms):
        found.append("transforms")
    return found


class LoadedWeights:
    """A bundle's weights, used like a ``WeightsEnum`` member: ``.url``, ``.meta``,
    ``.transforms()`` (a fresh pipeline per call), ``.name``, ``.get_state_dict()``.

    ``installed`` is the installed torchvision's member of the same name (None when it has none);
    ``differences`` lists where its description differs from the bundle's, which wins.
    """

    def __init__(self, entry: Entry, source: Source, *, registry: Sequence[str] = ()):
        self.entry = entry
        self.source = source
        self._registry = tuple(registry)
        self.meta: dict = meta_from_json(entry.meta, registry=self._registry)
        enum = _installed_enum(entry, self._registry)
        self.enum_class = enum  # the installed enum class, or None
        self.installed = enum.__members__.get(entry.member) if enum is not None else None
        self.differences: tuple[str, ...] = tuple(_differences(entry, self.installed)) if self.installed else ()
        if self.installed is not None and not self.differences:
            # The same description: take torchvision's own values (a copy), so that meta compares
            # equal to the member's even where JSON cannot round-trip identity (NaN metrics, e.g.
            # VGG16_Weights.IMAGENET1K_FEATURES: nan != nan unless it is the same float object).
            import copy

            try:
                self.meta = copy.deepcopy(self.installed.meta)
            except Exception:  # noqa: BLE001 - something uncopyable in a user's meta: keep the bundle's
                pass
        if self.differences:
            warnings.warn(DriftWarning(
                f"{entry.name}: the installed torchvision describes these weights differently "
                f"({'; '.join(self.differences)}); using the bundle's description"), stacklevel=3)

    # -- the WeightsEnum surface ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def url(self) -> str:
        return self.entry.url

    @property
    def sha256(self) -> str:
        return self.entry.sha256

    @property
    def models(self) -> tuple[str, ...]:
        return self.entry.models

    @property
    def family(self) -> str:
        return self.entry.family

    def transforms(self, *args, **kwargs):
        """The preprocessing pipeline the bundle recorded (a new module on every call)."""
        if args or kwargs:
            raise TypeError("transforms() takes no arguments: the pipeline is the one the bundle recorded")
        return build_transforms(self.entry.transforms, registry=self._registry)

    @property
    def value(self):
        """A ``torchvision.models.Weights`` with the bundle's url, transforms and meta."""
        from torchvision.models._api import Weights

        return Weights(url=self.url, transforms=self.transforms, meta=self.meta)

    def get_state_dict(self, *args, map_location="cpu", **kwargs) -> dict:
        """The verified checkpoint (``progress`` / ``check_hash`` are accepted and ignored)."""
        return self.source.state_dict(self.entry, map_location=map_location)

    def member_for_builder(self):
        """What the builder gets as ``weights=``: the installed member when it describes these
        weights exactly as the bundle does, else a stand-in member of the installed enum carrying
        the bundle's description; None when this torchvision has no such enum."""
        if self.installed is not None and not self.differences:
            return self.installed
        if self.enum_class is None:
            return None
        return _stand_in(self.enum_class, self.entry.member, self.value)

    def __repr__(self) -> str:
        return f"LoadedWeights({self.name}, {self.source.kind}={str(self.source.location)!r})"

    def __str__(self) -> str:
        return self.name


def _stand_in(enum_class, member: str, value):
    """A member of ``enum_class`` that the enum does not list (``Enum.verify`` accepts it:
    isinstance holds), carrying the bundle's url, meta and transforms."""
    obj = object.__new__(enum_class)
    obj._name_ = member
    obj._value_ = value
    obj._sort_order_ = len(enum_class._member_names_)
    return obj


# -- building models ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _patched(target, attr: str, value):
    missing = object()
    old = target.__dict__.get(attr, missing) if isinstance(target, type) else getattr(target, attr, missing)
    setattr(target, attr, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(target, attr)
        else:
            setattr(target, attr, old)


class _Fetcher:
    """Serves the builder's state-dict requests from the source; refuses anything else."""

    def __init__(self, weights: LoadedWeights, member, model: str, map_location):
        self.weights, self.member, self.model, self.map_location = weights, member, model, map_location

    def for_member(self, member) -> dict:
        entry = self.weights.entry
        if member is self.member or (type(member).__name__, member.name) == (entry.enum, entry.member):
            return self.weights.get_state_dict(map_location=self.map_location)
        return self._other(f"{type(member).__name__}.{member.name}", member.url)

    def for_url(self, url: str) -> dict:
        if url == self.weights.url:
            return self.weights.get_state_dict(map_location=self.map_location)
        return self._other(url, url)

    def _other(self, what: str, url: str) -> dict:
        source = self.weights.source
        entry = source.entries.get(what) or source.entry_for_url(url)
        if entry is None:
            raise LoadError(f"building {self.model} also needs {what}, which {source.describe()} does not hold",
                            hint="bundle it too (e.g. --with-backbones)")
        return source.state_dict(entry, map_location=self.map_location)

    @contextlib.contextmanager
    def installed(self):
        import torch.hub
        import torchvision._internally_replaced_utils as replaced
        import torchvision.models._api as api

        def get_state_dict(member, *args, **kwargs):
            return self.for_member(member)

        def load_state_dict_from_url(url, *args, **kwargs):
            return self.for_url(url)

        def download_url_to_file(url, *args, **kwargs):
            raise LoadError(f"building {self.model} tried to download {url}; the offline loader never downloads")

        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(api.WeightsEnum, "get_state_dict", get_state_dict))
            for module in (api, replaced, torch.hub):
                stack.enter_context(_patched(module, "load_state_dict_from_url", load_state_dict_from_url))
            stack.enter_context(_patched(torch.hub, "download_url_to_file", download_url_to_file))
            yield


@contextlib.contextmanager
def _skeleton():
    """While active, parameters and persistent buffers become meta tensors as they are registered
    (their initialisation is then free), and ``load_state_dict`` assigns the checkpoint's tensors.

    Non-persistent buffers and other tensors stay on the CPU: they are computed as usual. The
    patches are process-wide but act only in the calling thread: models built meanwhile in other
    threads are untouched."""
    import torch
    from torch import nn
    from torch.nn.modules import module as module_mod

    owner = threading.get_ident()
    loading = [0]  # inside load_state_dict, assign=True registers the checkpoint's tensors: keep those

    def skeletal() -> bool:
        return threading.get_ident() == owner and not loading[0]

    def on_parameter(module, name, param):
        if type(param) is nn.Parameter and not param.is_meta and skeletal():
            return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        return None

    original_register_buffer = nn.Module.register_buffer
    original_load_state_dict = nn.Module.load_state_dict

    def register_buffer(self, name, tensor, persistent=True):
        if persistent and type(tensor) is torch.Tensor and not tensor.is_meta and skeletal():
            tensor = torch.empty_like(tensor, device="meta")
        return original_register_buffer(self, name, tensor, persistent)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if threading.get_ident() != owner:
            return original_load_state_dict(self, state_dict, strict=strict, assign=assign)
        loading[0] += 1
        try:
            return original_load_state_dict(self, _aligned(self, state_dict), strict=strict, assign=True)
        finally:
            loading[0] -= 1

    handle = module_mod.register_module_parameter_registration_hook(on_parameter)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(nn.Module, "register_buffer", register_buffer))
            stack.enter_context(_patched(nn.Module, "load_state_dict", load_state_dict))
            # Initialising a meta tensor does nothing but still costs a Python decomposition per call.
            for name in _INIT_FUNCTIONS:
                function = getattr(nn.init, name, None)
                if function is not None:
                    stack.enter_context(_patched(nn.init, name, _skipping_meta(function)))
            yield
    finally:
        handle.remove()


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


def _skipping_meta(function):
    import functools

    import torch

    @functools.wraps(function)
    def init(tensor, *args, **kwargs):
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return function(tensor, *args, **kwargs)

    return init


def _aligned(module, state_dict: Mapping) -> Mapping:
    """The state dict with each tensor in the dtype and layout (strides) of the tensor it replaces,
    as ``copy_`` into the module's own tensor would have left it."""
    import torch

    targets = module.state_dict(keep_vars=True)
    out = OrderedDict()
    changed = False
    for key, value in state_dict.items():
        target = targets.get(key)
        if (isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor) and value.shape == target.shape
                and not value.is_quantized and not target.is_quantized):
            if value.dtype != target.dtype or value.stride() != target.stride():
                fixed = torch.empty_strided(target.shape, target.stride(), dtype=target.dtype, device=value.device)
                fixed.copy_(value)
                value, changed = fixed, True
        out[key] = value
    if not changed:
        return state_dict
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


def _meta_leftovers(model) -> list[str]:
    """Names of tensors still on the meta device anywhere in the model."""
    import torch

    found = []

    def check(name, value, depth=0):
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                found.append(name)
        elif depth < 2 and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                check(f"{name}[{i}]", item, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            for key, item in value.items():
                check(f"{name}.{key}", item, depth + 1)

    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, value in vars(module).items():
            if attr == "_modules":
                continue
            if attr in ("_parameters", "_buffers"):
                for key, item in value.items():
                    check(f"{prefix}.{key}".lstrip("."), item, 1)
            else:
                check(f"{prefix}.{attr}".lstrip("."), value)
    return found


def _builder(entry: Entry, model: str | None, registry):
    info = get_registry(registry).models.get(model) if model else None
    if info is not None:
        return info
    recorded = entry.builder_path(model) or "?"
    if not model:
        raise LoadError(f"{entry.name}: the manifest names no model to build; its transforms and meta are still "
                        "available (packager.loader.load_weights)")
    made_with = entry.created_by.get("torchvision")
    if recorded.startswith("torchvision."):
        import torchvision

        why = f"this torchvision ({torchvision.__version__}) has no model {model!r}"
        if made_with:
            why += f"; the bundle was made with torchvision {made_with}"
        hint = "upgrade torchvision, or use load_weights() for its transforms and meta"
    else:
        module = recorded.rsplit(".", 1)[0]
        why = f"no builder for model {model!r} ({recorded}) is registered here"
        hint = f"pass --registry {module} if that module is installed; load_weights() still gives transforms and meta"
    raise LoadError(f"cannot build {entry.name}: {why}", hint=hint)


def _build(weights: LoadedWeights, model: str | None, *, registry, map_location, fast: bool,
           builder_kwargs: Mapping):
    import torch

    entry = weights.entry
    info = _builder(entry, model, registry)
    member = weights.member_for_builder()
    if member is None:
        made_with = entry.created_by.get("torchvision")
        raise LoadError(
            f"cannot build {entry.name}: this environment has no weights enum {entry.enum} "
            f"(from {entry.module or '?'}) for the builder {info.builder_path}"
            + (f"; the bundle was made with torchvision {made_with}" if made_with else ""),
            hint="load_weights() still gives its transforms and meta")
    params = inspect.signature(info.builder).parameters
    kwargs = dict(builder_kwargs)
    if "quantize" in params and "backend" in weights.meta:
        kwargs.setdefault("quantize", True)
    if "progress" in params:
        kwargs.setdefault("progress", False)
    fetcher = _Fetcher(weights, member, info.name, map_location)
    built = None
    if fast and not kwargs.get("quantize"):
        try:
            with _BUILD_LOCK, fetcher.installed(), _skeleton():
                built = info.builder(weights=member, **kwargs)
            leftovers = _meta_leftovers(built)
            if leftovers:
                log.debug("%s: %d tensor(s) left on the meta device (%s%s); building the plain way", entry.name,
                          len(leftovers), ", ".join(leftovers[:3]), ", ..." if len(leftovers) > 3 else "")
                built = None
        except TvpackError:
            raise
        except Exception as exc:  # noqa: BLE001 - the plain build below decides whether it is real
            log.debug("%s: the fast build failed (%s: %s); building the plain way", entry.name,
                      type(exc).__name__, exc)
            built = None
    if built is None:
        try:
            with _BUILD_LOCK, fetcher.installed():
                built = info.builder(weights=member, **kwargs)
        except TvpackError:
            raise
        except Exception as exc:  # noqa: BLE001 - a builder failure, told in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LoadError(f"building {info.name} with {entry.name} failed: {type(exc).__name__}: {first[:300]}") \
                from exc
    if not isinstance(built, torch.nn.Module):
        raise LoadError(f"the builder {info.builder_path} returned {type(built).__name__}, not a torch.nn.Module")
    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else None
    if device is not None and device.type != "cpu":
        built = built.to(device)
    return built.eval()


# -- public API --------------------------------------------------------------------------------------

def load_model(source, name: str, *, registry: Sequence[str] = (), map_location="cpu", fast: bool = True,
               trusted_keys=None, require_signed: bool | None = None, torch_home=None, **builder_kwargs):
    """``(model, weights)`` from a bundle file or a TORCH_HOME where bundles were installed.

    ``name`` is a model name (its only weights in the source, else its DEFAULT), ``model:MEMBER``
    or a weights name (``ResNet50_Weights.IMAGENET1K_V2``). The model is in eval mode. Extra
    keyword arguments go to the builder, as with ``torchvision.models.get_model``. ``fast=False``
    builds the plain way (random init, then copy), for comparison.

    ``trusted_keys`` (PEM public keys or CA roots: paths or bytes) refuses checkpoints that no
    signature valid for them covers; so does a configured trust policy (``TVPACK_TRUSTED_KEYS``,
    ``<hub>/tvpack/trusted/``) unless ``require_signed=False``; ``require_signed=True`` demands one. The
    configured policy is the installed source's own; for a bundle file, that of ``torch_home`` (default: the
    TORCH_HOME torch.hub resolves).
    """
    src = _signed_only(open_source(source), name, registry, trusted_keys, require_signed, torch_home)
    return src.load_model(name, registry=registry, map_location=map_location, fast=fast, **builder_kwargs)


def load_weights(source, name: str, *, registry: Sequence[str] = (), trusted_keys=None,
                 require_signed: bool | None = None, torch_home=None) -> LoadedWeights:
    """The weights object alone (transforms, meta, state dict): works even where no builder exists."""
    src = _signed_only(open_source(source), name, registry, trusted_keys, require_signed, torch_home)
    return src.weights(name, registry=registry)


def _signed_only(src: Source, name: str, registry, trusted_keys, require_signed, torch_home=None) -> Source:
    """Under a trust policy, ``src`` keeps only the weights a trusted signature covers (backbones included), and
    ``name`` not among them is refused in one line. The configured policy of an installed source is its own
    hub's; of a bundle file, ``torch_home``'s (None: torch.hub's)."""
    from . import signing

    hub = src.hub if isinstance(src, InstalledSource) else None
    policy_hub = hub if hub is not None else (home.hub_dir(torch_home) if torch_home is not None else None)
    trust = signing.loader_policy(trusted_keys, require_signed, hub=policy_hub)
    if not trust:
        return src
    entry, _ = src.find(name, registry=registry)
    covered, why = signing.covered_entries(src.entries.values(), trust, hub=hub,
                                           bundle_path=src.path if isinstance(src, BundleSource) else None)
    if entry.name not in covered:
        raise SignatureError(f"refusing {entry.name} from {src.describe()}: {why[entry.name]}")
    src.entries = {n: e for n, e in src.entries.items() if n in covered}
    return src


def list_entries(source) -> list[Entry]:
    return sorted(open_source(source).entries.values(), key=lambda e: e.name)


def _decode_reason(exc: BaseException) -> str:
    """torchvision's decoder errors start with its C++ source location; keep the reason only."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    reason = line.rsplit(".cpp:", 1)[-1].split(",", 1)[-1].strip() if ".cpp:" in line else line
    return reason[:200] or type(exc).__name__


def _is_classification(weights: LoadedWeights) -> bool:
    spec = weights.entry.transforms
    return (spec.get("kind") == "preset" and spec.get("class") == "ImageClassification"
            and bool(weights.meta.get("categories")))


def classify(source, name: str, images: Sequence[str | os.PathLike], *, topk: int = 5,
             registry: Sequence[str] = (), trusted_keys=None, require_signed: bool | None = None,
             torch_home=None) -> list[dict]:
    """Top-k categories for each image file (classification weights only); signatures are checked as by
    :func:`load_model` (``torch_home`` as there)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    src = _signed_only(open_source(source), name, registry, trusted_keys, require_signed, torch_home)
    entry, model_name = src.find(name, registry=registry)
    weights = LoadedWeights(entry, src, registry=registry)
    if not _is_classification(weights):
        kind = weights.family or weights.entry.transforms.get("class", "non-classification")
        raise LoadError(f"predict handles image classification weights; {weights.name} is {kind} weights",
                        hint="load it with packager.load_model and run it yourself")
    tensors = []
    for image in images:
        try:
            tensors.append(decode_image(str(image), mode=ImageReadMode.RGB))
        except Exception as exc:  # noqa: BLE001 - unreadable or not an image
            raise LoadError(f"cannot decode image {image}: {_decode_reason(exc)}") from None
    model = _build(weights, model_name or (entry.models[0] if entry.models else None), registry=registry,
                   map_location="cpu", fast=True, builder_kwargs={})
    preprocess = weights.transforms()
    batch = torch.stack([preprocess(t) for t in tensors])
    with torch.inference_mode():
        logits = model(batch)
    if not isinstance(logits, torch.Tensor):  # e.g. inception's namedtuple outside eval
        logits = logits[0]
    probabilities = logits.float().softmax(dim=1)
    categories = weights.meta["categories"]
    k = min(topk, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    results = []
    for image, probs, idxs in zip(images, values.tolist(), indices.tolist()):
        results.append({
            "image": str(image),
            "weights": weights.name,
            "top": [{"rank": r + 1, "index": i, "category": categories[i] if i < len(categories) else str(i),
                     "probability": p} for r, (p, i) in enumerate(zip(probs, idxs))],
        })
    return results
