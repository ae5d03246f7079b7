"""Instance labels of a whole volume on a Dask cluster: connected components or a seeded
watershed, block by block, with the object table and a pyramid.

The blocks run the three passes of :mod:`unet_volume.instances.passes` (label, pair, relabel;
resumable per block). The result is ``scipy.ndimage.label`` of the whole mask, ids included.
The mask is the foreground of a prediction (its ``segmentation`` equal to ``foreground``) or
the nonzero voxels of any label or mask volume. The output is a Zarr v3 group like a
prediction's, and an OME-Zarr image-label: ``instances`` (z, y, x) uint64 with physical
coordinates, one shard per block of viewer-sized chunks (:func:`viewer_chunks`), and its
strided pyramid (:mod:`unet_volume.output.ome`), complete only once every block
is written; the object table (:mod:`unet_volume.instances.objects`) sits beside it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from distributed import Client

from unet_volume.errors import InputError
from unet_volume.geometry import Shape, ceil_div
from unet_volume.instances.components import structure
from unet_volume.instances.objects import merge_stats, table_url, write_table
from unet_volume.instances.passes import (
    INSTANCES,
    Labelling,
    inner_chunks,
    remove_scratch,
    run_passes,
)
from unet_volume.instances.watershed import WatershedConfig
from unet_volume.io.locations import absolute
from unet_volume.io.volumes import Volume, open_volume
from unet_volume.output.bookkeeping import fingerprint
from unet_volume.output.lifecycle import (
    check_run_limits,
    create_output,
    find_resumable,
    recorded_grid,
    run_info,
    run_recorded,
)
from unet_volume.output.ome import publish_levels, register_label
from unet_volume.output.prediction import new_single_array_output, volume_attrs

INSTANCES_ARRAY = (INSTANCES, "uint64", 0, "instance id (0: background)")
DEFAULT_BLOCK = (1, 512, 512)


@dataclass(frozen=True)
class InstanceReport:
    """What :func:`label_instances` did: where, how many objects, in how many blocks."""

    output_url: str
    objects: int
    blocks: int
    seconds: float
    skipped: int = 0
    """Blocks an earlier run of the same labelling had finished (resumed), not redone."""


def label_instances(
    source: str,
    out: str,
    *,
    client: Client,
    connectivity: int = 6,
    per_slice: bool = True,
    foreground: int = 1,
    watershed: WatershedConfig | None = None,
    block_shape: Shape | None = None,
    overwrite: bool = False,
    max_failures: int = 0,
) -> InstanceReport:
    """Label the objects of ``source``'s foreground into the group ``out``; write the object
    table beside it.

    ``source`` is a prediction (its ``segmentation == foreground`` is the mask) or a label or
    mask volume (nonzero is the mask). ``per_slice`` labels each z slice on its own (2D
    objects, 4 or 8 neighbours for ``connectivity`` 6 or 26), else in 3D. With ``watershed``
    (a prediction only) the objects come from a seeded watershed of the foreground
    probability (:mod:`unet_volume.instances.watershed`) instead of connected components; its blocks
    must hold whole slices (per slice) or the whole volume (3D), so that no basin is cut:
    that is the default ``block_shape`` with a watershed, (1, 512, 512) without.

    A run that stops (a failed block, a killed driver) keeps its finished blocks; the same
    call resumes it (:mod:`unet_volume.instances.passes`), and a complete output is left be.
    Up to ``max_failures`` blocks may fail, recorded in the output, before the run stops.
    """
    start = time.perf_counter()
    how = _labelling(source, foreground, structure(connectivity, per_slice=per_slice), watershed)
    shape = _check_block_shape(block_shape, how, per_slice)
    check_run_limits(max_failures, 60.0)
    given, out_url = str(out), absolute(out)
    recipe = {
        "method": "watershed" if watershed else "components",
        "connectivity": connectivity,
        "per_slice": per_slice,
        "foreground": how.wanted,
        **(asdict(watershed) if watershed else {}),
    }
    identity = {**recipe, "block_shape": list(shape), "input": fingerprint(how.volume)}
    blocks = int(np.prod([ceil_div(n, b) for n, b in zip(how.volume.shape, shape)]))
    existing = find_resumable(given, out_url, identity, overwrite=overwrite)
    if existing is not None and existing.complete:
        objects = (run_info(out_url) or {})["report"]["objects"]
        return InstanceReport(out_url, objects, blocks, time.perf_counter() - start, blocks)
    if existing is None:
        attrs = {
            "array": INSTANCES,
            "instances": {"source": how.volume.url, **recipe},
            "input": volume_attrs(how.volume),
            "identity": identity,
        }
        create_output(
            out_url,
            lambda: new_single_array_output(
                out_url, how.volume, shape, attrs, INSTANCES_ARRAY, viewer_chunks(shape)
            ),
            overwrite=overwrite,
        )
    skipped = existing.done if existing is not None else 0

    def run(done: Any) -> pd.DataFrame:
        stats = run_passes(client, how, shape, out_url, done, max_failures=max_failures)
        table = merge_stats(stats, how.volume.voxel_size)
        write_table(table, out_url)
        publish_levels(client, out_url, INSTANCES, "stride", label=True)
        remove_scratch(out_url)
        return table

    def report(table: pd.DataFrame) -> dict[str, Any]:
        counts = {"objects": len(table), "blocks": blocks}
        return {"report": counts, "table": table_url(out_url), "units": how.volume.units}

    table = run_recorded(out_url, run, report, command="unet-volume segment")
    register_label(out_url)
    return InstanceReport(out_url, len(table), blocks, time.perf_counter() - start, skipped)


def viewer_chunks(block: Shape) -> Shape:
    """The labels' chunks within a block's shard: what a viewer reads at once (64^3, or
    1x256x256 per slice), where a block is a task's write (e.g. 32 MiB of uint64 at 64x256x256).

    >>> viewer_chunks((64, 256, 256)), viewer_chunks((1, 512, 512))
    ((64, 64, 64), (1, 256, 256))
    """
    return inner_chunks(block, cube=64, square=256)


def open_instances(url: str) -> xr.Dataset:
    """The instance labels at ``url`` as an xarray Dataset: ``instances`` (z, y, x) at full
    resolution with physical coordinates, lazily (dask); the pyramid's levels left out."""
    group = zarr.open_group(url, mode="r", zarr_format=3)
    levels = [name for name in group.array_keys() if name.startswith(f"{INSTANCES}_")]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return xr.open_zarr(url, drop_variables=levels, zarr_format=3)


def _labelling(
    source: str, foreground: int, neighbourhood: np.ndarray, watershed: WatershedConfig | None
) -> Labelling:
    volume, wanted = _mask_source(source, foreground)
    probability = _probability_of(source, wanted)
    if watershed is not None and probability is None:
        raise InputError(
            f"{source} is not a prediction: the watershed floods a foreground probability; "
            "pass a prediction group, or label a mask with connected components"
        )
    return Labelling(volume, wanted, neighbourhood, probability, watershed)


def _mask_source(source: str, foreground: int) -> tuple[Volume, int | None]:
    """The volume whose voxels make the mask, and the value that is foreground (None: any
    nonzero). A prediction group gives its ``segmentation``."""
    try:
        group = zarr.open_group(source, mode="r")
    except Exception:  # not a group: an array or a TIFF stack
        group = None
    if group is not None and "segmentation" in group:
        volume = open_volume(f"{source.rstrip('/')}/segmentation")
        return replace(volume, **recorded_grid(group)), foreground
    volume = open_volume(source)
    if volume.channels != 1 or np.dtype(volume.dtype).kind not in "uib":
        raise InputError(
            f"{source} holds {volume.channels} channel(s) of {volume.dtype_name}; pass a "
            "prediction, or one (z, y, x) volume of labels or a 0/1 mask"
        )
    return volume, None


def _check_block_shape(block_shape: Shape | None, how: Labelling, per_slice: bool) -> Shape:
    volume = how.volume.shape
    if block_shape is None:
        whole_slices = (1, *volume[1:]) if per_slice else volume
        block_shape = DEFAULT_BLOCK if how.watershed is None else whole_slices
    shape = tuple(int(b) for b in block_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(
            f"block shape {tuple(block_shape)} must be 3 positive sizes (z, y, x); "
            "pass e.g. --block-shape 1,512,512"
        )
    shape = tuple(min(b, n) for b, n in zip(shape, volume))
    whole = volume[1:] if per_slice else volume
    if how.watershed is not None and shape[3 - len(whole) :] != whole:
        fix = (1, *volume[1:]) if per_slice else volume
        raise InputError(
            f"block shape {shape} cuts {'the slices' if per_slice else 'the volume'} of "
            f"{how.volume.url} {volume}: a watershed basin must not be cut; pass "
            f"--block-shape {','.join(map(str, fix))}"
        )
    return shape


def _probability_of(source: str, foreground: int | None) -> tuple[Volume, int] | None:
    """A prediction's probabilities and the foreground's channel; None for a mask."""
    if foreground is None:
        return None
    return open_volume(f"{source.rstrip('/')}/probabilities"), foreground
