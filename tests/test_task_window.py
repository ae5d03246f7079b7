"""The bounded task window every block run goes through: how many tasks are out, in what order
results come, and which tasks a failure is charged to."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from itertools import pairwise

import dask
import pytest
from distributed import Client

from unet_volume.cluster.spec import local_cluster_config
from unet_volume.cluster.task_window import map_bounded
from unet_volume.errors import BlockError
from unet_volume.testing import free_port_cluster


def interval(item: int, *, pause: float) -> tuple[int, float, float]:
    start = time.time()
    time.sleep(pause)
    return item, start, time.time()


def fail_on_three(item: int) -> int:
    if item == 3:
        raise ValueError("bad block")
    return item


def slow_first(item: int, *, pause: float) -> int:
    time.sleep(pause if item == 0 else pause / 100)
    return item


def never_overlap(spans: list[tuple[float, float]]) -> bool:
    """Whether no two (start, end) spans overlap in time."""
    ordered = sorted(spans)
    return all(previous_end <= start for (_, previous_end), (start, _) in pairwise(ordered))


def test_map_bounded_runs_every_item_once_with_at_most_window_in_flight(client: Client) -> None:
    # With a window of one, no two tasks may overlap in time, although two workers are idle.
    results = list(
        map_bounded(client, interval, range(6), name=lambda i: f"probe-{i}", window=1, pause=0.05)
    )
    assert sorted(item for item, _, _ in results) == list(range(6))
    assert never_overlap([(start, end) for _, start, end in results])


def test_map_bounded_pulls_items_lazily_at_most_a_window_ahead(client: Client) -> None:
    # A generator that counts how many items map_bounded has taken from it. Before the k-th
    # result reaches the caller, the window (2) plus one refill per finished task (k) may have
    # been taken: 3 of the 20 at the first result. Taking all items first (`list(items)`)
    # would show 20 there.
    taken = 0

    def items() -> Iterator[int]:
        nonlocal taken
        for item in range(20):
            taken += 1
            yield item

    seen = []
    for k, result in enumerate(map_bounded(client, abs, items(), name=str, window=2), start=1):
        assert taken <= 2 + k, f"{taken} items taken before result {k} came back"
        seen.append(result)
    assert sorted(seen) == list(range(20))


def test_map_bounded_yields_results_in_the_order_tasks_finish(client: Client) -> None:
    # Window 2 on two workers: item 0 sleeps 2 s on one worker while items 1..6 (20 ms each)
    # pass one after another through the other. In submission order 0 would come first; as
    # tasks finish, it comes last.
    results = list(map_bounded(client, slow_first, range(7), name=str, window=2, pause=2.0))
    assert results == [1, 2, 3, 4, 5, 6, 0]


def test_map_bounded_names_the_failed_task(client: Client) -> None:
    with pytest.raises(BlockError, match=r"task probe-3 failed: bad block"):
        list(map_bounded(client, fail_on_three, range(6), name=lambda i: f"probe-{i}"))


def kill_on_one(item: int) -> int:
    """Item 1 kills its worker process (as the kernel's out-of-memory killer would) 0.2 s in;
    item 0 is still running then; the others are quick."""
    if item == 1:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0 if item == 0 else 0.01)
    return item


def test_map_bounded_a_task_that_kills_its_worker_fails_alone_not_the_tasks_beside_it() -> None:
    # One worker, two threads: items 0 and 1 run side by side, so each time item 1 kills the
    # worker, the scheduler blames item 0 as well, and after two deaths (allowed-failures 1)
    # gives both up. Run again alone, item 0 succeeds; item 1 kills its worker again and fails.
    with (
        dask.config.set(local_cluster_config()),
        free_port_cluster(n_workers=1, threads_per_worker=2) as cluster,
        Client(cluster) as own,
        pytest.raises(BlockError) as info,
    ):
        done = []
        for result in map_bounded(own, kill_on_one, range(4), name=str, max_failures=1):
            done.append(result)
    assert sorted(done) == [0, 2, 3]
    assert [item for item, _ in info.value.failures] == [1]
    assert type(info.value.failures[0][1]).__name__ == "KilledWorker"
