"""Preview images of a prediction: a few z slices as one PNG, for people and Prefect artifacts.

Each chosen slice becomes one row of two panels: the input (channel 0) in gray with the
segmentation's nonzero classes overlaid (class 1, the cell interior in ISBI terms, in the
first colour), and the foreground probability ``1 - P(class 0)`` (= ``P(class 1)`` for two
classes). Volumes can be terabytes, so only the chosen slices are read, with a stride that
keeps the longest side at most ``max_side``. Torch-free: it runs wherever storage does.
"""

from __future__ import annotations

import base64
import io
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from unet_volume.errors import InputError
from unet_volume.io.formats import opened_array
from unet_volume.io.volumes import Volume, open_volume
from unet_volume.output.prediction import open_prediction

if TYPE_CHECKING:
    import xarray as xr

PANEL_WIDTH = 4.0  # inches per panel; two panels side by side per row
TITLE_HEIGHT = 0.35  # inches above each row for its titles
DPI = 100
OVERLAY_ALPHA = 0.4
IMAGE_BUDGET = 200_000
"""Characters of base64 one embedded image may take: a few keep a web page light."""
INLINE_SIDE = 1200
"""Longest side of an embedded image in pixels: sharp on a laptop screen, not a poster."""


def choose_slices(depth: int, count: int = 3) -> list[int]:
    """Evenly spaced z indices from first to last, rounded half up, without duplicates.

    >>> choose_slices(25)
    [0, 12, 24]
    >>> choose_slices(4)
    [0, 2, 3]
    >>> choose_slices(2), choose_slices(1), choose_slices(9, count=1)
    ([0, 1], [0], [4])
    """
    if depth < 1 or count < 1:
        raise InputError(f"cannot choose {count} slices of depth {depth}; both must be at least 1")
    if count == 1:
        return [(depth - 1) // 2]
    span = count - 1  # integer arithmetic: round(i * (depth - 1) / span), halves up
    return sorted({(2 * i * (depth - 1) + span) // (2 * span) for i in range(count)})


def write_preview(
    image_url: str,
    prediction_url: str,
    out: str | Path,
    *,
    slices: Sequence[int] | None = None,
    max_side: int = 512,
) -> Path:
    """Write one PNG previewing ``slices`` (default: first, middle, last) of a prediction.

    Everything is read and checked before anything is written, and the PNG is written to a
    temporary file beside ``out`` and renamed, so a failure never leaves a partial image.
    Returns ``out``. Raises :class:`InputError` for a missing input or prediction, shapes
    that disagree, or a slice outside the volume.
    """
    volume = open_volume(image_url)
    dataset = open_prediction(prediction_url)
    shape = tuple(int(n) for n in dataset["segmentation"].shape)
    if shape != volume.shape:
        raise InputError(
            f"prediction {prediction_url} has shape {shape} but input {image_url} has "
            f"{volume.shape}; pass the input the prediction was made from"
        )
    chosen = list(choose_slices(shape[0]) if slices is None else slices)
    bad = [z for z in chosen if not 0 <= z < shape[0]]
    if not chosen or bad:
        raise InputError(
            f"slices {bad or chosen} are not in the volume (depth {shape[0]}); "
            f"pass z indices from 0 to {shape[0] - 1}"
        )
    if max_side < 1:
        raise InputError(f"max_side {max_side} must be at least 1 pixel")
    stride = -(-max(shape[1:]) // max_side)  # ceil: ceil(n / stride) <= max_side
    rows = [_read_row(volume, dataset, int(z), stride) for z in chosen]
    return _save(rows, Path(out))


Row = tuple[int, np.ndarray, np.ndarray, np.ndarray]


def _read_row(volume: Volume, dataset: xr.Dataset, z: int, stride: int) -> Row:
    """``(z, image, segmentation, foreground)`` of slice ``z``, each ``(y, x)`` strided."""
    yx = (slice(None, None, stride),) * 2
    with opened_array(volume.url, volume.kind) as array:
        image = np.asarray(array[(0,) * (len(array.shape) - 3) + (z, *yx)], dtype=np.float64)
    where = {"z": z, "y": yx[0], "x": yx[1]}
    segmentation = dataset["segmentation"].isel(where).to_numpy()
    background = dataset["probabilities"].isel({"class": 0, **where}).to_numpy()
    if background.dtype == np.uint8:  # stored as round(p * 255)
        background = background / 255.0
    return z, image, segmentation, 1.0 - background.astype(np.float64)


def _overlay(segmentation: np.ndarray) -> np.ndarray:
    """RGBA ``(y, x, 4)``: class k > 0 in colour C(k-1), semi-transparent; class 0 clear."""
    colours = colormaps["tab10"](np.arange(10))  # (10, 4)
    rgba = colours[(segmentation.astype(np.int64) - 1) % 10]
    rgba[..., 3] = np.where(segmentation > 0, OVERLAY_ALPHA, 0.0)
    return rgba


def _save(rows: list[Row], out: Path) -> Path:
    """One row per slice, written atomically. A bare Agg ``Figure``, not pyplot: no global
    backend switch, no figure registry to leak from, safe in the threads Prefect runs tasks in."""
    height, width = rows[0][1].shape
    panel_height = PANEL_WIDTH * height / width  # a panel has the (subsampled) slice's aspect
    total = len(rows) * (panel_height + TITLE_HEIGHT)
    fig = Figure(figsize=(2 * PANEL_WIDTH, total), dpi=DPI)
    FigureCanvasAgg(fig)
    for r, (z, image, segmentation, foreground) in enumerate(rows):
        bottom = 1.0 - (r + 1) * (panel_height + TITLE_HEIGHT) / total
        left = fig.add_axes((0.005, bottom, 0.49, panel_height / total))
        right = fig.add_axes((0.505, bottom, 0.49, panel_height / total))
        low, high = np.percentile(image, (1, 99))
        left.imshow(
            image,
            cmap="gray",
            vmin=low,
            vmax=max(high, low + 1e-9),
            aspect="auto",
            interpolation="nearest",
        )
        left.imshow(_overlay(segmentation), aspect="auto", interpolation="nearest")
        right.imshow(
            foreground, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
        )
        left.set_title(f"z = {z}: input and segmentation", fontsize="small")
        right.set_title(f"z = {z}: foreground probability (0-1)", fontsize="small")
        left.set_axis_off()
        right.set_axis_off()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(
        f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    )  # default permissions, unlike mkstemp
    try:
        fig.savefig(temporary, format="png")
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return out


def data_url(path: str | Path, *, budget: int = IMAGE_BUDGET) -> str:
    """The image at ``path`` as a JPEG ``data:`` URL of at most ``budget`` base64 characters.

    For pages that cannot load local files (a browser refuses ``file://`` links from a web
    page, such as a Prefect artifact): the image is shrunk and its JPEG quality lowered until
    it fits, down to 64 pixels a side.
    """
    with Image.open(path) as opened:
        picture = opened.convert("RGB")
    side, quality = INLINE_SIDE, 85
    while True:
        small = picture.copy()
        small.thumbnail((side, side))
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=quality, optimize=True)
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        if len(encoded) <= budget or side <= 64:
            return f"data:image/jpeg;base64,{encoded}"
        side, quality = int(side * 0.8), max(50, quality - 10)
