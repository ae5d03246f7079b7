"""Many tasks through a bounded window on a Dask cluster: the loop every block run shares.

A 10^6-block volume cannot be one graph: the client would hold a million futures and the
scheduler a million tasks before the first block ran. :func:`map_bounded` keeps a window of
tasks in flight, pulls items lazily, sets failures aside up to a budget, tells a worker that
killed a task from the tasks that merely ran beside it, and never waits silently
(:class:`StallWatchdog`).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import islice
from typing import Any, Generic, TypeVar

from distributed import Client, Future, as_completed, get_worker
from distributed.scheduler import KilledWorker

from unet_volume.errors import BlockError, StallError

Item = TypeVar("Item")

STALL_AFTER = 600.0
"""Seconds without a finished task after which a run stops (unless tasks take longer)."""


def map_bounded(
    client: Client,
    function: Callable[..., Any],
    items: Iterable[Item],
    *,
    name: Callable[[Item], str],
    window: int | None = None,
    resources: Mapping[str, float] | None = None,
    max_failures: int = 0,
    stall_after: float = STALL_AFTER,
    beats: str | None = None,
    **kwargs: Any,
) -> Generator[Any, None, None]:
    """``function(item, **kwargs)`` as one Dask task per item; yields results as tasks finish.

    At most ``window`` tasks (default: 4 per worker thread) are on the cluster at once, so
    a 10^6-block volume never floods the scheduler, and ``items`` may be a lazy iterator.
    Keys are ``name(item)`` plus a run token (unique per call: Dask must never see the same
    key with another graph). Up to ``max_failures`` failed tasks are set aside while the rest
    carry on; one more cancels what is left. Either way, once it stops, a :class:`BlockError`
    names every failed task and carries them (``error.failures``: ``(item, exception)``).

    A task whose worker died under it (``KilledWorker``) may be innocent: the scheduler blames
    every task a dying worker held, not only the one that killed it. So once the tasks in
    flight have finished, it runs again alone, and fails only if it kills its worker then too.

    If no task finishes for ``stall_after`` seconds (or 10 times the median task, if longer),
    :class:`StallError` names the tasks in flight and their workers: it never hangs silently.
    ``resources`` (e.g. ``{"GPU": 1}``) restricts every task to workers that advertise them,
    and runs as many at once on a worker as its amount allows. ``beats`` names the Dask event
    topic on which long tasks say they are getting on (:func:`beat`, e.g. once per shard of a
    task): each beat counts as a finish for the stall watchdog.
    """
    tasks = _Tasks(client, function, iter(items), name, resources, kwargs)
    limit = window or 4 * max(1, sum(client.nthreads().values()))
    refill = max(1, limit // 4)
    failures: list[tuple[Any, BaseException]] = []
    suspects: list[tuple[Any, BaseException]] = []  # their workers died under them
    watchdog = StallWatchdog(client, at_least=stall_after)
    # Results come with their futures, gathered in the background; tasks go out a quarter
    # window at a time: half the client's work per task of one submit and one fetch each.
    # On this client's loop: as_completed otherwise takes the default client's, which may be
    # another (or a closed) client in this process, and then waits forever.
    running = as_completed(
        tasks.submit(limit), loop=client.loop, with_results=True, raise_errors=False
    )
    with (
        watchdog.watching(running),
        _cancelled_on_exit(client, running),
        _hearing(client, beats, watchdog),
    ):
        for future, result in running:
            if watchdog.stalled:
                break
            watchdog.finished()
            error = _error_of(future, result)
            item, alone = tasks.finished(future)
            if error is None:
                yield result
            elif isinstance(error, KilledWorker) and not alone:
                suspects.append((item, error))
            else:
                failures.append((item, error))
                if len(failures) > max_failures:
                    client.cancel(list(running.futures))
                    running.clear()
                    break
            in_flight = running.count()
            if suspects and in_flight == 0:
                running.add(tasks.submit_alone(suspects.pop(0)[0]))
            elif not suspects and (limit - in_flight >= refill or in_flight == 0):
                running.update(tasks.submit(limit - in_flight))
    if watchdog.stalled:
        raise StallError(watchdog.stalled)
    failures += suspects  # not tried alone: the run stopped first
    if failures:
        raise BlockError(failures, names=[name(item) for item, _ in failures])


def beat(topic: str | None, message: Any) -> None:
    """From inside a task: tell the run on ``topic`` (``map_bounded(beats=...)``) that the task
    is getting on, so that a long task is not taken for a stalled one. Outside a Dask worker
    (a task body called directly) nobody listens, and nothing is sent."""
    if topic is None:
        return
    try:
        worker = get_worker()
    except ValueError:
        return
    worker.log_event(topic, message)


@contextmanager
def _hearing(client: Client, topic: str | None, watchdog: StallWatchdog) -> Iterator[None]:
    """Beats on ``topic`` count as finished tasks for ``watchdog`` while the body runs."""
    if topic is None:
        yield
        return
    client.subscribe_topic(topic, lambda _event: watchdog.finished())
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a cluster already gone has nobody to tell
            client.unsubscribe_topic(topic)


def _error_of(future: Future, result: Any) -> BaseException | None:
    """The exception a finished task raised (or its cancellation), None if it succeeded.

    ``as_completed(with_results=True)`` gives an error as (type, exception, traceback), a
    cancellation as itself."""
    if future.status == "error":
        return result[1]
    return result if future.status == "cancelled" else None


class _Tasks(Generic[Item]):
    """The tasks of one :func:`map_bounded` call: submitted with unique keys, released once
    finished (the client keeps no result it has yielded)."""

    def __init__(
        self,
        client: Client,
        function: Callable[..., Any],
        todo: Iterator[Item],
        name: Callable[[Item], str],
        resources: Mapping[str, float] | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        self.client, self.function, self.todo, self.name = client, function, todo, name
        self.options = {"pure": False, "resources": resources, **kwargs}
        self.run = uuid.uuid4().hex[:8]
        self.pending: dict[str, tuple[Item, bool]] = {}

    def submit(self, count: int) -> list[Future]:
        """The next ``count`` items (fewer at the end), as tasks."""
        batch = list(islice(self.todo, count))
        if not batch:
            return []
        keys = [f"{self.name(item)}-{self.run}" for item in batch]
        futures = self.client.map(self.function, batch, key=keys, **self.options)
        self.pending.update((key, (item, False)) for key, item in zip(keys, batch))
        return list(futures)

    def submit_alone(self, item: Item) -> Future:
        """``item`` again, under a new key, while nothing else runs."""
        key = f"{self.name(item)}-{self.run}-alone"
        self.pending[key] = (item, True)
        return self.client.submit(self.function, item, key=key, **self.options)

    def finished(self, future: Future) -> tuple[Item, bool]:
        """The item ``future`` ran, and whether it ran alone; the future is released."""
        future.release()
        return self.pending.pop(str(future.key))  # our keys are names


@contextmanager
def _cancelled_on_exit(client: Client, running: as_completed) -> Iterator[None]:
    """Cancel the tasks still in flight when the iteration stops early (Ctrl-C, an error, the
    caller closing the generator): their results are no longer gathered in the background, so a
    cluster that closes next logs no "Couldn't gather keys" tracebacks.
    """
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a cluster already gone has nothing to cancel
            client.cancel(list(running.futures))
            running.clear()
        raise


class StallWatchdog:
    """Stops a run in which no task has finished for far longer than tasks take.

    A hung read (a dead NFS mount), a deadlocked worker or a scheduler that lost its workers
    would otherwise wait forever. The limit is ``at_least`` seconds, or ``factor`` times the
    median time between finishes, whichever is longer. On a stall it records which tasks were
    in flight on which workers (:attr:`stalled`) and cancels them, which ends the iteration.
    """

    def __init__(self, client: Client, *, at_least: float, factor: float = 10.0) -> None:
        self.client, self.at_least, self.factor = client, at_least, factor
        self.stalled: str | None = None
        self._last = time.monotonic()
        self._gaps: list[float] = []

    def finished(self) -> None:
        now = time.monotonic()
        self._gaps = [*self._gaps[-999:], now - self._last]
        self._last = now

    def limit(self) -> float:
        typical = statistics.median(self._gaps) if self._gaps else 0.0
        return max(self.at_least, self.factor * typical)

    @contextmanager
    def watching(self, running: as_completed) -> Iterator[None]:
        stop = threading.Event()
        thread = threading.Thread(
            target=self._watch, args=(running, stop), name="stall-watchdog", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _watch(self, running: as_completed, stop: threading.Event) -> None:
        while not stop.wait(min(self.limit() / 4, 5.0)):
            idle = time.monotonic() - self._last
            if idle > self.limit():
                futures = list(running.futures)
                try:
                    self.stalled = self._describe(futures, idle)
                except Exception as error:  # the run must stop even if the cluster cannot say
                    self.stalled = (
                        f"no task finished for {idle:.0f} s, and the cluster could not say "
                        f"which were in flight ({type(error).__name__}: {error}); finished "
                        "blocks are kept, so run the same command again to resume"
                    )
                self.client.cancel(futures)
                return

    def _describe(self, futures: list[Any], idle: float) -> str:
        if not self.client.scheduler_info(n_workers=-1)["workers"]:
            return (
                f"no task finished for {idle:.0f} s and no worker is connected: the cluster "
                "lost its workers (jobs cancelled, pre-empted or past their walltime?); "
                "finished blocks are kept, so run the same command again to resume"
            )
        where = {key: worker for worker, keys in self.client.processing().items() for key in keys}
        shown = ", ".join(f"{f.key} on {where.get(f.key, 'no worker')}" for f in futures[:5])
        more = f" and {len(futures) - 5} more" if len(futures) > 5 else ""
        return (
            f"no task finished for {idle:.0f} s (limit {self.limit():.0f} s); in flight: "
            f"{shown}{more}. Look at those workers (dashboard, logs); finished blocks are kept, "
            "so run the same command again to resume"
        )
