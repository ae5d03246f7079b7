"""How far a long stage is, told to a person now and then: blocks of a prediction or a weight
volume, steps of training.

A stage calls its *sink* with a :class:`Progress` after each unit of work; :class:`Every` passes
on only some of them (every ~30 s, every tenth of the way, and the last), so that a log a person
reads, or a progress bar in the Prefect UI, says how far a run is without a line per block.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

ProgressSink = Callable[["Progress"], None]


@dataclass(frozen=True, slots=True)
class Progress:
    """One stage's progress: ``done`` of ``total`` units after ``seconds``."""

    stage: str
    """What runs: ``predict``, ``weights``, ``train``."""
    done: int
    total: int | None
    """None where only a time budget bounds the stage (training for so many minutes)."""
    unit: str
    """What is counted: ``block``, ``step``."""
    seconds: float
    fraction: float
    """How much of the stage is done, 0 to 1 (training on a time budget: the larger of the
    steps' and the minutes' shares)."""
    rate: str = ""
    """Throughput as a person reads it, e.g. ``12.3 Mvoxel/s``."""
    detail: str = ""
    """Anything else worth a glance, e.g. ``loss 0.2113``."""

    @classmethod
    def of_blocks(cls, stage: str, done: int, total: int, voxels: int, seconds: float) -> Progress:
        """A block-wise stage's progress: ``done`` of ``total`` blocks, ``voxels`` written."""
        return cls(stage, done, total, "block", seconds, done / total, voxel_rate(voxels, seconds))

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the pace so far; None before anything is done."""
        if self.fraction <= 0:
            return None
        return self.seconds * (1 - min(self.fraction, 1.0)) / self.fraction

    def __str__(self) -> str:
        """E.g. ``predict: 1,200 / 4,096 blocks (29.3%), 45.1 Mvoxel/s, ETA 2 min 05 s``."""
        of = f" / {self.total:,}" if self.total is not None else ""
        parts = [f"{self.stage}: {self.done:,}{of} {self.unit}s "]
        parts.append(f"({100 * self.fraction:.1f}%)")
        if self.rate:
            parts.append(f", {self.rate}")
        eta = self.eta_seconds
        parts.append(", done" if self.fraction >= 1 else f", ETA {duration(eta)}" if eta else "")
        if self.detail:
            parts.append(f"; {self.detail}")
        return "".join(parts)


def voxel_rate(voxels: int, seconds: float) -> str:
    """Throughput in Mvoxel/s, with the digits that matter at small and large rates alike.

    >>> voxel_rate(45_100_000, 1.0), voxel_rate(8192, 1.0), voxel_rate(1, 0.0)
    ('45.1 Mvoxel/s', '0.00819 Mvoxel/s', '')
    """
    if seconds <= 0:
        return ""
    rate = voxels / seconds / 1e6
    return f"{rate:.1f} Mvoxel/s" if rate >= 1 else f"{rate:.3g} Mvoxel/s"


def duration(seconds: float | None) -> str:
    """Seconds as a person reads them.

    >>> duration(42.4), duration(125), duration(7322), duration(None)
    ('42 s', '2 min 05 s', '2 h 02 min', '?')
    """
    if seconds is None:
        return "?"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class Every:
    """A sink that passes progress on to ``sink`` every ``seconds``, at each ``step`` of the way
    (a fraction), and when the stage is done; nothing in between.
    """

    def __init__(self, sink: ProgressSink, *, seconds: float = 30.0, step: float = 0.1) -> None:
        self.sink, self.seconds, self.step = sink, seconds, step
        self._last_time = time.monotonic()
        self._steps_passed = 0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        # Rounded first: 0.3 / 0.1 is 2.9999999999999996, and 30% is the third step.
        steps = math.floor(round(progress.fraction / self.step, 9))
        if (
            progress.fraction >= 1
            or steps > self._steps_passed
            or now - self._last_time >= (self.seconds)
        ):
            self._last_time, self._steps_passed = now, steps
            self.sink(progress)
