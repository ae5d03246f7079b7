"""Progress a person can follow: a line now and then, not one per block."""

from __future__ import annotations

from unet_volume.progress import Every, Progress


def blocks(done: int, total: int = 100, seconds: float = 1.0) -> Progress:
    return Progress("predict", done, total, "block", seconds, done / total, "12.5 Mvoxel/s")


def test_progress_reads_as_a_sentence_with_an_eta_from_the_pace_so_far() -> None:
    assert str(blocks(25, seconds=30.0)) == (
        "predict: 25 / 100 blocks (25.0%), 12.5 Mvoxel/s, ETA 1 min 30 s"
    )
    assert str(blocks(100)).endswith(", done")
    training = Progress("train", 40, 1850, "step", 40.0, 0.5, "1.00 steps/s", "loss 0.2113")
    assert str(training) == ("train: 40 / 1,850 steps (50.0%), 1.00 steps/s, ETA 40 s; loss 0.2113")


def test_progress_has_no_eta_before_anything_is_done() -> None:
    assert blocks(0).eta_seconds is None and "ETA" not in str(blocks(0))


def test_every_passes_on_each_tenth_of_the_way_and_the_end_only() -> None:
    heard: list[int] = []
    every = Every(lambda p: heard.append(p.done), seconds=3600, step=0.1)
    for done in range(1, 101):
        every(blocks(done))
    assert heard == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def test_every_passes_on_everything_when_the_interval_has_passed() -> None:
    heard: list[int] = []
    every = Every(lambda p: heard.append(p.done), seconds=0.0, step=0.5)
    for done in (1, 2, 3):
        every(blocks(done))
    assert heard == [1, 2, 3]
