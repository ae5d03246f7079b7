"""The configuration of a U-Net: what defines one network, as plain validated values.

Kept apart from :mod:`unet_volume.models.unet` so that planning code, the command line and
checkpoints
can read and check a network's description without importing torch. ``UNet(**config.to_dict())``
(or :meth:`unet_volume.models.unet.UNet.from_config`) builds the network it describes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from annotated_types import Ge, Lt

from unet_volume.errors import InputError
from unet_volume.option_fields import Count, option


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines a U-Net; its printout identifies the model.

    >>> UNetConfig(depth=3, ndim=3)  # doctest: +NORMALIZE_WHITESPACE
    UNetConfig(in_channels=1, num_classes=2, base_channels=64, depth=3, ndim=3,
               batch_norm=False, dropout=0.5)
    """

    in_channels: Count = option(1, "image channels, e.g. 1 for grayscale")
    num_classes: Annotated[int, Ge(2)] = option(2, "number of classes")
    base_channels: Count = option(64, "channels of the first level; the paper's net has 64")
    depth: Count = option(4, "number of poolings; the paper's net has 4")
    ndim: Literal[2, 3] = option(2, "2 (a 2D U-Net on slices) or 3 (a 3D U-Net)")
    batch_norm: bool = option(
        False, "batch normalisation before each ReLU (as the 3D U-Net of Cicek et al.)"
    )
    dropout: Annotated[float, Ge(0), Lt(1)] = option(
        0.5, "dropout probability at the end of the contracting path, as the paper"
    )

    def __post_init__(self) -> None:
        # Checked here, once, so a bad value fails with its name instead of deep inside torch.
        for name, least, hint in (
            ("in_channels", 1, "the number of image channels, e.g. 1 for grayscale"),
            ("num_classes", 2, "2 or more: the soft-max needs at least two classes"),
            ("base_channels", 1, "the channels of the first level, e.g. 64 as in the paper"),
            ("depth", 1, "the number of poolings, e.g. 4 as in the paper"),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < least:
                raise InputError(f"{name} must be an int >= {least}, got {value!r}; pass {hint}")
        if not _is_int(self.ndim) or self.ndim not in (2, 3):
            raise InputError(f"a U-Net is 2D or 3D, not ndim={self.ndim!r}; pass ndim=2 or ndim=3")
        if not isinstance(self.batch_norm, bool):
            raise InputError(f"batch_norm must be True or False, got {self.batch_norm!r}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise InputError(f"dropout must be in [0, 1), got {p!r}; pass 0.5 (the paper) or 0")
        object.__setattr__(self, "dropout", float(p))  # 0 -> 0.0: one printout per model

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, e.g. for a checkpoint or a run's parameters file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys fail."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown U-Net config keys {unknown}; use only {sorted(known)}")
        return cls(**data)
