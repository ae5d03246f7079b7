"""The ``unet-volume`` command: ``train``, ``predict``, ``evaluate`` and ``weights``.

Thin over the library: parse, call, report. A :class:`UnetVolumeError` (bad
input, existing output, not a checkpoint, ...) becomes one line on stderr and
exit code 2, with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from unet_volume.errors import InputError, UnetVolumeError
from unet_volume.options import (
    add_options,
    options_from,
    parse_floats,
    parse_ints,
    parse_range,
    parse_sigma,
    show,
)
from unet_volume.predict_config import PredictOptions
from unet_volume.train_config import TrainConfig
from unet_volume.unet_config import UNetConfig
from unet_volume.weight_map import WEIGHT_BLOCK, WeightMapConfig

if TYPE_CHECKING:
    from distributed import Client

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet-volume",
        description="Train a U-Net on annotated slices and segment whole microscopy volumes "
        "with it.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details (INFO level)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add, summary, description in COMMANDS:
        add(commands.add_parser(name, help=summary, description=description))
    return parser


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="TIFF stack or Zarr array, (z, y, x) or (c, z, y, x)")
    p.add_argument("output", help="the Zarr array to write (path or fsspec URL)")
    p.add_argument(
        "--chunks",
        type=parse_ints,
        default=(1, 512, 512),
        metavar="Z,Y,X",
        help="chunk shape (default 1,512,512)",
    )
    p.add_argument(
        "--voxel-size", type=parse_floats, metavar="Z,Y,X", help="physical voxel size, e.g. 50,4,4"
    )
    p.add_argument("--units", help="units of --voxel-size (default nm)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> None:
    from unet_volume.storage import convert_to_zarr

    volume = convert_to_zarr(
        args.input,
        args.output,
        chunks=args.chunks,
        voxel_size=args.voxel_size,
        units=args.units,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {volume.url}: {_fmt(volume.shape)} {volume.dtype}, "
        f"voxel size {volume.voxel_size} {volume.units}"
    )


def _add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "labels", help="instance labels or binary mask: Zarr array or TIFF stack, (z, y, x)"
    )
    p.add_argument("output", help="Zarr v3 float32 array to create")
    add_options(p, WeightMapConfig(), skip={"sigma", "class_weights", "binary"})
    p.add_argument(
        "--sigma",
        dest="sigma_length",
        type=parse_sigma,
        default=(WeightMapConfig().sigma, "px"),
        metavar="LENGTH",
        help=f"border width sigma: 5 or 5px in voxels (a bare number is voxels), 20nm in the "
        f"units of --voxel-size (default {WeightMapConfig().sigma:g} voxels, as the paper)",
    )
    p.add_argument(
        "--block-shape",
        type=parse_ints,
        metavar="Z,Y,X",
        help="voxels per task and output chunk (default "
        f"{show(WEIGHT_BLOCK[2])} in 2D, {show(WEIGHT_BLOCK[3])} in 3D)",
    )
    p.add_argument("--chunk-shape", type=parse_ints, help=argparse.SUPPRESS)  # the old name
    p.add_argument(
        "--balance-z-range",
        type=parse_range,
        metavar="BEGIN:END",
        help="count the class frequencies over these slices only (the training slices, so "
        "held-out ones stay unseen); default all",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _add_cluster_options(p)
    p.set_defaults(run=_weights)


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 "
        "(default: start a LocalCluster)",
    )
    where.add_argument(
        "--cluster",
        metavar="SPEC",
        help="start the cluster a spec describes: a name in deploy/clusters (local, slurm-gpu, "
        "k8s-gpu) or a YAML path",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes of the LocalCluster, one thread each (default: one per core)",
    )


def _client(args: argparse.Namespace) -> AbstractContextManager[Client]:
    """The Dask client the cluster options ask for."""
    from unet_volume.cluster import open_client

    # distributed sets INFO on its loggers when first imported: quiet them after that import.
    logging.getLogger("distributed").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.workers is not None and args.workers < 1:  # in the CLI's words, not the library's
        raise InputError(f"--workers {args.workers} must be at least 1")
    # Workers we start print to our stderr: a failed block is reported once, in one line.
    quiet = not args.verbose and not args.scheduler
    return open_client(args.scheduler, args.cluster, n_workers=args.workers, quiet=quiet)


def _weights(args: argparse.Namespace) -> None:
    from unet_volume.weight_volume import compute_weight_volume

    config = weight_map_config_from(args)
    voxels = ", ".join(
        f"{a} {config.sigma / v:g}" for a, v in zip("zyx"[3 - config.ndim :], config.sampling)
    )
    physical = f" ({config.sigma:g} in --voxel-size units)" if config.voxel_size else ""
    _say(f"sigma in voxels: {voxels}{physical}")
    block_shape = _weight_block_shape(args)  # checked before a cluster starts
    with _client(args) as client:
        _say(f"Dask dashboard: {client.dashboard_link}")
        report = compute_weight_volume(
            args.labels,
            args.output,
            config,
            block_shape=block_shape,
            client=client,
            overwrite=args.overwrite,
            balance_z_range=args.balance_z_range,
        )
    print(
        f"wrote {report.output_url}: {report.blocks} blocks, {report.voxels:,} voxels in "
        f"{report.seconds:.1f} s ({report.voxels_per_second / 1e6:.2f} Mvoxel/s); "
        f"class weights {report.class_weights}, "
        f"halo {report.halo}"
    )


def weight_map_config_from(args: argparse.Namespace) -> WeightMapConfig:
    """The weight map that ``unet-volume weights``'s options describe, sigma converted.

    WeightMapConfig takes sigma in the units of ``voxel_size`` when one is given: a sigma in
    voxels becomes that many of the finest voxel size along the weighed axes.
    """
    value, unit = args.sigma_length
    config = options_from(args, WeightMapConfig)
    if unit != "px" and config.voxel_size is None:
        raise InputError(
            f"--sigma {value:g}{unit} is a physical length but no --voxel-size was given; "
            f"pass --voxel-size Z,Y,X in {unit}, or --sigma in voxels, e.g. --sigma 5px"
        )
    sigma = value * min(config.sampling) if unit == "px" else value
    return dataclasses.replace(config, sigma=sigma)


def _weight_block_shape(args: argparse.Namespace) -> tuple[int, ...] | None:
    """``--block-shape``, or its old name ``--chunk-shape`` with a warning."""
    if args.chunk_shape is None:
        return typing.cast("tuple[int, ...] | None", args.block_shape)
    if args.block_shape is not None:
        raise InputError("--chunk-shape is the old name of --block-shape; pass --block-shape only")
    print(
        "unet-volume weights: warning: --chunk-shape is deprecated; pass --block-shape "
        "(a block is one task and one output chunk)",
        file=sys.stderr,
    )
    return typing.cast("tuple[int, ...]", args.chunk_shape)


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prediction",
        help="prediction group written by `unet-volume predict` (its segmentation is "
        "scored), or a Zarr array / TIFF stack of class indices",
    )
    p.add_argument(
        "labels",
        help="labels of the same (z, y, x) shape: Zarr array or TIFF stack; with 2 classes "
        "any nonzero label is class 1 (0/255 ISBI labels work)",
    )
    p.add_argument(
        "--z-range",
        type=parse_range,
        metavar="BEGIN:END",
        help="score slices BEGIN..END-1 only, e.g. 20:25 (default: all)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the report to FILE as JSON")
    p.set_defaults(run=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from unet_volume.evaluation import evaluate

    report = evaluate(args.prediction, args.labels, z_range=args.z_range)
    print(report.to_table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "image",
        help="the volume to segment: a Zarr array (path or fsspec URL, v2 or v3) or a TIFF "
        "stack, shape (z, y, x) or (c, z, y, x)",
    )
    p.add_argument(
        "output", help="output Zarr v3 group to create (probabilities, segmentation, coordinates)"
    )
    p.add_argument(
        "--model", required=True, help="checkpoint written by `unet-volume train` or save_model"
    )
    add_options(p, PredictOptions())
    _add_cluster_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_predict)


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "image", help="image volume: Zarr array or TIFF stack, (z, y, x) or (c, z, y, x)"
    )
    p.add_argument(
        "labels",
        help="label volume of the same (z, y, x) shape: class indices; with 2 "
        "classes any nonzero label is class 1",
    )
    p.add_argument(
        "--out", required=True, help="checkpoint file to write (and update during training)"
    )
    add_options(p, TrainConfig())
    add_options(p, TrainConfig().model, skip={"in_channels"})
    p.add_argument(
        "--weights",
        metavar="VOLUME",
        help="per-voxel loss weights of the same shape, e.g. from `unet-volume weights` "
        "(default: inverse class frequencies)",
    )
    p.add_argument(
        "--mask",
        metavar="VOLUME",
        help="annotation mask of the same shape: voxels where it is 0 do not count",
    )
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue from this checkpoint (weights, optimizer, curve); --steps counts the total",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_train)


def _predict(args: argparse.Namespace) -> None:
    from unet_volume.predict import plan_prediction, run_plan

    options = options_from(args, PredictOptions)
    plan = plan_prediction(args.model, args.image, args.output, options)
    existing = plan.existing
    if existing is not None and existing.complete:
        print(f"{plan.output_url} is complete ({existing.total} blocks): nothing to do")
        return
    client = _client(args)  # options checked before anything is said or started
    _say(
        f"{plan.num_blocks} blocks of {_fmt(plan.block_shape)} over a "
        f"{_fmt(plan.volume.shape)} volume; "
        f"tile {_fmt(plan.geometry.input_shape)} -> {_fmt(plan.geometry.output_shape)}"
    )
    if existing is not None:
        _say(
            f"resuming {plan.output_url}: {existing.done} of {existing.total} blocks done, "
            f"{existing.total - existing.done} to go"
        )
    with client as active:
        _say(f"Dask dashboard: {active.dashboard_link}")
        report = run_plan(plan, active, progress=not args.no_progress)
    resumed = f" (and {report.skipped} done before)" if report.skipped else ""
    print(
        f"wrote {report.output_url}: {report.blocks} blocks{resumed}, {report.voxels:,} voxels in "
        f"{report.seconds:.1f} s ({report.voxels_per_second / 1e6:.2f} Mvoxel/s)\n"
        "open it with:\n"
        f"    import xarray as xr; ds = xr.open_zarr({report.output_url!r})\n"
        "    # or: from unet_volume import open_prediction; "
        f"ds = open_prediction({report.output_url!r})"
    )


def _add_status(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "output", help="a prediction written (or being written) by `unet-volume predict`"
    )
    p.add_argument(
        "--errors", type=int, default=5, metavar="N", help="show the first N failures (default 5)"
    )
    p.set_defaults(run=_status)


def _status(args: argparse.Namespace) -> None:
    from unet_volume.prediction_store import read_status

    status = read_status(args.output)
    print(status.summary())
    identity = status.identity
    if identity:
        source = identity.get("input", {})
        print(
            f"run: model sha256 {str(identity.get('model_sha256'))[:12]}, blocks "
            f"{_fmt(identity.get('block_shape', []))}, dtype {identity.get('output_dtype')}, "
            f"input {source.get('url')} {_fmt(source.get('shape', []))}"
        )
    for failure in status.failures[: args.errors]:
        print(f"failed: {failure}")
    if not status.complete:
        print("run the same `unet-volume predict` command again to resume")


def _train(args: argparse.Namespace) -> None:
    from unet_volume.train import train

    report = train(
        args.image,
        args.labels,
        args.out,
        train_config_from(args),
        weights=args.weights,
        mask=args.mask,
        resume=args.resume,
        progress=not args.no_progress,
    )
    validation = report.curve.validation[-1] if report.curve.validation else None
    scores = f", validation pixel error {validation['pixel_error']:.4f}" if validation else ""
    print(
        f"trained {report.steps} steps in {report.seconds:.0f} s, "
        f"final loss {report.final_loss:.4f}{scores}; "
        f"model saved to {report.checkpoint} (curve: {report.checkpoint}.curve.png)"
    )


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    """The recipe that ``unet-volume train``'s options describe."""
    return options_from(args, TrainConfig, model=options_from(args, UNetConfig))


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


COMMANDS: list[tuple[str, Callable[[argparse.ArgumentParser], None], str, str]] = [
    (
        "predict",
        _add_predict,
        "segment a volume with a trained model",
        "Predict class probabilities and a segmentation for a whole volume, block by block on "
        "a Dask cluster (overlap-tile: exact stitching, no seams, no blending).",
    ),
    (
        "train",
        _add_train,
        "train a U-Net on an image volume and its labels",
        "Train a U-Net on random tiles of IMAGE with LABELS (weighted soft-max cross entropy) "
        "and save the model to --out.",
    ),
    (
        "evaluate",
        _add_evaluate,
        "score a prediction against labels: pixel error, Rand error, VOI, IoU, Dice",
        "Score PREDICTION against LABELS slice by slice and for the whole volume (ISBI 2012 "
        "metrics: pixel error, adapted Rand error, variation of information; IoU and Dice of "
        "the foreground).",
    ),
    (
        "weights",
        _add_weights,
        "compute the paper's loss-weight map of a label volume",
        "Write w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) for LABELS (0 = background, "
        "cells 1..n, or a binary mask whose connected components are the cells) to OUTPUT, "
        "block by block on a Dask cluster. Pass OUTPUT to `unet-volume train --weights`.",
    ),
    (
        "status",
        _add_status,
        "how far a prediction got: blocks done, failed and missing, and the first errors",
        "Print the state of the run writing OUTPUT (done / failed / missing / total blocks), "
        "the run's identity (model, geometry, dtype, input) and its first failures.",
    ),
    (
        "convert",
        _add_convert,
        "copy a TIFF stack (or any input) into a chunked Zarr v3 array",
        "Copy INPUT into a Zarr v3 array with dims (z, y, x) and its voxel size, chunk by "
        "chunk, so that prediction blocks read only their own region.",
    ),
]
"""Each command: name, the function that adds its options, its --help line and description."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except UnetVolumeError as error:
        print(f"unet-volume {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"unet-volume {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
