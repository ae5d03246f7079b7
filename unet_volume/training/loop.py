"""Training: lazily sampled tiles, weighted soft-max cross entropy, validation, checkpoints, resume.

The loss is the paper's pixel-wise soft-max cross entropy weighted per voxel,
``E = sum_x w(x) * -log p_l(x)(x) / sum_x w(x)``. The weights come from a weight-map
volume (``unet-volume weights``: class balance plus the border term separating touching
cells), given or, by default, computed beside the checkpoint (``weight_map``; it halved the
held-out Rand error on ISBI, benchmarks/RESULTS.md), else from inverse class frequencies
(``class_balance``), times an annotation mask
(unannotated voxels weigh 0, as in 3D U-Net's sparse annotation).

Tiles are drawn by :class:`~unet_volume.training.sampling.TileSampler` (never a whole volume),
augmented and normalised in DataLoader workers (``loader_workers``) or in process.
Every ``validate_every`` steps the model is scored on a fixed grid of tiles of the
held-out ``validation_z_range``. Checkpoints are atomic; ``MODEL.state.pt`` beside the
checkpoint holds the optimizer state and learning curve, so a run can resume; the curve is
drawn to ``MODEL.curve.png``.

Usage::

    report = train("image.zarr", "labels.zarr", "model.pt", TrainConfig(minutes=3, z_range=(0, 20)))
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from unet_volume.io.locations import location, write_whole
from unet_volume.models.checkpoint import TrainedInput, save_model
from unet_volume.models.unet import UNet, channels_last
from unet_volume.progress import Progress, ProgressSink
from unet_volume.training.config import TrainConfig
from unet_volume.training.learning_curve import LearningCurve
from unet_volume.training.sampling import TileSampler, TrainingData
from unet_volume.training.start import (
    CheckedRun,
    check_training,
    close_samplers,
    fresh_start,
    samplers,
    state_path,
    weight_map_beside,
)
from unet_volume.training.tile_stream import TileStream, augment_tile, to_batch

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["CheckedRun", "TrainConfig", "TrainReport", "check_training", "train"]

log = logging.getLogger(__name__)

LOG_EVERY = 20  # steps between loss log lines; ``final_loss`` averages this many last steps
BINARY_CLASSES = ["background/membrane", "foreground/interior"]
DEFAULT_CONFIG = TrainConfig()


@dataclass
class TrainReport:
    """What a run did. ``final_loss`` is the mean of the last ``LOG_EVERY`` steps' losses."""

    steps: int
    seconds: float
    final_loss: float
    checkpoint: Path | str
    curve: LearningCurve

    @property
    def losses(self) -> list[float]:
        return self.curve.losses

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum w * CE / sum w``: the paper's weighted soft-max loss, independent of tile size."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * weights).sum() / weights.sum().clamp_min(1e-8)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    lr = config.resolved_learning_rate()
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.99)  # the paper's momentum
    return torch.optim.Adam(model.parameters(), lr=lr)


def use_all_cores() -> None:
    """Give torch every usable core, unless the user chose a thread count (OMP_NUM_THREADS)."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() != cores:
        torch.set_num_threads(cores)


def train(
    image: str | Path,
    labels: str | Path,
    out: str | Path,
    config: TrainConfig = DEFAULT_CONFIG,
    *,
    weights: str | Path | None = None,
    mask: str | Path | None = None,
    resume: str | Path | None = None,
    init: str | Path | None = None,
    client: Client | None = None,
    progress: bool = False,
    on_progress: ProgressSink | None = None,
) -> TrainReport:
    """Train a U-Net on random tiles of ``image`` against ``labels``; checkpoint to ``out``.

    ``weights`` is a per-voxel loss-weight volume, ``mask`` an annotation mask; ``resume``
    continues from a checkpoint (its weights, normalisation, optimizer state, curve and clock;
    ``steps`` and ``minutes`` count the whole run); ``init`` starts a new run from another
    model's network and weights (fine-tuning; see :mod:`unet_volume.training.start`). Inputs are
    validated first: bad input raises InputError and writes nothing. ``progress`` shows a bar;
    ``on_progress`` hears of every step, with the running loss (:mod:`unet_volume.progress`).
    """
    run = check_training(
        image, labels, config, weights=weights, mask=mask, resume=resume, init=init
    )
    config, data, start, previous = run.config, run.data, run.init, run.previous
    # Everything checked: only now may the weight map be written beside the checkpoint.
    if weights is None and (found := weight_map_beside(out, labels, config, client)):
        data = TrainingData.open(image, labels, weights=found, mask=mask, z_range=config.z_range)
    sampler, validation = samplers(data, config)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    use_all_cores()
    if previous is not None:
        model, normalization, balance = (
            previous["model"],
            previous["normalization"],
            previous["balance"],
        )
    else:
        model, normalization, balance = fresh_start(data, sampler, config, rng)
        if start is not None:
            model.load_state_dict(start.state_dict)
    log.info("normalisation %s; class weights %s", normalization, balance.round(3))
    loop = _Loop(model, config, sampler, validation, normalization, balance, location(out))
    loop.on_progress = on_progress
    if start is not None:  # where the weights came from
        loop.origin = {"checkpoint": str(init), "sha256": start.sha256}
    if previous is not None:
        loop.restore(previous["state"])
    try:
        return loop.run(progress)
    finally:
        close_samplers(sampler, validation)


class _Loop:
    """The optimisation loop and its bookkeeping (curve, clock, checkpoints)."""

    def __init__(
        self,
        model: UNet,
        config: TrainConfig,
        sampler: TileSampler,
        validation: TileSampler | None,
        normalization: tuple[float, float],
        balance: np.ndarray,
        out: Path | str,
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.layout = channels_last(config.model.ndim)  # same sums, in oneDNN's fast order
        # torch's stub lacks memory_format, which Module.to takes
        self.model = model.to(self.device, memory_format=self.layout).train()  # type: ignore[call-overload]
        self.config, self.sampler, self.validation, self.out = config, sampler, validation, out
        self.normalization, self.balance = normalization, balance
        self.optimizer = build_optimizer(self.model, config)
        self.curve = LearningCurve()
        self.seconds = 0.0
        self.amp = config.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.on_progress: ProgressSink | None = None
        self.origin: dict[str, Any] | None = None  # the model it was initialised from

    def restore(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "curve" in state:
            self.curve = LearningCurve.from_dict(state["curve"])
        self.seconds = float(state.get("seconds", 0.0))

    def batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        stream = TileStream(
            self.sampler, self.config, self.normalization, self.balance, len(self.curve.losses)
        )
        loader = DataLoader(
            stream,
            batch_size=self.config.batch_size,
            num_workers=self.config.loader_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y, w in loader:
            yield to_batch(x, y, w, self.config.model.ndim)

    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
        x = x.to(self.device, non_blocking=True, memory_format=self.layout)
        y, w = (t.to(self.device, non_blocking=True) for t in (y, w))
        with torch.autocast(self.device.type, enabled=self.amp):
            loss = weighted_cross_entropy(self.model(x), y, w)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def progress(self) -> float:
        c, done = self.config, len(self.curve.losses)
        fractions = [
            done / c.steps if c.steps else 0.0,
            self.seconds / (60 * c.time_budget) if c.time_budget else 0.0,
        ]
        return max(fractions)

    def run(self, show_progress: bool) -> TrainReport:
        start = time.perf_counter() - self.seconds
        bar = tqdm(
            total=self.config.steps,
            initial=len(self.curve.losses),
            disable=not show_progress,
            desc="train",
            unit="step",
        )
        with bar:
            for x, y, w in self.batches():
                if self.progress() >= 1.0:
                    break
                for group in self.optimizer.param_groups:
                    group["lr"] = self.config.learning_rate_at(self.progress())
                self.curve.losses.append(self.step(x, y, w))
                self.seconds = time.perf_counter() - start
                bar.update()
                self.after_step(bar)
                if self.on_progress is not None:
                    self.on_progress(self.told())
        if len(self.curve.losses) % self.config.checkpoint_every:  # else just saved
            self.save()
        return TrainReport(
            len(self.curve.losses), self.seconds, self.final_loss(), self.out, self.curve
        )

    def told(self) -> Progress:
        """How far training is, as :mod:`unet_volume.progress` tells it."""
        n = len(self.curve.losses)
        rate = f"{n / self.seconds:.2f} steps/s" if self.seconds > 0 else ""
        fraction = min(self.progress(), 1.0)
        detail = f"loss {self.final_loss():.4f}"
        return Progress("train", n, self.config.steps, "step", self.seconds, fraction, rate, detail)

    def after_step(self, bar: tqdm) -> None:
        n = len(self.curve.losses)
        if n % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{self.final_loss():.4f}")
            log.info("step %d: loss %.4f (mean of last %d)", n, self.final_loss(), LOG_EVERY)
        if self.validation is not None and n % self.config.validate_every == 0:
            scores = self.validate()
            bar.set_postfix(
                loss=f"{self.final_loss():.4f}", val_error=f"{scores['pixel_error']:.4f}"
            )
        if n % self.config.checkpoint_every == 0:
            self.save()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and pixel error on a fixed grid of held-out tiles (dropout off)."""
        assert self.validation is not None
        self.model.eval()
        loss, errors, voxels = 0.0, 0.0, 0.0
        mean, std = self.normalization
        boxes = self.validation.grid(self.config.validation_tiles)
        registration = self.config.registration()
        for box in boxes:
            tile = augment_tile(
                self.validation.read(box),
                registration,
                np.random.default_rng(0),  # draws nothing: no random part
                ndim=self.config.model.ndim,
            )
            image = torch.from_numpy((tile.image - mean) / std)[None]
            labels, weights = (
                torch.from_numpy(tile.labels)[None],
                torch.from_numpy(tile.weights)[None],
            )
            x, y, w = to_batch(image, labels, weights, self.config.model.ndim)
            logits = self.model(x.to(self.device))
            loss += float(weighted_cross_entropy(logits, y.to(self.device), w.to(self.device)))
            annotated = w.to(self.device) > 0
            errors += float(((logits.argmax(1) != y.to(self.device)) & annotated).sum())
            voxels += float(annotated.sum())
        self.model.train()
        scores = {
            "step": float(len(self.curve.losses)),
            "loss": loss / len(boxes),
            "pixel_error": errors / max(voxels, 1.0),
        }
        self.curve.validation.append(scores)
        log.info(
            "step %d: validation loss %.4f, pixel error %.4f",
            scores["step"],
            scores["loss"],
            scores["pixel_error"],
        )
        return scores

    def final_loss(self) -> float:
        recent = self.curve.losses[-LOG_EVERY:]
        return float(np.mean(recent)) if recent else math.nan

    def save(self) -> None:
        """Checkpoint, resume state and learning curve, each written whole."""
        save_model(self.model, self.out, metadata=self.metadata())
        state = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "curve": self.curve.to_dict()}, state)
        write_whole(state_path(self.out), state.getvalue())
        write_whole(f"{self.out}.curve.png", self.curve.png())
        log.info("checkpoint %s at step %d", self.out, len(self.curve.losses))

    def metadata(self) -> dict[str, Any]:
        k = self.config.model.num_classes
        mean, std = self.normalization
        trained = TrainedInput(mean, std, tuple(self.config.label_offset or ()))
        return {
            **trained.to_metadata(),
            "classes": BINARY_CLASSES if k == 2 else [str(i) for i in range(k)],
            "training": {
                "config": self.config.to_dict(),
                "learning_rate": self.config.resolved_learning_rate(),
                "class_weights": [float(w) for w in self.balance],
                "image": self.sampler.data.image.url,
                "labels": self.sampler.data.labels.url,
                "weights": self.sampler.data.weights.url if self.sampler.data.weights else None,
                "steps": len(self.curve.losses),
                "seconds": round(self.seconds, 3),
                "final_loss": self.final_loss(),
                "validation": self.curve.validation[-1] if self.curve.validation else None,
                "init": self.origin,
            },
        }
