"""``tvpack list``: what the registries hold and what is cached."""
from __future__ import annotations

import click

from ..fsutil import human_bytes
from ..registry import FAMILIES
from ._common import echo_json, json_option, registry_option, table, torch_home_option
from .app import live_registry, main


@main.command("list")
@click.argument("patterns", nargs=-1, metavar="[PATTERN...]")
@click.option("--module", "family", type=click.Choice(FAMILIES), help="Only models of this torchvision module.")
@click.option("--cached", is_flag=True, help="Only weights whose file is in the cache.")
@click.option("--all", "all_weights", is_flag=True, help="Every weights (the default without PATTERN).")
@torch_home_option
@registry_option
@json_option
def list_cmd(patterns, family, cached, all_weights, torch_home, registry, as_json):
    """List weights: model(s), file, size, headline metric and whether it is cached.

    PATTERN is a model name or glob (all of its weights are listed), or any selector
    (resnet50:DEFAULT, ResNet50_Weights.IMAGENET1K_V2). Without PATTERN, every weights.
    """
    from ..home import checkpoints_dir
    from ..snapshot import get_catalog

    catalog = get_catalog(registry, live=live_registry())
    selectors = [p if (":" in p or "." in p) else f"{p}:all" for p in patterns]
    refs = catalog.resolve(selectors, all_weights=all_weights or not patterns)
    refs.sort(key=lambda r: r.name)
    ckpt = checkpoints_dir(torch_home)
    rows = []
    for ref in refs:
        if family and ref.family != family:
            continue
        info = catalog.info(ref)
        meta = info.meta
        is_cached = (ckpt / ref.filename).is_file()
        if cached and not is_cached:
            continue
        rows.append({
            **ref.to_dict(),
            "size_mb": meta.get("_file_size"),
            "metric": info.headline_metric,
            "cached": is_cached,
            "path": str(ckpt / ref.filename) if is_cached else None,
        })
    total_mb = sum(r["size_mb"] or 0 for r in rows)
    total_bytes = sum(r["size_hint"] or 0 for r in rows)
    if as_json:
        echo_json(rows)
        return
    click.echo(table(
        ["weights", "model(s)", "file", "size", "metric", "cached"],
        [[r["weights"], ",".join(r["models"]), r["filename"], human_bytes(r["size_hint"]), r["metric"] or "",
          "yes" if r["cached"] else "no"] for r in rows],
        right=[3],
    ))
    n_cached = sum(r["cached"] for r in rows)
    click.echo(f"\n{len(rows)} weights, {human_bytes(total_bytes)} in all (torchvision's _file_size: {total_mb:,.0f} MiB);"
               f" {n_cached} cached in {ckpt}")
