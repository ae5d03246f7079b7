"""The ``unet-volume`` command: ``train``, ``predict``, ``evaluate`` and ``weights``.

Thin over the library: parse, call, report. A :class:`UnetVolumeError` (bad
input, existing output, not a checkpoint, ...) becomes one line on stderr and
exit code 2, with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from unet_volume.errors import InputError, UnetVolumeError
from unet_volume.prediction_store import OUTPUT_DTYPES

if TYPE_CHECKING:
    from distributed import Client

EXIT_USAGE = 2


def parse_ints(text: str) -> tuple[int, ...]:
    """``"1,512,512"`` -> ``(1, 512, 512)``."""
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,512,512, got {text!r}"
        ) from None


def parse_floats(text: str) -> tuple[float, ...]:
    """``"50,4,4"`` -> ``(50.0, 4.0, 4.0)``."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 50,4,4, got {text!r}"
        ) from None


def parse_range(text: str) -> tuple[int, int]:
    """``"0:20"`` -> ``(0, 20)`` (half-open)."""
    try:
        begin, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BEGIN:END like 0:20, got {text!r}") from None
    return begin, end


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet-volume",
        description="Train a U-Net on annotated slices and segment whole microscopy volumes with it.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details (INFO level)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(
        commands.add_parser(
            "predict",
            help="segment a volume with a trained model",
            description="Predict class probabilities and a segmentation for a whole volume, block by "
            "block on a Dask cluster (overlap-tile: exact stitching, no seams, no blending).",
        )
    )
    _add_train(
        commands.add_parser(
            "train",
            help="train a U-Net on an image volume and its labels",
            description="Train a U-Net on random tiles of IMAGE with LABELS (weighted soft-max cross entropy) "
            "and save the model to --out.",
        )
    )
    _add_evaluate(
        commands.add_parser(
            "evaluate",
            help="score a prediction against labels: pixel error, Rand error, VOI, IoU, Dice",
            description="Score PREDICTION against LABELS slice by slice and for the whole volume (ISBI 2012 "
            "metrics: pixel error, adapted Rand error, variation of information; IoU and Dice of the foreground).",
        )
    )
    _add_weights(
        commands.add_parser(
            "weights",
            help="compute the paper's loss-weight map of a label volume",
            description="Write w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) for LABELS (0 = background, "
            "cells 1..n, or a binary mask whose connected components are the cells) to OUTPUT, chunk by chunk "
            "on a Dask cluster. Pass OUTPUT to `unet-volume train --weights`.",
        )
    )
    _add_convert(
        commands.add_parser(
            "convert",
            help="copy a TIFF stack (or any input) into a chunked Zarr v3 array",
            description="Copy INPUT into a Zarr v3 array with dims (z, y, x) and its voxel size, chunk by chunk, "
            "so that prediction blocks read only their own region.",
        )
    )
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
        f"wrote {volume.url}: {_fmt(volume.shape)} {volume.dtype}, voxel size {volume.voxel_size} {volume.units}"
    )


def _add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "labels", help="instance labels or binary mask: Zarr array or TIFF stack, (z, y, x)"
    )
    p.add_argument("output", help="Zarr v3 float32 array to create")
    p.add_argument(
        "--w0", type=float, default=10.0, help="border weight w0 (default 10, as the paper)"
    )
    p.add_argument(
        "--sigma",
        type=float,
        default=5.0,
        help="border width sigma, in voxels or in --voxel-size units (default 5, as the paper)",
    )
    p.add_argument(
        "--ndim",
        type=int,
        choices=(2, 3),
        default=2,
        help="2: cells and distances per z slice (default); 3: in the volume",
    )
    p.add_argument(
        "--voxel-size",
        type=parse_floats,
        metavar="Z,Y,X",
        help="physical voxel size: distances and sigma become physical (anisotropic volumes)",
    )
    p.add_argument(
        "--chunk-shape",
        type=parse_ints,
        metavar="Z,Y,X",
        help="voxels per task and output chunk (default 1,1024,1024 in 2D, 128,128,128 in 3D)",
    )
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
    from unet_volume.cluster_spec import connect

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers} must be at least 1")
    return connect(args.scheduler, args.cluster, n_workers=args.workers)


def _weights(args: argparse.Namespace) -> None:
    from unet_volume.weight_map import WeightMapConfig, compute_weight_volume

    config = WeightMapConfig(
        w0=args.w0, sigma=args.sigma, ndim=args.ndim, voxel_size=args.voxel_size
    )
    chunks = args.chunk_shape or ((1, 1024, 1024) if args.ndim == 2 else (128, 128, 128))
    with _client(args) as client:
        _say(f"Dask dashboard: {client.dashboard_link}")
        report = compute_weight_volume(
            args.labels,
            args.output,
            config,
            chunk_shape=chunks,
            client=client,
            overwrite=args.overwrite,
            balance_z_range=args.balance_z_range,
        )
    print(
        f"wrote {report.output_url}: {report.blocks} blocks, {report.voxels:,} voxels in {report.seconds:.1f} s "
        f"({report.voxels_per_second / 1e6:.2f} Mvoxel/s); class weights {report.class_weights}, "
        f"halo {report.halo}"
    )


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

    from unet_volume.metrics import evaluate

    report = evaluate(args.prediction, args.labels, z_range=args.z_range)
    print(report.to_table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input",
        help="input volume: a Zarr array (path or fsspec URL, v2 or v3) or a TIFF "
        "stack, shape (z, y, x) or (c, z, y, x)",
    )
    p.add_argument(
        "output", help="output Zarr v3 group to create (probabilities, segmentation, coordinates)"
    )
    p.add_argument(
        "--model", required=True, help="checkpoint written by `unet-volume train` or save_model"
    )
    p.add_argument(
        "--block-shape",
        type=parse_ints,
        metavar="Z,Y,X",
        help="voxels per task and per output chunk; multiples of 2**depth on convolved "
        "axes (default 1,512,512 for 2D models, 64,64,64 for 3D)",
    )
    p.add_argument(
        "--tile-shape",
        type=parse_ints,
        metavar="Z,Y,X",
        help="smallest output of one forward pass; a block runs several tiles when "
        "it is larger (default: the block shape)",
    )
    p.add_argument(
        "--output-dtype",
        default="uint8",
        choices=OUTPUT_DTYPES,
        help="stored probability type; uint8 stores round(p * 255) (default uint8)",
    )
    p.add_argument(
        "--voxel-size",
        type=parse_floats,
        metavar="Z,Y,X",
        help="physical voxel size for the output coordinates (default: read from the input)",
    )
    p.add_argument("--units", help="units of the voxel size (default: the input's, else nm)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average over the 8 flips and quarter turns of each tile "
        "(8x slower; stitching stays exact)",
    )
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
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    p.add_argument("--steps", type=int, help="stop after this many steps (default: only --minutes)")
    p.add_argument(
        "--z-range",
        type=parse_range,
        metavar="BEGIN:END",
        help="train on slices BEGIN..END-1 only, e.g. 0:20 (default: all)",
    )
    p.add_argument(
        "--validation-z-range",
        type=parse_range,
        metavar="BEGIN:END",
        help="held-out slices scored every --validate-every steps, e.g. 20:25 (default: none)",
    )
    p.add_argument(
        "--validate-every", type=int, default=100, help="steps between validations (default 100)"
    )
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
    p.add_argument("--ndim", type=int, default=2, choices=(2, 3), help="2D or 3D U-Net (default 2)")
    p.add_argument(
        "--depth", type=int, default=4, help="number of poolings (default 4, as the paper)"
    )
    p.add_argument(
        "--base-channels",
        type=int,
        default=16,
        help="channels of the first level (the paper: 64; default 16 for CPUs)",
    )
    p.add_argument("--classes", type=int, default=2, help="number of classes (default 2)")
    p.add_argument(
        "--tile-output",
        type=parse_ints,
        metavar="Z,Y,X",
        help="output shape of one training tile (default 1,132,132)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="tiles per step (default 4)")
    p.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="adam, or sgd with momentum 0.99 as the paper (default adam)",
    )
    p.add_argument("--lr", type=float, help="learning rate (default: the optimizer's default)")
    p.add_argument(
        "--lr-schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="cosine decay over the run's steps or minutes, or constant (default cosine)",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)"
    )
    p.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="processes that read and augment tiles (default 0: in the training process)",
    )
    p.add_argument(
        "--augment",
        choices=("plain", "paper", "none"),
        default="plain",
        help="plain: random flips and right-angle turns; paper: elastic deformation (3x3 grid, "
        "10 px), any rotation, flips and gray-value changes; none (default plain)",
    )
    p.add_argument("--no-class-balance", action="store_true", help="unweighted cross entropy")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_train)


def _predict(args: argparse.Namespace) -> None:
    from unet_volume.predict import PredictOptions, plan_prediction, run_plan

    options = PredictOptions(
        args.block_shape,
        args.tile_shape,
        args.output_dtype,
        args.voxel_size,
        args.units,
        args.overwrite,
        args.tta,
    )
    plan = plan_prediction(args.model, args.input, args.output, options)
    client = _client(args)  # options checked before anything is said or started
    _say(
        f"{plan.num_blocks} blocks of {_fmt(plan.block_shape)} over a {_fmt(plan.volume.shape)} volume; "
        f"tile {_fmt(plan.geometry.input_shape)} -> {_fmt(plan.geometry.output_shape)}"
    )
    with client as active:
        _say(f"Dask dashboard: {active.dashboard_link}")
        report = run_plan(plan, active, progress=not args.no_progress)
    print(
        f"wrote {report.output_url}: {report.blocks} blocks, {report.voxels:,} voxels in "
        f"{report.seconds:.1f} s ({report.voxels_per_second / 1e6:.2f} Mvoxel/s)\n"
        "open it with:\n"
        f"    import xarray as xr; ds = xr.open_zarr({report.output_url!r})\n"
        f"    # or: from unet_volume import open_prediction; ds = open_prediction({report.output_url!r})"
    )


def _train(args: argparse.Namespace) -> None:
    from unet_volume.train import TrainConfig, train

    options = {
        "base_channels": args.base_channels,
        "depth": args.depth,
        "ndim": args.ndim,
        "num_classes": args.classes,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "minutes": args.minutes,
        "steps": args.steps,
        "z_range": args.z_range,
        "seed": args.seed,
        "augment": args.augment,
        "class_balance": not args.no_class_balance,
        "validation_z_range": args.validation_z_range,
        "validate_every": args.validate_every,
        "lr_schedule": args.lr_schedule,
        "checkpoint_every": args.checkpoint_every,
        "loader_workers": args.loader_workers,
    }
    if args.tile_output is not None:
        options["tile_output"] = args.tile_output
    if args.lr is not None:
        options["learning_rate"] = args.lr
    report = train(
        args.image,
        args.labels,
        args.out,
        TrainConfig(**options),
        weights=args.weights,
        mask=args.mask,
        resume=args.resume,
        progress=not args.no_progress,
    )
    validation = report.curve.validation[-1] if report.curve.validation else None
    scores = f", validation pixel error {validation['pixel_error']:.4f}" if validation else ""
    print(
        f"trained {report.steps} steps in {report.seconds:.0f} s, final loss {report.final_loss:.4f}{scores}; "
        f"model saved to {report.checkpoint} (curve: {report.checkpoint}.curve.png)"
    )


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(level)  # it sets INFO on its own loggers
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
