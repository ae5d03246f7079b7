"""Object-store requests tried again after transient faults, one request at a time, counted.

Object stores throttle (HTTP 503 SlowDown), time out, drop connections and cut bodies short
under load. A task reads many chunks in one Zarr call; were a fault to fail the call, the
retry would fetch every chunk again, and at a few percent of faulty requests a call of 50
chunks would rarely succeed at all. :class:`RetryingStore` wraps a remote Zarr store so that
each request (a chunk, a shard's byte range, a metadata key) is tried again on its own, after
an exponential backoff with full jitter (so that the workers a throttled store slowed down do
not all come back at once). A permanent error (403, 404, a bad key) is not retried.

Every retry, and every retry the S3 client made by itself (botocore retries throttling and
dropped connections before they reach us), is counted per worker process: :func:`counted`
gives the counts, which the engine sums over its workers into the run report and the output's
run record, so ``status`` says how the store behaved.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from zarr.abc.store import Store
from zarr.storage import WrapperStore

from unet_volume.errors import RETRY_STATUSES, is_transient

T = TypeVar("T")
log = logging.getLogger(__name__)

ATTEMPTS = 8
"""Tries per request: with 5% of requests failing, 8 tries all fail once in 4 * 10^10."""
FIRST_DELAY = 0.05
"""Seconds: the first backoff's upper bound; it doubles per try, up to :data:`MAX_DELAY`."""
MAX_DELAY = 5.0

_counts: Counter[str] = Counter()
_lock = threading.Lock()


def count(kind: str) -> None:
    """Count one transient fault of ``kind`` in this process."""
    with _lock:
        _counts[kind] += 1


def counted() -> dict[str, int]:
    """The transient faults met in this process so far, per kind (``503``, ``ConnectionError``,
    ...): a worker's lifetime counts, which the engine takes differences of."""
    with _lock:
        return dict(_counts)


def faults_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The faults counted between two :func:`counted` readings of one process."""
    grown = {kind: n - before.get(kind, 0) for kind, n in after.items()}
    return {kind: n for kind, n in sorted(grown.items()) if n > 0}


def describe_faults(faults: dict[str, int]) -> str:
    """``12 transient store faults retried (503: 10, ClientPayloadError: 2)``, or ``""``.

    >>> describe_faults({"503": 10, "ClientPayloadError": 2})
    '12 transient store faults retried (503: 10, ClientPayloadError: 2)'
    """
    if not faults:
        return ""
    kinds = ", ".join(f"{kind}: {n}" for kind, n in faults.items())
    return f"{sum(faults.values())} transient store faults retried ({kinds})"


def fault_kind(error: BaseException) -> str:
    """A short name of a transient fault: its HTTP status where it has one, else its type."""
    status = getattr(error, "status", None) or getattr(error, "status_code", None)
    return str(status) if isinstance(status, int) else type(error).__name__


def backoff(attempt: int) -> float:
    """Seconds to wait before try ``attempt + 1``: full jitter over a doubling bound."""
    return random.uniform(0, min(MAX_DELAY, FIRST_DELAY * 2**attempt))


async def retried(call: Callable[[], Awaitable[T]], what: str) -> T:
    """``await call()``, tried again after transient faults (:func:`is_transient`)."""
    for attempt in range(ATTEMPTS):
        try:
            return await call()
        except Exception as error:
            if attempt == ATTEMPTS - 1 or not is_transient(error):
                raise
            count(fault_kind(error))
            log.info("%s: transient %s, try %d", what, fault_kind(error), attempt + 2)
            await asyncio.sleep(backoff(attempt))
    raise AssertionError("unreachable")


class RetryingStore(WrapperStore[Store]):
    """A Zarr store whose reads, writes and deletes are retried one request at a time."""

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        result = await retried(lambda: self._store.get(key, *args, **kwargs), key)
        _watch_client(self._store)
        return result

    async def get_partial_values(self, *args: Any, **kwargs: Any) -> Any:
        return await retried(lambda: self._store.get_partial_values(*args, **kwargs), "ranges")

    async def set(self, key: str, value: Any) -> None:
        await retried(lambda: self._store.set(key, value), key)

    async def exists(self, key: str) -> bool:
        return await retried(lambda: self._store.exists(key), key)

    async def delete(self, key: str) -> None:
        await retried(lambda: self._store.delete(key), key)

    def __repr__(self) -> str:
        return f"RetryingStore({self._store!r})"


def _watch_client(store: Any) -> None:
    """Count the retries an S3 client makes by itself (once per client)."""
    client = getattr(getattr(store, "fs", None), "_s3", None)  # s3fs' botocore client
    events = getattr(getattr(client, "meta", None), "events", None)
    if client is None or events is None or getattr(client, "_unet_volume_watched", False):
        return
    events.register("needs-retry.s3", _on_s3_attempt)
    client._unet_volume_watched = True


def _on_s3_attempt(response: Any = None, caught_exception: Any = None, **_: Any) -> None:
    """botocore's hook after each attempt: count those that failed transiently."""
    if caught_exception is not None:
        count(type(caught_exception).__name__)
    elif response is not None and response[0].status_code in RETRY_STATUSES:
        count(str(response[0].status_code))


def remote_store(url: str, *, read_only: bool = False) -> Any:
    """What Zarr should open for ``url``: a remote store wrapped in :class:`RetryingStore`; a
    local path as it is (local files do not throttle)."""
    if "://" not in url or url.startswith("file://"):
        return url
    from zarr.storage import FsspecStore

    return RetryingStore(FsspecStore.from_url(url, read_only=read_only))
