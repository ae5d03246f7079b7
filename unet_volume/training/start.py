"""How a training run starts: a new network, one that resumes a run, or another model's weights.

- Fresh: a new network (He initialisation), the input normalisation and class weights
  estimated from sampled tiles of this data.
- Resumed (``--resume``): the checkpoint's network, normalisation, class weights, optimizer
  state and learning curve, so the run goes on where it stopped; the run must ask for the
  same network.
- The loss weights: a weight-map volume the caller gives, else the paper's weight map of the
  labels, computed once beside the checkpoint (``OUT.weights.zarr``; a second run, or a
  resumed one, finds it done), with class frequencies from the training slices only.
- Initialised (``--init``): another model's network and weights (an ensemble's first
  network), with this data's normalisation and class weights and a new optimizer: fine-tuning,
  as users adapt a model to a new volume from a few labelled slices. The checkpoint's network
  wins over the run's network options, which describe a new one.

:func:`check_training` makes every check of a run before it writes anything.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client

from unet_volume.cluster.client import open_client
from unet_volume.errors import InputError
from unet_volume.io.locations import read_whole
from unet_volume.models.checkpoint import Checkpoint, read_checkpoint, trained_normalization
from unet_volume.models.unet import UNet
from unet_volume.training.augment import required_apron
from unet_volume.training.config import TrainConfig
from unet_volume.training.sampling import TileSampler, TrainingData
from unet_volume.training.tile_stream import class_weights, estimate_statistics
from unet_volume.training.weight_map import WeightMapConfig
from unet_volume.training.weight_volume import compute_weight_volume

log = logging.getLogger(__name__)


def state_path(checkpoint: str | Path) -> str:
    """Where the optimizer state and learning curve of ``checkpoint`` are kept (for resume)."""
    return f"{checkpoint}.state.pt"


def weight_map_beside(
    out: str | Path, labels: str | Path, config: TrainConfig, client: Client | None
) -> str | None:
    """The paper's weight map of ``labels`` for this run, in ``OUT.weights.zarr``; None where
    the run weighs by class balance (``weight_map`` off, or more than 2 classes).

    Computed on ``client`` (by default a LocalCluster for the occasion); a complete map of the
    same labels and recipe is reused and an incomplete one resumed, so a resumed run, or one
    run again, costs nothing here.
    """
    if not config.weight_map or config.model.num_classes != 2:
        return None
    url = f"{out}.weights.zarr"
    recipe = WeightMapConfig(ndim=config.model.ndim)
    with nullcontext(client) if client is not None else open_client(dashboard=False) as c:
        report = compute_weight_volume(
            str(labels), url, recipe, client=c, balance_z_range=config.z_range
        )
    log.info("weight map %s: %d block(s) computed, %d found", url, report.blocks, report.skipped)
    return url


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
    train loads its weights, and the new checkpoint records its path and sha256)."""
    checkpoint = read_checkpoint(init)
    if checkpoint.members > 1:  # fine-tuning adapts one network, as users do
        log.info("--init %s: the first of its %d networks", init, checkpoint.members)
        checkpoint = checkpoint.network(0)
    return dataclasses.replace(config, model=checkpoint.config), checkpoint


def one_network(path: str | Path, option: str) -> Checkpoint:
    """The checkpoint at ``path``, refused if it is an ensemble: a run trains one network."""
    checkpoint = read_checkpoint(path)
    if checkpoint.members != 1:
        raise InputError(
            f"{option} {path} is an ensemble of {checkpoint.members} networks and a run trains "
            "one; pass one of its networks' checkpoints (--init takes an ensemble's first)"
        )
    return checkpoint


def check_channels(init: Checkpoint, channels: int, name: str | Path) -> None:
    """Refuse to fine-tune the model of checkpoint ``name`` on an image of other channels."""
    if init.config.in_channels != channels:
        raise InputError(
            f"model {name} takes {init.config.in_channels} channel(s), the image has "
            f"{channels}; fine-tune it on an image of its channels, or train a new model"
        )


def resumed(resume: str | Path, config: TrainConfig) -> dict[str, Any]:
    """The network, normalisation, class weights and loop state of the run to continue."""
    checkpoint = one_network(resume, "--resume")
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
    normalization = trained_normalization(checkpoint, f"checkpoint {resume}")
    stored = read_whole(state_path(resume))
    state = {} if stored is None else torch.load(io.BytesIO(stored), weights_only=True)
    training = checkpoint.metadata.get("training", {})
    balance = np.asarray(training.get("class_weights", [1.0] * config.model.num_classes))
    # The clock goes on too: steps/s and the time budget count the whole run, as steps do.
    state["seconds"] = float(training.get("seconds", 0.0))
    return {
        "model": checkpoint.to_model(),
        "normalization": normalization,
        "balance": balance,
        "state": state,
    }


@dataclass(frozen=True)
class CheckedRun:
    """A training run that passed every check: its recipe (with ``--init``'s network), its
    data, the checkpoint it starts from (``init``) or the state it resumes (``previous``)."""

    config: TrainConfig
    data: TrainingData
    init: Checkpoint | None
    previous: dict[str, Any] | None


def check_training(
    image: str | Path,
    labels: str | Path,
    config: TrainConfig,
    *,
    weights: str | Path | None = None,
    mask: str | Path | None = None,
    resume: str | Path | None = None,
    init: str | Path | None = None,
) -> CheckedRun:
    """Every check :func:`train` makes before it writes: the image, labels, weights and mask,
    the tiles they give, and the network of ``init`` or ``resume``. Raises InputError (or
    CheckpointError); writes nothing, so a flow calls it before its first write."""
    if init is not None and resume is not None:
        raise InputError(
            "got both --init and --resume: --resume continues a run, --init starts a new one "
            "from a model's weights; pass one of them"
        )
    start = None
    if init is not None:
        config, start = with_network_of(init, config)
    data = TrainingData.open(image, labels, weights=weights, mask=mask, z_range=config.z_range)
    close_samplers(*samplers(data, config))  # the tiles fit the data
    if start is not None and init is not None:
        check_channels(start, data.image.channels, init)
    previous = resumed(resume, config) if resume is not None else None
    return CheckedRun(config, data, start, previous)


def close_samplers(sampler: TileSampler, validation: TileSampler | None) -> None:
    sampler.close()
    if validation is not None:
        validation.close()


def samplers(data: TrainingData, config: TrainConfig) -> tuple[TileSampler, TileSampler | None]:
    """The training tiles (with the augmentation's apron) and the held-out ones, if any."""
    geometry = config.geometry()
    apron = required_apron(config.augmentation(), geometry.input_shape, ndim=config.model.ndim)
    classes = config.model.num_classes
    sampler = TileSampler(data, geometry, num_classes=classes, apron=_frame(apron))
    if config.validation_z_range is None:
        return sampler, None
    held_out = data.with_region(config.validation_z_range)
    registered = required_apron(config.registration(), geometry.input_shape, ndim=config.model.ndim)
    return sampler, TileSampler(held_out, geometry, num_classes=classes, apron=_frame(registered))


def _frame(apron: tuple[int, ...]) -> tuple[int, int, int]:
    """Apron per (z, y, x) axis from :func:`required_apron`, which omits z for 2D nets."""
    padded = (0,) * (3 - len(apron)) + tuple(apron)
    return (padded[0], padded[1], padded[2])
