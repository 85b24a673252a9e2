"""`dynq offload`: how to load a model on the GPUs and RAM at hand, drawn with rich."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dynq import api
from dynq.cli.shell import ensure_source, out
from dynq.cli.text import clean, data, line
from dynq.core.units import GIB, parse_memory
from dynq.errors import DynqError


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _experts(p: api.Placement) -> str:
    if p.n_cpu_moe is not None:
        rest = f" + {len(p.override_tensors) - 1} -ot" if len(p.override_tensors) > 1 else ""
        return f"--n-cpu-moe {p.n_cpu_moe}{rest}"
    return " ".join(f"-ot {o}" for o in p.override_tensors) or "-"


def _placements(plan: api.OffloadPlan) -> Table:
    table = Table(title="placements (GiB; tokens/s predicted for decode)", title_justify="left")
    for col in ("plan", "-ngl", "experts on CPU", "-ts", "GPU", "CPU", "fits", "tokens/s"):
        table.add_column(col, justify="left" if col in ("plan", "experts on CPU") else "right", overflow="fold")
    for p in (plan.best, *plan.alternatives, plan.rule_of_thumb):
        fits = "yes" if p.fits else ("no: VRAM" if not p.fits_vram else "no: RAM")
        # -ot patterns are built from the file's tensor names
        experts = data(f"{p.experts_on_cpu} tensors\n{_experts(p)}" if p.experts_on_cpu else "-")
        table.add_row(data(p.label), str(p.n_gpu_layers), experts, ",".join(map(str, p.tensor_split or ())) or "-",
                      " + ".join(_gib(g) for g in p.gpu_bytes), _gib(p.cpu_bytes), fits,
                      f"{p.tokens_per_s:.2f}")  # fmt: skip
    return table


def draw_offload(console: Console, plan: api.OffloadPlan) -> None:
    m, s = plan.model, plan.settings
    blocks = m.block_bytes
    console.print(
        line(data(m.source), " (", data(m.arch), f"): {_gib(m.file_bytes)} GiB of weights, {m.n_blocks} blocks of "
             f"{_gib(min(blocks))}-{_gib(max(blocks))} GiB"
             + (f" ({_gib(sum(m.expert_bytes))} GiB routed experts)" if m.is_moe else "")
             + f"; input layer {_gib(m.input_bytes)} GiB (stays on the CPU), output layer {_gib(m.output_bytes)} GiB"
             + (" (tied: token_embd again)" if m.tied_output else ""))
    )  # fmt: skip
    kv = {m.kv_bytes_per_token(b, s.kv_type) for b in range(m.n_blocks)}
    console.print(
        line("KV cache (", data(s.kv_type), f"{', MLA' if m.attention.mla else ''}): "
             + "/".join(f"{v:,}" for v in sorted(kv))
             + f" bytes per token per block; {_gib(m.kv_total(s.n_ctx, s.kv_type, s.n_ubatch))} GiB at {s.n_ctx} "
             f"tokens; compute buffer allowance {_gib(m.compute_bytes(s.n_ctx, s.n_ubatch, True))} GiB")
    )  # fmt: skip
    console.print(_placements(plan))
    rule, best = plan.rule_of_thumb, plan.best
    verdict = "fits" if rule.fits_vram else "does not fit"
    console.print(
        line(f"rule of thumb (VRAM / file size x {m.n_blocks} blocks - 4): -ngl {rule.n_gpu_layers}, which {verdict} "
             f"by the byte model ({' + '.join(_gib(g) for g in rule.gpu_bytes)} GiB on the GPU); the plan: -ngl "
             f"{best.n_gpu_layers} at {best.tokens_per_s:.2f} tokens/s against {rule.tokens_per_s:.2f}")
    )  # fmt: skip
    # Assumptions and notes quote the settings and the model (KV type, architecture, sizes): data, not markup.
    for a in plan.assumptions:
        console.print(line("assumes: ", data(a), style="dim"))
    for n in plan.notes:
        console.print(line("note: ", data(n)))
    console.print(line("command:"))
    # Plain print, so the command is never wrapped and can be copied; it holds the model's path.
    print(clean(plan.command))


def register(app: typer.Typer) -> None:
    """Add `offload` to the dynq app."""

    @app.command(name="offload")
    def offload_command(
        source: Annotated[str, typer.Argument(help="GGUF file, zoo:NAME or shapes:NAME")],
        vram: Annotated[str, typer.Option(help="memory per GPU, e.g. 24GB (binary units: a 24 GB card)")],
        recipe: Annotated[
            str | None, typer.Option("--recipe", "-r", help="plan a quant of SOURCE by this recipe")
        ] = None,
        gpus: Annotated[int, typer.Option(help="number of GPUs (layer split)")] = 1,
        ram: Annotated[str | None, typer.Option(help="system memory, e.g. 128GB (default: not checked)")] = None,
        n_ctx: Annotated[int, typer.Option("--ctx", help="context length (tokens)")] = 4096,
        kv_type: Annotated[
            str | None,
            typer.Option(
                help="KV cache type: "
                + "|".join(api.KV_TYPES)
                + " (default: f16, or the first of "
                + "/".join(api.AUTO_KV_TYPES)
                + " that fits)"
            ),
        ] = None,
        ubatch: Annotated[int, typer.Option(help="llama.cpp ubatch size (compute buffer)")] = 512,
        gpu_bw: Annotated[float | None, typer.Option(help="GPU bandwidth in GB/s (default: by VRAM size)")] = None,
        cpu_bw: Annotated[float, typer.Option(help="system memory bandwidth in GB/s")] = api.DEFAULT_CPU_BANDWIDTH
        / 1e9,
        op_offload: Annotated[bool, typer.Option(help="llama.cpp's op offload (prompt batches on the GPU)")] = True,
        as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    ) -> None:
        """Recommended --n-gpu-layers and expert placement, with predicted decode speed and the llama.cpp command."""
        if gpus < 1 or n_ctx < 1 or ubatch < 1:
            raise DynqError("--gpus, --ctx and --ubatch must be positive")
        hw = api.Hardware(
            vram=parse_memory(vram),
            n_gpus=gpus,
            ram=parse_memory(ram) if ram else None,
            gpu_bandwidth=gpu_bw * 1e9 if gpu_bw else None,
            cpu_bandwidth=cpu_bw * 1e9,
        )
        settings = api.Settings(n_ctx=n_ctx, kv_type=(kv_type or "f16").lower(), n_ubatch=ubatch, op_offload=op_offload)
        kv_types = None if kv_type else api.AUTO_KV_TYPES
        plan = api.offload(ensure_source(source), hw, recipe=recipe, settings=settings, kv_types=kv_types)
        if as_json:
            sys.stdout.write(json.dumps(plan.to_dict(), indent=2) + "\n")
        else:
            draw_offload(out, plan)
