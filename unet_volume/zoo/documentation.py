"""The model card a package carries as its documentation (``README.md``).

The spec asks for a ``Validation`` section: how to check the model on new data. The card also
says what the spec cannot state as a step: the label offset prediction applies, and that the
figures were measured with test-time augmentation where they were.
"""

from __future__ import annotations

from unet_volume.models.checkpoint import Checkpoint
from unet_volume.models.shipped import ShippedModel, describe
from unet_volume.models.unet import UNet


def model_card(checkpoint: Checkpoint, shipped: ShippedModel | None, net: UNet) -> str:
    """Markdown: what the net is, what it takes and gives, how it was made and measured."""
    sections = [
        _what(checkpoint, shipped),
        _geometry(checkpoint, net),
        _input(checkpoint),
        _made(checkpoint, shipped),
        _validation(shipped),
    ]
    return "\n\n".join(sections) + "\n"


def _what(checkpoint: Checkpoint, shipped: ShippedModel | None) -> str:
    config = checkpoint.config
    title = shipped.name if shipped else f"A {config.ndim}D U-Net from unet-volume"
    members = (
        f" An ensemble of {checkpoint.members} networks of one recipe: the mean of their class "
        "probabilities."
        if checkpoint.members > 1
        else ""
    )
    after = " in 3D, after Cicek et al. (2016)" if config.ndim == 3 else ""
    return (
        f"# {title}\n\n"
        f"The U-Net of Ronneberger et al. (2015){after}: "
        f"depth {config.depth}, {config.base_channels} channels at the first level, "
        f"{'batch norm, ' if config.batch_norm else ''}unpadded 3x3 convolutions, "
        f"{config.num_classes} classes.{members} Exported by unet-volume from a checkpoint with "
        f"sha256 `{checkpoint.sha256}`."
    )


def _geometry(checkpoint: Checkpoint, net: UNet) -> str:
    smallest = net.input_shape_for((1,) * checkpoint.config.ndim)
    return (
        "## Input and output sizes\n\n"
        "The convolutions are valid (unpadded), so the output is the centre of the input: "
        f"smaller by {2 * net.halo[-1]} voxels per spatial axis ({net.halo[-1]} per side). An "
        f"axis takes {smallest[-1]} + n x {net.period[-1]} voxels. Tiles of such inputs whose "
        "outputs abut give exactly the output of one pass over the whole image (no seams): "
        "pad the image by the halo (mirrored) and step the tiles by their output size. "
        "unet-volume does this over whole volumes in Zarr (`unet-volume predict`)."
    )


def _input(checkpoint: Checkpoint) -> str:
    trained = checkpoint.trained_input
    text = (
        "## Input\n\n"
        f"Raw intensities as in the training data; preprocessing normalises them as training did, "
        f"(x - {trained.mean:g}) / {trained.std:g}. The output is the class probabilities "
        "(soft-max)."
    )
    if any(trained.label_offset):
        offset = ", ".join(f"{v:g}" for v in trained.label_offset)
        text += (
            f"\n\nThe training labels lay ({offset}) voxels off the image's boundaries (trailing "
            "axes). unet-volume's prediction moves the image by that offset (linear "
            "interpolation) before the network, so its boundaries land where the labels put "
            "them; the bioimage.io format has no such step, so this package's own runs leave "
            "it out (as `unet-volume predict --label-offset 0,0` does)."
        )
    return text


def _made(checkpoint: Checkpoint, shipped: ShippedModel | None) -> str:
    if shipped is not None:
        lines = describe(shipped)[1:]
        return "## How it was made and measured\n\n" + "\n".join(
            f"- {line.strip()}" for line in lines
        )
    training = checkpoint.metadata.get("training") or {}
    recipe = training.get("config") or {}
    facts = [
        f"image: {training.get('image')}, labels: {training.get('labels')}",
        f"steps: {training.get('steps')}, final loss: {training.get('final_loss')}",
        f"augmentation: {recipe.get('augment')}, weight map: {recipe.get('weight_map')}",
    ]
    return "## How it was made\n\n" + "\n".join(f"- {fact}" for fact in facts if training)


def _validation(shipped: ShippedModel | None) -> str:
    measured = (
        "The figures above were measured with test-time augmentation (the 8 flips and turns), "
        "which this package's own runs do not apply. "
        if shipped is not None and shipped.predict_options.get("tta")
        else ""
    )
    return (
        "## Validation\n\n"
        f"{measured}To validate on your data: annotate a few slices, predict them "
        "(with any bioimage.io consumer, or `unet-volume predict` from the checkpoint), and "
        "score the result against the labels with `unet-volume evaluate` (pixel error and "
        "Rand error, as the ISBI 2012 challenge)."
    )
