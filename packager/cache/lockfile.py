"""``tvpack lock``: resolve selectors, fetch what is missing, pin each file's sha256 and size."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from ..config import Config, config_from
from ..formats.lockfile import dump_lockfile
from ..registry import WeightsRef
from ..snapshot import resolve
from .fetching import fetch_results
from .index import file_sha256


def write_lockfile(selectors: Iterable[str], output, *, registry: Sequence[str] = (), all_weights: bool = False,
                   with_backbones: bool = False, torch_home=None, config: Config | None = None, **keywords) -> Path:
    """Resolve selectors, fetch whatever is missing, and pin each file's sha256 and size; how it fetches:
    ``config`` (:class:`packager.config.Config`) or its fields as keywords."""
    config = config_from(config, **keywords)
    refs = resolve(list(selectors), registry=registry, all_weights=all_weights, with_backbones=with_backbones,
                   live=config.live)
    results = fetch_results(refs=refs, torch_home=torch_home, config=config)
    pinned = []
    for result in results:
        sha = result.sha256 or file_sha256(result.path)
        pinned.append(WeightsRef(**{**result.ref.__dict__, "sha256": sha, "size_hint": result.path.stat().st_size}))
    return dump_lockfile(pinned, output)
