#!/usr/bin/env bash
# The end-to-end demo on embedded defaults (Prefect's local API, a Dask LocalCluster, local Zarr;
# offline): convert the ISBI 2012 stack to Zarr; predict it with the shipped model
# (isbi2012-membranes), segment its objects and score slices 20-24; run the `train` flow for a
# few minutes on slices 0-19, score slices 20-24, run the `predict` flow on all 25; print where
# the outputs are, an xarray summary and the metrics, and write preview PNGs; where napari is
# installed (pip install -e '.[viewer]'), a napari screenshot of the objects over the image.
# Usage: bash scripts/demo.sh [OUTPUT_DIR] (default runs/demo); MINUTES=3 sets the training budget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/demo}
mkdir -p "$out"
# Prefect offline: its own home under the output, no telemetry, time for a cold start on 2 cores.
export PREFECT_HOME=${PREFECT_HOME:-$out/prefect-home}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export DASK_LOGGING__DISTRIBUTED=${DASK_LOGGING__DISTRIBUTED:-warning}  # the flows log the run; workers stay quiet
.venv/bin/python -m unet_volume_flows.demo --out "$out" --minutes "${MINUTES:-3}"
# The objects as a person sees them: napari opens the store with napari-ome-zarr. It needs a
# display; a headless machine renders into Xvfb (apt install xvfb). Qt's chatter goes to a log.
shot=(.venv/bin/python scripts/napari_screenshot.py "$out/shipped.zarr"
  --image "$out/isbi-volume.zarr" --out "$out/shipped.napari.png" --z 22)
if ! .venv/bin/python -c "import napari, napari_ome_zarr" 2>/dev/null; then
  echo "napari screenshot skipped: pip install -e '.[viewer]' renders one"
elif [[ -n ${DISPLAY:-} ]]; then
  "${shot[@]}" 2>"$out/napari.log"
elif command -v xvfb-run >/dev/null; then
  xvfb-run -a -s "-screen 0 1280x1024x24" "${shot[@]}" 2>"$out/napari.log"
else
  echo "napari screenshot skipped: no display (install xvfb to render one headless)"
fi
