"""OME-Zarr 0.5 metadata: an output that napari, neuroglancer and ome-zarr readers open with
its scales.

A prediction group is an OME-Zarr image: its ``multiscales`` are the levels of
``probabilities`` (axes ``class`` (channel), ``z``, ``y``, ``x`` (space, with units)).
Instance labels are an image-label: the levels of ``instances``. Labels written under a
prediction's ``labels/`` (``unet-volume segment PRED PRED/labels/cells``) are listed there, so
one store opens as probabilities plus labels. The metadata is made with ome-zarr-models'
own pydantic models, so what is written is valid by construction; the arrays keep their
``dimension_names``, which OME-Zarr 0.5 requires to equal the axes' names.

Scale and translation per level: level ``k`` of factor ``f`` has voxels ``f`` times the
spacing, centred ``(f - 1) / 2`` voxels of level 0 further along (its windows' centres);
level 0's voxel centres are at ``i * spacing``, as its coordinate arrays say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zarr
from distributed import Client
from ome_zarr_models.v05.axes import Axis
from ome_zarr_models.v05.multiscales import Dataset, Multiscale

from unet_volume.geometry import Shape
from unet_volume.output.lifecycle import reconsolidate, recorded_grid
from unet_volume.output.pyramid import Reduction, build_pyramid, level_path

VERSION = "0.5"
LABELS_GROUP = "labels"
UNITS = {
    "nm": "nanometer",
    "um": "micrometer",
    "µm": "micrometer",
    "micron": "micrometer",
    "mm": "millimeter",
    "m": "meter",
    "pm": "picometer",
    "angstrom": "angstrom",
}
"""Common spellings of the units inputs carry, as OME-Zarr's (UDUNITS-2) names."""


def publish_levels(
    client: Client, url: str, array: str, reduction: Reduction, *, label: bool = False
) -> list[Shape]:
    """Build the pyramid of ``array`` in the output at ``url`` and describe it as OME-Zarr
    (:func:`write_image_metadata`); returns the levels' factors. The voxel size and units
    are those the output recorded of its input."""
    group = zarr.open_group(url, mode="r", zarr_format=3)
    grid = recorded_grid(group)
    spacing, units = grid["voxel_size"], grid["units"]
    factors = build_pyramid(client, url, array, reduction, spacing, flat=label)
    named = group[array].metadata.dimension_names  # type: ignore[union-attr]
    dims = [str(d) for d in named or ()]
    entry = multiscales(
        array, dims, factors, spacing, units, name=array, reduction=reduction, flat=label
    )
    write_image_metadata(url, entry, label=label)
    return factors


def ome_unit(units: str | None) -> str | None:
    """The OME-Zarr name of ``units`` (None where unknown: better no unit than a wrong one).

    >>> ome_unit("nm"), ome_unit("micrometer"), ome_unit("furlong")
    ('nanometer', 'micrometer', None)
    """
    if units is None:
        return None
    if units in UNITS.values():
        return units
    return UNITS.get(units.strip().lower())


def multiscales(
    array: str,
    dims: Sequence[str],
    factors: Sequence[Shape],
    spacing: Sequence[float] | None,
    units: str | None,
    *,
    name: str,
    reduction: str,
    flat: bool = False,
) -> dict[str, Any]:
    """The ``multiscales`` entry of ``array``'s levels; dims other than the last three (z, y,
    x) are channels, never downsampled."""
    step = list(spacing or (1.0, 1.0, 1.0))
    unit = ome_unit(units) if spacing else None
    lead = len(dims) - 3
    axes = [Axis(name=d, type="channel") for d in dims[:lead]]
    axes += [Axis(name=d, type="space", unit=unit) for d in dims[lead:]]
    datasets = [
        Dataset.build(
            path=level_path(array, level, flat=flat),
            scale=[1.0] * lead + [s * f for s, f in zip(step, factor)],
            translation=[0.0] * lead + [s * (f - 1) / 2 for s, f in zip(step, factor)],
        )
        for level, factor in enumerate(factors)
    ]
    metadata = Multiscale(
        axes=axes,
        datasets=tuple(datasets),
        name=name,
        type=reduction,
        coordinateTransformations=None,
    )
    return metadata.model_dump(mode="json", exclude_none=True, by_alias=True)


def write_image_metadata(url: str, entry: dict[str, Any], *, label: bool = False) -> None:
    """Make the group at ``url`` an OME-Zarr image (an image-label if ``label``)."""
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    ome: dict[str, Any] = {"version": VERSION, "multiscales": [entry]}
    if label:
        ome["image-label"] = {"source": {"image": "../../"}} if labelled_image(url) else {}
    group.attrs["ome"] = ome


def labelled_image(url: str) -> str | None:
    """The image group whose ``labels/`` holds ``url``, or None."""
    parts = url.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or parts[1] != LABELS_GROUP:
        return None
    try:
        image = zarr.open_group(parts[0], mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return parts[0] if "ome" in image.attrs else None


def register_label(url: str) -> str | None:
    """List the labels at ``url`` in their image's ``labels/`` group, if they are under one;
    returns the image's URL. The image's consolidated metadata is refreshed, so readers that
    open the image see the labels."""
    image = labelled_image(url)
    if image is None:
        return None
    name = url.rstrip("/").rsplit("/", 1)[1]
    labels = zarr.open_group(f"{image}/{LABELS_GROUP}", mode="a", zarr_format=3)
    ome: Any = labels.attrs.get("ome", {})
    known = list(ome.get("labels", []))
    labels.attrs["ome"] = {"version": VERSION, "labels": sorted({*known, name})}
    reconsolidate(image)
    return image
