#!/usr/bin/env bash
# The GPU checks in one call, for a machine with a CUDA device: `make test-gpu` where dynq's virtualenv can be made;
# elsewhere (a lent GPU machine without the package registries) with the Python there, which must hold torch with
# CUDA, llama-cpp-python, gguf and dynq's other dependencies: PYTHON=python3 scripts/test-gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then
    exec make test-gpu
fi
PY="${PYTHON:-python3}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count())'
PYTHONPATH="src:tests${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider \
    --override-ini addopts="-ra --strict-markers" tests/test_gpu.py 2>&1 | tee "${OUT:-.}/test-gpu.log"
