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
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import tifffile
from fsspec.implementations.local import LocalFileSystem

from unet_volume.errors import InputError
from unet_volume.io.formats import TIFF_SUFFIXES
from unet_volume.io.locations import exists
from unet_volume.output.lifecycle import run_info

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
    fs.invalidate_cache(root)  # a bucket's cached listing would hide what arrived since
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


def settled_volumes(
    sources: list[str], *, settle_seconds: float = 60.0, now: float | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``sources`` into volumes ready to read and those to leave for the next scan.

    A volume still being copied must not be predicted (nor fail the scan): a TIFF that is
    empty, changed within ``settle_seconds``, or whose pages reach past its end (truncated);
    a Zarr array whose metadata is missing or changed within ``settle_seconds``. Returns
    ``(ready, waiting)``, ``waiting`` as ``(source, why)``.
    """
    now = time.time() if now is None else now
    ready, waiting = [], []
    for source in sources:
        why = _not_settled(source, settle_seconds, now)
        if why is None:
            ready.append(source)
        else:
            waiting.append((source, why))
    return ready, waiting


def _not_settled(source: str, settle_seconds: float, now: float) -> str | None:
    fs, path = fsspec.core.url_to_fs(source)
    is_tiff = source.lower().endswith(TIFF_SUFFIXES)
    marker = path if is_tiff else posixpath.join(path, "zarr.json")
    if not is_tiff and not fs.exists(marker):
        marker = posixpath.join(path, ".zarray")  # a Zarr v2 array
    if not fs.exists(marker):
        return "no Zarr metadata yet (still being copied?)"
    info = fs.info(marker)
    if is_tiff and not info.get("size"):
        return "empty file (still being copied?)"
    changed = _modified(info)
    if changed is not None and now - changed < settle_seconds:
        waited = f"{now - changed:.0f} s ago"
        return f"changed {waited}; waiting until it has been still for {settle_seconds:g} s"
    return _tiff_problem(fs, path, int(info["size"])) if is_tiff else None


def _modified(info: dict[str, object]) -> float | None:
    """Modification time (seconds since the epoch) from an fsspec ``info``, where it has one."""
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())  # type: ignore[union-attr]
    return None


def _tiff_problem(fs: Any, path: str, size: int) -> str | None:
    """Why a TIFF cannot be read whole yet (unreadable header, a page past the end), or None."""
    try:
        with fs.open(path, "rb") as handle, tifffile.TiffFile(handle) as tiff:
            pages = [page for page in tiff.pages if page is not None]
            ends = [
                offset + count
                for page in pages
                for offset, count in zip(page.dataoffsets, page.databytecounts)  # type: ignore[union-attr]
            ]
            # A cut-off file loses its last pages' IFDs: the stack's shape still counts them.
            per_page = max(1, int(np.prod(pages[0].shape))) if pages else 1
            expected = int(np.prod(tiff.series[0].shape)) // per_page if tiff.series else 0
    except Exception as error:  # any failure to parse: not a whole TIFF (yet)
        return f"not a readable TIFF yet ({type(error).__name__}: {error})"
    if len(pages) < expected or (ends and max(ends) > size):
        return f"truncated: {len(pages)} of {expected} pages readable in its {size} bytes"
    return None


def output_for(source: str, outputs: str) -> str:
    """Where the prediction of ``source`` goes: ``outputs/<name without suffix>.zarr``."""
    name = posixpath.basename(str(source).rstrip("/"))
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return posixpath.join(str(outputs).rstrip("/"), f"{name}.zarr")


def due(
    sources: list[str],
    outputs: str,
    model_sha256: str,
    *,
    reprocess: bool = False,
    labels: str | None = None,
) -> list[Arrival]:
    """The volumes of ``sources`` whose prediction in ``outputs`` is missing, incomplete, or (with
    ``reprocess``) made by a model other than ``model_sha256``; with ``labels`` (a name under
    the prediction's ``labels/``), also those whose labels are missing or incomplete.

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
        if reason is None and labels is not None:
            labelled = run_info(f"{output.rstrip('/')}/labels/{labels}") or {}
            reason = None if labelled.get("complete") else "incomplete"
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
