"""A checkpoint as a bioimage.io model package (format 0.5): what other tools run it from.

``unet-volume export MODEL OUT.zip`` writes one zip that bioimageio.core, ilastik, deepImageJ,
QuPath and BiaPy read. It holds:

- the weights three ways, one network each: ``pytorch_state_dict`` with its architecture's
  source (:mod:`unet_volume.models.architecture`, which needs torch alone), ``torchscript``
  (what QuPath and deepImageJ read), and ``onnx`` where it exports cleanly: checked against
  torch on the test input, and left out, saying why, where not;
- a test input and the output it must give (``bioimageio test`` reruns it);
- the valid-convolution geometry as the spec states it: each spatial input axis takes
  ``min + n * step`` voxels (``min`` the smallest valid input, ``step`` = 2^depth) and each
  output axis is the input's minus a fixed offset (184 for the paper's net), the halo the net
  already cropped; the axes carry the voxel size and unit;
- the input normalisation the net was trained with as ``fixed_zero_mean_unit_variance``
  preprocessing, a soft-max to class probabilities as postprocessing; the label offset, which
  the spec has no step for, in the description, the documentation and ``config.unet_volume``;
- the checkpoint's recipe, figures, training data and licence, and its sha256.

This module writes the package and states its tensors; :mod:`~unet_volume.zoo.weights` writes
and checks the weights, :mod:`~unet_volume.zoo.samples` the test tensors, and
:mod:`~unet_volume.zoo.documentation` the words and records.

A network gives the same probabilities here as ``unet-volume predict`` without test-time
augmentation and without the label offset (``--label-offset 0,0``): a test checks it on the
same slices.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast, get_args

from bioimageio.spec import save_bioimageio_package
from bioimageio.spec.model.v0_5 import (
    Author,
    AxisId,
    BatchAxis,
    ChannelAxis,
    Config,
    EnsureDtypeDescr,
    EnsureDtypeKwargs,
    FileDescr,
    FixedZeroMeanUnitVarianceDescr,
    FixedZeroMeanUnitVarianceKwargs,
    InputTensorDescr,
    LicenseId,
    ModelDescr,
    OutputTensorDescr,
    ParameterizedSize,
    SizeReference,
    SoftmaxDescr,
    SoftmaxKwargs,
    SpaceInputAxis,
    SpaceOutputAxis,
    SpaceUnit,
    TensorId,
)
from torch import nn

from unet_volume.errors import InputError, UnetVolumeError
from unet_volume.models.checkpoint import Checkpoint, read_checkpoint
from unet_volume.models.shipped import ShippedModel, shipped_model
from unet_volume.models.unet import UNet
from unet_volume.output.ome import ome_unit
from unet_volume.zoo import documentation as words
from unet_volume.zoo.samples import normalized, raw_test_input, write_test_tensors
from unet_volume.zoo.weights import FORMATS, plain_network, their_warnings_quiet, write_weights

INPUT, OUTPUT = TensorId("raw"), TensorId("probabilities")


class ExportError(UnetVolumeError):
    """A package that was written but does not pass bioimageio.core's own test."""


@dataclass(frozen=True)
class PackageFacts:
    """What a package states that its checkpoint may not know.

    ``voxel_size`` is ``(z, y, x)`` in ``units`` of the training data (a shipped model's record
    has both); ``sample`` is an image to cut the test input from (its centre; else a smooth
    synthetic image at the trained mean and std).
    """

    name: str | None = None
    voxel_size: Sequence[float] | None = None
    units: str | None = None
    authors: Sequence[str] = ("unet-volume",)
    license: str = "MIT"
    sample: str | None = None
    onnx: bool = True


@dataclass(frozen=True)
class ExportReport:
    """What a package holds: its weights formats, the ones left out and why, its test shapes."""

    path: Path
    formats: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)
    test_input: tuple[int, ...] = ()
    test_output: tuple[int, ...] = ()


def export_package(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    facts: PackageFacts = PackageFacts(),
    *,
    overwrite: bool = False,
) -> ExportReport:
    """Write ``model`` (a checkpoint, an ensemble or a shipped name) as a package at ``out``.

    ``out`` is a ``.zip``. Bad arguments raise :class:`InputError` before anything is written.
    """
    out = Path(out)
    _check_out(out, overwrite)
    checkpoint, shipped = read_checkpoint(model), shipped_model(model)
    facts = _with_record(facts, shipped)
    voxel_size, units = _voxel_size(facts, checkpoint.config.ndim)
    network = checkpoint.to_model()
    net, plain = first_net(network), plain_network(checkpoint, network)
    raw = raw_test_input(net, checkpoint, facts.sample)
    with tempfile.TemporaryDirectory(prefix="unet-volume-export-") as folder:
        work = Path(folder)
        expected = write_test_tensors(work, plain, checkpoint, raw)
        x = normalized(checkpoint, raw)
        weights, left_out = write_weights(work, plain, checkpoint, x, net.period, facts.onnx)
        (work / "README.md").write_text(words.model_card(checkpoint, shipped, net))
        descr = ModelDescr(
            name=facts.name or words.name(model, checkpoint),
            description=words.description(checkpoint),
            authors=[Author(name=a) for a in facts.authors],
            cite=[words.citation(checkpoint)],
            license=LicenseId(facts.license),
            documentation=FileDescr(source=work / "README.md"),
            tags=words.tags(checkpoint),
            inputs=[_input(net, checkpoint, voxel_size, units, work)],
            outputs=[_output(net, checkpoint, voxel_size, units, work)],
            weights=weights,
            training_data=words.training_data(checkpoint, shipped),
            config=Config.model_validate({"unet_volume": words.record(checkpoint, shipped)}),
        )
        save_bioimageio_package(descr, output_path=out)
    formats = tuple(f for f in FORMATS if getattr(weights, f) is not None)
    return ExportReport(out, formats, left_out, tuple(raw.shape), tuple(expected.shape))


def first_net(network: nn.Module) -> UNet:
    """The net whose geometry a package states (an ensemble's members share one)."""
    return network if isinstance(network, UNet) else cast(UNet, network.get_submodule("members.0"))


def test_package(path: str | os.PathLike[str]) -> str:
    """Run bioimageio.core's test of a package (every weights format reproduces the test
    output); the formats it ran, or an :class:`ExportError` with the first failure."""
    from bioimageio.core import test_model

    with their_warnings_quiet():
        summary = test_model(Path(path))
    if summary.status != "passed":
        failed = [d for d in summary.details if d.status == "failed"]
        why = failed[0].name if failed else summary.status
        if failed and failed[0].errors:
            why += f": {failed[0].errors[0].msg}"
        raise ExportError(
            f"{path} fails bioimageio.core's test ({why}); the package is kept for a look"
        )
    ran = sorted(
        {str(d.loc[1]) for d in summary.details if len(d.loc) > 1 and d.loc[0] == "weights"}
    )
    return ", ".join(ran)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix != ".zip":
        raise InputError(f"{out}: a model package is a .zip; pass OUT.zip")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it, or another path")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent} is not a folder; create it or pass another path")


def _with_record(facts: PackageFacts, shipped: ShippedModel | None) -> PackageFacts:
    """A shipped model's record fills in the voxel size and units when none are passed."""
    data = (shipped.record.get("data") or {}) if shipped else {}
    if facts.voxel_size is not None or "voxel_size" not in data:
        return facts
    units = facts.units or data["units"]
    return dataclasses.replace(facts, voxel_size=data["voxel_size"], units=units)


def _voxel_size(facts: PackageFacts, ndim: int) -> tuple[tuple[float, ...], SpaceUnit | None]:
    """The spatial axes' scale (as many as the net convolves) and the spec's unit name."""
    if facts.voxel_size is None:
        return (1.0,) * ndim, None
    size = tuple(float(v) for v in facts.voxel_size)
    if len(size) != 3 or min(size) <= 0:
        raise InputError(f"voxel size {size}: pass three positive sizes Z,Y,X, e.g. 50,4,4")
    unit = ome_unit(facts.units or "nm")
    if unit not in get_args(SpaceUnit):
        raise InputError(f"unknown units {facts.units!r}; pass e.g. nm, um or micrometer")
    return size[3 - ndim :], cast(SpaceUnit, unit)


# --- the tensors' descriptions ------------------------------------------------------------------


def _input(
    net: UNet,
    checkpoint: Checkpoint,
    voxel_size: tuple[float, ...],
    units: SpaceUnit | None,
    work: Path,
) -> InputTensorDescr:
    config = checkpoint.config
    smallest = net.input_shape_for((1,) * config.ndim)
    space = [
        SpaceInputAxis(
            id=AxisId(axis), size=ParameterizedSize(min=size, step=step), scale=scale, unit=units
        )
        for axis, size, step, scale in zip(
            "zyx"[3 - config.ndim :], smallest, net.period, voxel_size
        )
    ]
    trained = checkpoint.trained_input
    names = ["raw"] if config.in_channels == 1 else [f"raw{i}" for i in range(config.in_channels)]
    return InputTensorDescr(
        id=INPUT,
        description="raw intensities, as the training data's (normalised by preprocessing)",
        axes=[BatchAxis(), ChannelAxis(channel_names=names), *space],
        test_tensor=FileDescr(source=work / "test_input.npy"),
        sample_tensor=FileDescr(source=work / "sample_input.tif"),
        preprocessing=[
            EnsureDtypeDescr(kwargs=EnsureDtypeKwargs(dtype="float32")),
            FixedZeroMeanUnitVarianceDescr(
                kwargs=FixedZeroMeanUnitVarianceKwargs(mean=trained.mean, std=trained.std)
            ),
        ],
    )


def _output(
    net: UNet,
    checkpoint: Checkpoint,
    voxel_size: tuple[float, ...],
    units: SpaceUnit | None,
    work: Path,
) -> OutputTensorDescr:
    config = checkpoint.config
    space = [
        SpaceOutputAxis(
            id=AxisId(axis),
            size=SizeReference(tensor_id=INPUT, axis_id=AxisId(axis), offset=-2 * halo),
            scale=scale,
            unit=units,
        )
        for axis, halo, scale in zip("zyx"[3 - config.ndim :], net.halo, voxel_size)
    ]
    return OutputTensorDescr(
        id=OUTPUT,
        description="class probabilities of the input's centre (valid convolutions)",
        axes=[BatchAxis(), ChannelAxis(channel_names=words.classes(checkpoint)), *space],
        test_tensor=FileDescr(source=work / "test_output.npy"),
        sample_tensor=FileDescr(source=work / "sample_output.tif"),
        postprocessing=[SoftmaxDescr(kwargs=SoftmaxKwargs(axis=AxisId("channel")))],
    )
