"""The options of a prediction run, in one place for the library, the CLI and the flows.

Kept apart from :mod:`unet_volume.prediction.run` (which imports torch) so that ``unet-volume
--help``
and planning tools read them without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from unet_volume.option_fields import Natural, Shape3, Size, option
from unet_volume.output.prediction import OutputDtype

DEFAULT_BLOCK = {2: (1, 512, 512), 3: (64, 64, 64)}
"""Block shape (z, y, x) by model ndim when none is given: one chunk of each output array."""


def _csv(shape: Sequence[int]) -> str:
    return ",".join(map(str, shape))


@dataclass(frozen=True)
class PredictOptions:
    """How to predict: the options of :func:`~unet_volume.prediction.run.predict_volume`,
    ``unet-volume predict`` and the ``predict`` flow, each with its default and help, here only.
    """

    block_shape: Shape3 | Literal["auto"] | None = option(
        None,
        "voxels per block (z, y, x): one chunk of each output array, covered by whole tiles "
        "and recorded done as one; "
        f"multiples of 2**depth on convolved axes (default {_csv(DEFAULT_BLOCK[2])} for 2D "
        f"models, {_csv(DEFAULT_BLOCK[3])} for 3D); auto: picked from the network, the input's "
        "chunks, the workers' memory and their device (bigger on GPU)",
    )
    shard_shape: Shape3 | None = option(
        None,
        "voxels per stored object (z, y, x): a whole number of blocks, written at once (Zarr "
        "sharding: the blocks are its inner chunks, read one by one) (default: picked from the "
        "volume and block, 4 to 64 Mi voxels and at most about 4096 shards)",
    )
    task_shape: Shape3 | None = option(
        None,
        "voxels per Dask task (z, y, x): a whole number of shards, read from the input "
        "together so that the chunks they share are fetched once; it changes how the input is "
        "read, never the output (default: grown from one shard until the run fetches at most "
        "about 1.1 times the stored chunks; `unet-volume plan` prints the figure)",
    )
    tile_shape: Shape3 | None = option(
        None,
        "smallest output of one forward pass (z, y, x); a block runs several tiles when it is "
        "larger (default: the block shape)",
    )
    output_dtype: OutputDtype = option(
        "uint8", "stored probability type; uint8 stores round(p * 255)"
    )
    voxel_size: tuple[Size, Size, Size] | None = option(
        None,
        "physical voxel size (z, y, x) for the output coordinates (default: read from the input)",
    )
    units: str | None = option(None, "units of the voxel size (default: the input's, else nm)")
    overwrite: bool = option(
        False,
        "replace the output if it exists; without it, an incomplete output of the same run "
        "(model, geometry, dtype, input) is resumed, and a complete one is left as it is",
    )
    stall_after: Size = option(
        600.0,
        "seconds without a finished task (or 10 times the usual gap, if longer) after which "
        "the run stops with an error naming the tasks in flight and their workers",
    )
    max_failures: Natural = option(
        10,
        "blocks that may fail (bad data) while the rest carry on; one more stops the run. "
        "Failed blocks are recorded in the output and redone when the run is resumed",
    )
    precision: Literal["float32", "bfloat16", "float16"] = option(
        "float32",
        "arithmetic of the network: bfloat16 or float16 run it under autocast, several times "
        "faster on a GPU's tensor cores, probabilities within about 1e-2 of float32 "
        "(benchmarks/precision_agreement.py)",
    )
    threshold: float | None = option(
        None,
        "segmentation of a two-class model: class 1 (the foreground) where its probability "
        "exceeds THRESHOLD, between 0 and 1 (default: the most probable class). A model "
        "trained with the paper's weight map draws its boundaries wide; a threshold below "
        "0.5, chosen on training slices, gives the foreground back",
    )
    label_offset: tuple[float, ...] | None = option(
        None,
        "read the image moved by this many voxels (y,x or z,y,x; at most 1 each), onto the "
        "registration of the labels the model learnt from (default: the one its training "
        "recorded, if any; 0,0 reads the image as it is)",
    )
    tta: bool = option(
        False,
        "test-time augmentation: average over the 8 flips and quarter turns of each tile in "
        "(y, x) (8x slower; stitching stays exact)",
    )


DEFAULT_OPTIONS = PredictOptions()
