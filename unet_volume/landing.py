"""New volumes in a landing location, and which of them still need a prediction.

Microscopes and transfer jobs drop volumes (Zarr arrays, TIFF stacks) into a landing folder
or bucket; the ingest flow runs this scan on a schedule. Which volumes are done is read
from the outputs themselves, never from a side database: a volume is done when its
prediction exists and is marked complete (``run_info(...)["complete"]``). That makes a
second scan find nothing to do, survives a lost scheduler database, and lets an
interrupted run (an output left incomplete) resume on the next scan, redoing only its
missing blocks. A prediction made with another model stays, unless reprocessing is asked
for; an incomplete one made with another model is started anew.

>>> output_for("/landing/brain-01.tif", "s3://bucket/predictions")
's3://bucket/predictions/brain-01.zarr'
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from unet_volume.errors import InputError
from unet_volume.prediction_store import run_info
from unet_volume.storage import TIFF_SUFFIXES, exists

VOLUME_SUFFIXES = (".zarr", *TIFF_SUFFIXES)

Reason = Literal["new", "incomplete", "model changed"]


@dataclass(frozen=True, slots=True)
class Arrival:
    """A volume to predict: where it is, where its prediction goes, and why it is due."""

    source: str
    output: str
    reason: Reason


def find_volumes(landing: str) -> list[str]:
    """The Zarr arrays (``*.zarr``) and TIFF stacks directly in ``landing``, sorted.

    ``landing`` is a folder or an fsspec URL. Hidden entries (``.name``, e.g. a transfer
    tool's temporary file) are skipped.
    """
    fs, root = fsspec.core.url_to_fs(str(landing))
    if not fs.isdir(root):
        raise InputError(
            f"landing location {landing} is not a folder; pass the folder or bucket prefix "
            "where new volumes arrive"
        )
    names = sorted(posixpath.basename(entry.rstrip("/")) for entry in fs.ls(root, detail=False))
    # Local volumes by absolute path, so that workers started elsewhere find them too.
    base = root if isinstance(fs, LocalFileSystem) else str(landing)
    return [
        posixpath.join(base.rstrip("/"), name)
        for name in names
        if name.lower().endswith(VOLUME_SUFFIXES) and not name.startswith(".")
    ]


def output_for(source: str, outputs: str) -> str:
    """Where the prediction of ``source`` goes: ``outputs/<name without suffix>.zarr``."""
    name = posixpath.basename(str(source).rstrip("/"))
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return posixpath.join(str(outputs).rstrip("/"), f"{name}.zarr")


def due(
    sources: list[str], outputs: str, model_sha256: str, *, reprocess: bool = False
) -> list[Arrival]:
    """The volumes of ``sources`` whose prediction in ``outputs`` is missing, incomplete, or (with
    ``reprocess``) made by a model other than ``model_sha256``.

    Two volumes whose predictions would land in the same place (``a.tif`` and ``a.zarr``) are
    refused, since one would overwrite the other.
    """
    by_output: defaultdict[str, list[str]] = defaultdict(list)
    for source in sources:
        by_output[output_for(source, outputs)].append(source)
    clashes = [names for names in by_output.values() if len(names) > 1]
    if clashes:
        raise InputError(
            f"volumes {' and '.join(clashes[0])} would both be predicted to "
            f"{output_for(clashes[0][0], outputs)}; rename one of them"
        )
    arrivals = []
    for output, (source,) in by_output.items():
        reason = _reason(output, model_sha256, reprocess)
        if reason is not None:
            arrivals.append(Arrival(source, output, reason))
    return arrivals


def _reason(output: str, model_sha256: str, reprocess: bool) -> Reason | None:
    info = run_info(output)
    if info is None:
        if exists(output):
            raise InputError(
                f"output {output} exists but is not a unet-volume prediction; move it away "
                "or choose another outputs location"
            )
        return "new"
    same_model = info.get("model", {}).get("sha256") == model_sha256
    if not info.get("complete"):
        return "incomplete" if same_model else "model changed"
    if reprocess and not same_model:
        return "model changed"
    return None
