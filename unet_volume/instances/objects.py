"""The object table: one row per instance, computed block by block and merged.

Each block task reports, per object id it holds, sums and extremes that add up across blocks
(voxel count, coordinate sums, bounding box, probability sum, border contact); the client
merges them by id and derives what people query: the physical volume, the centroid in
physical units, the bounding box, the mean foreground probability and whether the object
touches the volume border (so that it may be cut off). The table is written as Parquet
beside the labels, readable with pandas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import fsspec
import numpy as np
import pandas as pd

from unet_volume.errors import InputError
from unet_volume.geometry import Box, Shape
from unet_volume.io.locations import absolute

OBJECTS = ".objects.parquet"

AXES = ("z", "y", "x")


def decode_probability(stored: np.ndarray) -> np.ndarray:
    """Probabilities as stored by a prediction (uint8: ``round(p * 255)``) as float64.

    >>> decode_probability(np.array([0, 255], np.uint8)).tolist()
    [0.0, 1.0]
    """
    values = stored.astype(np.float64)
    return values / 255.0 if stored.dtype == np.uint8 else values


def block_stats(
    labels: np.ndarray, box: Box, volume: Shape, probability: np.ndarray | None = None
) -> pd.DataFrame:
    """Per object id in the block ``labels`` (at ``box`` of a ``volume``): the partial sums
    and extremes that :func:`merge_stats` adds up."""
    where = np.nonzero(labels)
    ids, inverse = np.unique(labels[where], return_inverse=True)
    columns: dict[str, np.ndarray] = {"id": ids, "voxels": np.bincount(inverse)}
    touches = np.zeros(len(ids), bool)
    for axis, name in enumerate(AXES):
        coords = where[axis] + box.begin[axis]
        columns[f"sum_{name}"] = np.bincount(inverse, weights=coords)
        low = np.full(len(ids), np.iinfo(np.int64).max)
        high = np.full(len(ids), -1)
        np.minimum.at(low, inverse, coords)
        np.maximum.at(high, inverse, coords)
        columns[f"min_{name}"], columns[f"max_{name}"] = low, high
        touches |= (low == 0) | (high == volume[axis] - 1)
    columns["touches_border"] = touches
    if probability is not None:
        columns["sum_probability"] = np.bincount(inverse, weights=probability[where])
    return pd.DataFrame(columns)


def merge_stats(
    parts: Iterable[pd.DataFrame], voxel_size: Sequence[float] | None = None
) -> pd.DataFrame:
    """One row per object, by id: voxel count, physical volume, bounding box (voxels,
    half-open), centroid (physical units), mean probability, border contact."""
    stats = pd.concat(list(parts), ignore_index=True)
    aggregate = {c: "sum" for c in stats.columns if c.startswith("sum_") or c == "voxels"}
    aggregate |= {c: "min" for c in stats.columns if c.startswith("min_")}
    aggregate |= {c: "max" for c in stats.columns if c.startswith("max_")}
    aggregate["touches_border"] = "any"
    merged = stats.groupby("id", sort=True).agg(aggregate)
    spacing = tuple(voxel_size) if voxel_size else (1.0, 1.0, 1.0)
    table = pd.DataFrame(index=merged.index)
    table["voxels"] = merged["voxels"].astype(np.int64)
    table["volume"] = table["voxels"] * float(np.prod(spacing))
    for axis, name in enumerate(AXES):
        table[f"centroid_{name}"] = merged[f"sum_{name}"] / merged["voxels"] * spacing[axis]
    for name in AXES:
        table[f"bbox_{name}_begin"] = merged[f"min_{name}"].astype(np.int64)
        table[f"bbox_{name}_end"] = merged[f"max_{name}"].astype(np.int64) + 1
    if "sum_probability" in merged:
        table["mean_probability"] = merged["sum_probability"] / merged["voxels"]
    table["touches_border"] = merged["touches_border"].astype(bool)
    return table.reset_index()


def table_url(out_url: str) -> str:
    """Where the object table of the labels at ``out_url`` is: beside the group,
    ``OUT.objects.parquet``; for labels inside an image's ``labels/`` (``PRED/labels/cells``),
    beside the image, ``PRED.cells.objects.parquet``. Inside a Zarr hierarchy, Zarr would
    warn of a file that is not part of it.

    >>> table_url("/d/cells.zarr"), table_url("/d/pred.zarr/labels/cells/")
    ('/d/cells.zarr.objects.parquet', '/d/pred.zarr.cells.objects.parquet')
    """
    parts = out_url.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == "labels":
        return f"{parts[0]}.{parts[2]}{OBJECTS}"
    return f"{out_url.rstrip('/')}{OBJECTS}"


def write_table(table: pd.DataFrame, out_url: str) -> str:
    """The object table as Parquet at :func:`table_url`."""
    url = table_url(out_url)
    with fsspec.open(url, "wb") as f:
        table.to_parquet(f, index=False)
    return url


def read_objects(labels_url: str) -> pd.DataFrame:
    """The object table of the labels at ``labels_url`` (from :func:`label_instances`)."""
    url = table_url(absolute(labels_url))
    try:
        return pd.read_parquet(url)
    except FileNotFoundError:
        raise InputError(
            f"{labels_url} has no object table ({url}); run `unet-volume segment` to write it"
        ) from None


def summary(table: pd.DataFrame, *, largest: int = 5) -> str:
    """What ``unet-volume objects`` prints: the count, size percentiles, the largest objects."""
    if table.empty:
        return "0 objects"
    sizes = table["voxels"]
    percentiles = np.percentile(sizes, [5, 25, 50, 75, 95])
    lines = [
        f"{len(table):,} objects, {int(table['touches_border'].sum()):,} touching the border; "
        f"{int(sizes.sum()):,} voxels in all",
        "voxels per object: "
        + ", ".join(f"p{p} {v:,.0f}" for p, v in zip((5, 25, 50, 75, 95), percentiles))
        + f", max {int(sizes.max()):,}",
        f"largest {min(largest, len(table))}:",
    ]
    for row in table.nlargest(largest, "voxels").itertuples():
        lines.append(
            f"  id {row.id}: {row.voxels:,} voxels, volume {row.volume:,.6g}, centroid "
            f"(z, y, x) ({row.centroid_z:,.6g}, {row.centroid_y:,.6g}, {row.centroid_x:,.6g})"
        )
    return "\n".join(lines)
