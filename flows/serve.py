"""Serve the three flows on this machine; ``ingest`` runs on a cron schedule.

Schedules need a Prefect server (the ephemeral API cannot schedule), and no account::

    prefect server start --host 127.0.0.1 --port 4200 &     # the UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m unet_volume_flows.serve --landing /data/landing --outputs /data/predictions \\
        --model runs/demo/model.pt --cron "*/10 * * * *"

The deployments are named ``served`` (``ingest/served``, ``predict/served``, ``train/served``),
apart from those of ``deploy/prefect.yaml`` (``.../pool``), so neither replaces the other.
``train`` and ``predict`` are served without a schedule: start them from the UI, or with
``prefect deployment run predict/served --param image=... --param model=... --param out=...``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from prefect import serve

from unet_volume import __version__
from unet_volume_flows.common import VERBOSE
from unet_volume_flows.ingest import ingest_flow
from unet_volume_flows.predict import predict_flow
from unet_volume_flows.train import train_flow

SERVED = "served"
"""The deployment name of every served flow; deploy/prefect.yaml's are ``pool``."""


def given(**parameters: object) -> dict[str, object]:
    """The parameters that were given: a None is left out, so the flow's own default applies
    and the deployment shows only what the operator chose."""
    return {name: value for name, value in parameters.items() if value is not None}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unet_volume_flows.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--landing", required=True, help="folder or fsspec URL where new volumes arrive"
    )
    parser.add_argument("--outputs", required=True, help="folder or fsspec URL for the predictions")
    parser.add_argument("--model", required=True, help="the checkpoint that ingest predicts with")
    parser.add_argument(
        "--cron", default="*/10 * * * *", help="when ingest scans (default every 10 minutes)"
    )
    parser.add_argument(
        "--cluster", help="cluster spec name (deploy/clusters) or path; default a LocalCluster"
    )
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=60.0,
        help="a volume changed more recently than this is left for the next scan (default 60)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="keep Dask's INFO lines (workers, connections) in the flow runs' logs",
    )
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE] = "1"  # flow runs are this process's children: they inherit it
    labels = {"tags": ["unet-volume"], "version": __version__}
    serve(
        ingest_flow.to_deployment(
            name=SERVED,
            cron=args.cron,
            parameters=given(
                landing=args.landing,
                outputs=args.outputs,
                model=args.model,
                cluster=args.cluster,
                settle_seconds=args.settle_seconds,
            ),
            **labels,
        ),
        predict_flow.to_deployment(name=SERVED, **labels),
        train_flow.to_deployment(name=SERVED, **labels),
    )


if __name__ == "__main__":
    main()
