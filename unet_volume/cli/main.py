"""The ``unet-volume`` command: ``predict``, ``status``, ``evaluate``, ``convert`` here, and
``train`` and ``weights`` from :mod:`unet_volume.cli.train`.

Thin over the library: parse, call, report. A :class:`UnetVolumeError` (bad
input, existing output, not a checkpoint, ...) becomes one line on stderr and
exit code 2, with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from unet_volume.cli.common import (
    add_cluster_options,
    add_old_name,
    apply_old_names,
    client_from,
    fmt,
    say,
)
from unet_volume.cli.segment import add_objects, add_segment
from unet_volume.cli.train import add_ensemble, add_train, add_weights
from unet_volume.cli.zoo import add_export
from unet_volume.errors import UnetVolumeError
from unet_volume.io.locations import check_no_credentials
from unet_volume.io.retries import describe_faults
from unet_volume.option_fields import (
    add_options,
    options_from,
    parse_floats,
    parse_ints,
    parse_range,
    show,
)
from unet_volume.prediction.options import PredictOptions

if TYPE_CHECKING:
    from distributed import Client

    from unet_volume.prediction.plan import PredictionPlan

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a command the signal stopped
CONVERT_CHUNKS = (1, 512, 512)
"""Chunks of the arrays ``convert`` writes: a slice of 512 x 512, a block of a 2D net."""


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
        "--chunk-shape",
        type=parse_ints,
        metavar="Z,Y,X",
        help=f"voxels per chunk of the array written (default {show(CONVERT_CHUNKS)})",
    )
    add_old_name(p, "--chunks", "--chunk-shape", type=parse_ints)
    p.add_argument(
        "--voxel-size", type=parse_floats, metavar="Z,Y,X", help="physical voxel size, e.g. 50,4,4"
    )
    p.add_argument("--units", help="units of --voxel-size (default nm)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> None:
    from unet_volume.io.volumes import convert_to_zarr

    volume = convert_to_zarr(
        args.input,
        args.output,
        chunks=args.chunk_shape or CONVERT_CHUNKS,
        voxel_size=args.voxel_size,
        units=args.units,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {volume.url}: {fmt(volume.shape)} {volume.dtype}, "
        f"voxel size {volume.voxel_size} {volume.units}"
    )


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prediction",
        help="prediction group written by `unet-volume predict` (its segmentation is "
        "scored; objects: its connected components), instance labels written by `unet-volume "
        "segment` (scored as those objects), or a Zarr array / TIFF stack of class indices",
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

    from unet_volume.evaluation.scores import evaluate

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
    _add_prediction_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_predict)


def _add_prediction_options(p: argparse.ArgumentParser) -> None:
    """``--model``, every :class:`PredictOptions` field and the cluster options."""
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint written by `unet-volume train` or save_model, or a shipped model's "
        "name (`unet-volume models`), e.g. isbi2012-membranes",
    )
    add_options(p, PredictOptions())
    add_cluster_options(p)


def _predict(args: argparse.Namespace) -> None:
    from unet_volume.prediction.run import predict_volume

    report = predict_volume(
        args.model,
        args.image,
        args.output,
        options_from(args, PredictOptions),
        client=lambda: client_from(args),
        progress=not args.no_progress,
        on_plan=_announce,
    )
    if report.complete_before:
        print(f"{report.output_url} is complete ({report.skipped} blocks): nothing to do")
        return
    resumed = f" (and {report.skipped} done before)" if report.skipped else ""
    print(
        f"wrote {report.output_url}: {report.blocks} blocks{resumed}, {report.voxels:,} voxels in "
        f"{report.seconds:.1f} s ({report.voxels_per_second / 1e6:.2f} Mvoxel/s)\n"
        "open it with:\n"
        f"    import xarray as xr; ds = xr.open_zarr({report.output_url!r})\n"
        "    # or: from unet_volume import open_prediction; "
        f"ds = open_prediction({report.output_url!r})"
    )
    if report.store_faults:
        say(f"store: {describe_faults(report.store_faults)}")


def _announce(plan: PredictionPlan, client: Client) -> None:
    """What a run will do, before it does it: the plan, what it resumes, the dashboard."""
    from unet_volume.cluster.client import dashboard_link

    _say_plan(plan, client)
    existing = plan.existing
    if existing is not None:
        say(
            f"resuming {plan.output_url}: {existing.done} of {existing.total} blocks done, "
            f"{existing.total - existing.done} to go"
        )
    if dashboard := dashboard_link(client):
        say(f"Dask dashboard: {dashboard}")


def _say_plan(plan: PredictionPlan, client: Client, predictor: Any = None) -> None:
    """The plan in numbers (and, with a ``predictor``, the time one block takes on a worker)."""
    from unet_volume.cluster.client import gpu_resources
    from unet_volume.prediction.estimate import summarize, time_one_block

    workers = client.scheduler_info(n_workers=-1)["workers"]
    summary = summarize(plan, workers, on_gpu=gpu_resources(client) is not None)
    if predictor is not None:
        seconds = time_one_block(client, plan, predictor)
        summary = dataclasses.replace(summary, seconds_per_block=seconds)
    for line in summary.lines():
        say(line)
    say(f"tile {fmt(plan.geometry.input_shape)} -> {fmt(plan.geometry.output_shape)}")
    if any(plan.volume.offset):
        moved = ",".join(f"{v:g}" for v in plan.volume.offset)
        say(f"input read moved by {moved} voxels (z,y,x): the labels' registration")


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="the volume to segment, as for `unet-volume predict`")
    p.add_argument(
        "output",
        nargs="?",
        help="the output to check as predict would (resumable, refused, new); default: none",
    )
    _add_prediction_options(p)
    p.add_argument("--no-timing", action="store_true", help="do not time one block on a worker")
    p.set_defaults(run=_plan)


def _plan(args: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    from unet_volume.prediction.model_predictor import ModelPredictor
    from unet_volume.prediction.plan import plan_prediction

    options = options_from(args, PredictOptions)
    output = args.output or str(Path(tempfile.gettempdir()) / "unet-volume-plan-no-output.zarr")
    with client_from(args) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        plan = plan_prediction(args.model, args.image, output, options, workers=workers)
        predictor = (
            None
            if args.no_timing
            else ModelPredictor(
                plan.checkpoint,
                tta=plan.tta,
                precision=plan.precision,  # type: ignore[arg-type]
            )
        )
        _say_plan(plan, client, predictor)
    if plan.existing is not None and args.output:
        say(f"{plan.output_url}: {plan.existing.summary()}; predict resumes it")
    print(
        f"planned; `unet-volume predict {args.image} {args.output or 'OUTPUT'}` with the same "
        "options runs it"
    )


def _add_status(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "output",
        help="an output written (or being written) by `unet-volume predict`, `weights` "
        "or `segment` (its labels group)",
    )
    p.add_argument(
        "--errors", type=int, default=5, metavar="N", help="show the first N failures (default 5)"
    )
    p.set_defaults(run=_status)


def _status(args: argparse.Namespace) -> None:
    from unet_volume.output.lifecycle import read_status

    status = read_status(args.output)
    print(status.summary())
    identity = status.identity
    command, made_by = _made_by(identity)
    if identity:
        source = identity.get("input", {})
        dtype = f", dtype {identity['output_dtype']}" if "output_dtype" in identity else ""
        print(
            f"run: {made_by}, blocks {fmt(identity.get('block_shape', []))}{dtype}, input "
            f"{source.get('url')} {fmt(source.get('shape', []))}"
        )
    if faults := status.store_faults:
        print(f"store: {describe_faults(faults)}")
    for failure in status.failures[: args.errors]:
        print(f"failed: {failure}")
    if not status.complete:
        print(f"run the same `{command}` command again to resume")


def _made_by(identity: dict[str, Any]) -> tuple[str, str]:
    """The command that writes an output of this run identity, and what made it."""
    if "weights" in identity:
        weights = identity["weights"]
        return (
            "unet-volume weights",
            f"weights w0 {weights.get('w0')}, sigma {weights.get('sigma')}",
        )
    if "method" in identity:
        return "unet-volume segment", f"segment {identity['method']}"
    return "unet-volume predict", f"model sha256 {str(identity.get('model_sha256'))[:12]}"


def _add_models(p: argparse.ArgumentParser) -> None:
    p.set_defaults(run=_models)


def _models(args: argparse.Namespace) -> None:
    from unet_volume.models.shipped import describe, shipped_models

    for shipped in shipped_models().values():
        print("\n".join(describe(shipped)))


COMMANDS: list[tuple[str, Callable[[argparse.ArgumentParser], None], str, str]] = [
    (
        "predict",
        _add_predict,
        "segment a volume with a trained model",
        "Predict class probabilities and a segmentation for a whole volume, block by block on "
        "a Dask cluster (overlap-tile: exact stitching, no seams, no blending).",
    ),
    (
        "plan",
        _add_plan,
        "what a prediction will cost: blocks, tasks, memory, halo overhead, run time",
        "Check a prediction as `predict` would, without writing anything, and print its plan: "
        "the block and shard shapes, blocks, tasks and stored objects, the halo overhead, the "
        "memory per worker and the run time estimated from one block timed on one worker.",
    ),
    (
        "train",
        add_train,
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
        add_weights,
        "compute the paper's loss-weight map of a label volume",
        "Write w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) for LABELS (0 = background, "
        "cells 1..n, or a binary mask whose connected components are the cells) to OUTPUT, "
        "block by block on a Dask cluster. Pass OUTPUT to `unet-volume train --weights`.",
    ),
    (
        "segment",
        add_segment,
        "instance labels of a prediction: connected components across blocks, on Dask",
        "Label the connected components of PREDICTION's foreground (or of a mask's nonzero "
        "voxels) into OUTPUT, block by block on a Dask cluster: equal to labelling the whole "
        "volume at once (scipy.ndimage.label), ids included.",
    ),
    (
        "status",
        _add_status,
        "how far a prediction (or weight volume) got: blocks done, failed, missing; first errors",
        "Print the state of the run writing OUTPUT (done / failed / missing / total blocks), "
        "the run's identity (model, geometry, dtype, input) and its first failures.",
    ),
    (
        "objects",
        add_objects,
        "summarise the objects of `segment`'s labels: count, sizes, the largest",
        "Print the object count, size percentiles and the largest objects (with volume and "
        "centroid in physical units) from the object table beside LABELS.",
    ),
    (
        "ensemble",
        add_ensemble,
        "one model of several trained networks that averages their probabilities",
        "Write one checkpoint holding MODELs (networks of one recipe, e.g. other seeds): "
        "predicting with it averages their class probabilities, one forward pass per network.",
    ),
    (
        "models",
        _add_models,
        "the models shipped with unet-volume, with how they were made and how well they score",
        "List the shipped models: pass a name to --model (predict, plan) or --init (train) "
        "instead of a checkpoint path.",
    ),
    (
        "export",
        add_export,
        "write a model as a bioimage.io package that other tools run",
        "Write MODEL (a checkpoint, an ensemble or a shipped name) as a bioimage.io model "
        "package (format 0.5): state-dict weights with the architecture's source, "
        "TorchScript and ONNX, test tensors, the axes' voxel size, the valid-convolution sizes "
        "and the trained normalisation; then run bioimageio.core's test of it.",
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


def _check_urls(args: argparse.Namespace) -> None:
    """Refuse a URL argument that carries credentials, before anything writes it anywhere."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and "://" in item:
                check_no_credentials(item, name.replace("_", "-"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        apply_old_names(args)
        _check_urls(args)
        run(args)
        sys.stdout.flush()  # here, so that a reader gone away is met below, not at exit
    except BrokenPipeError:
        # `unet-volume models | head`: the reader has what it wanted; stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except UnetVolumeError as error:
        print(f"unet-volume {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"unet-volume {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
