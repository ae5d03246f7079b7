# Sourced by the GPU scripts (gpu_checks.sh, gpu_training.sh), from the repository root: the
# machine's own python3 with its CUDA torch, and the packages it lacks from the wheels in .whl/
# (downloaded beforehand with `pip download --python-version 3.12 ...`) in a private site
# directory; nothing is installed system-wide.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/unet-volume-site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/unet-volume-site:$PWD
else
  export PYTHONPATH=$PWD
fi
