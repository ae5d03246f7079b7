"""What the flows share: the cluster they run blocks on, and the failures worth a retry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from unet_volume.cluster import open_client
from unet_volume.errors import is_transient
from unet_volume.locations import check_location


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


@contextmanager
def scheduler_address(scheduler: str | None, cluster: str | None) -> Iterator[str]:
    """The address of a cluster that lives as long as the block, for subflows to share.

    The cluster is the one :func:`~unet_volume.cluster.open_client` picks (``scheduler``, a
    spec named ``cluster``, or a LocalCluster); subflows take its address as ``scheduler``.
    """
    with open_client(scheduler, cluster, dashboard=False) as client:
        yield client.scheduler.address


def check_locations(**locations: str | None) -> None:
    """Check each path or URL parameter given (see :func:`check_location`), before any task.

    Parameters reach a flow from the UI, the API or a deployment file: a flow refuses in one
    line, naming the parameter, what no filesystem could open, before it reads or writes.
    """
    for name, value in locations.items():
        if value is not None:
            check_location(value, name)
