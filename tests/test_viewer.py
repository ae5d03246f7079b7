"""A person's look at an output: napari opens a prediction and its labels through
napari-ome-zarr (the reader its users have) at the voxel size as scale, and the screenshot of
``scripts/napari_screenshot.py`` shows the objects over the image.

Needs the viewer extra (``pip install -e '.[viewer]'``: napari, PyQt6, napari-ome-zarr) and a
display or ``xvfb-run``; deselected by default, run with ``-m viewer``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client
from imageio.v3 import imread

from unet_volume.instances.labelling import label_instances
from unet_volume.models.unet import UNet
from unet_volume.prediction.run import predict_volume
from unet_volume.testing import blob_volume, write_zarr

pytestmark = pytest.mark.viewer
SCRIPT = Path(__file__).parents[1] / "scripts" / "napari_screenshot.py"
VOXEL = (50.0, 4.0, 4.0)


def with_a_display(command: list[str]) -> list[str]:
    """``command`` as it can draw here: as it is under a display, else inside Xvfb."""
    if os.environ.get("DISPLAY"):
        return command
    if shutil.which("xvfb-run") is None:
        pytest.fail("napari needs a display: set DISPLAY or install xvfb (xvfb-run)")
    return ["xvfb-run", "-a", "-s", "-screen 0 1024x768x24", *command]


def test_napari_shows_the_objects_over_the_image_at_the_voxel_size(
    tmp_path: Path, client: Client
) -> None:
    image = write_zarr(tmp_path / "image.zarr", blob_volume((3, 64, 64)))
    out = tmp_path / "prediction.zarr"
    torch.manual_seed(0)
    predict_volume(UNet(base_channels=2, depth=1), image, out, client=client, voxel_size=VOXEL)
    label_instances(str(out), f"{out}/labels/cells", client=client)
    png = tmp_path / "shot.png"
    command = [sys.executable, str(SCRIPT), str(out), "--image", image, "--out", str(png)]
    run = subprocess.run(
        with_a_display([*command, "--z", "1"]), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    layers = [line for line in run.stdout.splitlines() if line.startswith(("Image", "Labels"))]
    # the probabilities, one layer per class, and the labels, each at the voxel size
    assert len(layers) == 3 and layers[-1].startswith("Labels 'labels/labels/cells'")
    assert all(line.endswith(f"scale {VOXEL}") for line in layers)
    shot = imread(png)[..., :3].astype(int)
    coloured = np.ptp(shot, axis=-1) > 40  # a label's colour, not the gray image
    assert coloured.mean() > 0.05
