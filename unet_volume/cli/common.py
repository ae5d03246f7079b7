"""What the commands of ``unet-volume`` share: the cluster options, and how they talk.

Progress and notices go to stderr (:func:`say`), results to stdout, so that a command's
output can be piped while the user still sees what happens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from unet_volume.errors import InputError

if TYPE_CHECKING:
    from distributed import Client


def add_old_name(p: argparse.ArgumentParser, old: str, new: str, **kwargs: object) -> None:
    """Keep ``old``, a flag's former name, working for scripts, hidden from ``--help``.

    :func:`apply_old_names` moves its value to ``new`` with a warning (``new`` must default to
    None, so that giving both is seen and refused).
    """
    dest = "old_" + old.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]
    p.set_defaults(old_names=(*(p.get_default("old_names") or ()), (old, new, dest)))


def apply_old_names(args: argparse.Namespace) -> None:
    """Each old flag given: its value under the new name, and a warning naming the new one."""
    for old, new, dest in getattr(args, "old_names", ()):
        value, new_dest = getattr(args, dest), new.lstrip("-").replace("-", "_")
        if value is None:
            continue
        if getattr(args, new_dest) is not None:
            raise InputError(f"{old} is the old name of {new}; pass {new} only")
        say(f"unet-volume {args.command}: warning: {old} is deprecated; pass {new}")
        setattr(args, new_dest, value)


def add_cluster_options(p: argparse.ArgumentParser) -> None:
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
        help="start the cluster a spec describes: a name in deploy/clusters (local, local-gpu, "
        "slurm-gpu, k8s-gpu) or a YAML path",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes of the LocalCluster, one thread each (default: one per core)",
    )


def client_from(args: argparse.Namespace) -> AbstractContextManager[Client]:
    """The Dask client the cluster options ask for."""
    from unet_volume.cluster.client import open_client

    # distributed sets INFO on its loggers when first imported: quiet them after that import.
    # Its warnings are a slow machine's (garbage collection, a worker slow to close) or come
    # back as the run's own one-line errors: shown with --verbose only.
    logging.getLogger("distributed").setLevel(logging.INFO if args.verbose else logging.ERROR)
    if args.workers is not None and args.workers < 1:  # in the CLI's words, not the library's
        raise InputError(f"--workers {args.workers} must be at least 1")
    # Workers we start print to our stderr: a failed block is reported once, in one line.
    quiet = not args.verbose and not args.scheduler
    return open_client(args.scheduler, args.cluster, n_workers=args.workers, quiet=quiet)


def fmt(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
