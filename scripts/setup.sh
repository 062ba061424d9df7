#!/usr/bin/env bash
# Sets up .venv with torch and builds + installs physmdn into it (CPU kernels always; CUDA kernels too
# when nvcc is found). Idempotent: re-running rebuilds physmdn incrementally.
#   PHYSMDN_TORCH   torch requirement (default torch==2.14.1, a CUDA 13.0 build)
#   PHYSMDN_CUDA    AUTO|ON|OFF (default: ON when torch is a CUDA build and nvcc is found, so CUDA code
#                   always compiles where it can)
#   PHYSMDN_VENV    venv folder (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PHYSMDN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${PHYSMDN_TORCH:-torch==2.14.1}" pybind11 "scikit-build-core>=0.10" "cmake>=3.26" ninja \
  numpy scipy tqdm matplotlib pytest
if [ -z "${PHYSMDN_CUDA:-}" ]; then
  torch_cuda=$(python -c "import torch; print(torch.version.cuda or '')")
  if [ -n "$torch_cuda" ] && { command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
    export PHYSMDN_CUDA=ON
  else
    export PHYSMDN_CUDA=AUTO
  fi
fi
if [ "$PHYSMDN_CUDA" = ON ]; then
  # nvdisasm, for bench/cuda_static.py and tests/cuda/test_cuda_static.py (the SASS of the CUDA kernels, read without a
  # GPU); this machine's CUDA toolkit has none. Optional: those tests skip without it.
  python -m pip install -q nvidia-cuda-nvdisasm || echo "(nvidia-cuda-nvdisasm not installed: tests/cuda/test_cuda_static.py will skip its build checks)"
fi
echo "== building physmdn (PHYSMDN_CUDA=$PHYSMDN_CUDA)"
python -m pip install --no-build-isolation --no-deps . 2>&1 | tail -n 3
python -m physmdn info
