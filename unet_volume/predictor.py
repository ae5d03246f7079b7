"""The U-Net as a predictor: checkpoint bytes in, soft-max probabilities out, one net per process.

The prediction engine (:mod:`unet_volume.predict`) accepts any picklable callable
mapping an input tile ``(c, z, y, x)`` to probabilities ``(k, z', y', x')``. This is
the one that wraps a trained U-Net: it reaches every Dask worker once, and
each worker process builds the network on first use and keeps it for every block.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from unet_volume.checkpoint import checkpoint_from_bytes
from unet_volume.cluster import tune_worker_process, worker_threads
from unet_volume.errors import InputError
from unet_volume.model import UNet

_MODELS: dict[tuple[str, str, str], UNet] = {}
"""Networks built in this process, by (checkpoint sha256, device, dtype): one per worker."""


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
    ) -> None:
        if output not in ("probabilities", "logits"):
            raise InputError(
                f"predictor output {output!r} is unknown; pass 'probabilities' or 'logits'"
            )
        self.checkpoint = checkpoint
        self.tta = tta
        self.output = output
        self.requested_device = device
        self.dtype = dtype
        info = checkpoint_from_bytes(checkpoint)
        self.sha256 = info.sha256
        self.ndim = info.config.ndim
        norm = info.metadata.get("normalization", {})
        self.mean = float(norm.get("mean", 0.0))
        self.std = float(norm.get("std", 1.0))

    @property
    def layout(self) -> torch.memory_format:
        """Channels-last for float32: oneDNN's fast layout (1.7x single-threaded on CPU, measured).

        float64 has no oneDNN kernels, so it keeps torch's reference layout, whose
        2D convolutions sum in the same order for every tile size (bit-exact stitching).
        """
        if self.dtype != "float32":
            return torch.contiguous_format
        return torch.channels_last if self.ndim == 2 else torch.channels_last_3d

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
            model = checkpoint_from_bytes(self.checkpoint).to_model()
            model = model.to(device=self.device, dtype=getattr(torch, self.dtype))
            model = model.to(memory_format=self.layout)  # type: ignore[call-overload]
            _MODELS[self.key] = model
        return _MODELS[self.key]

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        net = self.network()
        x = (tile.astype(self.dtype) - self.mean) / self.std  # (c, z, y, x)
        batch = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if self.ndim == 2:
            batch = batch.permute(1, 0, 2, 3)  # (z, c, y, x): slices are the batch
        else:
            batch = batch[None]  # (1, c, z, y, x)
        with torch.inference_mode():
            if self.tta:
                probs = torch.stack([self._turned(net, batch, k) for k in range(8)]).mean(dim=0)
            else:
                probs = self._scores(net, batch)
        probs = probs.permute(1, 0, 2, 3) if self.ndim == 2 else probs[0]  # (k, z, y, x)
        return np.asarray(probs.cpu().numpy())

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
