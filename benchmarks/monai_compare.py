"""The engine against MONAI's sliding window on the same volume and network (CPU).

Both run the base-16 depth-4 U-Net of this project (the same weights) over a (16, 1024, 1024)
uint8 volume, slice by slice (a 2D net):

- MONAI 1.6 ``sliding_window_inference``, as a MONAI user would: windows of 512x512 with its
  default overlap 0.25 and gaussian blending. MONAI's windows must map to outputs of the same
  size, so the network is wrapped to mirror-pad each window by its halo (92 voxels a side)
  first: the padded convolutions of a typical MONAI net, made explicit. One process, torch with
  2 threads, the whole volume in memory.
- unet-volume: ``predict_volume`` from the Zarr volume into a Zarr output, 2 single-threaded
  worker processes, blocks of 1x512x512, exact stitching (no overlap beyond the halo, no
  blending).

Prints seconds and Mvoxel/s of each and the ratio (target: the engine at least 3x MONAI).
MONAI is not a dependency of unet-volume: ``pip install monai==1.6.1`` in the environment first
(with the CPU torch already installed, pip keeps it).

    .venv/bin/python benchmarks/monai_compare.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from unet_volume.cluster.client import open_client
from unet_volume.models.checkpoint import save_model
from unet_volume.models.unet import UNet
from unet_volume.prediction.run import predict_volume

VOLUME = (16, 1024, 1024)
METADATA = {"normalization": {"mean": 127.5, "std": 64.0}}


class MirroredUNet(torch.nn.Module):
    """The valid-convolution U-Net made same-size: each window mirror-padded by the halo."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net, self.halo = net, net.halo[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        padded_size = self.net.tile_geometry(min_output=(1, size, size)).input_shape[-1]
        high = padded_size - size - self.halo
        padded = F.pad(x, (self.halo, high, self.halo, high), mode="reflect")
        return torch.softmax(self.net(padded), dim=1)[..., :size, :size]


def monai_run(net: UNet, volume: np.ndarray) -> float:
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(2)
    model = MirroredUNet(net).eval()
    mean, std = METADATA["normalization"].values()
    start = time.perf_counter()
    with torch.inference_mode():
        for z in range(volume.shape[0]):
            image = (torch.from_numpy(volume[z : z + 1].astype(np.float32)) - mean) / std
            sliding_window_inference(
                image[None],
                roi_size=(512, 512),
                sw_batch_size=1,
                predictor=model,
                overlap=0.25,
                mode="gaussian",
            )
    return time.perf_counter() - start


def engine_run(model_path: Path, source: Path, workdir: Path) -> float:
    with open_client(n_workers=2, dashboard=False) as client:
        predict_volume(model_path, source, workdir / "warm.zarr", client=client, overwrite=True)
        report = predict_volume(
            model_path, source, workdir / "out.zarr", client=client, overwrite=True
        )
    return report.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = UNet(base_channels=16, depth=4).eval()
    volume = np.random.default_rng(0).integers(0, 256, VOLUME, dtype=np.uint8)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        model_path = save_model(net, workdir / "model.pt", metadata=METADATA)
        source = workdir / "volume.zarr"
        zarr.create_array(source, shape=VOLUME, chunks=(1, 512, 512), dtype="uint8")[:] = volume
        engine_s = engine_run(model_path, source, workdir)
        monai_s = monai_run(net, volume)
    voxels = np.prod(VOLUME) / 1e6
    print(f"MONAI sliding window: {monai_s:.1f} s ({voxels / monai_s:.2f} Mvoxel/s)")
    print(f"unet-volume engine:   {engine_s:.1f} s ({voxels / engine_s:.2f} Mvoxel/s)")
    print(f"engine / MONAI = {monai_s / engine_s:.2f}  (target >= 3)")


if __name__ == "__main__":
    main()
