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

A network gives the same probabilities here as ``unet-volume predict`` without test-time
augmentation and without the label offset (``--label-offset 0,0``): a test checks it on the
same slices.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import tifffile
import torch
from bioimageio.spec import save_bioimageio_package
from bioimageio.spec.dataset.v0_3 import DatasetDescr
from bioimageio.spec.model.v0_5 import (
    ArchitectureFromFileDescr,
    Author,
    AxisId,
    BatchAxis,
    ChannelAxis,
    CiteEntry,
    Config,
    Doi,
    EnsureDtypeDescr,
    EnsureDtypeKwargs,
    FileDescr,
    FixedZeroMeanUnitVarianceDescr,
    FixedZeroMeanUnitVarianceKwargs,
    HttpUrl,
    Identifier,
    InputTensorDescr,
    LicenseId,
    ModelDescr,
    OnnxWeightsDescr,
    OutputTensorDescr,
    ParameterizedSize,
    PytorchStateDictWeightsDescr,
    SizeReference,
    SoftmaxDescr,
    SoftmaxKwargs,
    SpaceInputAxis,
    SpaceOutputAxis,
    SpaceUnit,
    TensorId,
    TorchscriptWeightsDescr,
    Version,
    WeightsDescr,
)
from torch import nn

from unet_volume.errors import InputError, UnetVolumeError
from unet_volume.geometry import Box
from unet_volume.io.volumes import open_volume
from unet_volume.models import architecture
from unet_volume.models.checkpoint import Checkpoint, read_checkpoint
from unet_volume.models.shipped import ShippedModel, shipped_model
from unet_volume.models.unet import UNet
from unet_volume.output.ome import ome_unit

FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
INPUT, OUTPUT = TensorId("raw"), TensorId("probabilities")
TEST_OUTPUT = {2: 64, 3: 12}
"""Output voxels per spatial axis of the test tensors: a few periods, seconds on a CPU."""
ONNX_TOLERANCE = 1e-4
"""Largest difference to torch's logits at which the ONNX weights are kept."""
_CITE = {
    2: ("Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image "
        "Segmentation. MICCAI 2015.", "10.1007/978-3-319-24574-4_28"),
    3: ("Cicek, Abdulkadir, Lienkamp, Brox, Ronneberger. 3D U-Net: Learning Dense Volumetric "
        "Segmentation from Sparse Annotation. MICCAI 2016.", "10.1007/978-3-319-46723-8_49"),
}  # fmt: skip


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
    network, plain = checkpoint.to_model(), _plain(checkpoint)
    raw = _test_input(network, checkpoint, facts.sample)
    with tempfile.TemporaryDirectory(prefix="unet-volume-export-") as folder:
        work = Path(folder)
        expected = _write_test_tensors(work, plain, checkpoint, raw)
        weights, left_out = _write_weights(work, plain, checkpoint, raw, facts.onnx)
        descr = ModelDescr(
            name=facts.name or _name(model, checkpoint),
            description=_description(checkpoint),
            authors=[Author(name=a) for a in facts.authors],
            cite=[CiteEntry(text=_CITE[checkpoint.config.ndim][0],
                            doi=Doi(_CITE[checkpoint.config.ndim][1]))],
            license=LicenseId(facts.license),
            documentation=FileDescr(source=_write_docs(work, checkpoint, shipped, network)),
            tags=_tags(checkpoint),
            inputs=[_input(network, checkpoint, voxel_size, units, work)],
            outputs=[_output(network, checkpoint, voxel_size, units, work)],
            weights=weights,
            training_data=_training_data(checkpoint, shipped),
            config=Config.model_validate({"unet_volume": _record(checkpoint, shipped)}),
        )  # fmt: skip
        save_bioimageio_package(descr, output_path=out)
    formats = tuple(f for f in FORMATS if getattr(weights, f) is not None)
    return ExportReport(out, formats, left_out, tuple(raw.shape), tuple(expected.shape))


def test_package(path: str | os.PathLike[str]) -> str:
    """Run bioimageio.core's test of a package (every weights format reproduces the test
    output); the formats it ran, or an :class:`ExportError` with the first failure."""
    from bioimageio.core import test_model

    with _their_warnings_quiet():
        summary = test_model(Path(path))
    if summary.status != "passed":
        failed = [d for d in summary.details if d.status == "failed"]
        first = failed[0] if failed else None
        why = (
            f"{first.name}: {first.errors[0].msg if first and first.errors else ''}"
            if first
            else summary.status
        )
        raise ExportError(
            f"{path} fails bioimageio.core's test ({why}); the package is kept for a look"
        )
    ran = sorted(
        {str(d.loc[1]) for d in summary.details if len(d.loc) > 1 and d.loc[0] == "weights"}
    )
    return ", ".join(ran)


@contextlib.contextmanager
def _their_warnings_quiet() -> Iterator[None]:
    """torch 2.13 deprecates TorchScript and its exporters warn of their own internals: not
    the user's to act on, and fatal where warnings are errors (as in this project's tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


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
    return _replace(facts, voxel_size=data["voxel_size"], units=facts.units or data["units"])


def _replace(facts: PackageFacts, **changes: Any) -> PackageFacts:
    values = {**facts.__dict__, **changes}
    return PackageFacts(**values)


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


def _plain(checkpoint: Checkpoint) -> nn.Module:
    """The network as the package's architecture builds it, with the checkpoint's weights."""
    net = _architecture_of(checkpoint)
    net.load_state_dict(checkpoint.to_model().state_dict())
    return net.eval()


def _architecture_kwargs(checkpoint: Checkpoint) -> dict[str, Any]:
    kwargs: dict[str, Any] = checkpoint.config.to_dict()
    return kwargs if checkpoint.members == 1 else {"networks": checkpoint.members, **kwargs}


def _architecture_of(checkpoint: Checkpoint) -> nn.Module:
    kwargs = _architecture_kwargs(checkpoint)
    if checkpoint.members == 1:
        return architecture.UNet(**kwargs)
    return architecture.ensemble(**kwargs)


def _callable(checkpoint: Checkpoint) -> str:
    return "UNet" if checkpoint.members == 1 else "ensemble"


# --- the test tensors ---------------------------------------------------------------------------


def _first_net(network: nn.Module) -> UNet:
    """The net whose geometry a package states (an ensemble's members share one)."""
    return network if isinstance(network, UNet) else cast(UNet, network.get_submodule("members.0"))


def _test_input(network: nn.Module, checkpoint: Checkpoint, sample: str | None) -> np.ndarray:
    """``(1, c, [z,] y, x)`` raw intensities (before normalisation), float32."""
    net, ndim = _first_net(network), checkpoint.config.ndim
    shape = net.input_shape_for((TEST_OUTPUT[ndim],) * ndim)
    channels = checkpoint.config.in_channels
    if sample is None:
        trained = checkpoint.trained_input
        image = trained.mean + trained.std * _smooth_noise((channels, *shape))
    else:
        image = _cut(sample, shape, channels)
    return image[np.newaxis].astype(np.float32)


def _smooth_noise(shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance noise smoothed over a few voxels: edges and blobs for a net to answer."""
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(
        np.random.default_rng(0).standard_normal(shape), (0, *[2] * (len(shape) - 1))
    )
    return (noise - noise.mean()) / noise.std()


def _cut(sample: str, shape: tuple[int, ...], channels: int) -> np.ndarray:
    """The centre of ``sample`` as large as ``shape`` (mirrored where the image is smaller)."""
    volume = open_volume(sample)
    if volume.channels != channels:
        raise InputError(
            f"{sample} has {volume.channels} channels but the net takes {channels}; "
            "pass an image like its training data"
        )
    full = (1, *shape) if len(shape) == 2 else shape
    begin = [(n - s) // 2 for n, s in zip(volume.shape, full)]
    data = volume.read(Box.from_shape(full, begin=begin)).astype(np.float32)
    return data[:, 0] if len(shape) == 2 else data


def _write_test_tensors(
    work: Path, plain: nn.Module, checkpoint: Checkpoint, raw: np.ndarray
) -> np.ndarray:
    """The test input and the probabilities the package must give for it."""
    np.save(work / "test_input.npy", raw)
    expected = _probabilities(plain, checkpoint, raw)
    np.save(work / "test_output.npy", expected)
    # The same as images a person can open (the spec's sample tensors; imageio reads TIFF).
    tifffile.imwrite(work / "sample_input.tif", raw[0])
    tifffile.imwrite(work / "sample_output.tif", expected[0])
    return expected


def _normalized(checkpoint: Checkpoint, raw: np.ndarray) -> torch.Tensor:
    trained = checkpoint.trained_input
    return torch.from_numpy((raw - np.float32(trained.mean)) / np.float32(trained.std))


def _probabilities(plain: nn.Module, checkpoint: Checkpoint, raw: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits = plain(_normalized(checkpoint, raw))
    return np.asarray(logits.float().softmax(1).numpy(), dtype=np.float32)


# --- the weights --------------------------------------------------------------------------------


def _write_weights(
    work: Path, plain: nn.Module, checkpoint: Checkpoint, raw: np.ndarray, onnx: bool
) -> tuple[WeightsDescr, dict[str, str]]:
    version = Version(torch.__version__.split("+")[0])
    source = work / "architecture.py"
    shutil.copyfile(inspect.getfile(architecture), source)
    torch.save(plain.state_dict(), work / "weights.pt")
    state_dict = PytorchStateDictWeightsDescr(
        source=work / "weights.pt",
        architecture=ArchitectureFromFileDescr(
            source=source,
            callable=Identifier(_callable(checkpoint)),
            kwargs=_architecture_kwargs(checkpoint),
        ),
        pytorch_version=version,
    )
    with _their_warnings_quiet():  # QuPath and deepImageJ read TorchScript alone
        torch.jit.script(plain).save(str(work / "weights.torchscript.pt"))
    script = TorchscriptWeightsDescr(
        source=work / "weights.torchscript.pt",
        pytorch_version=version,
        parent="pytorch_state_dict",
    )
    left_out: dict[str, str] = {}
    onnx_descr = None
    if onnx:
        why = _write_onnx(work / "weights.onnx", plain, checkpoint, raw)
        if why is None:
            onnx_descr = OnnxWeightsDescr(
                source=work / "weights.onnx", opset_version=ONNX_OPSET, parent="pytorch_state_dict"
            )
        else:
            left_out["onnx"] = why
    else:
        left_out["onnx"] = "not asked for (--no-onnx)"
    weights = WeightsDescr(pytorch_state_dict=state_dict, torchscript=script, onnx=onnx_descr)
    return weights, left_out


ONNX_OPSET = 18


def _write_onnx(
    path: Path, plain: nn.Module, checkpoint: Checkpoint, raw: np.ndarray
) -> str | None:
    """Export to ONNX with free batch and spatial sizes and check it on the test input and on
    a larger one; None when it holds, else why it was left out."""
    x = _normalized(checkpoint, raw)
    free = torch.export.Dim.AUTO
    dims = {axis: free for axis in (0, *range(2, x.dim()))}
    try:
        import onnxruntime

        with _their_warnings_quiet():
            torch.onnx.export(
                plain, (x,), str(path), dynamo=True, input_names=["raw"],
                output_names=["logits"], dynamic_shapes=(dims,), opset_version=ONNX_OPSET,
                verbose=False, external_data=False,
            )  # fmt: skip
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        step = _first_net(checkpoint.to_model()).period
        larger = torch.nn.functional.pad(x, (0, step[-1]))  # the next valid size along x
        for sample in (x, torch.cat([larger, larger])):
            (got,) = session.run(None, {"raw": sample.numpy()})
            with torch.inference_mode():
                want = plain(sample).numpy()
            if got.shape != want.shape or float(np.abs(got - want).max()) > ONNX_TOLERANCE:
                return (
                    f"ONNX Runtime's output differs from torch's on a {tuple(sample.shape)} input"
                )
    except Exception as error:
        path.unlink(missing_ok=True)
        return f"the ONNX export failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    return None


# --- the tensors' descriptions ------------------------------------------------------------------


def _spatial_axes(ndim: int) -> str:
    return "yx" if ndim == 2 else "zyx"


def _input(
    network: nn.Module,
    checkpoint: Checkpoint,
    voxel_size: tuple[float, ...],
    units: SpaceUnit | None,
    work: Path,
) -> InputTensorDescr:
    net, config = _first_net(network), checkpoint.config
    smallest = net.input_shape_for((1,) * config.ndim)
    space = [
        SpaceInputAxis(
            id=AxisId(axis), size=ParameterizedSize(min=size, step=step), scale=scale, unit=units
        )
        for axis, size, step, scale in zip(
            _spatial_axes(config.ndim), smallest, net.period, voxel_size
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
    network: nn.Module,
    checkpoint: Checkpoint,
    voxel_size: tuple[float, ...],
    units: SpaceUnit | None,
    work: Path,
) -> OutputTensorDescr:
    net, config = _first_net(network), checkpoint.config
    space = [
        SpaceOutputAxis(
            id=AxisId(axis),
            size=SizeReference(tensor_id=INPUT, axis_id=AxisId(axis), offset=-2 * halo),
            scale=scale,
            unit=units,
        )
        for axis, halo, scale in zip(_spatial_axes(config.ndim), net.halo, voxel_size)
    ]
    return OutputTensorDescr(
        id=OUTPUT,
        description="class probabilities of the input's centre (valid convolutions)",
        axes=[BatchAxis(), ChannelAxis(channel_names=_classes(checkpoint)), *space],
        test_tensor=FileDescr(source=work / "test_output.npy"),
        sample_tensor=FileDescr(source=work / "sample_output.tif"),
        postprocessing=[SoftmaxDescr(kwargs=SoftmaxKwargs(axis=AxisId("channel")))],
    )


def _classes(checkpoint: Checkpoint) -> list[str]:
    classes = checkpoint.metadata.get("classes")
    if isinstance(classes, list) and len(classes) == checkpoint.config.num_classes:
        return [str(c) for c in classes]
    return [f"class{i}" for i in range(checkpoint.config.num_classes)]


# --- words: name, description, documentation, record -------------------------------------------


def _name(model: str | os.PathLike[str], checkpoint: Checkpoint) -> str:
    stem = Path(str(model)).stem if Path(str(model)).suffix else str(model)
    return f"unet-volume {stem} ({checkpoint.config.ndim}D U-Net)"


def _description(checkpoint: Checkpoint) -> str:
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


def _tags(checkpoint: Checkpoint) -> list[str]:
    return ["unet", "semantic-segmentation", f"{checkpoint.config.ndim}d", "pytorch", "unet-volume"]


def _training_data(checkpoint: Checkpoint, shipped: ShippedModel | None) -> DatasetDescr | None:
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


def _record(checkpoint: Checkpoint, shipped: ShippedModel | None) -> dict[str, Any]:
    """What unet-volume knows of the net, as plain values: config, trained input, recipe."""
    record: dict[str, Any] = {
        "checkpoint_sha256": checkpoint.sha256,
        "networks": checkpoint.members,
        "model": checkpoint.config.to_dict(),
        "trained_input": checkpoint.trained_input.to_metadata()["input"],
        "training": checkpoint.metadata.get("training"),
    }
    if shipped is not None:
        record["shipped"] = {"name": shipped.name, **shipped.record}
    return json.loads(json.dumps(record))


def _write_docs(
    work: Path, checkpoint: Checkpoint, shipped: ShippedModel | None, network: nn.Module
) -> Path:
    from unet_volume.zoo.documentation import model_card

    path = work / "README.md"
    path.write_text(model_card(checkpoint, shipped, _first_net(network)))
    return path
