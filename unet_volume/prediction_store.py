"""The prediction output: a Zarr v3 group that xarray, napari and neuroglancer read.

Layout of ``OUTPUT`` (all arrays carry ``dimension_names``, which is what
``xarray.open_zarr`` needs on Zarr v3)::

    OUTPUT/
      zarr.json          group attributes: identity, model, geometry, input, complete, failures
      probabilities      (class, z, y, x)  float32 | float16 | uint8 (p * 255, rounded) | float64
      segmentation       (z, y, x)         uint8 argmax of the float probabilities
      class, z, y, x     1-D coordinates: class index; voxel centres in physical units
      done               (block_z, block_y, block_x) uint8: 1 where a block is written

Chunks are the block grid (one chunk per block and array), so each block task
writes its own chunks and no two tasks touch the same one. Compression is
Blosc-zstd with bit-shuffle. The identity and done markers (:mod:`unet_volume.run_record`)
let a run resume; an output that is not complete is refused by :func:`open_prediction`
unless asked for, so missing blocks never pass for zeros.
"""

from __future__ import annotations

import importlib.metadata
import platform
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from unet_volume.errors import InputError, OutputExistsError
from unet_volume.geometry import Box, Shape
from unet_volume.run_record import (
    BlockFailure,
    RunStatus,
    block_grid,
    create_done_markers,
    done_blocks,
    identity_differences,
    mark_done,
)
from unet_volume.storage import Volume, exists, remove_output

OutputDtype = Literal["float32", "float16", "uint8", "float64"]
OUTPUT_DTYPES: tuple[str, ...] = get_args(OutputDtype)
DIMS = ("z", "y", "x")
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
ATTRS_KEY = "unet_volume"


@dataclass(frozen=True, slots=True)
class PredictionStore:
    """Where a prediction is written, and how; picklable, reopened by URL in each task."""

    url: str
    output_dtype: OutputDtype

    def write(self, box: Box, probabilities: np.ndarray) -> None:
        """Write float ``(class, *box.shape)`` probabilities and their argmax into ``box``.

        ``box`` must be a whole chunk (a block's write box): one writer per chunk.
        """
        group = zarr.open_group(self.url, mode="r+", zarr_format=3)
        slices = box.to_slices()
        segmentation = cast("zarr.Array[Any]", group["segmentation"])
        segmentation[slices] = np.argmax(probabilities, axis=0).astype(np.uint8)
        stored = cast("zarr.Array[Any]", group["probabilities"])
        stored[(slice(None), *slices)] = encode_probabilities(probabilities, self.output_dtype)

    def mark_done(self, index: Shape) -> None:
        """Record block ``index`` as done, after :meth:`write` returned (its data is stored)."""
        mark_done(self.url, index)


def encode_probabilities(probabilities: np.ndarray, output_dtype: OutputDtype) -> np.ndarray:
    """Cast to the stored dtype; uint8 stores ``round(p * 255)``.

    >>> encode_probabilities(np.array([0.0, 0.5, 1.0]), "uint8").tolist()
    [0, 128, 255]
    """
    encoded: np.ndarray
    if output_dtype == "uint8":
        encoded = np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        encoded = probabilities.astype(output_dtype)
    return encoded


def check_output_dtype(value: str) -> OutputDtype:
    if value not in OUTPUT_DTYPES:
        raise InputError(
            f"output dtype {value!r} is not supported; pass one of {', '.join(OUTPUT_DTYPES)}"
        )
    return value  # type: ignore[return-value]


def check_output(url: str, *, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``."""
    if not overwrite and exists(url):
        raise OutputExistsError(
            f"output {url} already exists; pass --overwrite (overwrite=True) to replace it, "
            "or choose another output path"
        )


def prepare_output(url: str, *, overwrite: bool) -> None:
    """Make room for a new output: refuse an existing one unless ``overwrite``, then remove it."""
    check_output(url, overwrite=overwrite)
    remove_output(url)


def create_prediction(
    url: str,
    *,
    volume: Volume,
    num_classes: int,
    block_shape: Shape,
    output_dtype: OutputDtype,
    attrs: Mapping[str, Any],
) -> PredictionStore:
    """Create the output group with its arrays, coordinates and metadata (no voxel data yet)."""
    group = zarr.open_group(url, mode="w", zarr_format=3)
    chunks = tuple(min(b, s) for b, s in zip(block_shape, volume.shape))
    group.create_array(
        "probabilities",
        shape=(num_classes, *volume.shape),
        chunks=(num_classes, *chunks),
        dtype=output_dtype,
        compressors=[COMPRESSOR],
        dimension_names=("class", *DIMS),
        fill_value=0,
        attributes={"long_name": "class probability", "encoding": _encoding(output_dtype)},
    )
    group.create_array(
        "segmentation",
        shape=volume.shape,
        chunks=chunks,
        dtype="uint8",
        compressors=[COMPRESSOR],
        dimension_names=DIMS,
        fill_value=0,
        attributes={"long_name": "most probable class"},
    )
    _write_coordinate(group, "class", np.arange(num_classes, dtype=np.int64), {})
    for axis, name in enumerate(DIMS):
        spacing = volume.voxel_size[axis] if volume.voxel_size else 1.0
        units: dict[str, Any] = (
            {"units": volume.units} if volume.voxel_size and volume.units else {}
        )
        centres = np.arange(volume.shape[axis], dtype=np.float64) * spacing
        _write_coordinate(group, name, centres, units)
    create_done_markers(group, block_grid(volume.shape, chunks))
    group.attrs.update({ATTRS_KEY: {**attrs, "complete": False, "failures": []}})
    return PredictionStore(url=url, output_dtype=output_dtype)


def _encoding(output_dtype: str) -> str:
    return "p * 255, rounded" if output_dtype == "uint8" else "p"


def _write_coordinate(
    group: zarr.Group, name: str, values: np.ndarray, attrs: dict[str, Any]
) -> None:
    array = group.create_array(
        name, shape=values.shape, dtype=values.dtype, dimension_names=(name,), attributes=attrs
    )
    array[:] = values


def finish_prediction(url: str, extra: Mapping[str, Any]) -> None:
    """Mark the output complete, record ``extra`` (e.g. the run report) and consolidate metadata.

    Consolidated metadata lets ``xarray.open_zarr(url)`` open the group with one read
    and without its "consolidated metadata" warning.
    """
    _update_run_info(url, {**extra, "complete": True})


def record_failures(url: str, failures: Iterable[BlockFailure]) -> None:
    """Record the blocks that failed for good (the rest of the output stays as it is)."""
    _update_run_info(url, {"failures": [failure.to_dict() for failure in failures]})


def find_resumable(given: str, url: str, identity: Mapping[str, Any]) -> RunStatus | None:
    """The status of the same run at ``url``, to resume or leave be; None if nothing is there.

    Anything else at ``url`` is refused, naming what differs: another model, geometry, dtype
    or input would mix two runs' blocks in one output. ``given`` is ``url`` as the user wrote it.
    """
    if not exists(url):
        return None
    info = run_info(url)
    if info is None or "identity" not in info:
        raise OutputExistsError(
            f"output {given} already exists and is not a resumable unet-volume prediction; "
            "pass --overwrite (overwrite=True) to replace it, or choose another output path"
        )
    differences = identity_differences(info["identity"], identity)
    if differences:
        raise OutputExistsError(
            f"output {given} holds another run ({'; '.join(differences)}); pass --overwrite "
            "(overwrite=True) to start it anew, or choose another output path"
        )
    return read_status(url)


def read_status(url: str) -> RunStatus:
    """How far the run writing the prediction at ``url`` got (done, failed, missing blocks)."""
    info = run_info(url)
    if info is None:
        raise InputError(
            f"{url} is not a unet-volume prediction; pass the OUTPUT of `unet-volume predict`"
        )
    group = zarr.open_group(url, mode="r", zarr_format=3)
    total = int(np.prod(cast("zarr.Array[Any]", group["done"]).shape))
    failures = tuple(BlockFailure.from_dict(f) for f in info.get("failures", []))
    return RunStatus(
        url,
        total,
        len(done_blocks(url)),
        bool(info.get("complete")),
        dict(info.get("identity", {})),
        failures,
    )


def record_provenance(url: str, provenance: Mapping[str, Any]) -> None:
    """Record who made a finished prediction and how (e.g. flow run, parameters, package versions).

    Kept beside the data, so the output tells its own history wherever it is copied.
    """
    info = run_info(url)
    if info is None or not info.get("complete"):
        raise InputError(
            f"{url} is not a finished prediction; record provenance after the run completes"
        )
    _update_run_info(url, {"provenance": dict(provenance)})


def environment() -> dict[str, Any]:
    """The host and the versions of the packages a prediction depends on."""
    versions: dict[str, str | None] = {}
    for package in ("unet-volume", "torch", "numpy", "zarr", "dask", "distributed", "prefect"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"host": platform.node(), "python": platform.python_version(), "packages": versions}


def _update_run_info(url: str, extra: Mapping[str, Any]) -> None:
    """Merge ``extra`` into the run attributes, then re-consolidate the metadata."""
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    info = dict(group.attrs[ATTRS_KEY])  # type: ignore[arg-type]
    group.attrs[ATTRS_KEY] = {**info, **extra}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(url, zarr_format=3)


def run_info(url: str) -> dict[str, Any] | None:
    """What the prediction at ``url`` records of its run (model, input, ``complete``), or None.

    A group that is not a prediction (no ``unet_volume`` attributes) counts as none, too.
    """
    if not exists(url):
        return None
    try:
        group = zarr.open_group(url, mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError, TypeError):  # not a Zarr v3 group
        return None
    info = group.attrs.get(ATTRS_KEY)
    return dict(info) if isinstance(info, dict) else None


def open_prediction(url: str, *, allow_incomplete: bool = False) -> xr.Dataset:
    """Open a prediction as an xarray Dataset with dims (class, z, y, x), lazily (dask).

    An incomplete output (a run still going, killed or failed) is refused: its missing
    blocks would read as zeros. ``allow_incomplete=True`` opens it with a warning; its
    ``done`` variable (dims ``block_z, block_y, block_x``) then says which blocks hold data.

    >>> # ds = open_prediction("out.zarr"); ds.segmentation.sel(z=100.0)
    """
    if not exists(url):
        raise InputError(f"prediction {url} does not exist; run `unet-volume predict` first")
    info = run_info(url) or {}
    if not info.get("complete", True):
        status = read_status(url)
        if not allow_incomplete:
            raise InputError(
                f"prediction {url} is incomplete ({status.done} of {status.total} blocks done, "
                f"{len(status.failures)} failed): run the same `unet-volume predict` again to "
                "resume, or pass allow_incomplete=True to read what is there"
            )
        warnings.warn(
            f"{status.summary()}; the `done` variable marks the blocks that hold data",
            UserWarning,
            stacklevel=2,
        )
    group = zarr.open_group(url, mode="r", zarr_format=3)
    consolidated = group.metadata.consolidated_metadata is not None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        dataset: xr.Dataset = xr.open_zarr(url, consolidated=consolidated, zarr_format=3)
        return dataset


def volume_attrs(volume: Volume) -> dict[str, Any]:
    """The input's description, as recorded in the output's attributes."""
    return {
        "url": volume.url,
        "shape": list(volume.shape),
        "channels": volume.channels,
        "dtype": volume.dtype,
        "voxel_size": list(volume.voxel_size) if volume.voxel_size else None,
        "units": volume.units,
    }
