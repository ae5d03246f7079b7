"""Test helpers shared by the test suite and benchmarks: strategies, probes, references.

Kept in the package (as zarr-python does) so downstream code can test against
the same definitions. Imports hypothesis lazily: it is a test extra.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from unet_volume.geometry import Box
from unet_volume.io.volumes import ArrayLike, read_box
from unet_volume.tiling import TileGeometry

if TYPE_CHECKING:  # torch is imported lazily: this module serves torch-free tests too
    import torch

    from unet_volume.models.unet import UNet

EXACT_LIMIT = 2**53
"""Integers below this magnitude are exact in float64, and so is every sum of them."""


class CropPredictor:
    """A placement probe: "predicts" its input's centre, cropped by the halo.

    Run over an ``arange`` volume, correct tiling must give the volume back
    exactly; a tile read or written one voxel off shows at once.
    """

    def __init__(self, geometry: TileGeometry) -> None:
        self.geometry = geometry

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        inner = Box.from_shape(tile.shape[1:]).shrink(self.geometry.halo)
        return tile[(slice(None), *inner.to_slices())].astype(np.float64)


def predict_whole(
    predictor: Callable[[np.ndarray], np.ndarray], array: ArrayLike, ndim: int, depth: int
) -> np.ndarray:
    """The reference: one forward pass over the whole mirror-padded volume.

    The volume is padded by the halo on both sides (plus the few voxels that
    make its size valid on the high side), run once, and cropped back.
    """
    shape = tuple(array.shape[-3:])
    geometry = TileGeometry.for_unet(ndim, depth, min_output=shape)
    output_box = Box.from_shape(geometry.output_shape)
    result = predictor(read_box(array, geometry.input_box(output_box)))
    return result[(slice(None), *Box.from_shape(shape).to_slices())]


def blob_volume(
    shape: tuple[int, ...], *, seed: int = 0, channels: int | None = None
) -> np.ndarray:
    """A synthetic uint8 volume: bright touching blobs over an intensity ramp.

    The ramp makes every voxel different (so misplaced tiles show), the blobs
    give a segmentation something to find.
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ramp = sum(g * (k + 1) for k, g in enumerate(grids)) % 97
    blobs = np.zeros(shape)
    for _ in range(max(1, int(np.prod(shape)) // 400)):
        centre = [rng.uniform(0, n) for n in shape]
        radius = rng.uniform(2.0, 6.0)
        dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        blobs = np.maximum(blobs, dist2 < radius**2)
    volume = (ramp + 150 * blobs).clip(0, 255).astype(np.uint8)
    if channels is None:
        return volume
    return np.stack([np.roll(volume, c, axis=-1) for c in range(channels)])


def blob_labels(
    shape: tuple[int, int, int], count: int, *, seed: int = 0, radius: tuple[float, float] = (2, 5)
) -> np.ndarray:
    """Instance labels: random balls labelled 1..count, later ones over earlier ones.

    Touching cells with background between them: what weight maps and metrics are about.
    """
    rng = np.random.default_rng(seed)
    grids = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint16)
    for label in range(1, count + 1):
        centre = rng.uniform(0, shape)[:, None, None, None]
        labels[((grids - centre) ** 2).sum(0) < rng.uniform(*radius) ** 2] = label
    return labels


def write_zarr(
    path: str | Path, data: np.ndarray, chunks: tuple[int, ...] | None = None, **attrs: Any
) -> str:
    """A real Zarr v3 array on disk, with odd chunks (2, 17, 19) unless told otherwise.

    Odd chunks make every block read cross chunk borders, as real volumes do.
    """
    default = (2, 2, 17, 19)[-data.ndim :]
    chunks = chunks or tuple(min(n, c) for n, c in zip(data.shape, default))
    array = zarr.create_array(
        path, shape=data.shape, dtype=data.dtype, chunks=chunks, attributes=attrs
    )
    array[:] = data
    return str(path)


def boxes(ndim: int = 3, low: int = -20, high: int = 40) -> Any:
    """Hypothesis strategy of boxes (possibly empty) with corners in ``[low, high]``."""
    from hypothesis import strategies as st

    corner = st.tuples(*(st.integers(low, high) for _ in range(ndim)))
    return st.tuples(corner, corner).map(
        lambda c: Box(tuple(map(min, c[0], c[1])), tuple(map(max, c[0], c[1])))
    )


def integer_unet(
    *,
    ndim: Literal[2, 3] = 2,
    depth: int = 2,
    base_channels: int = 8,
    in_channels: int = 1,
    seed: int = 0,
) -> UNet:
    """A U-Net whose weights are in {-1, 0, 1} and biases in {-2, ..., 2}: exact in float64.

    With integer inputs, every product and partial sum in every conv, up-conv and the head is
    an integer; while they stay below 2**53 (:class:`SumBound` checks it) float64 holds
    them exactly, so the result cannot depend on the order in which a CPU's math library adds
    them (kernel choice, blocking, vector width, threads). Max-pool, ReLU, crop and concat
    only move or select values. Two thirds of the weights are 0, which keeps the sums of a
    depth-3 net about 2**40 on inputs below 16 (a dense {-1, 0, 1} net reaches 2**52).
    """
    import torch

    from unet_volume.models.unet import UNet

    torch.manual_seed(seed)
    net = UNet(
        in_channels=in_channels, base_channels=base_channels, depth=depth, ndim=ndim, dropout=0.0
    )
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, value in net.named_parameters():
            if name.endswith("bias"):
                drawn = rng.integers(-2, 3, value.shape)
            else:
                drawn = rng.choice([-1, 0, 0, 0, 0, 1], size=value.shape)
            value.copy_(torch.from_numpy(drawn))
    return net.eval()


class SumBound:
    """Within ``with SumBound(net) as bound:``, the largest partial sum any conv can form.

    Each conv's output is recomputed with ``|weights|``, ``|bias|`` and ``|input|``: that sum
    of absolute terms bounds every partial sum of the real one, in any order. If
    ``bound.largest < EXACT_LIMIT`` after a float64 pass of an :func:`integer_unet` on integer
    input, every value of that pass was exact.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self.largest = 0.0
        self._hooks: list[Any] = []

    def __enter__(self) -> SumBound:
        self._hooks = [m.register_forward_hook(self._measure) for m in self.net.modules()]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()

    def _measure(self, layer: Any, inputs: tuple[Any, ...], _output: Any) -> None:
        from torch.nn import functional

        convs: dict[str, Callable[..., Any]] = {
            "Conv2d": functional.conv2d,
            "Conv3d": functional.conv3d,
            "ConvTranspose2d": functional.conv_transpose2d,
            "ConvTranspose3d": functional.conv_transpose3d,
        }
        conv = convs.get(type(layer).__name__)
        if conv is None:
            return
        bias = None if layer.bias is None else layer.bias.abs()
        terms = conv(inputs[0].abs(), layer.weight.abs(), bias, stride=layer.stride)
        self.largest = max(self.largest, float(terms.max()))


def label_pairs(max_label: int = 5) -> Any:
    """Hypothesis strategy: two label volumes of one random (z, y, x) shape, ids 0..max_label.

    Drawn as (segmentation, truth), for metrics that must agree with a reference.
    """
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
    return shapes.flatmap(
        lambda shape: st.tuples(
            arrays(np.int64, shape, elements=st.integers(0, max_label)),
            arrays(np.int64, shape, elements=st.integers(0, max_label)),
        )
    )


def assert_one_line_error(call: Callable[[], object], error: type[Exception], match: str) -> None:
    """``call()`` raises ``error``, whose message matches ``match`` and fits on one line.

    The house rule for bad input: one line naming the problem and the fix, which the CLI
    prints as is (exit code 2, no traceback).
    """
    import pytest

    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value), f"a multi-line message: {info.value}"


def snapshot(root: str | Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and modification time, to show nothing was touched."""
    base = Path(root)
    return {
        str(p.relative_to(base)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


FULL_DISK = "fulldisk"
"""The URL protocol of :class:`FullDisk`: ``fulldisk:///tmp/disk/out.zarr``."""
SPACE_FILE = ".space"


class FullDisk(LocalFileSystem):
    """A local file system whose disk fills up: a store that raises ENOSPC, for tests.

    The bytes left are kept in a ``.space`` file in a folder above the written path (absent:
    unlimited). Each write spends its size; a write that does not fit raises
    ``OSError(ENOSPC)``, as a full disk does, and writes nothing. Removing ``.space`` frees
    the disk. Kept in a file so that every worker process sees the same disk; register the
    protocol in each with :func:`register_full_disk`.
    """

    protocol = FULL_DISK

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "auto_mkdir": True})

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        text = str(path)
        return super()._strip_protocol(text.removeprefix(FULL_DISK + "://"))

    def pipe_file(self, path: Any, value: bytes, *args: Any, **kwargs: Any) -> None:
        _spend(Path(self._strip_protocol(path)), len(value))
        super().pipe_file(path, value, *args, **kwargs)


def _spend(path: Path, size: int) -> None:
    """Take ``size`` bytes from the ``.space`` above ``path``, or raise ENOSPC."""
    for folder in path.parents:
        space = folder / SPACE_FILE
        if space.exists():
            left = int(space.read_text())
            if size > left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            # Replaced, never rewritten in place: other processes read it meanwhile.
            spent = folder / f"{SPACE_FILE}.{os.getpid()}.{threading.get_ident()}"
            spent.write_text(str(left - size))
            os.replace(spent, space)
            return


def register_full_disk() -> None:
    """Make ``fulldisk://`` URLs open :class:`FullDisk` in this process (run it in workers too)."""
    fsspec.register_implementation(FULL_DISK, FullDisk, clobber=True)


def listening_sockets(process: Any) -> set[tuple[str, int]]:
    """The TCP (host, port) pairs a ``psutil.Process`` and its children listen on."""
    import psutil  # a dependency of distributed

    found = set()
    for each in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            for conn in each.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port))
    return found


def free_port_cluster(**options: Any) -> Any:
    """A ``distributed.LocalCluster`` of ``options`` on 127.0.0.1 that claims no fixed port.

    A LocalCluster serves its dashboard on 8787 by default; where that port is taken (a user's
    own Dask or Jupyter, a second test run beside this one) it warns, which the suite's
    warnings-as-errors turns into "Cluster failed to start". So the dashboard is off and the
    scheduler's web server takes a free port.
    """
    from distributed import LocalCluster

    defaults = {
        "dashboard_address": None,
        "host": "127.0.0.1",
        "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
    }
    return LocalCluster(**{**defaults, **options})


ONE_LOCAL_WORKER = (
    "kind: local\nn_workers: 1\nthreads_per_worker: 1\nhost: 127.0.0.1\n"
    "dashboard_address: null\nscheduler_kwargs: {dashboard_address: '127.0.0.1:0'}\n"
)
"""A cluster spec (``deploy/clusters`` YAML) of one local worker that, as
:func:`free_port_cluster`, claims no fixed port."""
