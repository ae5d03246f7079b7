#!/usr/bin/env bash
# The end-to-end demo on embedded defaults: train a small U-Net on ISBI 2012 slices 0-19 for a few
# minutes, then predict the whole 25-slice stack on a Dask LocalCluster and print how to open it.
# Usage: bash scripts/demo.sh [OUTPUT_DIR] (default runs/demo); MINUTES=3 sets the training budget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/demo}
mkdir -p "$out"
.venv/bin/unet-volume train data/isbi2012/train-volume.tif data/isbi2012/train-labels.tif \
  --out "$out/model.pt" --z-range 0:20 --validation-z-range 20:25 --minutes "${MINUTES:-3}"
.venv/bin/unet-volume predict data/isbi2012/train-volume.tif "$out/prediction.zarr" \
  --model "$out/model.pt" --voxel-size 50,4,4 --units nm --overwrite
