"""The training commands of ``unet-volume``: ``train``, ``weights`` (its loss-weight maps) and
``ensemble`` (one model of several trained networks).

Thin over the library, as :mod:`unet_volume.cli.main`: options derived from the config
dataclasses, one library call, a line of results.
"""

from __future__ import annotations

import argparse
import dataclasses

from unet_volume.cli.common import add_cluster_options, add_old_name, client_from, say
from unet_volume.errors import InputError
from unet_volume.models.config import UNetConfig
from unet_volume.option_fields import (
    add_options,
    options_from,
    parse_ints,
    parse_range,
    parse_sigma,
    show,
)
from unet_volume.prediction.options import PredictOptions
from unet_volume.training.config import TrainConfig
from unet_volume.training.weight_map import WEIGHT_BLOCK, WeightMapConfig


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "labels", help="instance labels or binary mask: Zarr array or TIFF stack, (z, y, x)"
    )
    p.add_argument(
        "output",
        help="Zarr v3 group to create: float32 `weights` (z, y, x) and the run's records; "
        "an incomplete one of the same run is resumed",
    )
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
    add_old_name(p, "--chunk-shape", "--block-shape", type=parse_ints)
    p.add_argument(
        "--balance-z-range",
        type=parse_range,
        metavar="BEGIN:END",
        help="count the class frequencies over these slices only (the training slices, so "
        "held-out ones stay unseen); default all",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it exists; without it, an incomplete OUTPUT of the same run "
        "(labels, weight map, block shape) is resumed, and a complete one is left as it is",
    )
    add_options(p, PredictOptions(), only={"max_failures", "stall_after"})
    add_cluster_options(p)
    p.set_defaults(run=_weights)


def _weights(args: argparse.Namespace) -> None:
    from unet_volume.cluster.client import dashboard_link
    from unet_volume.training.weight_volume import compute_weight_volume

    config = weight_map_config_from(args)
    voxels = ", ".join(
        f"{a} {config.sigma / v:g}" for a, v in zip("zyx"[3 - config.ndim :], config.sampling)
    )
    physical = f" ({config.sigma:g} in --voxel-size units)" if config.voxel_size else ""
    say(f"sigma in voxels: {voxels}{physical}")
    with client_from(args) as client:
        if dashboard := dashboard_link(client):
            say(f"Dask dashboard: {dashboard}")
        report = compute_weight_volume(
            args.labels,
            args.output,
            config,
            block_shape=args.block_shape,
            client=client,
            overwrite=args.overwrite,
            balance_z_range=args.balance_z_range,
            max_failures=args.max_failures,
            stall_after=args.stall_after,
        )
    if report.skipped and not report.blocks:
        print(f"{report.output_url} is complete ({report.skipped} blocks); nothing to do")
        return
    resumed = f" (resumed: {report.skipped} blocks were done)" if report.skipped else ""
    print(
        f"wrote {report.output_url}{resumed}: {report.blocks} blocks, {report.voxels:,} voxels in "
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


def add_train(p: argparse.ArgumentParser) -> None:
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
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue from this checkpoint (weights, optimizer, curve); --steps counts the total",
    )
    start.add_argument(
        "--init",
        metavar="MODEL",
        help="start from this model's network and weights (an ensemble's first network), a "
        "checkpoint or a shipped model's name (fine-tuning on new data: its normalisation and "
        "class weights are this data's; the network options are ignored)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> None:
    from unet_volume.training.loop import train

    report = train(
        args.image,
        args.labels,
        args.out,
        train_config_from(args),
        weights=args.weights,
        mask=args.mask,
        resume=args.resume,
        init=args.init,
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


def add_ensemble(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models", nargs="+", metavar="MODEL", help="2 or more checkpoints (or shipped names)"
    )
    p.add_argument("--out", required=True, help="the ensemble's checkpoint to write")
    p.add_argument(
        "--float16", action="store_true", help="store the weights as float16 (half the file)"
    )
    p.set_defaults(run=_ensemble)


def _ensemble(args: argparse.Namespace) -> None:
    import torch

    from unet_volume.models.checkpoint import read_checkpoint, save_ensemble

    dtype = torch.float16 if args.float16 else None
    out = save_ensemble(list(args.models), args.out, weights_dtype=dtype)
    found = read_checkpoint(out)
    say(
        f"wrote {out}: {found.members} networks, {found.num_params / 1e6:.2f} M parameters, "
        f"sha256 {found.sha256[:12]}"
    )
