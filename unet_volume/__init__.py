"""unet-volume: segment terabyte-scale microscopy volumes with a U-Net.

Public API::

    from unet_volume import UNet, save_model, load_model, predict_volume, open_prediction

Names that need torch are imported on first use, so that the geometry, tiling and
storage modules stay importable (and fast to import) without it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "UNet": "unet_volume.models.unet",
    "UNetConfig": "unet_volume.models.config",
    "save_model": "unet_volume.models.checkpoint",
    "load_model": "unet_volume.models.checkpoint",
    "predict_volume": "unet_volume.prediction.run",
    "RunReport": "unet_volume.prediction.engine",
    "open_prediction": "unet_volume.output.prediction",
    "evaluate": "unet_volume.evaluation.scores",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unet_volume' has no attribute {name!r}")
