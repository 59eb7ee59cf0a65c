#!/usr/bin/env bash
# GPU readiness check (issue #10): default TDA-MIL fwd+bwd at 10k/50k/100k patches (fp32, bf16),
# the extraction pipeline with a UNI-shaped ViT-L/16 (random weights from a local file) on ~5k
# patches of the repository's slide, and the digits simulation on the GPU. Budget: <= 8 min on one
# H100/H200. Results: benchmarks/results/gpu_check_<step>.json.
#
#   benchmarks/gpu_check.sh            # GPU (cuda when available)
#   benchmarks/gpu_check.sh --tiny     # CPU-sized, for CI (also TDAMIL_GPU_CHECK_TINY=1)
#   PYTHON=/path/to/env/bin/python benchmarks/gpu_check.sh   # tdamil-fl installed outside .venv
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter of the environment tdamil-fl is installed in: $PYTHON, else the README's .venv,
# else the first python3 / python on PATH that imports tdamil.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=""
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import tdamil" 2>/dev/null; then PY="$candidate"; break; fi
  done
  if [ -z "$PY" ]; then
    echo "gpu_check.sh: no Python with tdamil-fl installed: no .venv here and python3 cannot import tdamil." \
         "Run it as PYTHON=/path/to/your/env/bin/python benchmarks/gpu_check.sh" >&2
    exit 2
  fi
fi
export FLWR_TELEMETRY_ENABLED=0
if [ "${1:-}" = "--tiny" ] || [ "${TDAMIL_GPU_CHECK_TINY:-0}" = "1" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
"$PY" - <<'PY' || true
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
# 8 minutes in all: the model, extraction and simulation figures first, then the shared-GPU check
status=0
timeout 390 "$PY" benchmarks/gpu_check.py "$@" || status=$?
timeout 90 "$PY" benchmarks/gpu_ray_share.py "$@" || true  # issue 14: two Ray sites share the GPU (num_gpus 0.5)
exit "$status"
