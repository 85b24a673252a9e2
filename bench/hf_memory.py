"""Peak memory and time of quantizing a Hugging Face FP8 checkpoint straight to GGUF, against the number of experts:
`dynq quantize DIR -r q8_0` (one pass, through llama.cpp's converter in lazy mode, one expert at a time) and the
two-pass way (llama.cpp's `convert_hf_to_gguf.py --outtype bf16`, then `llama-quantize ... Q8_0`).

    .venv/bin/python bench/hf_memory.py                  # N = 16, 64, 256 routed experts
    .venv/bin/python bench/hf_memory.py --experts 16 64  # a subset (the results files are rewritten)

Each checkpoint is a DeepseekV3ForCausalLM with one MoE block at DeepSeek-R1's expert dimensions (hidden 7168,
moe_intermediate 2048, one shared expert), stored as R1 is: float8_e4m3fn linears with float32 128x128
`weight_scale_inv` blocks, each block's largest value at 448, from Gaussian weights of std 0.02 (uniformly random FP8
bytes would put a third of the values below float16's smallest normal, where numpy's float16 conversions, which the
F16 path of the converter and of dynq go through, run ~10x slower than on real weights). Everything else is as small
as the converter allows: 2 MLA heads with small LoRA ranks, and an embedding and output of 1,024 rows. config.json
keeps vocab_size 151,936: the converter asserts it is above the largest token id of the Qwen2.5 tokenizer (the only
tokenizer at hand whose pre-tokenizer the converter knows), but checks no tensor's row count, nor does
llama-quantize; dynq does (against transformers' model of config.json), and the benchmark leaves out only these two
tensors from that check. Full-size ones (2 x 2.2 GB of BF16 at 7168 wide) would dominate the checkpoint and every
peak. The safetensors file is written by hand, one tensor at a time, so generating it never holds more than one
matrix.

Every step runs in its own process under `/usr/bin/time -v` ("Maximum resident set size"): per-run peaks. dynq runs
as its CLI does (`dynq.plan(DIR, "q8_0")`, then `dynq.quantize`), through the library so that the QuantizeResult
(time, VmHWM) and the resident memory after each written tensor come back too. The two-pass baseline runs for
N = 16 and 64 only (its BF16 intermediate at N = 256 is ~22 GB). For N = 16 dynq's output
is compared byte for byte with `dynq quantize` of the converter's own F16 conversion. Outputs are deleted before the
next N. To keep the disk under ~15 GB the N = 256 checkpoint stores weights for as many experts as `--disk-budget`
allows and leaves the other experts' weights as file holes: same file, same sizes, no disk space; they read as 0.0
(without disk reads). Writes bench/results/hf-memory.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dynq.llamacpp.tools import tool
from dynq.paths import cache_dir
from hf_checkpoints import BOS, EOS, FP8_BLOCK, FP8_CONFIG, TOKENIZER_FILES, VOCAB_ROWS, fp8_blocks, qwen_tokenizer

RESULTS = Path(__file__).parent / "results"
NAME = "hf-memory"

# DeepSeek-R1's expert dimensions; the rest as small as the converter takes.
HIDDEN, MOE_FFN = 7168, 2048
HEADS, Q_LORA, KV_LORA, NOPE, ROPE, V_DIM = 2, 128, 128, 128, 64, 128
EMBED_ROWS = 1024  # rows actually stored for the embedding and the output (config.json says VOCAB_ROWS)
TWO_PASS_MAX = 64  # the BF16 intermediate of N = 256 (~22 GB) does not fit the disk budget
SEED = 0
WEIGHT_STD = 0.02  # of the expert and attention weights before FP8 storage
DIMS = {"hidden": HIDDEN, "moe_intermediate": MOE_FFN, "heads": HEADS, "q_lora": Q_LORA, "kv_lora": KV_LORA,
        "embed_rows": EMBED_ROWS, "vocab_size": VOCAB_ROWS}  # fmt: skip


# --- the checkpoint ---


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # safetensors' names: F8_E4M3, BF16, F32
    shape: tuple[int, ...]
    fill: Callable[[], bytes] | None  # None: a hole in the file (reads as zeros)

    @property
    def itemsize(self) -> int:
        return {"F8_E4M3": 1, "BF16": 2, "F32": 4}[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.itemsize * int(np.prod(self.shape))


def _fp8_pair(gen: torch.Generator, shape: tuple[int, int]) -> tuple[Callable[[], bytes], Callable[[], bytes]]:
    """Fills for one FP8 weight and its `weight_scale_inv`: Gaussian values (std WEIGHT_STD) stored as DeepSeek-V3
    stores them, each 128x128 block's largest value at 448 (`fp8_blocks` of tests/hf_checkpoints.py). The scale is
    computed with the weight, which is written just before it."""
    made: dict[str, bytes] = {}

    def weight() -> bytes:
        values, scale = fp8_blocks(WEIGHT_STD * torch.randn(shape, generator=gen))
        made["scale"] = scale.numpy().tobytes()
        return values.view(torch.uint8).numpy().tobytes()

    return weight, lambda: made.pop("scale")


def _bf16(rng: np.random.Generator, shape: tuple[int, ...], mean: float, std: float) -> Callable[[], bytes]:
    def fill() -> bytes:
        values = (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # truncated to BF16

    return fill


def _f32(rng: np.random.Generator, shape: tuple[int, ...], low: float, high: float) -> Callable[[], bytes]:
    return lambda: rng.uniform(low, high, shape).astype(np.float32).tobytes()


def _tensors(n_experts: int, stored_experts: int) -> list[Tensor]:
    """Every tensor of the one-block checkpoint in file order, with R1's names, dtypes and FP8 block scales; the
    routed experts from `stored_experts` on are holes."""
    out: list[Tensor] = []
    rng, gen = np.random.default_rng(SEED), torch.Generator().manual_seed(SEED)

    def fp8(name: str, rows: int, cols: int, hole: bool = False) -> None:
        blocks = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        weight, scale = (None, _f32(rng, blocks, 0.5e-4, 2e-4)) if hole else _fp8_pair(gen, (rows, cols))
        out.append(Tensor(f"{name}.weight", "F8_E4M3", (rows, cols), weight))
        out.append(Tensor(f"{name}.weight_scale_inv", "F32", blocks, scale))

    def bf16(name: str, shape: tuple[int, ...], mean: float = 0.0, std: float = 0.02) -> None:
        out.append(Tensor(name, "BF16", shape, _bf16(rng, shape, mean, std)))

    block = "model.layers.0"
    bf16("model.embed_tokens.weight", (EMBED_ROWS, HIDDEN))
    bf16(f"{block}.input_layernorm.weight", (HIDDEN,), 1.0, 0.1)
    attn = f"{block}.self_attn"
    fp8(f"{attn}.q_a_proj", Q_LORA, HIDDEN)
    bf16(f"{attn}.q_a_layernorm.weight", (Q_LORA,), 1.0, 0.1)
    fp8(f"{attn}.q_b_proj", HEADS * (NOPE + ROPE), Q_LORA)
    fp8(f"{attn}.kv_a_proj_with_mqa", KV_LORA + ROPE, HIDDEN)  # a partial last block of rows, as R1's 576
    bf16(f"{attn}.kv_a_layernorm.weight", (KV_LORA,), 1.0, 0.1)
    fp8(f"{attn}.kv_b_proj", HEADS * (NOPE + V_DIM), KV_LORA)
    fp8(f"{attn}.o_proj", HIDDEN, HEADS * V_DIM)
    bf16(f"{block}.post_attention_layernorm.weight", (HIDDEN,), 1.0, 0.1)
    bf16(f"{block}.mlp.gate.weight", (n_experts, HIDDEN))
    out.append(Tensor(f"{block}.mlp.gate.e_score_correction_bias", "F32", (n_experts,),
                      _f32(rng, (n_experts,), -0.01, 0.01)))  # fmt: skip
    for e in range(n_experts):
        for proj, rows, cols in (("gate_proj", MOE_FFN, HIDDEN), ("up_proj", MOE_FFN, HIDDEN),
                                 ("down_proj", HIDDEN, MOE_FFN)):  # fmt: skip
            fp8(f"{block}.mlp.experts.{e}.{proj}", rows, cols, hole=e >= stored_experts)
    for proj, rows, cols in (("gate_proj", MOE_FFN, HIDDEN), ("up_proj", MOE_FFN, HIDDEN),
                             ("down_proj", HIDDEN, MOE_FFN)):  # fmt: skip
        fp8(f"{block}.mlp.shared_experts.{proj}", rows, cols)
    bf16("model.norm.weight", (HIDDEN,), 1.0, 0.1)
    bf16("lm_head.weight", (EMBED_ROWS, HIDDEN))
    return out


def expert_bytes() -> int:
    """One routed expert's stored bytes: three FP8 matrices and their scales."""
    scales = 2 * (MOE_FFN // FP8_BLOCK) * (HIDDEN // FP8_BLOCK) * 4 + (HIDDEN // FP8_BLOCK) * (MOE_FFN // FP8_BLOCK) * 4
    return 3 * MOE_FFN * HIDDEN + scales


def q8_expert_bytes() -> int:
    return 3 * MOE_FFN * HIDDEN // 32 * 34


def _config(n_experts: int) -> dict[str, Any]:
    """config.json as transformers 5 writes DeepseekV3Config (the form tests/hf_checkpoints.py checks), with R1's
    routing and RoPE and the small attention above."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "dtype": "bfloat16",
        "vocab_size": VOCAB_ROWS, "hidden_size": HIDDEN, "intermediate_size": 18432,
        "moe_intermediate_size": MOE_FFN, "num_hidden_layers": 1, "first_k_dense_replace": 0,
        "n_routed_experts": n_experts, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
        "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE,
        "qk_head_dim": NOPE + ROPE, "head_dim": ROPE, "v_head_dim": V_DIM, "num_nextn_predict_layers": 0,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_interleave": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                            "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 1.0, "mscale_all_dim": 1.0},
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": False, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": None,
        "use_cache": True, "quantization_config": FP8_CONFIG,
    }  # fmt: skip


def write_checkpoint(out: Path, n_experts: int, stored_experts: int) -> tuple[int, int]:
    """The checkpoint folder (config, Qwen2.5 tokenizer, one model.safetensors written tensor by tensor); returns
    (file bytes, bytes allocated on disk)."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(_config(n_experts), indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(qwen_tokenizer() / name, out / name)
    tensors = _tensors(n_experts, stored_experts)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if offset % t.itemsize:
            raise ValueError(f"{t.name} would start unaligned, at {offset}")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = out / "model.safetensors"
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors:
            if t.fill is None:
                f.seek(t.nbytes, os.SEEK_CUR)
            else:
                data = t.fill()
                assert len(data) == t.nbytes, t.name
                f.write(data)
        f.truncate(8 + len(text) + offset)  # a trailing hole still counts in the file's size
    stat = path.stat()
    return stat.st_size, stat.st_blocks * 512


# --- measuring ---


@dataclass(frozen=True)
class Step:
    wall_s: float
    peak_rss_mib: float


def timed(cmd: Sequence[str | Path], label: str) -> tuple[Step, str]:
    """Run `cmd` under /usr/bin/time -v; its wall time and maximum resident set size (the peak of the process and
    of any child it waited for)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        started = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", "-o", report.name, *map(str, cmd)], capture_output=True,
                              text=True, env={**os.environ, "NO_LOCAL_GGUF": "1"})  # fmt: skip
        wall = time.perf_counter() - started
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"{label} failed ({done.returncode}):\n{tail}")
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", Path(report.name).read_text())
    assert found is not None
    step = Step(round(wall, 1), round(int(found.group(1)) / 1024, 1))
    print(f"  {label}: {step.wall_s:.1f} s, peak RSS {step.peak_rss_mib:.0f} MiB", flush=True)
    return step, done.stdout


# `dynq quantize SOURCE -r q8_0 -o OUT` as the CLI runs it (`dynq.plan`, then `dynq.quantize` with the default
# context), through the library so that the QuantizeResult's own numbers come back: its time and VmHWM, and the
# resident memory after each tensor is written (from the progress callback). One check is narrowed: dynq compares
# each tensor's shape with the model transformers builds from config.json, and this checkpoint's embedding and
# output hold fewer rows than vocab_size on purpose (see the module docstring); every other tensor is still checked.
_DYNQ = """
import json, sys
import dynq
import dynq.sources.checkpoint as checkpoint
from dynq.core.context import RunContext

full = getattr(checkpoint, "_expected_shapes", None)
if full is not None:
    small = ("model.embed_tokens.weight", "lm_head.weight")
    checkpoint._expected_shapes = lambda d: {k: v for k, v in full(d).items() if k not in small}

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

trace = []
ctx = RunContext(progress=lambda p: trace.append((p.detail.split(" ", 1)[-1], round(rss_mib(), 1))))
result = dynq.quantize(dynq.plan(sys.argv[1], "q8_0", ctx=ctx), sys.argv[2], ctx=ctx)
print(json.dumps({"seconds": result.seconds, "peak_rss_bytes": result.peak_rss_bytes, "rss_after": trace}))
"""


def dynq_quantize(source: Path, output: Path, label: str) -> tuple[Step, dict[str, Any]]:
    """The run timed from outside, and what its QuantizeResult says."""
    step, stdout = timed([sys.executable, "-c", _DYNQ, source, output], label)
    inner = json.loads(stdout.strip().splitlines()[-1])
    rss_after = inner["rss_after"]
    experts = [mib for name, mib in rss_after if "_exps." in name]
    own = {
        "quantize_s": round(inner["seconds"], 1),
        "vmhwm_mib": round(inner["peak_rss_bytes"] / 2**20, 1),
        "rss_after_first_expert_tensor_mib": experts[0] if experts else None,
        "rss_after_last_expert_tensor_mib": experts[-1] if experts else None,
        "rss_after_tensor_mib": dict(rss_after),
    }
    print(f"  {label}: QuantizeResult {own['quantize_s']} s, VmHWM {own['vmhwm_mib']:.0f} MiB; RSS after each "
          f"expert tensor {experts} MiB", flush=True)  # fmt: skip
    return step, own


def convert(directory: Path, output: Path, outtype: str, label: str) -> Step:
    """`dynq.llamacpp.converter.convert` (llama.cpp's converter in a subprocess), timed with that subprocess."""
    code = ("import sys; from pathlib import Path; from dynq.paths import cache_dir; "
            "from dynq.llamacpp.converter import convert; "
            "convert(Path(sys.argv[1]), Path(sys.argv[2]), cache_dir(), sys.argv[3])")  # fmt: skip
    return timed([sys.executable, "-c", code, directory, output, outtype], label)[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# Keys that say where a file came from, so two files of the same bytes made from different sources differ there.
PROVENANCE = {"dynq.source"}


def compare(ours: Path, reference: Path) -> dict[str, Any]:
    """Byte-for-byte comparison; on a difference, which tensors' data and which metadata keys differ."""
    same = ours.stat().st_size == reference.stat().st_size and sha256(ours) == sha256(reference)
    result: dict[str, Any] = {"identical": same, "bytes": ours.stat().st_size}
    if not same:
        from gguf import GGUFReader

        a, b = GGUFReader(ours), GGUFReader(reference)
        ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
        result["tensors_differing"] = sorted(
            n for n in ta.keys() | tb.keys()
            if n not in ta or n not in tb or ta[n].tensor_type != tb[n].tensor_type
            or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))
        )  # fmt: skip
        fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
        fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
        result["metadata_differing"] = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    return result


def run_one(n: int, scratch: Path, disk_budget: int, two_pass: bool, check: bool) -> dict[str, Any]:
    fixed = 64 << 20  # attention, norms, router, embedding and output, with room to spare
    fits = (disk_budget - fixed - n * q8_expert_bytes()) // expert_bytes()
    stored_experts = int(max(0, min(n, fits)))
    ckpt = scratch / f"deepseek-r1-moe-{n}"
    print(f"N = {n}: writing {ckpt} ({stored_experts} experts stored, {n - stored_experts} holes)", flush=True)
    started = time.perf_counter()
    size, on_disk = write_checkpoint(ckpt, n, stored_experts)
    row: dict[str, Any] = {"experts": n, "stored_experts": stored_experts, "checkpoint_bytes": size,
                           "checkpoint_bytes_on_disk": on_disk,
                           "generate_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    try:
        out = scratch / f"dynq-{n}.gguf"
        step, own = dynq_quantize(ckpt, out, "dynq quantize (one pass)")
        row["dynq"] = asdict(step) | own
        row["dynq_output_bytes"] = out.stat().st_size
        if not check:
            out.unlink()
        if two_pass:
            bf16, q8 = scratch / f"convert-{n}-bf16.gguf", scratch / f"llama-{n}-q8_0.gguf"
            conv = convert(ckpt, bf16, "bf16", "convert_hf_to_gguf --outtype bf16")
            quant = timed([tool("llama-quantize", cache_dir()), bf16, q8, "Q8_0", str(os.cpu_count() or 1)],
                          "llama-quantize Q8_0")[0]  # fmt: skip
            row["two_pass"] = {"convert": asdict(conv), "quantize": asdict(quant),
                               "wall_s": round(conv.wall_s + quant.wall_s, 1),
                               "peak_rss_mib": max(conv.peak_rss_mib, quant.peak_rss_mib),
                               "bf16_bytes": bf16.stat().st_size, "output_bytes": q8.stat().st_size}  # fmt: skip
            bf16.unlink()
            q8.unlink()
        if check:
            f16, ref = scratch / f"convert-{n}-f16.gguf", scratch / f"dynq-{n}-of-f16.gguf"
            convert(ckpt, f16, "f16", "convert_hf_to_gguf --outtype f16")
            dynq_quantize(f16, ref, "dynq quantize of the F16 GGUF")
            row["check"] = compare(out, ref)
            print(f"  check: {row['check']}", flush=True)
            for p in (f16, ref, out):
                p.unlink()
    finally:
        shutil.rmtree(ckpt)
        for p in scratch.glob(f"*-{n}*.gguf"):
            p.unlink()
    return row


# --- report ---


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def report(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Quantizing a DeepSeek-R1-shaped FP8 checkpoint: memory against the number of experts",
        "",
        f"One DeepseekV3ForCausalLM MoE block at R1's expert dimensions (hidden {HIDDEN}, moe_intermediate {MOE_FFN}, "
        f"1 shared expert; FP8 e4m3 with 128x128 block scales), N routed experts; the rest kept small ({HEADS} MLA "
        f"heads, q/kv LoRA ranks {Q_LORA}/{KV_LORA}, embedding and output of {EMBED_ROWS} rows). "
        "`dynq quantize DIR -r q8_0` against llama.cpp's two passes (`convert_hf_to_gguf.py --outtype bf16`, then "
        "`llama-quantize Q8_0`). Peak RSS: `/usr/bin/time -v` of each process (for dynq the same as its "
        "QuantizeResult's VmHWM); wall time of each process, start-up included. Rerun: "
        "`.venv/bin/python bench/hf_memory.py`.",
        "",
        f"Machine: {meta['machine']}. **Another benchmark was running at the same time** (one core busy): the times "
        "are upper bounds.",
        "",
        "| experts | checkpoint GiB | dynq one pass s | dynq peak RSS MiB | dynq RSS after 1st / last expert tensor "
        "MiB | two pass s (convert + quantize) | two pass peak RSS MiB (convert / quantize) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ckpt = _gib(r["checkpoint_bytes"])
        if r["stored_experts"] < r["experts"]:
            ckpt += f" ({_gib(r['checkpoint_bytes_on_disk'])} on disk: {r['stored_experts']} experts stored)"
        if "two_pass" in r:
            t = r["two_pass"]
            conv, quant = t["convert"], t["quantize"]
            two = (
                f"{t['wall_s']:.0f} ({conv['wall_s']:.0f} + {quant['wall_s']:.0f})",
                f"{t['peak_rss_mib']:.0f} ({conv['peak_rss_mib']:.0f} / {quant['peak_rss_mib']:.0f})",
            )
        else:
            two = ("not run (BF16 intermediate too big for the disk)", "-")
        d = r["dynq"]
        after = f"{d['rss_after_first_expert_tensor_mib']:.0f} / {d['rss_after_last_expert_tensor_mib']:.0f}"
        lines.append(f"| {r['experts']} | {ckpt} | {d['wall_s']:.0f} | {d['peak_rss_mib']:.0f} | {after} "
                     f"| {two[0]} | {two[1]} |")  # fmt: skip
    if (growth := meta.get("dynq_rss_growth_pct")) is not None:
        lines += ["", f"Growth of dynq's peak RSS from {meta['growth_from']} to {meta['growth_to']} experts: "
                  f"**{growth:+.1f}%** (target: under 10%)."]  # fmt: skip
    checks = [r for r in rows if "check" in r]
    for r in checks:
        c = r["check"]
        if c["identical"]:
            verdict = "identical, byte for byte"
        elif not c.get("tensors_differing") and set(c.get("metadata_differing", [])) <= PROVENANCE:
            # dynq.source names what each file was made from: the checkpoint folder, or the F16 file
            differing = ", ".join(sorted(c["metadata_differing"]))
            verdict = (f"every tensor identical, byte for byte; metadata identical but for {differing}, which "
                       "names what each was made from")  # fmt: skip
        else:
            verdict = f"DIFFERENT: tensors {c.get('tensors_differing')}, metadata {c.get('metadata_differing')}"
        lines += ["", f"Check (N = {r['experts']}): dynq's one-pass Q8_0 against `dynq quantize -r q8_0` of the "
                  f"converter's own F16 conversion ({c['bytes']} bytes): {verdict}."]  # fmt: skip
    lines += [
        "",
        "Notes: the vocabulary is the real Qwen2.5 tokenizer (the converter accepts only a tokenizer whose "
        f"pre-tokenizer it knows) with vocab_size {VOCAB_ROWS} in config.json (the converter asserts it is above the "
        f"largest token id), but only {EMBED_ROWS} embedding and output rows are stored: neither the converter nor "
        "llama-quantize checks the row count; dynq does, and the benchmark leaves these two tensors out of that "
        "check. Full-size ones (2 x 2.2 GB in BF16) would dominate both the checkpoint and every peak RSS. The weights "
        f"are Gaussian (std {WEIGHT_STD}) stored in FP8 with 128x128 block scales as R1's are (uniformly random FP8 "
        "bytes were tried first: a third of their values fall below float16's smallest normal, where numpy's float16 "
        "conversions run ~10x slower, which made every F16 path look slower than it is on real weights). Where the "
        "table says fewer stored experts than experts, the others' weights are file holes: they read as zeros "
        "without disk reads, and convert about as fast as Gaussian values; so that row's time is a lower bound of "
        "what the same file with all weights costs. The dynq output of N = 256 (~12 GB) is written to disk as the "
        "others are.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--disk-budget", type=float, default=13e9,
                        help="bytes a checkpoint plus dynq's output may take on disk (default 13e9)")  # fmt: skip
    parser.add_argument("--scratch", type=Path, default=None, help="folder for checkpoints and outputs")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dynq-hf-memory-", dir=args.scratch) as tmp:
        for n in args.experts:
            rows.append(run_one(n, Path(tmp), int(args.disk_budget), two_pass=n <= TWO_PASS_MAX, check=n == 16))
    meta: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "concurrent_load": "another benchmark was running at the same time; times are upper bounds",
        "dims": DIMS,
    }
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        meta |= {"growth_from": first["experts"], "growth_to": last["experts"],
                 "dynq_rss_growth_pct": round(100 * (last["dynq"]["peak_rss_mib"] / first["dynq"]["peak_rss_mib"] - 1),
                                              1)}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(report(rows, meta))
    print(report(rows, meta))


if __name__ == "__main__":
    main()
