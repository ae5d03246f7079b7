"""``unet-volume segment``: instance labels of a prediction (or any mask), block by block;
``unet-volume objects``: what they hold, from the object table.

Thin over :func:`unet_volume.instances.labelling.label_instances`, as :mod:`unet_volume.cli.main` is
over
the library: parse, call, one line of results.
"""

from __future__ import annotations

import argparse

from unet_volume.cli.common import add_cluster_options, client_from
from unet_volume.instances.watershed import WatershedConfig
from unet_volume.option_fields import add_options, parse_ints
from unet_volume.prediction.options import PredictOptions


def add_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prediction",
        help="prediction group written by `unet-volume predict` (its foreground is labelled), "
        "or a Zarr array / TIFF stack of labels or a 0/1 mask (nonzero is labelled)",
    )
    p.add_argument(
        "output",
        help="the Zarr group to write: uint64 `instances` (z, y, x) with its pyramid; "
        "PREDICTION/labels/NAME puts them in the prediction's OME-Zarr labels, so that "
        "napari opens probabilities and labels together",
    )
    p.add_argument(
        "--connectivity",
        type=int,
        choices=(6, 26),
        default=6,
        help="6: faces (4 neighbours in a slice), 26: faces, edges, corners (8 in a slice)",
    )
    p.add_argument(
        "--3d",
        dest="per_slice",
        action="store_false",
        help="label 3D objects (default: each z slice on its own, as 2D EM segmentations)",
    )
    p.add_argument(
        "--watershed",
        action="store_true",
        help="a seeded watershed of the foreground probability (a prediction only): seeds "
        "where p > --seed-threshold, flooding 1 - p within p > --threshold; cells that touch "
        "through a thin gap stay apart (default: connected components)",
    )
    defaults = WatershedConfig()
    p.add_argument(
        "--threshold",
        type=float,
        default=defaults.threshold,
        help=f"watershed: foreground probability (default {defaults.threshold:g})",
    )
    p.add_argument(
        "--seed-threshold",
        type=float,
        default=defaults.seed_threshold,
        help=f"watershed: probability of a seed (default {defaults.seed_threshold:g})",
    )
    p.add_argument(
        "--cover",
        action="store_true",
        help="watershed: flood the background too, so that every voxel gets an object and "
        "each boundary is split between its cells (a dense segmentation, as connectomics "
        "scores one)",
    )
    p.add_argument(
        "--block-shape",
        type=parse_ints,
        metavar="Z,Y,X",
        help="voxels per task and output chunk (default 1,512,512; with --watershed whole "
        "slices, or the whole volume with --3d, so that no basin is cut)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it exists; without it, an incomplete OUTPUT of the same "
        "labelling is resumed (only its blocks not done), and a complete one is left as it is",
    )
    add_options(p, PredictOptions(), only={"max_failures"})
    add_cluster_options(p)
    p.set_defaults(run=_segment)


def _segment(args: argparse.Namespace) -> None:
    from unet_volume.instances.labelling import label_instances

    with client_from(args) as client:
        report = label_instances(
            args.prediction,
            args.output,
            client=client,
            connectivity=args.connectivity,
            per_slice=args.per_slice,
            watershed=WatershedConfig(args.threshold, args.seed_threshold, args.cover)
            if args.watershed
            else None,
            block_shape=args.block_shape,
            overwrite=args.overwrite,
            max_failures=args.max_failures,
        )
    print(
        f"labelled {report.output_url}: {report.objects:,} object(s) in {report.blocks} "
        f"block(s) ({report.skipped} done before), {report.seconds:.1f} s"
    )


def add_objects(p: argparse.ArgumentParser) -> None:
    p.add_argument("labels", help="labels written by `unet-volume segment`")
    p.add_argument(
        "--largest", type=int, default=5, metavar="N", help="list the N largest (default 5)"
    )
    p.set_defaults(run=_objects)


def _objects(args: argparse.Namespace) -> None:
    from unet_volume.instances.objects import read_objects, summary

    print(summary(read_objects(args.labels), largest=args.largest))
