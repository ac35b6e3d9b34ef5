#!/usr/bin/env bash
# The GPU check in one command, from a plain checkout (nothing installed):
#   benchmarks/gpu_check.sh [--no-compile] [gpu_check.py options]
# On a machine with a GPU: the extraction benchmark (CPU vs GPU JPEG decode, the decoders alone,
# torch.compile), a short projector training (eager, then torch.compile'd), a top-k search and a short backbone adaptation (bf16; fp16 with the loss scaler) on
# the GPU, and a 2-process torchrun extraction when two GPUs exist (under 5 minutes); the last line is one JSON summary
# (each step's result is also written to stderr as it ends). Without a GPU it exits at once saying so.
#
# The machine needs torch, torchvision, transformers, timm, pandas, pyarrow, scikit-learn, PyYAML and
# tqdm. Pure-Python packages it may lack are installed from wheels put in .whl/ beside this checkout,
# e.g. made on a machine with a network by:
#   pip download --no-deps --only-binary=:all: -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
set -euo pipefail
cd "$(dirname "$0")/.."

no_gpu() {
    echo "{\"benchmark\": \"gpu_check\", \"gpu\": null, \"message\": \"no GPU on this machine ($1): nothing checked\"}"
    exit 0
}
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi lists none"
fi

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || no_gpu "torch finds no usable CUDA GPU, or is not installed"

if compgen -G ".whl/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/cxr-gpu-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
