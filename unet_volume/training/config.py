"""The recipe of a training run: one frozen, validated record, stored in each checkpoint.

Every option of ``unet-volume train`` and every parameter of the ``train`` flow is a field here
or of :class:`~unet_volume.models.config.UNetConfig`: its name, type, default and help text live in
this one place (:func:`~unet_volume.option_fields.option`), and the command line and the flow are
derived from them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from unet_volume.errors import InputError
from unet_volume.io.volumes import check_z_range
from unet_volume.label_offset import check_offset
from unet_volume.models.config import UNetConfig
from unet_volume.option_fields import Count, Natural, Shape3, Size, option
from unet_volume.tiling import TileGeometry
from unet_volume.training.augment import AugmentConfig

Augment = Literal["none", "plain", "paper", "upright"]
DEFAULT_LEARNING_RATE = {"adam": 1e-3, "sgd": 1e-2}  # SGD runs with the paper's momentum 0.99
TRAINING_MODEL = UNetConfig(base_channels=16)
"""The network trained by default: the paper's, with 16 base channels instead of 64 (CPUs)."""
DEFAULT_MINUTES = 3.0
"""The training budget of a run given neither steps nor minutes."""


def _over_training_model(value: object) -> object:
    """A network given in part (``{"depth": 2}``, a flow parameter) changes the one trained by
    default, not the paper's 64-channel net."""
    if isinstance(value, Mapping):
        return {**TRAINING_MODEL.to_dict(), **value}
    return value


TrainingNet = Annotated[UNetConfig, BeforeValidator(_over_training_model)]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """One training run's recipe; stored in the checkpoint's ``training`` metadata.

    ``model`` is the network to train; its ``in_channels`` is taken from the image, whatever
    it says here. ``tile_output`` is the (z, y, x) output of one training tile (its input
    follows from the net's geometry); a 2D net takes the tile's z slices as extra batch items.
    Training stops after ``steps`` or ``minutes`` (of training, after a second or two of
    set-up), whichever comes first. Given neither, it trains for :data:`DEFAULT_MINUTES`; given
    ``steps`` alone, it has no time limit (:attr:`time_budget`).
    """

    model: TrainingNet = dataclasses.field(
        default=TRAINING_MODEL,
        metadata={
            "description": "the network to train (default: the paper's with 16 base channels); "
            "in_channels is the image's"
        },
    )
    tile_output: Shape3 = option((1, 132, 132), "output shape (z, y, x) of one training tile")
    batch_size: Count = option(4, "tiles per step")
    optimizer: Literal["adam", "sgd"] = option(
        "adam", "adam, or sgd with momentum 0.99 as the paper"
    )
    learning_rate: Size | None = option(
        None, "learning rate (default: the optimizer's, adam 1e-3, sgd 1e-2)"
    )
    steps: Count | None = option(None, "stop after this many steps (default: only --minutes)")
    minutes: Size | None = option(
        None, f"training time budget in minutes (default: {DEFAULT_MINUTES:g}, none with --steps)"
    )
    z_range: tuple[Natural, Count] | None = option(
        None, "train on slices BEGIN..END-1 only, e.g. 0:20 (default: all)"
    )
    validation_z_range: tuple[Natural, Count] | None = option(
        None, "held-out slices scored every --validate-every steps, e.g. 20:25 (default: none)"
    )
    class_balance: bool = option(
        True, "weigh the classes by inverse frequency when no --weights map is given"
    )
    weight_map: bool = option(
        True,
        "weigh the loss with the paper's weight map (w0 10, sigma 5 px: class balance plus a "
        "border term between touching cells), computed once into OUT.weights.zarr when no "
        "--weights map is given (2-class labels); off: class balance only",
    )
    augment: Augment = option(
        "paper",
        "paper: elastic deformation (3x3 grid, 10 px), any rotation, flips and gray-value "
        "changes (the better for long runs: benchmarks/RESULTS.md); "
        "plain: random flips and right-angle turns (the better for short runs); "
        "upright: the paper's without rotations or flips (learns a label offset itself, but "
        "--label-offset with paper scored better); none",
    )
    label_offset: tuple[float, ...] | None = option(
        None,
        "where the image's boundaries sit against the labels', in voxels per axis (y,x; at most "
        "1): training samples the image that far from each label, and prediction reads the "
        "image moved alike (benchmarks/label_offset.py measures it for a stack)",
    )
    lr_schedule: Literal["constant", "cosine"] = option(
        "cosine", "cosine decay over the run's steps or minutes, or constant"
    )
    validate_every: Count = option(100, "steps between validations")
    validation_tiles: Count = option(8, "held-out tiles scored per validation")
    checkpoint_every: Count = option(200, "steps between checkpoints")
    loader_workers: Natural = option(
        0, "processes that read and augment tiles; 0 reads them in the training process"
    )
    amp: bool = option(True, "use mixed precision on CUDA (no effect on CPUs)")
    seed: Natural = option(0, "random seed")

    def __post_init__(self) -> None:
        # Everything checked here, once, so a bad value fails before any data is read.
        if not isinstance(self.model, UNetConfig):
            raise InputError(f"model must be a UNetConfig, got {self.model!r}")
        for name, low in (
            ("batch_size", 1),
            ("checkpoint_every", 1),
            ("seed", 0),
            ("validate_every", 1),
            ("validation_tiles", 1),
            ("loader_workers", 0),
        ):
            if not (
                _is_number(value := getattr(self, name)) and isinstance(value, int) and value >= low
            ):
                raise InputError(f"{name} must be an int >= {low}, got {value!r}")
        if self.optimizer not in DEFAULT_LEARNING_RATE:
            raise InputError(f"optimizer {self.optimizer!r} is unknown; pass 'adam' or 'sgd'")
        if self.augment not in ("none", "plain", "paper", "upright"):
            raise InputError(
                f"augment {self.augment!r} is unknown; pass 'none', 'plain' (flips and right-angle "
                "turns), 'paper' (elastic deformation, rotations, flips, gray values) or "
                "'upright' (the paper's without rotations and flips)"
            )
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(
                f"lr_schedule {self.lr_schedule!r} is unknown; pass 'constant' or 'cosine'"
            )
        if self.learning_rate is not None and not (
            _is_number(self.learning_rate) and self.learning_rate > 0
        ):
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate!r}; e.g. 1e-3")
        self._check_stopping()
        if self.label_offset is not None:
            object.__setattr__(self, "label_offset", check_offset(self.label_offset))
            if len(self.label_offset) > self.model.ndim:
                raise InputError(
                    f"label_offset {self.label_offset} has {len(self.label_offset)} axes; a "
                    f"{self.model.ndim}D net's tiles move along {self.model.ndim}: pass y,x"
                    + (" or z,y,x" if self.model.ndim == 3 else "")
                )
        object.__setattr__(self, "tile_output", self._checked_tile_output())
        for name in ("z_range", "validation_z_range"):
            value = getattr(self, name)
            if value is not None:  # the volume's depth is checked when it is opened
                object.__setattr__(self, name, check_z_range(value, None, what=name))

    def _check_stopping(self) -> None:
        if self.steps is not None and not _positive_int(self.steps):
            raise InputError(f"steps must be an int >= 1 or None, got {self.steps!r}")
        if self.minutes is not None and not (_is_number(self.minutes) and self.minutes > 0):
            raise InputError(f"minutes must be > 0 or None, got {self.minutes!r}; e.g. minutes=3")

    @property
    def time_budget(self) -> float | None:
        """Minutes of training allowed: ``minutes``, else none when ``steps`` bound the run.

        A retrain of 5000 steps once stopped at 257, the default budget's; so the default
        applies only to a run given neither.

        >>> TrainConfig().time_budget, TrainConfig(steps=5000).time_budget
        (3.0, None)
        """
        if self.minutes is not None:
            return float(self.minutes)
        return None if self.steps is not None else DEFAULT_MINUTES

    def _checked_tile_output(self) -> tuple[int, int, int]:
        shape = tuple(self.tile_output)
        if len(shape) != 3 or not all(_positive_int(s) for s in shape):
            raise InputError(
                f"tile_output {shape} must be 3 positive ints (z, y, x), e.g. (1, 132, 132)"
            )
        geometry = self.geometry()
        if geometry.output_shape != shape:
            net = f"{self.model.ndim}D depth-{self.model.depth} U-Net"
            raise InputError(
                f"tile_output {shape} is not a valid output of a {net}; "
                f"the nearest valid one above is {geometry.output_shape}: pass that"
            )
        return shape

    def geometry(self) -> TileGeometry:
        """The training tile: the smallest valid tile whose output covers ``tile_output``."""
        return TileGeometry.for_unet(
            self.model.ndim, self.model.depth, min_output=tuple(self.tile_output)
        )

    def resolved_learning_rate(self) -> float:
        return float(self.learning_rate or DEFAULT_LEARNING_RATE[self.optimizer])

    def augmentation(self) -> AugmentConfig:
        """The augmentation recipe (none, plain flips and turns, the paper's, or upright), with
        the image sampled ``label_offset`` from each label where one is given."""
        recipe = {
            "none": AugmentConfig.none(),
            "plain": AugmentConfig.plain(),
            "paper": AugmentConfig(),
            "upright": AugmentConfig.upright(),
        }[self.augment]
        return dataclasses.replace(recipe, image_offset=self.label_offset or ())

    def registration(self) -> AugmentConfig:
        """No augmentation, but the image sampled ``label_offset`` from each label: how the
        held-out tiles are read, as prediction reads the image."""
        return dataclasses.replace(AugmentConfig.none(), image_offset=self.label_offset or ())

    def learning_rate_at(self, progress: float) -> float:
        """The learning rate at ``progress`` in [0, 1] of the run (steps or time, the further).

        >>> TrainConfig(learning_rate=1.0, lr_schedule="cosine").learning_rate_at(0.5)
        0.5
        """
        base = self.resolved_learning_rate()
        if self.lr_schedule == "constant":
            return base
        return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists) for the checkpoint's metadata."""
        values = dataclasses.asdict(self)  # the model becomes a dict too
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def unet_config(self, in_channels: int) -> UNetConfig:
        """The network to build for an image of ``in_channels`` channels."""
        return dataclasses.replace(self.model, in_channels=in_channels)
