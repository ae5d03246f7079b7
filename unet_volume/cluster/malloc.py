"""The worker processes' native heap (glibc): its thresholds, and giving free memory back.

Two measured effects (benchmarks/RESULTS.md):

- With the nanny's ``MALLOC_TRIM_THRESHOLD_`` glibc maps and unmaps every large torch
  activation: :func:`tune_for_torch` sets mmap/trim thresholds that keep inference fast.
- Freed memory stays resident in glibc's arenas: a worker that ran many block tasks of
  varying shapes holds more and more of it, so its peak grows with the volume though each
  task's working set does not. :func:`give_back` (``malloc_trim``) returns it; tasks that take
  seconds call it after each task, the engine after every 16th (a trim per task cost 15% of
  its throughput: the next task faults its pages in again).

Elsewhere than glibc (macOS), both do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_for_torch() -> None:
    """Keep activations of up to 32 MiB on the heap and up to 256 MiB of it free, resident."""
    libc = _libc()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to fix
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 2**20)


def give_back() -> None:
    """Return the free memory of every arena to the system (``malloc_trim(0)``)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to release
        _libc().malloc_trim(0)


def peak_resident_mb() -> float:
    """This process's peak resident memory in MiB: Linux's ``VmHWM``, else ``ru_maxrss``.

    Not ``ru_maxrss`` where ``/proc`` has the answer: Linux carries it across ``exec``, so a
    worker process spawned by a client of 950 MB reported 954 MB before it had run a task
    (``VmHWM``: 62 MB).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # POSIX

    per_mb = 2**20 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None
