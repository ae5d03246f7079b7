#!/usr/bin/env bash
# Issue 17 on a lent GPU machine: the paper's network (base 64, depth 4) trained with AMP on the
# ISBI slices 0-19 for MINUTES (default 5), scored on 20-24, with the GPU's utilisation sampled
# every second (nvidia-smi). One script, under 10 minutes; packages as in gpu_checks.sh.
#
#   MINUTES=5 bash benchmarks/gpu_training.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-training}
mkdir -p "$out"
source benchmarks/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
  >"$out/utilisation.csv" &
sampler=$!
timeout $(( ${MINUTES:-5} * 60 + 200 )) python3 benchmarks/isbi_quality.py \
  --minutes "${MINUTES:-5}" --base-channels 64 --tile-output 388 --batch-size 4 \
  --out "$out/isbi" 2>&1 | grep -v INFO | tee "$out/isbi.txt" | tail -8
kill "$sampler"
awk -F', ' '{u += $1; n++} END {if (n) printf "GPU utilisation: mean %.0f%% over %d s\n", u / n, n}' \
  "$out/utilisation.csv" | tee -a "$out/isbi.txt"
