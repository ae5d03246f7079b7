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
    "UNet": "unet_volume.model",
    "UNetConfig": "unet_volume.unet_config",
    "save_model": "unet_volume.checkpoint",
    "load_model": "unet_volume.checkpoint",
    "predict_volume": "unet_volume.predict",
    "RunReport": "unet_volume.engine",
    "open_prediction": "unet_volume.prediction_store",
    "evaluate": "unet_volume.evaluation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unet_volume' has no attribute {name!r}")
