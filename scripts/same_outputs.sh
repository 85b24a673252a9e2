#!/usr/bin/env bash
# Run the commands a refactor must not change on the 1.5B zoo model and its two-block checkpoint export, with the
# dynq source tree $1, into the folder $2, and list each output's sha256 in $2/sums.txt. Run it for the code before and
# after, each with its own empty cache for what the commands build (profiles, conversions, encoded tensors), and
# compare the two sums.txt. Profile files are compared without their timings.
#   scripts/same_outputs.sh /path/to/old/src /tmp/before && scripts/same_outputs.sh src /tmp/after
#   diff /tmp/before/sums.txt /tmp/after/sums.txt
set -euo pipefail
src=$(realpath "$1"); out=$(realpath -m "$2")
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-$here/.venv/bin/python}
shared=${DYNQ_SHARED_CACHE:-$HOME/.cache/dynq}
imatrix=${IMATRIX:-$shared/demo/qwen2.5-coder-1.5b-8x512-d7055510.imatrix.gguf}
checkpoint=${CHECKPOINT:-$shared/hf/qwen2.5-coder-1.5b-2blocks}
ref=${REF:-$shared/demo/qwen2.5-coder-1.5b-f16.gguf}  # the float reference profile needs (make demo writes it)
mkdir -p "$out/cache"
# Fetched inputs are shared; everything the commands build lands in this run's own cache.
for kept in models texts hf llama.cpp-0.3.36 wheels; do ln -sfn "$shared/$kept" "$out/cache/$kept"; done
export DYNQ_CACHE_DIR=$out/cache PYTHONPATH=$src
dynq() { "$py" -m dynq.cli "$@"; }
model=zoo:qwen2.5-coder-1.5b
# Each step writes its output once: a step whose output exists is skipped (use a fresh folder to redo all).
timed() { local made=$1; shift; [ -e "$made" ] && return; local start=$SECONDS; "$@"; echo "$((SECONDS - start)) s: $*" >>"$out/times.txt"; }
cd "$out" && mkdir -p split
timed recipe.gguf dynq quantize $model -r dyn-q2_k_xl --imatrix "$imatrix" -o recipe.gguf --threads 2
timed split/recipe-00001-of-00004.gguf dynq split recipe.gguf --max-size 300M -o split/recipe.gguf
timed checkpoint.gguf dynq quantize "$checkpoint" -r dyn-q2_k_xl -o checkpoint.gguf --threads 2
timed profile.json dynq profile "$ref" --imatrix "$imatrix" -o profile.json --ctx 128 --chunks 1 --rows 32 --group-blocks 28 --threads 2
timed solved.yaml dynq solve "$ref" --profile profile.json --imatrix "$imatrix" --target 600M -o solved.yaml
timed target.gguf dynq quantize "$ref" --target 600M --profile profile.json --imatrix "$imatrix" -o target.gguf --threads 2
"$py" - <<'EOF' >profile.measured.json
import json
def drop(x):
    if isinstance(x, dict):
        return {k: drop(v) for k, v in x.items() if "second" not in k and "time" not in k and k not in {"created", "elapsed"}}
    return [drop(v) for v in x] if isinstance(x, list) else x
print(json.dumps(drop(json.load(open("profile.json"))), indent=1, sort_keys=True))
EOF
sha256sum recipe.gguf split/* checkpoint.gguf profile.measured.json solved.yaml target.gguf >sums.txt
cat sums.txt times.txt
