"""The input formats people have, each opened as a lazily readable array.

- Zarr arrays, v2 or v3, local or any fsspec URL; a unet-volume output group opens as the
  array it names (a weight volume's ``weights``), an OME-Zarr image as its full resolution.
- TIFF stacks (tifffile's Zarr view, page by page), and local folders of 2D TIFFs, one per
  z slice in name order.
- HDF5 datasets, ``file.h5:/path/to/dataset`` (h5py; a file's only dataset may go unnamed).
- N5 datasets, ``container.n5/path/to/dataset`` (tensorstore, the ``n5`` extra), in (z, y, x)
  order: N5 lists its dimensions fastest first (x, y, z), as the Java tools that write it.

Each also gives its voxel size where the format stores one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import tifffile
import zarr

from unet_volume.errors import InputError
from unet_volume.io.locations import exists
from unet_volume.io.retries import remote_store

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5 = re.compile(r"(?P<file>.+\.(?:h5|hdf5|hdf))(?::(?P<dataset>/?[^:]*))?", re.IGNORECASE)
"""``file.h5:/path/to/dataset`` (the dataset may be left out when the file holds one)."""
N5 = re.compile(r"(?P<container>.+?\.n5)(?:/(?P<dataset>.*?))?/?", re.IGNORECASE)
"""``container.n5/path/to/dataset``."""
Kind = Literal["zarr", "tiff", "hdf5", "n5"]
UNITS = {"nanometer": "nm", "micrometer": "um", "millimeter": "mm", "angstrom": "A"}
"""OME-Zarr's unit names as the rest of the package writes them."""


def is_tiff(url: str) -> bool:
    """A TIFF stack, or a local folder of 2D TIFFs (one per z slice, in name order)."""
    return url.lower().endswith(TIFF_SUFFIXES) or bool(tiff_files(url))


def input_kind(url: str) -> Kind:
    """How the input at ``url`` is read: a Zarr array, a TIFF stack (or folder), an HDF5 dataset.

    >>> input_kind("data/raw.h5:/volumes/raw"), input_kind("s3://b/v.zarr/raw")
    ('hdf5', 'zarr')
    """
    if HDF5.fullmatch(url):
        return "hdf5"
    if N5.fullmatch(url):
        return "n5"
    return "tiff" if is_tiff(url) else "zarr"


ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup")
"""The keys a Zarr node (v3, v2 array, v2 group) stores at its root."""


def input_exists(url: str) -> bool:
    """Whether the input at ``url`` is there (for HDF5: its file).

    A Zarr node is there when its metadata key is: a web server or static bucket hosting
    answers 404 for the node's own URL, which is no file (only listings make it look like one).
    """
    match = HDF5.fullmatch(url)
    if match:
        return exists(match["file"])
    if exists(url):
        return True
    if input_kind(url) != "zarr":
        return False
    keys = [f"{url.rstrip('/')}/{key}" for key in ZARR_METADATA]
    if any(exists(key) for key in keys):
        return True
    if url.startswith(("http://", "https://")):
        _raise_refusal(keys[0])
    return False


def _raise_refusal(url: str) -> None:
    """Raise a web server's refusal (403) of ``url``: fsspec's ``exists`` says no for it, as
    for a missing file, and a user would look for a typo instead of a permission."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        fs.cat_file(path)
    except FileNotFoundError:
        pass
    except Exception as error:
        if getattr(error, "status", None) == 403:
            raise PermissionError(f"403 {getattr(error, 'message', 'Forbidden')}") from error


def _hdf5_dataset(url: str, file: Any) -> Any:
    """The dataset that ``file.h5:/path`` names; without a path, the file's only dataset."""
    match = HDF5.fullmatch(url)
    assert match is not None
    if match["dataset"]:
        if match["dataset"] not in file:
            raise InputError(
                f"{match['file']} has no dataset {match['dataset']}; pass one of {_datasets(file)}"
            )
        return file[match["dataset"]]
    found = _datasets(file)
    if len(found) != 1:
        example = found[0] if found else "/raw"
        raise InputError(
            f"{url} holds {len(found)} datasets {found[:5]}; name one, e.g. {url}:{example}"
        )
    return file[found[0]]


def _datasets(file: Any) -> list[str]:
    import h5py

    names: list[str] = []
    file.visititems(
        lambda name, node: names.append(f"/{name}") if isinstance(node, h5py.Dataset) else None
    )
    return names


def tiff_files(url: str) -> list[str]:
    """The TIFFs of a local folder of slices, sorted by name; [] for anything else.

    >>> tiff_files("no/such/folder")
    []
    """
    if "://" in url or not Path(url).is_dir():
        return []
    return sorted(str(p) for p in Path(url).iterdir() if p.name.lower().endswith(TIFF_SUFFIXES))


@contextmanager
def opened_array(url: str, kind: str) -> Iterator[Any]:
    """The array at ``url``, lazily readable; a TIFF's file handle is closed on exit."""
    if kind == "hdf5":
        import h5py  # read per access, as a TIFF: its file handle must be closed

        with h5py.File(HDF5.fullmatch(url)["file"], "r") as file:  # type: ignore[index]
            yield _hdf5_dataset(url, file)
        return
    if kind == "n5":
        yield N5Array(url)
        return
    if kind == "tiff" and (files := tiff_files(url)):
        with tifffile.TiffSequence(files).aszarr() as store:  # a folder: slices along z
            yield zarr.open_array(store, mode="r")
        return
    if kind == "tiff":
        with tifffile.imread(url, aszarr=True) as store:
            yield zarr.open_array(store, mode="r")
        return
    node = zarr.open(remote_store(url, read_only=True), mode="r")
    if isinstance(node, zarr.Group):
        image = ome_image(node)
        node = node[image[0]] if image else _main_array(node, url)
    yield node


class N5Array:
    """An N5 dataset read through tensorstore, as a (z, y, x) array: ``shape``, ``dtype``,
    ``chunks``, ``attrs`` (its voxel size ``resolution`` and ``units`` in z, y, x order) and
    numpy slicing."""

    def __init__(self, url: str):
        try:
            import tensorstore as ts
        except ImportError as error:
            raise InputError(
                f"input {url} is N5, which needs tensorstore: pip install 'unet-volume[n5]'"
            ) from error
        where = url if "://" in url else f"file://{Path(url).resolve()}"
        self._store = ts.open({"driver": "n5", "kvstore": where}, read=True).result().T
        self.shape = tuple(int(n) for n in self._store.shape)
        self.dtype = np.dtype(self._store.dtype.numpy_dtype)
        read_chunk = self._store.chunk_layout.read_chunk.shape  # always set for N5
        self.chunks = tuple(int(c) for c in read_chunk)  # type: ignore[union-attr, arg-type]
        with fsspec.open(f"{url.rstrip('/')}/attributes.json", "r") as f:
            stored = json.load(f)
        units = stored.get("units")
        resolution = stored.get("resolution")
        self.attrs = {
            "voxel_size": list(reversed(resolution)) if resolution else None,
            "units": units[0] if isinstance(units, list) and units else units,
        }

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._store[key].read().result())


def ome_image(
    group: zarr.Group,
) -> tuple[str, tuple[float, float, float] | None, str | None] | None:
    """An OME-Zarr image's full-resolution array (its first ``multiscales`` dataset), with its
    (z, y, x) scale and unit; None for any other group. OME-Zarr 0.5 keeps the metadata under
    ``ome`` (Zarr v3), 0.4 at the top (Zarr v2)."""
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)
    multiscales = meta.get("multiscales") if isinstance(meta, dict) else None
    if not multiscales:
        return None
    first = multiscales[0]
    dataset = first["datasets"][0]
    scales = [
        t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"
    ]
    size = tuple(float(v) for v in scales[0][-3:]) if scales and len(scales[0]) >= 3 else None
    unit = (first.get("axes") or [{}])[-1].get("unit")
    return dataset["path"], size, UNITS.get(unit, unit)  # type: ignore[return-value]


def _main_array(group: zarr.Group, url: str) -> Any:
    """The array that a unet-volume output names as its volume (a weight volume's ``weights``).

    An output whose run is not complete is refused: its missing blocks would read as zeros.
    Any other group is refused, naming its arrays.
    """
    info = group.attrs.get("unet_volume")
    name = info.get("array") if isinstance(info, dict) else None
    if not isinstance(name, str):
        names = sorted(name for name, _ in group.arrays())
        raise InputError(
            f"input {url} is a Zarr group, not an array; pass one of its arrays, "
            f"e.g. {url.rstrip('/')}/{names[0] if names else 'ARRAY'}"
        )
    if not info.get("complete"):  # type: ignore[union-attr]
        raise InputError(
            f"input {url} is incomplete (its run stopped before every block was written); "
            "run the command that writes it again to resume (`unet-volume status` shows how far)"
        )
    return group[name]


def stored_voxel_size(
    array: Any, url: str, kind: str
) -> tuple[tuple[float, float, float] | None, str | None]:
    """The voxel size and units stored with the input, so that outputs can carry them on.

    Read from an OME-Zarr image's scale and unit, the Zarr (or HDF5) attributes
    ``voxel_size`` (or ``resolution``) and ``units``, or a TIFF's ImageJ tags.
    """
    if kind == "tiff":
        return _tiff_voxel_size(url)
    node = zarr.open(url, mode="r") if kind == "zarr" else None
    if isinstance(node, zarr.Group) and (image := ome_image(node)):
        return image[1], image[2]
    attrs = dict(array.attrs)
    for key in ("voxel_size", "resolution"):
        value = attrs.get(key)
        value = value.tolist() if isinstance(value, np.ndarray) else value  # HDF5 attributes
        if isinstance(value, list | tuple) and len(value) >= 3:
            return tuple(float(v) for v in value[-3:]), attrs.get("units")  # type: ignore[return-value]
    return None, None


def _tiff_voxel_size(url: str) -> tuple[tuple[float, float, float] | None, str | None]:
    url = (tiff_files(url) or [url])[0]  # a folder's slices: the first one's tags
    with fsspec.open(url, "rb") as handle, tifffile.TiffFile(handle) as tif:
        meta = tif.imagej_metadata or {}
        page = tif.pages.first
        tags = page.tags
        if "spacing" not in meta or "XResolution" not in tags:
            return None, None
        x_num, x_den = tags["XResolution"].value
        y_num, y_den = tags["YResolution"].value
        size = (float(meta["spacing"]), y_den / y_num, x_den / x_num)
        unit = str(meta.get("unit") or "")
        return size, {"micron": "um", "\u00b5m": "um"}.get(unit, unit) or None
