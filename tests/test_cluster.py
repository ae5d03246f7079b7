"""The bounded task window shared by prediction and weight maps."""

from __future__ import annotations

import time

import pytest
from distributed import Client, get_worker

from unet_volume.cluster import gpu_resources, map_bounded
from unet_volume.errors import BlockError


def interval(item: int, *, pause: float) -> tuple[int, float, float]:
    start = time.time()
    time.sleep(pause)
    return item, start, time.time()


def fail_on_three(item: int) -> int:
    if item == 3:
        raise ValueError("bad block")
    return item


def test_map_bounded_runs_every_item_once_with_at_most_window_in_flight(client: Client) -> None:
    # With a window of one, no two tasks may overlap in time, although two workers are idle.
    results = list(
        map_bounded(client, interval, range(6), name=lambda i: f"probe-{i}", window=1, pause=0.05)
    )
    assert sorted(item for item, _, _ in results) == list(range(6))
    spans = sorted((start, end) for _, start, end in results)
    assert all(previous_end <= start for (_, previous_end), (start, _) in zip(spans, spans[1:]))


def test_map_bounded_takes_a_lazy_iterator_and_yields_as_tasks_finish(client: Client) -> None:
    items = (i for i in range(20))  # a generator: never materialised as a list
    assert sorted(map_bounded(client, fail_on_three, (i for i in items if i != 3), name=str)) == [
        i for i in range(20) if i != 3
    ]


def test_map_bounded_names_the_failed_task(client: Client) -> None:
    with pytest.raises(BlockError, match=r"block task probe-3-\w+ failed: bad block"):
        list(map_bounded(client, fail_on_three, range(6), name=lambda i: f"probe-{i}"))


def where(item: int, *, pause: float) -> tuple[str, float, float]:
    start = time.time()
    time.sleep(pause)
    return get_worker().address, start, time.time()


def test_map_bounded_resources_run_tasks_one_at_a_time_on_the_workers_that_have_them(
    gpu_client: Client,
) -> None:
    gpu_worker = next(
        address
        for address, info in gpu_client.scheduler_info()["workers"].items()
        if info["resources"].get("GPU")
    )
    results = list(
        map_bounded(
            gpu_client,
            where,
            range(6),
            name=lambda i: f"gpu-probe-{i}",
            resources=gpu_resources(gpu_client),
            pause=0.05,
        )
    )
    assert {address for address, _, _ in results} == {gpu_worker}
    # GPU=1 on that worker: one task at a time, though the window lets 8 be on the cluster.
    spans = sorted((start, end) for _, start, end in results)
    assert all(previous_end <= start for (_, previous_end), (start, _) in zip(spans, spans[1:]))
