"""Does zoo:qwen2.5-coder-1.5b-moe still write code? Greedy completions of one coding prompt from the dense reference
and the MoE model in llama.cpp, and from the MoE model in transformers (which loads the GGUF itself).

    .venv/bin/python bench/moe_complete.py [--tokens 96] [--no-transformers]

Writes bench/results/qwen2.5-coder-1.5b-moe-completions.md. transformers maps no GGUF key to the expert sizes of
qwen2moe, so they are passed in the config (its defaults are Qwen1.5-MoE's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import dynq
from dynq.gguf_io.reader import GGUFModel
from dynq.llamacpp.runtime import llama
from dynq.moe.convert import write_relaid

RESULTS = Path(__file__).parent / "results"
PROMPT = (
    "<|im_start|>user\nWrite a Python function that returns the n-th Fibonacci number.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def llama_cpp_completion(path: Path, tokens: int) -> str:
    llm = llama().Llama(str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)
    out = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0)
    return str(out["choices"][0]["text"])


def transformers_completion(path: Path, tokens: int) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = GGUFModel(path)
    sizes = {
        "moe_intermediate_size": int(model.field("qwen2moe.expert_feed_forward_length")),
        "shared_expert_intermediate_size": int(model.field("qwen2moe.expert_shared_feed_forward_length")),
    }
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, **sizes)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.generate(ids, max_new_tokens=tokens, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args(argv)
    ctx = dynq.RunContext(threads=2)
    moe = dynq.fetch("zoo:qwen2.5-coder-1.5b-moe", ctx=ctx)
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(dir=ctx.cache_dir) as tmp:
        dense = Path(tmp) / "dense-f16.gguf"
        base = GGUFModel(dynq.fetch("zoo:qwen2.5-coder-1.5b", ctx=ctx))
        write_relaid(base, dense, blocks=int(base.field("qwen2.block_count")), experts=None, metadata={})
        for label, path in (("dense F16, llama.cpp", dense), ("MoE F16, llama.cpp", moe)):
            started = time.perf_counter()
            rows.append((label, llama_cpp_completion(path, args.tokens), time.perf_counter() - started))
    if not args.no_transformers:
        started = time.perf_counter()
        rows.append(("MoE F16, transformers", transformers_completion(moe, args.tokens), time.perf_counter() - started))
    k = GGUFModel(moe).field("qwen2moe.expert_used_count")
    lines = [
        "# zoo:qwen2.5-coder-1.5b-moe writes code",
        "",
        f"Greedy, {args.tokens} tokens, the MoE model at its default {k} of 32 experts per token. Prompt (chat "
        "template by hand):",
        "",
        "```",
        PROMPT,
        "```",
    ]
    for label, text, seconds in rows:
        lines += ["", f"## {label} ({seconds:.0f} s)", "", "```", text.replace("```", "'''"), "```"]
    (RESULTS / "qwen2.5-coder-1.5b-moe-completions.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
