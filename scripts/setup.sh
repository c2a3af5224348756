#!/usr/bin/env bash
# Make sure an nvcc that can compile kernels/*.cu to PTX is available.
#
# Order of preference (the same order build.rs searches):
#   1. $NVCC, $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, nvcc on PATH  -> nothing to do
#   2. a pinned nvcc from PyPI, installed once into $SDLORA_TOOLS_DIR
#      (default: ~/.cache/sdlora/cuda-13.0); a second run finds it and returns at once.
#
# The five packages are pinned exactly: an unpinned nvvm (13.5+) writes PTX that a
# CUDA 13.0 driver (580) cannot load.
set -euo pipefail

TOOLS_DIR="${SDLORA_TOOLS_DIR:-$HOME/.cache/sdlora/cuda-13.0}"
PINNED=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
)

found_nvcc() {
  for c in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" \
           "$(command -v nvcc 2>/dev/null || true)" "$TOOLS_DIR/nvidia/cu13/bin/nvcc"; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

if nvcc_path=$(found_nvcc); then
  echo "setup: nvcc found at $nvcc_path"
  exit 0
fi

echo "setup: no nvcc found; installing ${PINNED[*]} into $TOOLS_DIR"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "setup: need python3 with pip to fetch nvcc (or install the CUDA toolkit)" >&2; exit 1; }
tmp="$TOOLS_DIR.partial.$$"
rm -rf "$tmp"
"$PY" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
  --target "$tmp" "${PINNED[@]}"
rm -rf "$TOOLS_DIR"
mkdir -p "$(dirname "$TOOLS_DIR")"
mv "$tmp" "$TOOLS_DIR"   # atomic: an interrupted install never looks complete
echo "setup: nvcc installed at $TOOLS_DIR/nvidia/cu13/bin/nvcc"
"$TOOLS_DIR/nvidia/cu13/bin/nvcc" --version | tail -n 2
