#!/usr/bin/env bash
# CI job at the GPU machines' versions (Python 3.12, jax 0.11.x; pip on Python 3.11 stops at
# jax 0.10): the flash-attention kernels (interpreted, and lowered for CUDA and TPU), the Mosaic
# GPU (Hopper) kernels, whose values only jax 0.11's GPU interpreter can run, and the
# device check's dry run, so that a lent GPU's few minutes are not spent on a version break.
# Skipped, and said so, where this machine has no Python 3.12. GPU_VENV sets the folder.
set -euo pipefail
cd "$(dirname "$0")/.."

python312=""
for candidate in python3.12 "$(pyenv root 2>/dev/null || true)"/versions/3.12*/bin/python3.12; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys' 2>/dev/null; then
    python312="$candidate"
    break
  fi
done
if [ -z "$python312" ]; then
  echo "gpu_versions: skipped, no Python 3.12 on this machine"
  exit 0
fi

venv="${GPU_VENV:-${TMPDIR:-/tmp}/research-gpu-versions-venv}"
"$python312" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# gpu-compile: jax's CUDA plugin (no CUDA wheels), so tests/test_gpu_compile.py compiles our
# kernels to SASS for an H100 with this machine's ptxas (it skips, saying so, without one).
"$venv/bin/python" -m pip install --quiet '.[data,gpu-compile]' 'jax==0.11.*' 'jaxlib==0.11.*' pytest
"$venv/bin/python" -m pip list --format=freeze | grep -iE '^(jax|jaxlib|flax|optax|numpy)=='

set +e
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_versions.py tests/test_flash_attention.py tests/test_device_check.py \
  tests/test_hopper_fwd.py tests/test_hopper_backward.py tests/test_hopper_route.py \
  tests/test_gpu_compile.py
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests at the GPU machines' versions" >&2
fi
exit "$status"
