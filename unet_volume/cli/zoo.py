"""``unet-volume export``: a model as a bioimage.io package (:mod:`unet_volume.zoo.export`).

bioimageio.spec and bioimageio.core are an optional extra; without them the command says which
one line to run, and nothing else of the command line needs them.
"""

from __future__ import annotations

import argparse

from unet_volume.cli.common import fmt, say
from unet_volume.errors import InputError
from unet_volume.option_fields import parse_floats

EXTRA = "pip install 'unet-volume[bioimageio]'"


def check_bioimageio() -> None:
    """An InputError naming the extra to install where bioimageio.core is missing."""
    try:
        import bioimageio.core
        import bioimageio.spec  # noqa: F401
    except ImportError as error:
        raise InputError(f"bioimage.io packages need {error.name}: {EXTRA}") from None


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint, an ensemble, or a shipped model's name")
    p.add_argument("out", help="the package to write, OUT.zip")
    p.add_argument(
        "--voxel-size",
        type=parse_floats,
        metavar="Z,Y,X",
        help="voxel size of the training data (default: a shipped model's record, else none)",
    )
    p.add_argument("--units", help="units of --voxel-size (default nm)")
    p.add_argument("--name", help="the package's name (default: from the model)")
    p.add_argument(
        "--author", action="append", dest="authors", metavar="NAME", help="an author (repeat)"
    )
    p.add_argument("--license", default="MIT", help="SPDX licence of the weights (default MIT)")
    p.add_argument(
        "--sample",
        metavar="IMAGE",
        help="an image like the training data to cut the test input from (its centre; "
        "default: a synthetic image at the trained mean and std)",
    )
    p.add_argument("--no-onnx", action="store_true", help="leave the ONNX weights out")
    p.add_argument(
        "--no-test",
        action="store_true",
        help="skip bioimageio.core's test of the written package (it reruns the test input "
        "with every weights format)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT.zip if it exists")
    p.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> None:
    check_bioimageio()
    from unet_volume.zoo.export import PackageFacts, export_package, test_package

    facts = PackageFacts(
        name=args.name,
        voxel_size=args.voxel_size,
        units=args.units,
        authors=tuple(args.authors or ("unet-volume",)),
        license=args.license,
        sample=args.sample,
        onnx=not args.no_onnx,
    )
    report = export_package(args.model, args.out, facts, overwrite=args.overwrite)
    for weights, why in report.left_out.items():
        say(f"unet-volume export: {weights} left out: {why}")
    print(
        f"wrote {report.path}: weights {', '.join(report.formats)}; test input "
        f"{fmt(report.test_input)} -> output {fmt(report.test_output)}"
    )
    if not args.no_test:
        print(f"bioimageio test: passed ({test_package(report.path)})")
