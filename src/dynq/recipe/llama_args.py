"""A plan as `llama-quantize` arguments, so the same mix can be made with llama.cpp's own tool."""

from __future__ import annotations

import re
import shlex
from collections import defaultdict
from pathlib import Path

from dynq.recipe.plan import QuantPlan


def _pattern(suffix: str, blocks: set[int], all_blocks: set[int]) -> str:
    tail = re.escape(suffix)
    if blocks == all_blocks:
        return rf"blk\.\d+\.{tail}$"
    return rf"blk\.({'|'.join(str(b) for b in sorted(blocks))})\.{tail}$"


def tensor_type_args(plan: QuantPlan) -> list[str]:
    """Options that pin every quantized tensor of `plan` to its planned type."""
    args: list[str] = []
    groups: dict[tuple[str, str], set[int]] = defaultdict(set)
    blocks_of: dict[str, set[int]] = defaultdict(set)
    for t in plan.tensors:
        if t.kept:
            continue
        typ = t.qtype.name.lower()
        if t.info.name == "token_embd.weight":
            args += ["--token-embedding-type", typ]
        elif t.info.name == "output.weight":
            args += ["--output-tensor-type", typ]
        elif (block := t.info.block) is not None:
            groups[(t.info.kind, typ)].add(block)
            blocks_of[t.info.kind].add(block)
        else:
            args += ["--tensor-type", f"^{re.escape(t.info.name)}$={typ}"]
    for (suffix, typ), blocks in groups.items():
        args += ["--tensor-type", f"{_pattern(suffix, blocks, blocks_of[suffix])}={typ}"]
    return args


def base_type(plan: QuantPlan) -> str:
    """The file type to name on the command line: the type holding the most bytes."""
    dominant = plan.dominant_type
    return dominant.name if dominant is not None else "F16"


def llama_quantize_command(
    plan: QuantPlan,
    source: str,
    output: str | None = None,
    imatrix: str | None = None,
    requantize: bool = False,
) -> str:
    out = output or f"{Path(source).stem}-{plan.recipe.name}.gguf"
    cmd = ["llama-quantize"]
    if imatrix:
        cmd += ["--imatrix", imatrix]
    if requantize:
        cmd.append("--allow-requantize")
    cmd += [*tensor_type_args(plan), source, out, base_type(plan)]
    return shlex.join(cmd)
