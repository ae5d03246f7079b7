"""Input volumes: validation, lazy reads and the mirror border convention."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorstore
import tifffile
import zarr
from hypothesis import given
from hypothesis import strategies as st

from unet_volume.errors import InputError
from unet_volume.geometry import Box
from unet_volume.io.volumes import convert_to_zarr, open_volume, read_box
from unet_volume.testing import boxes


@given(
    st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 8)),
    boxes(ndim=3, low=-15, high=20),
    st.booleans(),
)
def test_storage_read_box_equals_numpy_reflect_padding(
    shape: tuple[int, int, int], box: Box, channels: bool
) -> None:
    data = np.arange(np.prod(shape) * (2 if channels else 1)).reshape(
        ((2,) if channels else ()) + shape
    )
    pad = 40
    padded = np.pad(data, [(0, 0)] * (data.ndim - 3) + [(pad, pad)] * 3, mode="reflect")
    expected = padded[(Ellipsis, *box.shift(pad).to_slices())]
    got = read_box(data, box)
    np.testing.assert_array_equal(got, expected if channels else expected[np.newaxis])


def test_storage_read_box_reads_only_the_voxels_it_needs(tmp_path: Path) -> None:
    # A box deep inside a chunked Zarr array must not touch chunks away from it.
    array = zarr.create_array(
        tmp_path / "v.zarr", shape=(4, 64, 64), chunks=(1, 16, 16), dtype="uint16"
    )
    array[:] = np.arange(4 * 64 * 64).reshape(4, 64, 64)
    (tmp_path / "v.zarr" / "c" / "0" / "3" / "3").write_bytes(
        b"garbage"
    )  # a far chunk: reading it fails
    got = read_box(array, Box((1, 2, 2), (3, 20, 20)))
    np.testing.assert_array_equal(got[0], np.asarray(array[1:3, 2:20, 2:20]))


def _zarr(path: Path, data: np.ndarray, **kwargs: object) -> str:
    array = zarr.create_array(path, shape=data.shape, dtype=data.dtype, **kwargs)  # type: ignore[arg-type]
    array[:] = data
    return str(path)


def _text(path: Path) -> str:
    path.write_text("not an image")
    return str(path)


def test_storage_opens_zarr_v3_v2_tiff_and_fsspec_urls(tmp_path: Path) -> None:
    data = np.arange(2 * 5 * 6, dtype=np.uint8).reshape(2, 5, 6)
    v3 = _zarr(tmp_path / "v3.zarr", data, attributes={"voxel_size": [40, 4, 4], "units": "nm"})
    v2 = _zarr(tmp_path / "v2.zarr", data, zarr_format=2)
    tiff = str(tmp_path / "v.tif")
    tifffile.imwrite(
        tiff, data, imagej=True, resolution=(1 / 8, 1 / 8), metadata={"spacing": 30, "unit": "nm"}
    )
    for url in (v3, v2, tiff, "file://" + v3):
        volume = open_volume(url)
        assert volume.shape == (2, 5, 6) and volume.channels == 1
        np.testing.assert_array_equal(volume.read(volume.box)[0], data)
    assert open_volume(v3).voxel_size == (40.0, 4.0, 4.0)
    assert open_volume(tiff).voxel_size == (30.0, 8.0, 8.0)
    assert open_volume(v2).voxel_size is None
    assert open_volume(v2, voxel_size=(50, 4, 4)).voxel_size == (50.0, 4.0, 4.0)


def test_storage_channel_axis_comes_first(tmp_path: Path) -> None:
    url = _zarr(tmp_path / "c.zarr", np.zeros((3, 2, 5, 6), dtype=np.float32))
    volume = open_volume(url)
    assert volume.channels == 3 and volume.shape == (2, 5, 6)
    assert volume.read(Box((0, -1, -1), (1, 2, 2))).shape == (3, 1, 3, 3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda p: str(p / "missing.zarr"), "does not exist", id="missing"),
        pytest.param(
            lambda p: _zarr(p / "r2.zarr", np.zeros((4, 4))), r"expected \(z, y, x\)", id="rank-2"
        ),
        pytest.param(lambda p: _zarr(p / "e.zarr", np.zeros((0, 4, 4))), "is empty", id="empty"),
        pytest.param(
            lambda p: str(zarr.open_group(p / "g.zarr", mode="w").store_path.store.root),
            "is a Zarr group",
            id="group",
        ),
        pytest.param(lambda p: _text(p / "junk.tif"), "not a readable tiff", id="junk-tiff"),
        pytest.param(lambda p: _text(p / "junk.zarr"), "not a readable zarr", id="junk-zarr"),
        pytest.param(
            lambda p: _zarr(p / "b.zarr", np.zeros((1, 2, 2), dtype=bool)), "dtype bool", id="bool"
        ),
    ],
)
def test_storage_bad_input_is_one_clear_line(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    url = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        open_volume(url)
    assert "\n" not in str(info.value)


def test_storage_voxel_size_must_be_three_positive_numbers(tmp_path: Path) -> None:
    url = _zarr(tmp_path / "v.zarr", np.zeros((1, 2, 2)))
    with pytest.raises(InputError, match="3 positive numbers"):
        open_volume(url, voxel_size=(4, 4))


def test_storage_reads_the_isbi_stack_lazily_page_by_page() -> None:
    # The real ISBI 2012 stack shipped in data/ (see its README): 25 slices of 512 x 512 uint8.
    url = str(Path(__file__).parents[1] / "data" / "isbi2012" / "train-volume.tif")
    volume = open_volume(url)
    assert (volume.shape, volume.channels, volume.dtype) == ((25, 512, 512), 1, "|u1")
    corner = volume.read(Box((24, -2, 510), (26, 2, 514)))  # past the last slice and two edges
    full = tifffile.imread(url)
    padded = np.pad(full, 2, mode="reflect")
    np.testing.assert_array_equal(corner[0], padded[26:28, 0:4, 512:516])


def test_storage_reads_a_folder_of_2d_tiffs_as_a_stack_in_name_order(tmp_path: Path) -> None:
    # How many microscopes write a volume: one file per slice. Names sort as z, not as listed.
    stack = np.random.default_rng(0).integers(0, 255, (4, 20, 24), dtype=np.uint8)
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in (3, 0, 2, 1):
        tifffile.imwrite(
            folder / f"slice_{z:03d}.tif",
            stack[z],
            imagej=True,
            resolution=(1 / 4, 1 / 4),
            metadata={"spacing": 50, "unit": "nm"},
        )
    (folder / "notes.txt").write_text("not a slice")
    volume = open_volume(str(folder))
    assert (volume.shape, volume.kind, volume.voxel_size) == ((4, 20, 24), "tiff", (50, 4, 4))
    corner = volume.read(Box((3, -2, 22), (5, 2, 26)))  # mirrored past the last slice and edges
    np.testing.assert_array_equal(corner[0], np.pad(stack, 2, mode="reflect")[5:7, 0:4, 24:28])
    out = convert_to_zarr(str(folder), str(tmp_path / "volume.zarr"), chunks=(1, 20, 24))
    np.testing.assert_array_equal(zarr.open_array(out.url)[...], stack)


def test_storage_reads_an_hdf5_dataset_named_after_its_file(tmp_path: Path) -> None:
    stack = np.random.default_rng(1).integers(0, 2**12, (3, 16, 18), dtype=np.uint16)
    path = tmp_path / "sample.h5"
    with h5py.File(path, "w") as f:
        raw = f.create_dataset("volumes/raw", data=stack, chunks=(1, 8, 9))
        raw.attrs["resolution"] = np.array([40.0, 4.0, 4.0])
        f.create_dataset("volumes/mask", data=stack > 100)
    volume = open_volume(f"{path}:/volumes/raw")
    assert (volume.kind, volume.shape, volume.chunks) == ("hdf5", (3, 16, 18), (1, 8, 9))
    assert volume.voxel_size == (40.0, 4.0, 4.0)
    corner = volume.read(Box((2, -2, 16), (4, 2, 20)))  # mirrored past the last slice and edges
    np.testing.assert_array_equal(corner[0], np.pad(stack, 2, mode="reflect")[4:6, 0:4, 18:22])
    out = convert_to_zarr(f"{path}:/volumes/raw", str(tmp_path / "raw.zarr"), chunks=(1, 16, 18))
    np.testing.assert_array_equal(zarr.open_array(out.url)[...], stack)
    with pytest.raises(InputError, match=r"holds 2 datasets .*name one, e\.g\. .*sample\.h5:/"):
        open_volume(str(path))
    with pytest.raises(InputError, match="has no dataset /volumes/labels; pass one of"):
        open_volume(f"{path}:/volumes/labels")
    with pytest.raises(InputError, match="does not exist"):
        open_volume(f"{tmp_path / 'other.h5'}:/raw")


def test_storage_reads_an_n5_dataset_written_as_java_tools_write_it(tmp_path: Path) -> None:
    # N5 lists dimensions, block size and resolution fastest first: (x, y, z)
    stack = np.random.default_rng(5).integers(0, 2**12, (3, 16, 18), dtype=np.uint16)
    container = tmp_path / "sample.n5"
    metadata = {"dimensions": [18, 16, 3], "blockSize": [9, 8, 1], "dataType": "uint16"}
    spec = {"driver": "n5", "kvstore": f"file://{container}/volumes/raw", "metadata": metadata}
    stored = tensorstore.open({**spec, "create": True}).result()
    stored[...] = stack.T
    attributes = container / "volumes" / "raw" / "attributes.json"
    written = json.loads(attributes.read_text())
    attributes.write_text(json.dumps({**written, "resolution": [4, 4, 40], "units": ["nm"] * 3}))
    volume = open_volume(f"{container}/volumes/raw")
    assert (volume.kind, volume.shape, volume.chunks) == ("n5", (3, 16, 18), (1, 8, 9))
    assert (volume.voxel_size, volume.units) == ((40.0, 4.0, 4.0), "nm")
    corner = volume.read(Box((2, -2, 16), (4, 2, 20)))  # mirrored past the last slice and edges
    np.testing.assert_array_equal(corner[0], np.pad(stack, 2, mode="reflect")[4:6, 0:4, 18:22])
    out = convert_to_zarr(f"{container}/volumes/raw", str(tmp_path / "raw.zarr"))
    np.testing.assert_array_equal(zarr.open_array(out.url)[...], stack)
    with pytest.raises(InputError, match="does not exist"):
        open_volume(f"{container}/volumes/labels")


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_storage_opens_an_ome_zarr_image_at_full_resolution(tmp_path: Path, version: str) -> None:
    # OME-Zarr 0.5 on Zarr v3 keeps its metadata under "ome"; 0.4 on Zarr v2 at the top.
    full = np.random.default_rng(2).integers(0, 255, (4, 16, 16), dtype=np.uint8)
    fmt = 3 if version == "0.5" else 2
    group = zarr.open_group(tmp_path / "image.ome.zarr", mode="w", zarr_format=fmt)
    group.create_array("0", data=full)
    group.create_array("1", data=full[:, ::2, ::2])
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    datasets = [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        for level, scale in ((0, [40.0, 4.0, 4.0]), (1, [40.0, 8.0, 8.0]))
    ]
    multiscales = [{"axes": axes, "datasets": datasets, "name": "image"}]
    meta = {"version": version, "multiscales": multiscales}
    group.attrs.update({"ome": meta} if version == "0.5" else {"multiscales": multiscales})
    volume = open_volume(str(tmp_path / "image.ome.zarr"))
    assert (volume.shape, volume.voxel_size, volume.units) == ((4, 16, 16), (40, 4, 4), "nm")
    np.testing.assert_array_equal(volume.read(volume.box)[0], full)


def test_convert_to_zarr_copies_a_tiff_stack_with_named_dims_and_voxel_size(tmp_path: Path) -> None:
    data = np.arange(5 * 9 * 11, dtype=np.uint16).reshape(5, 9, 11)
    tifffile.imwrite(tmp_path / "stack.tif", data)
    volume = convert_to_zarr(
        tmp_path / "stack.tif", tmp_path / "stack.zarr", chunks=(2, 4, 4), voxel_size=(50, 4, 4)
    )
    array = zarr.open_array(tmp_path / "stack.zarr")
    np.testing.assert_array_equal(array[:], data)
    assert array.chunks == (2, 4, 4) and array.metadata.dimension_names == ("z", "y", "x")
    assert volume.voxel_size == (50.0, 4.0, 4.0) and volume.units == "nm"


def test_convert_to_zarr_refuses_an_existing_output(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "out.zarr").mkdir()
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):
        convert_to_zarr(tmp_path / "stack.tif", tmp_path / "out.zarr")
