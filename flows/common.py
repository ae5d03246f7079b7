"""What the flows share: the cluster they run blocks on, the failures worth a retry, and how a
long stage tells the operator how far it is."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar, cast
from uuid import UUID

from prefect import Task, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from pydantic.json_schema import SkipJsonSchema

from unet_volume.cluster.client import Client, open_client
from unet_volume.errors import is_transient
from unet_volume.io.locations import check_location
from unet_volume.progress import Every, Progress, ProgressSink

F = TypeVar("F", bound=Callable[..., Any])
HiddenNone = SkipJsonSchema[None]
"""A None that Python callers may pass but the UI's run form does not offer, for a parameter
whose default is a value (``minutes: float | HiddenNone = 3.0``): the form shows the field's
type, not a switch between it and "None" ('Property is type "None"').

Not for parameters whose default is None: the form fills a field with the schema's default
and checks it against the field's type, so a None default needs the null type (Prefect 3.9.1,
submitted in a browser by scripts/prefect_screenshots.py)."""
Instances = Literal["none", "components", "watershed"]
"""The objects a flow labels after predicting: none, connected components, or the watershed."""
CLUSTER_HELP = {
    "scheduler": "address of a running Dask scheduler (tcp://HOST:8786) to run the blocks on",
    "cluster": "a cluster spec to start for the run: a name in deploy/clusters (local, "
    "slurm-gpu, k8s-gpu) or a path; neither this nor scheduler: a LocalCluster on this machine",
}
"""What the flows' ``scheduler`` and ``cluster`` parameters mean, said once."""


def described(*configs: type, **own: str) -> Callable[[F], F]:
    """Give a flow function an ``Args:`` section that Prefect shows beside each parameter.

    A parameter's text comes from ``own``, else from the help of the same-named field of one
    of the ``configs`` dataclasses (:func:`unet_volume.option_fields.option`), where the CLI reads
    it
    too. A parameter with neither is a mistake, refused at import.
    """

    def describe(function: F) -> F:
        texts = {
            field.name: field.metadata["help"]
            for config in configs
            for field in dataclasses.fields(config)
            if "help" in field.metadata
        }
        texts.update(own)
        names = list(inspect.signature(function).parameters)
        if missing := [name for name in names if name not in texts]:
            raise TypeError(f"{function.__name__}: no description for {', '.join(missing)}")
        args = "\n".join(f"    {name}: {texts[name]}" for name in names)
        function.__doc__ = f"{inspect.cleandoc(function.__doc__ or '')}\n\nArgs:\n{args}\n"
        return function

    return describe


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry dropped connections and timeouts of storage.

    Bad input fails at once: it would fail again.
    """
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


STORAGE_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_if_transient,
}
"""Task options for stages that read storage: object stores drop connections under load."""


VERBOSE = "UNET_VOLUME_VERBOSE"
"""Set to 1 (``serve -v`` does) to keep Dask's INFO lines in flow runs' logs and terminals."""
DASK_LOG_LEVEL = "DASK_LOGGING__DISTRIBUTED"


@contextmanager
def flow_client(scheduler: str | None, cluster: str | None) -> Iterator[Client]:
    """The Dask client of a flow task (:func:`~unet_volume.cluster.client.open_client`), with Dask's
    own INFO lines (connections, workers coming and going) kept out of the run's log unless
    :data:`VERBOSE` is set: an operator reads what the run does, not how Dask does it.
    """
    verbose = os.environ.get(VERBOSE, "") not in ("", "0")
    level = "info" if verbose else "warning"
    logging.getLogger("distributed").setLevel(level.upper())
    # Worker processes started here set their level when they import distributed, from the
    # environment they inherit (Prefect's log format in them would show every INFO line).
    before = os.environ.get(DASK_LOG_LEVEL)
    os.environ[DASK_LOG_LEVEL] = level
    try:
        with open_client(scheduler, cluster) as client:  # a dashboard, loopback if started here
            yield client
    finally:
        if before is None:
            os.environ.pop(DASK_LOG_LEVEL, None)
        else:
            os.environ[DASK_LOG_LEVEL] = before


@contextmanager
def scheduler_address(scheduler: str | None, cluster: str | None) -> Iterator[str]:
    """The address of a cluster that lives as long as the block, for subflows to share.

    The cluster is the one :func:`~unet_volume.cluster.client.open_client` picks (``scheduler``, a
    spec named ``cluster``, or a LocalCluster); subflows take its address as ``scheduler``.
    """
    with flow_client(scheduler, cluster) as client:  # a dashboard for the subflows to link
        yield client.scheduler.address


@contextmanager
def reported(key: str, description: str, *, seconds: float = 30.0) -> Iterator[ProgressSink]:
    """A stage's progress in its Prefect run: a log line and the progress artifact ``key``,
    every ``seconds``, every tenth of the way, and at 100% when the stage ends well (also a
    stage with nothing left to do). A stage that fails leaves the artifact where it got to.
    """
    log = get_run_logger()
    artifact = cast("UUID", create_progress_artifact(0.0, key=key, description=description))

    def tell(progress: Progress) -> None:
        log.info("%s", progress)
        update_progress_artifact(artifact, 100 * min(progress.fraction, 1.0))

    yield Every(tell, seconds=seconds)
    update_progress_artifact(artifact, 100.0)


def check_locations(**locations: str | None) -> None:
    """Check each path or URL parameter given (see :func:`check_location`), before any task.

    Parameters reach a flow from the UI, the API or a deployment file: a flow refuses in one
    line, naming the parameter, what no filesystem could open, before it reads or writes.
    """
    for name, value in locations.items():
        if value is not None:
            check_location(value, name)
