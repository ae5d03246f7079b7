#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a lent GPU machine (see README, "Tests").
#
#   bash benchmarks/gpu_checks.sh [OUTDIR]
#
# Uses the machine's own python3 with its CUDA torch. Packages it lacks travel as wheels in
# .whl/ (downloaded beforehand with `pip download --python-version 3.12 ...`, zarrs among them:
# its abi3 wheel serves 3.12): they go to a
# private site directory, nothing is installed system-wide. Writes the card, the tests' output
# and the throughput figures to OUTDIR (default: runs/gpu-checks).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-checks}
mkdir -p "$out"
source benchmarks/gpu_env.sh || exit 1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), \
'gpu', torch.cuda.get_device_name())"
} 2>&1 | tee "$out/card.txt"
# The engine, checkpoints, the model and training on CUDA: the exactness tests run their
# float64 passes on the GPU here (ModelPredictor picks CUDA), so they check that cuDNN's
# float64 kernels keep every integer sum exact too. Flow tests need Prefect: not here.
timeout 150 python3 -m pytest -p no:cacheprovider -q -o addopts="" -m "not slow" \
  --durations=8 tests/test_predict.py tests/test_checkpoint.py tests/test_model.py \
  tests/test_train.py tests/test_gpu_pipeline.py tests/test_grid.py 2>&1 \
  | tee "$out/tests.txt" | tail -30
# The bare model and the engine on this GPU: paper net and base 16, float32 and bfloat16, a 4 GB
# volume (issue 15's figures: engine / bare, ms per 512x512 slice, GPU utilisation).
timeout 400 python3 benchmarks/gpu_throughput.py --gigabytes 4 --workdir /tmp/gpu-throughput \
  2>&1 | tee "$out/gpu_throughput.txt" | grep -v INFO | tail -8
