"""What a package says of its model in words and records: name, description, citation,
training data, unet-volume's own record, and the model card (``README.md``).

The spec asks the card for a ``Validation`` section: how to check the model on new data. The
card also says what the spec cannot state as a step: the label offset prediction applies, and
that the figures were measured with test-time augmentation where they were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bioimageio.spec.dataset.v0_3 import DatasetDescr
from bioimageio.spec.model.v0_5 import CiteEntry, Doi, HttpUrl

from unet_volume.models.checkpoint import Checkpoint
from unet_volume.models.shipped import ShippedModel, describe
from unet_volume.models.unet import UNet

_CITE = {
    2: ("Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image "
        "Segmentation. MICCAI 2015.", "10.1007/978-3-319-24574-4_28"),
    3: ("Cicek, Abdulkadir, Lienkamp, Brox, Ronneberger. 3D U-Net: Learning Dense Volumetric "
        "Segmentation from Sparse Annotation. MICCAI 2016.", "10.1007/978-3-319-46723-8_49"),
}  # fmt: skip


def name(model: str | os.PathLike[str], checkpoint: Checkpoint) -> str:
    stem = Path(str(model)).stem if Path(str(model)).suffix else str(model)
    return f"unet-volume {stem} ({checkpoint.config.ndim}D U-Net)"


def description(checkpoint: Checkpoint) -> str:
    config, offset = checkpoint.config, checkpoint.trained_input.label_offset
    what = f"an ensemble of {checkpoint.members} " if checkpoint.members > 1 else "a "
    nets = "U-Nets" if checkpoint.members > 1 else "U-Net"
    text = (
        f"{what}{config.ndim}D {nets} (depth {config.depth}, {config.base_channels} base "
        "channels, valid convolutions) giving class probabilities; trained with unet-volume"
    )
    if any(offset):
        text += f"; its labels lay {', '.join(f'{v:g}' for v in offset)} voxels off the image"
    return text


def citation(checkpoint: Checkpoint) -> CiteEntry:
    """The paper of the net: the U-Net's, or the 3D U-Net's."""
    text, doi = _CITE[checkpoint.config.ndim]
    return CiteEntry(text=text, doi=Doi(doi))


def tags(checkpoint: Checkpoint) -> list[str]:
    return ["unet", "semantic-segmentation", f"{checkpoint.config.ndim}d", "pytorch", "unet-volume"]


def classes(checkpoint: Checkpoint) -> list[str]:
    """The output channels' names: the checkpoint's classes, else class0, class1, ..."""
    names = checkpoint.metadata.get("classes")
    if isinstance(names, list) and len(names) == checkpoint.config.num_classes:
        return [str(c) for c in names]
    return [f"class{i}" for i in range(checkpoint.config.num_classes)]


def training_data(checkpoint: Checkpoint, shipped: ShippedModel | None) -> DatasetDescr | None:
    """The data the net learnt from: a shipped model's record, else the checkpoint's files."""
    data = (shipped.record.get("data") or {}) if shipped else {}
    if data:
        return DatasetDescr(
            name=data["name"], description=data["name"], source=HttpUrl(data["source"])
        )
    training = checkpoint.metadata.get("training") or {}
    if not training.get("image"):
        return None
    return DatasetDescr(
        name=str(training["image"]),
        description=f"image {training['image']}, labels {training.get('labels')}",
    )


def record(checkpoint: Checkpoint, shipped: ShippedModel | None) -> dict[str, Any]:
    """What unet-volume knows of the net, as plain values: config, trained input, recipe."""
    facts: dict[str, Any] = {
        "checkpoint_sha256": checkpoint.sha256,
        "networks": checkpoint.members,
        "model": checkpoint.config.to_dict(),
        "trained_input": checkpoint.trained_input.to_metadata()["input"],
        "training": checkpoint.metadata.get("training"),
    }
    if shipped is not None:
        facts["shipped"] = {"name": shipped.name, **shipped.record}
    return json.loads(json.dumps(facts))


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
