"""Which volumes in a landing location are due: read from the outputs, never a side database."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from unet_volume.errors import InputError
from unet_volume.grid import OutputLayout
from unet_volume.io.volumes import open_volume
from unet_volume.output.lifecycle import finish_output
from unet_volume.output.prediction import create_prediction
from unet_volume.prediction.landing import Arrival, due, find_volumes, output_for, settled_volumes


def landing_with(tmp_path: Path, *names: str) -> Path:
    landing = tmp_path / "landing"
    landing.mkdir()
    for name in names:
        if name.endswith(".zarr"):
            zarr.create_array(landing / name, shape=(1, 8, 8), dtype="uint8")
        elif name.endswith((".tif", ".tiff")):
            tifffile.imwrite(landing / name, np.zeros((1, 8, 8), np.uint8))
        else:
            (landing / name).write_text("x")
    return landing


def prediction(url: str, source: str, sha256: str, *, complete: bool = True) -> None:
    volume = open_volume(source)
    create_prediction(
        url,
        volume=volume,
        num_classes=2,
        layout=OutputLayout.unsharded(volume.shape, (1, 8, 8)),
        output_dtype="uint8",
        attrs={"model": {"sha256": sha256}},
    )
    if complete:
        finish_output(url, {})


def test_find_volumes_lists_zarr_and_tiff_sorted_and_skips_the_rest(tmp_path: Path) -> None:
    landing = landing_with(tmp_path, "b.tif", "a.zarr", "c.TIFF", "notes.txt", ".d.tif")
    # ".d.tif": a transfer tool's hidden temporary file is not a volume yet.
    assert find_volumes(str(landing)) == [str(landing / n) for n in ("a.zarr", "b.tif", "c.TIFF")]


def test_find_volumes_refuses_a_landing_location_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is not a folder; pass the folder"):
        find_volumes(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("/l/a.zarr", "/out/a.zarr", id="zarr"),
        pytest.param("/l/a.zarr/", "/out/a.zarr", id="trailing-slash"),
        pytest.param("s3://bucket/l/b.ome.tif", "/out/b.ome.zarr", id="tiff-url"),
        pytest.param("/l/c.TIFF", "/out/c.zarr", id="upper-case-suffix"),
    ],
)
def test_output_for_names_the_prediction_after_the_volume(source: str, expected: str) -> None:
    assert output_for(source, "/out/") == expected


def test_due_sorts_new_incomplete_finished_and_other_model_volumes(tmp_path: Path) -> None:
    names = ("new.zarr", "half.zarr", "done.zarr", "old.zarr", "old-half.zarr")
    landing, out = landing_with(tmp_path, *names), tmp_path / "out"
    volumes = find_volumes(str(landing))
    # An interrupted run resumes; an interrupted run of another model starts anew.
    prediction(str(out / "half.zarr"), str(landing / "half.zarr"), "m1", complete=False)
    prediction(str(out / "old-half.zarr"), str(landing / "old-half.zarr"), "m0", complete=False)
    prediction(str(out / "done.zarr"), str(landing / "done.zarr"), "m1")
    prediction(str(out / "old.zarr"), str(landing / "old.zarr"), "m0")
    assert due(volumes, str(out), "m1") == [
        Arrival(str(landing / "half.zarr"), str(out / "half.zarr"), "incomplete"),
        Arrival(str(landing / "new.zarr"), str(out / "new.zarr"), "new"),
        Arrival(str(landing / "old-half.zarr"), str(out / "old-half.zarr"), "model changed"),
    ]
    assert [a.reason for a in due(volumes, str(out), "m1", reprocess=True)] == [
        "incomplete",
        "new",
        "model changed",
        "model changed",
    ]


def test_due_refuses_two_volumes_with_the_same_output(tmp_path: Path) -> None:
    landing = landing_with(tmp_path, "a.zarr", "a.tif")
    with pytest.raises(InputError, match=r"would both be predicted to .*a\.zarr; rename one"):
        due(find_volumes(str(landing)), str(tmp_path / "out"), "m1")


def test_due_refuses_to_overwrite_data_that_is_not_a_prediction(tmp_path: Path) -> None:
    landing = landing_with(tmp_path, "a.zarr")
    zarr.create_array(
        tmp_path / "out" / "a.zarr", shape=(2,), dtype="uint8"
    )  # someone else's array
    with pytest.raises(InputError, match="is not a unet-volume prediction; move it away"):
        due(find_volumes(str(landing)), str(tmp_path / "out"), "m1")


def test_settled_volumes_leave_what_is_still_being_copied_for_the_next_scan(
    tmp_path: Path,
) -> None:
    # issue 13: a TIFF still being copied, an empty or a truncated one must neither be predicted
    # nor fail the scan; each waits, with its reason, and is tried again at the next scan.
    landing = tmp_path / "landing"
    landing.mkdir()
    whole = landing / "whole.tif"
    tifffile.imwrite(whole, np.zeros((3, 64, 64), np.uint8), photometric="minisblack")
    (landing / "empty.tif").write_bytes(b"")
    (landing / "half.tif").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (landing / "started.zarr").mkdir()  # no metadata yet
    old = time.time() - 3600
    for path in landing.iterdir():
        os.utime(path, (old, old))
    (landing / "fresh.tif").write_bytes(whole.read_bytes())  # written just now
    ready, waiting = settled_volumes(find_volumes(str(landing)), settle_seconds=60)
    assert ready == [str(whole)]
    reasons = {Path(source).name: why for source, why in waiting}
    assert reasons["empty.tif"].startswith("empty file")
    half = reasons["half.tif"]
    assert half.startswith("truncated") or half.startswith("not a readable TIFF yet")
    assert reasons["started.zarr"].startswith("no Zarr metadata")
    assert reasons["fresh.tif"].startswith("changed 0 s ago")
    # Once it has been still long enough, the fresh copy is ready too.
    later = time.time() + 120
    assert str(landing / "fresh.tif") in settled_volumes([str(landing / "fresh.tif")], now=later)[0]
