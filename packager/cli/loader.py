"""``tvpack predict``: run bundled classification weights on image files, offline."""
from __future__ import annotations

import click

from ._common import echo_json, json_option, registry_option
from .app import main
from .signing import trust_options


@main.command("predict")
@click.argument("source", type=click.Path(exists=True))
@click.argument("model", metavar="MODEL")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...",
                type=click.Path(exists=True, dir_okay=False))
@click.option("--topk", default=5, show_default=True, type=click.IntRange(min=1), help="How many categories to show.")
@trust_options
@click.option("--torch-home", "torch_home", type=click.Path(file_okay=False), default=None,
              help="For a bundle-file SOURCE: the TORCH_HOME whose trust policy (<hub>/tvpack/trusted/) applies "
                   "(default: as torch.hub resolves it). An installed SOURCE uses its own.")
@registry_option
@json_option
def predict_cmd(source, model, images, topk, keys, ca_roots, torch_home, registry, as_json):
    """Classify IMAGE files with weights from SOURCE, never touching the network.

    SOURCE is a bundle file or a TORCH_HOME where bundles were installed. MODEL is a model name
    (resnet50), MODEL:MEMBER or a weights name (ResNet50_Weights.IMAGENET1K_V2). Each image is
    decoded with torchvision.io.decode_image, preprocessed with the weights' own transforms and
    the top-k categories are printed with their probabilities. Classification weights only.

    Under a trust policy (TVPACK_TRUSTED_KEYS, <hub>/tvpack/trusted/) or with --key / --ca-root,
    weights that no trusted signature covers are refused, as load_model refuses them.
    """
    import warnings

    from ..loader import LoaderWarning, classify

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = classify(source, model, images, topk=topk, registry=registry,
                           trusted_keys=[*keys, *ca_roots] or None, torch_home=torch_home)
    for warning in caught:  # ours, as one line each; torch's deprecation chatter is dropped
        if issubclass(warning.category, LoaderWarning):
            click.echo(f"tvpack: warning: {warning.message}", err=True)
    if as_json:
        echo_json(results)
        return
    for n, result in enumerate(results):
        if n:
            click.echo()
        click.echo(f"{result['image']}  ({result['weights']})")
        width = max(len(item["category"]) for item in result["top"])
        for item in result["top"]:
            click.echo(f"  {item['rank']:>2}. {item['category']:<{width}}  {100 * item['probability']:6.2f}%")
