"""The U-Net as a predictor: checkpoint bytes in, soft-max probabilities out, one net per process.

The prediction engine (:mod:`unet_volume.prediction.run`) accepts any picklable callable
mapping an input tile ``(c, z, y, x)`` to probabilities ``(k, z', y', x')``. This is
the one that wraps a trained U-Net: it reaches every Dask worker once, and
each worker process builds the network on first use and keeps it for every block.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import numpy as np
import torch

from unet_volume.cluster.client import tune_worker_process, worker_threads
from unet_volume.errors import InputError
from unet_volume.models.checkpoint import checkpoint_from_bytes
from unet_volume.models.unet import UNet, channels_last
from unet_volume.output.prediction import encode_probabilities, segment
from unet_volume.prediction.memory import network_activations

_MODELS: dict[tuple[str, str, str], UNet] = {}
"""Networks built in this process, by (checkpoint sha256, device, dtype): one per worker."""
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
"""One lock per device in this process: a GPU worker's threads read, decode, encode and write
blocks side by side, and take turns on the GPU (one forward pass at a time)."""
Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")


class ModelPredictor:
    """A picklable predictor around checkpoint bytes; the network is built once per process.

    Applies the checkpoint's input normalisation, runs the net (a 2D net takes the tile's z
    slices as its batch), and returns soft-max probabilities as float32 (or float64 with
    ``dtype="float64"``). On CUDA, torch runs float32 convolutions in TF32 (10-bit mantissa):
    tiles and a whole pass then differ by up to ~1e-2 in probability (0.006 measured on an
    H100). ``output="logits"`` returns the net's raw class scores
    instead: with integer weights and inputs every sum in them is exact, which is how the tests
    prove stitching exact on any CPU (and on an H100's cuDNN, in float64); the soft-max's
    ``exp`` is not exact, and vector math libraries may round it differently.

    ``precision="bfloat16"`` (or ``"float16"``) runs the float32 network under autocast: on a
    GPU's tensor cores several times faster, at a probability difference of about 1e-2
    (``benchmarks/precision_agreement.py`` measures it on ISBI). ``tiles_per_pass`` tiles go
    through the network in one forward pass (:meth:`predict_many`): a GPU needs a batch to be
    busy. On CUDA, inputs go through pinned host memory with non-blocking copies, cuDNN picks
    its fastest kernels for the tile shape (``cudnn.benchmark``), and the threads of one worker
    take turns on the device.

    ``tta=True`` averages the probabilities (or logits) over the 8 flips and right-angle turns
    of the tile in (y, x), as the paper averaged rotated copies. Stitching stays exact:
    every valid input size of a depth-d U-Net has the same phase modulo 2^d, so a
    turned tile's pooling grid sits on one fixed lattice for every tile and for the
    whole volume alike.
    """

    def __init__(
        self,
        checkpoint: bytes,
        *,
        device: str = "auto",
        dtype: Literal["float32", "float64"] = "float32",
        tta: bool = False,
        output: Literal["probabilities", "logits"] = "probabilities",
        precision: Precision = "float32",
        tiles_per_pass: int | None = None,
    ) -> None:
        if output not in ("probabilities", "logits"):
            raise InputError(
                f"predictor output {output!r} is unknown; pass 'probabilities' or 'logits'"
            )
        if precision not in PRECISIONS or (precision != "float32" and dtype != "float32"):
            raise InputError(
                f"precision {precision!r} is not one of {', '.join(PRECISIONS)} over a float32 "
                "network; pass --precision float32, bfloat16 or float16"
            )
        if tiles_per_pass is not None and tiles_per_pass < 1:
            raise InputError(f"tiles per pass {tiles_per_pass} must be at least 1")
        self.precision = precision
        self.tiles_per_pass = tiles_per_pass
        self.checkpoint = checkpoint
        self.tta = tta
        self.output = output
        self.requested_device = device
        self.dtype = dtype
        info = checkpoint_from_bytes(checkpoint)
        self.sha256 = info.sha256
        self.config = info.config
        self.ndim = info.config.ndim
        self.mean, self.std = info.trained_input.mean, info.trained_input.std

    @property
    def layout(self) -> torch.memory_format:
        """Channels-last for float32: oneDNN's fast layout (1.7x single-threaded on CPU, measured).

        float64 has no oneDNN kernels, so it keeps torch's reference layout, whose
        2D convolutions sum in the same order for every tile size (bit-exact stitching).
        """
        if self.dtype != "float32":
            return torch.contiguous_format
        return channels_last(self.ndim)

    @property
    def device(self) -> str:
        """Resolved where the predictor runs: ``"auto"`` is CUDA on a worker that has it."""
        if self.requested_device != "auto":
            return self.requested_device
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.sha256, self.device, self.dtype)

    def network(self) -> UNet:
        """The network of this process, built on first use (once per worker)."""
        if self.key not in _MODELS:
            tune_worker_process()
            threads = worker_threads()
            if threads:
                torch.set_num_threads(threads)
            if self.device.startswith("cuda"):
                torch.backends.cudnn.benchmark = True  # the fastest kernels for this tile shape
            model = checkpoint_from_bytes(self.checkpoint).to_model()
            model = model.to(device=self.device, dtype=getattr(torch, self.dtype))
            model = model.to(memory_format=self.layout)  # type: ignore[call-overload]
            _MODELS[self.key] = model
        return _MODELS[self.key]

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        return self.predict_many([tile])[0]

    def batch_size(self, tile_input: Sequence[int]) -> int:
        """Tiles of ``tile_input`` (z, y, x) per forward pass: as given, or 1 on a CPU, or on
        CUDA as many as half the device's free memory holds (activations estimated as the
        memory check does, at most 64)."""
        if self.tiles_per_pass is not None:
            return self.tiles_per_pass
        if not self.device.startswith("cuda"):
            return 1
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        shrink = 2 if self.precision != "float32" else 1
        per_tile = network_activations(self.config, tile_input) // shrink
        return max(1, min(64, int(free // 2 // max(per_tile, 1))))

    def predict_many(self, tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Probabilities of several tiles of one shape ``(c, z, y, x)``, in one forward pass.

        A 2D net stacks the tiles' z slices as its batch, a 3D net the tiles themselves. The
        result of each tile does not depend on the others in the pass (no batch statistics
        at inference), which the tests check exactly.
        """
        with self._turn(), torch.inference_mode():
            probs = self._probabilities(tiles)
            probs = probs.float() if self.dtype == "float32" else probs
            result = probs.to("cpu", non_blocking=False).numpy()
        return [np.asarray(r) for r in self._per_tile(result, len(tiles))]

    def predict_encoded(
        self, tiles: Sequence[np.ndarray], output_dtype: str, threshold: float | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per tile, the segmentation and the probabilities as stored (``output_dtype``), as
        :func:`~unet_volume.output.prediction.segment` and
        :func:`~unet_volume.output.prediction.encode_probabilities` give them, bit for bit.

        Encoded where the network ran, in torch: on a GPU the worker's CPU only copies a
        quarter of the bytes (uint8), and on any CPU torch's float16 cast is vectorised where
        numpy's is not on every machine. A float64 network is encoded by numpy (torch casts
        float64 to float16 through float32, rounding twice).
        """
        if self.dtype != "float32":
            return [
                (segment(p, threshold), encode_probabilities(p, output_dtype))
                for p in self.predict_many(tiles)
            ]
        with self._turn(), torch.inference_mode():
            probs = self._probabilities(tiles).float()  # (n, k, z, y, x) or (n * z, k, y, x)
            labels = _segment(probs, threshold).cpu().numpy()
            stored = _encode(probs, output_dtype).cpu().numpy()
        if self.ndim == 2:  # (n * z, y, x) -> (n, z, y, x)
            labels = labels.reshape(len(tiles), -1, *labels.shape[1:])
        return list(zip(labels, self._per_tile(stored, len(tiles)), strict=True))

    def _probabilities(self, tiles: Sequence[np.ndarray]) -> torch.Tensor:
        """The net's scores of ``tiles`` on the device, batch first: ``(n, k, z, y, x)`` for a
        3D net, ``(n * z, k, y, x)`` for a 2D one (slices are the batch)."""
        net = self.network()
        x = np.stack([(t.astype(self.dtype) - self.mean) / self.std for t in tiles])
        if self.ndim == 2:  # (n * z, c, y, x): slices are the batch
            x = x.transpose(0, 2, 1, 3, 4).reshape(-1, x.shape[1], *x.shape[3:])
        batch = self._to_device(np.ascontiguousarray(x))
        with self.autocast():
            if self.tta:
                return torch.stack([self._turned(net, batch, k) for k in range(8)]).mean(dim=0)
            return self._scores(net, batch)

    def _per_tile(self, result: np.ndarray, tiles: int) -> np.ndarray:
        """``(n, k, z, y, x)`` from a pass's batch-first result (a 2D net's slices regrouped)."""
        if self.ndim == 2:  # (n * z, k, y, x) -> (n, k, z, y, x)
            return result.reshape(tiles, -1, *result.shape[1:]).transpose(0, 2, 1, 3, 4)
        return result

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        """The batch on the device: through pinned memory with a non-blocking copy on CUDA."""
        tensor = torch.from_numpy(x)
        if self.device.startswith("cuda"):
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _turn(self) -> threading.Lock | nullcontext[None]:
        """This process's lock of a CUDA device (threads take turns); none needed on a CPU."""
        if not self.device.startswith("cuda"):
            return nullcontext()
        return _DEVICE_LOCKS.setdefault(self.device, threading.Lock())

    def autocast(self) -> torch.autocast | nullcontext[None]:
        """The context the network runs in: autocast to :attr:`precision`, or none (float32)."""
        if self.precision == "float32":
            return nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=getattr(torch, self.precision))

    def _scores(self, net: UNet, batch: torch.Tensor) -> torch.Tensor:
        """Soft-max probabilities (or logits) of the net, per class along dim 1."""
        logits = net(batch.contiguous(memory_format=self.layout))
        return logits if self.output == "logits" else torch.softmax(logits, dim=1)

    def _turned(self, net: UNet, batch: torch.Tensor, k: int) -> torch.Tensor:
        """Scores of the batch turned by ``k % 4`` quarter turns and flipped if ``k >= 4``."""
        y, x = batch.ndim - 2, batch.ndim - 1
        turned = torch.rot90(batch, k % 4, dims=(y, x))
        if k >= 4:
            turned = torch.flip(turned, dims=(x,))
        probs = self._scores(net, turned)
        if k >= 4:
            probs = torch.flip(probs, dims=(x,))
        return torch.rot90(probs, -(k % 4), dims=(y, x))


def _segment(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """:func:`~unet_volume.output.prediction.segment` in torch, over classes along dim 1: the
    first class wins ties, and NaN never wins, as there."""
    if threshold is not None:
        return (probs[:, 1] > threshold).to(torch.uint8)
    best = probs[:, 0]
    label = torch.zeros(best.shape, dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[1]):
        better = probs[:, k] > best
        label.masked_fill_(better, k)
        if k + 1 < probs.shape[1]:
            best = torch.where(better, probs[:, k], best)
    return label


def _encode(probs: torch.Tensor, output_dtype: str) -> torch.Tensor:
    """:func:`~unet_volume.output.prediction.encode_probabilities` in torch (float32 input):
    uint8 is ``round(clip(p, 0, 1) * 255)``, rounding half to even as ``np.rint`` does."""
    if output_dtype == "uint8":
        return torch.clamp(probs, 0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return probs.to(getattr(torch, output_dtype))
