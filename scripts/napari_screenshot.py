"""Look at an output as a person would: open it in napari with napari-ome-zarr, and save a
screenshot of one slice (the raw image under the objects) beside the demo's other PNGs.

napari reads the store through napari-ome-zarr, the reader its users have: the probabilities'
multiscale image, split into one layer per class, and the labels under ``labels/``, each at the
voxel size that the OME metadata gives (printed, in the units of the store). The raw image, which
the store does not hold, is added from ``--image`` at the same scale. napari needs a display: on
a headless machine run it under Xvfb (``apt install xvfb``), e.g.

    xvfb-run -a .venv/bin/python scripts/napari_screenshot.py runs/demo/shipped.zarr \\
        --image runs/demo/isbi-volume.zarr --out runs/demo/shipped.napari.png --z 22

Needs ``pip install -e '.[viewer]'`` (napari with PyQt6, napari-ome-zarr).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import napari
import numpy as np
import zarr
from imageio.v3 import imwrite


def open_as_a_user(viewer: napari.Viewer, store: str) -> None:
    """The store's layers as napari-ome-zarr gives them; prints each with its scale."""
    viewer.open(store, plugin="napari-ome-zarr")
    for layer in viewer.layers:
        shape = layer.data[0].shape if layer.multiscale else layer.data.shape
        scale = tuple(float(s) for s in layer.scale)
        print(f"{type(layer).__name__:6s} {layer.name!r}: {shape}, scale {scale}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("store", help="an output of predict (with its labels/) or of segment")
    parser.add_argument("--image", help="the raw volume (a Zarr array), drawn under the labels")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--z", type=int, default=0, help="the slice to show (index)")
    args = parser.parse_args()
    viewer = napari.Viewer(show=True)  # a hidden viewer draws an empty canvas
    open_as_a_user(viewer, args.store)
    labels = [layer for layer in viewer.layers if isinstance(layer, napari.layers.Labels)]
    reference = labels[0] if labels else viewer.layers[0]
    for layer in viewer.layers:
        if isinstance(layer, napari.layers.Labels):
            layer.visible, layer.opacity = True, 0.45  # the reader opens labels hidden
        else:
            layer.visible = False  # the probabilities: the raw image shows the tissue
    if args.image:
        raw = np.asarray(zarr.open_array(args.image, mode="r"))
        viewer.add_image(
            raw, name="image", scale=reference.scale, units=reference.units, colormap="gray"
        )
        viewer.layers.move(len(viewer.layers) - 1, 0)  # under the labels
    viewer.dims.set_point(0, args.z * float(reference.scale[0]))
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    imwrite(args.out, shot)
    print(f"wrote {args.out} ({shot.shape[1]}x{shot.shape[0]}), slice z={args.z}")
    viewer.close()


if __name__ == "__main__":
    main()
