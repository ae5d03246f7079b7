"""How a training run starts: a new network, one that resumes a run, or another model's weights.

- Fresh: a new network (He initialisation), the input normalisation and class weights
  estimated from sampled tiles of this data.
- Resumed (``--resume``): the checkpoint's network, normalisation, class weights, optimizer
  state and learning curve, so the run goes on where it stopped; the run must ask for the
  same network.
- Initialised (``--init``): another model's network and weights, with this data's
  normalisation and class weights and a new optimizer: fine-tuning, as users adapt a model to
  a new volume from a few labelled slices. The checkpoint's network wins over the run's network
  options, which describe a new one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_volume.checkpoint import Checkpoint, read_checkpoint
from unet_volume.errors import CheckpointError, InputError
from unet_volume.model import UNet
from unet_volume.sampling import TileSampler, TrainingData
from unet_volume.tile_stream import class_weights, estimate_statistics
from unet_volume.train_config import TrainConfig


def state_path(checkpoint: Path) -> Path:
    """Where the optimizer state and learning curve of ``checkpoint`` are kept (for resume)."""
    return checkpoint.with_name(checkpoint.name + ".state.pt")


def fresh_start(
    data: TrainingData, sampler: TileSampler, config: TrainConfig, rng: np.random.Generator
) -> tuple[UNet, tuple[float, float], np.ndarray]:
    """A new network, the input normalisation and the class weights, from sampled tiles."""
    mean, std, counts = estimate_statistics(sampler, rng)
    classes = config.model.num_classes
    balance = class_weights(counts) if config.class_balance else np.ones(classes)
    return UNet.from_config(config.unet_config(data.image.channels)), (mean, std), balance


def with_network_of(init: str | Path, config: TrainConfig) -> tuple[TrainConfig, Checkpoint]:
    """``config`` training the network of checkpoint ``init``, and that checkpoint (read once:
    :func:`initialised` takes its weights, the new checkpoint records its path and sha256)."""
    checkpoint = read_checkpoint(init)
    return dataclasses.replace(config, model=checkpoint.config), checkpoint


def initialised(model: UNet, init: Checkpoint, channels: int, name: str | Path) -> UNet:
    """``model`` (built by :func:`fresh_start` for the network of ``init``, the checkpoint at
    ``name``) with its weights."""
    if init.config.in_channels != channels:
        raise InputError(
            f"model {name} takes {init.config.in_channels} channel(s), the image has "
            f"{channels}; fine-tune it on an image of its channels, or train a new model"
        )
    model.load_state_dict(init.state_dict)
    return model


def resumed(resume: str | Path, config: TrainConfig) -> dict[str, Any]:
    """The network, normalisation, class weights and loop state of the run to continue."""
    checkpoint = read_checkpoint(resume)
    found, wanted = checkpoint.config, config.unet_config(checkpoint.config.in_channels)
    if found != wanted:
        differences = ", ".join(
            f"{name} {getattr(found, name)!r} (checkpoint) vs {getattr(wanted, name)!r} (run)"
            for name in found.to_dict()
            if getattr(found, name) != getattr(wanted, name)
        )
        raise InputError(
            f"checkpoint {resume} is another network than the run asks for: {differences}; "
            "pass the checkpoint's values or start a new run"
        )
    norm = checkpoint.metadata.get("normalization")
    if not norm:
        raise CheckpointError(
            f"checkpoint {resume} has no normalization; it was not written by training"
        )
    path = state_path(Path(resume))
    state = torch.load(path, weights_only=True) if path.exists() else {}
    balance = np.asarray(
        checkpoint.metadata.get("training", {}).get(
            "class_weights", [1.0] * config.model.num_classes
        )
    )
    return {
        "model": checkpoint.to_model(),
        "normalization": (float(norm["mean"]), float(norm["std"])),
        "balance": balance,
        "state": state,
    }
