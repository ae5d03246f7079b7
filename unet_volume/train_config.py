"""The recipe of a training run: one frozen, validated record, stored in each checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from unet_volume.augment import AugmentConfig
from unet_volume.errors import InputError
from unet_volume.tiling import TileGeometry

DEFAULT_LEARNING_RATE = {"adam": 1e-3, "sgd": 1e-2}  # SGD runs with the paper's momentum 0.99


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """One training run's recipe; stored in the checkpoint's ``training`` metadata.

    ``tile_output`` is the (z, y, x) output of one training tile (its input follows from the
    net's geometry); a 2D net takes the tile's z slices as extra batch items. Training stops
    after ``steps`` or ``minutes`` (of training, after a second or two of set-up), whichever
    comes first. ``learning_rate=None`` means the optimizer's default (Adam 1e-3, SGD 1e-2).
    """

    base_channels: int = 16
    depth: int = 4
    ndim: int = 2
    num_classes: int = 2
    tile_output: tuple[int, int, int] = (1, 132, 132)
    batch_size: int = 4
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float | None = None
    steps: int | None = None
    minutes: float | None = 3.0
    z_range: tuple[int, int] | None = None
    validation_z_range: tuple[int, int] | None = None
    class_balance: bool = True
    augment: Literal["none", "plain", "paper"] = "plain"
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    validate_every: int = 100
    validation_tiles: int = 8
    checkpoint_every: int = 200
    loader_workers: int = 0
    amp: bool = True
    seed: int = 0
    dropout: float = 0.5

    def __post_init__(self) -> None:
        # Everything checked here, once, so a bad value fails before any data is read.
        for name, low in (
            ("base_channels", 1),
            ("depth", 1),
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
        if self.ndim not in (2, 3):
            raise InputError(f"ndim must be 2 or 3, got {self.ndim!r}; pass ndim=2 (slices) or 3")
        if not _positive_int(self.num_classes) or self.num_classes < 2:
            raise InputError(
                f"num_classes must be an int >= 2, got {self.num_classes!r}; pass 2 for binary"
            )
        if self.optimizer not in DEFAULT_LEARNING_RATE:
            raise InputError(f"optimizer {self.optimizer!r} is unknown; pass 'adam' or 'sgd'")
        if self.augment not in ("none", "plain", "paper"):
            raise InputError(
                f"augment {self.augment!r} is unknown; pass 'none', 'plain' (flips and right-angle "
                "turns) or 'paper' (elastic deformation, rotations, flips, gray values)"
            )
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(
                f"lr_schedule {self.lr_schedule!r} is unknown; pass 'constant' or 'cosine'"
            )
        if self.learning_rate is not None and not (
            _is_number(self.learning_rate) and self.learning_rate > 0
        ):
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate!r}; e.g. 1e-3")
        if not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}; pass 0.5 or 0")
        self._check_stopping()
        object.__setattr__(self, "tile_output", self._checked_tile_output())
        object.__setattr__(self, "z_range", _checked_z_range(self.z_range, "z_range"))
        object.__setattr__(
            self,
            "validation_z_range",
            _checked_z_range(self.validation_z_range, "validation_z_range"),
        )

    def _check_stopping(self) -> None:
        if self.steps is None and self.minutes is None:
            raise InputError(
                "no stopping criterion: steps and minutes are both None; "
                "pass steps=1000 or minutes=3"
            )
        if self.steps is not None and not _positive_int(self.steps):
            raise InputError(f"steps must be an int >= 1 or None, got {self.steps!r}")
        if self.minutes is not None and not (_is_number(self.minutes) and self.minutes > 0):
            raise InputError(f"minutes must be > 0 or None, got {self.minutes!r}; e.g. minutes=3")

    def _checked_tile_output(self) -> tuple[int, int, int]:
        shape = tuple(self.tile_output)
        if len(shape) != 3 or not all(_positive_int(s) for s in shape):
            raise InputError(
                f"tile_output {shape} must be 3 positive ints (z, y, x), e.g. (1, 132, 132)"
            )
        geometry = self.geometry()
        if geometry.output_shape != shape:
            raise InputError(
                f"tile_output {shape} is not a valid output of a {self.ndim}D depth-{self.depth} "
                f"U-Net; the nearest valid one above is {geometry.output_shape}: pass that"
            )
        return shape

    def geometry(self) -> TileGeometry:
        """The training tile: the smallest valid tile whose output covers ``tile_output``."""
        return TileGeometry.for_unet(self.ndim, self.depth, min_output=tuple(self.tile_output))

    def resolved_learning_rate(self) -> float:
        return float(self.learning_rate or DEFAULT_LEARNING_RATE[self.optimizer])

    def augmentation(self) -> AugmentConfig:
        """The augmentation recipe: none, plain (flips + right-angle turns) or the paper's."""
        return {
            "none": AugmentConfig.none(),
            "plain": AugmentConfig.plain(),
            "paper": AugmentConfig(),
        }[self.augment]

    def learning_rate_at(self, progress: float) -> float:
        """The learning rate at ``progress`` in [0, 1] of the run (steps or time, whichever is further).

        >>> TrainConfig(learning_rate=1.0, lr_schedule="cosine").learning_rate_at(0.5)
        0.5
        """
        base = self.resolved_learning_rate()
        if self.lr_schedule == "constant":
            return base
        return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists) for the checkpoint's metadata."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def _checked_z_range(value: tuple[int, int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    z = tuple(value)
    if len(z) != 2 or not all(isinstance(v, int) for v in z) or not 0 <= z[0] < z[1]:
        raise InputError(f"{name} {z} must be (begin, end) with 0 <= begin < end, e.g. (0, 20)")
    return (z[0], z[1])
