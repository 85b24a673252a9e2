#!/usr/bin/env bash
# The kernel benchmark on a GPU machine: dynq's torch encoders on CUDA, over the same real-row sample as the CPU run
# (bench/results/kernels.json), whose ggml columns are reused (that machine has no llama-cpp-python).
#
# Prepare here, once (both folders are git-ignored and travel as `carry`):
#   mkdir -p .bench && cp ~/.cache/dynq/bench/kernel-sample.npz .bench/
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gguf==0.19.0
# Run there: bash bench/kernels_gpu.sh   (writes bench/results/kernels-cuda.{md,json} and copies them to $OUT)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Correctness on CUDA first: for every type, gguf-py decodes the bytes to exactly the encoder's values.
python3 - <<'PY'
import numpy as np, torch
from dynq.kernels.compare import decode
from dynq.kernels.encoders import encoders
from dynq.core.qtypes import qtype

rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((64, 1024)).astype(np.float32)).cuda()
imp = torch.from_numpy(rng.gamma(0.5, 1.0, 1024).astype(np.float32)).cuda()
for name, encode in encoders().items():
    for w in (imp, None):
        e = encode(x, w)
        same = np.array_equal(decode(qtype(name), e.data.cpu().numpy(), 1024), e.values.cpu().numpy())
        print(f"{name:8s} {'imatrix' if w is not None else 'none':7s} exact={same}", flush=True)
        assert same, name
PY

python3 bench/kernels.py run --sample .bench/kernel-sample.npz --devices cuda --ggml-from bench/results/kernels.json \
    --out kernels-cuda
if [ -n "${OUT:-}" ]; then cp bench/results/kernels-cuda.* "$OUT/"; fi
