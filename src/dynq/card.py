"""`dynq card`: a Hugging Face model card (README.md) for a GGUF file, written from what the file itself records.

A dynq file carries its recipe, its importance matrix's provenance and the dynq version that wrote it (principle 7),
so a card made from the file cannot drift from the weights it describes. Nothing is recomputed here: sizes are
inspect's summary, the run commands are the offload planner's and the Modelfile is the Ollama export's, so the card
says what `dynq inspect`, `dynq offload` and `dynq export-ollama` say. What cannot be known (a file dynq did not
write, a model without the metadata the planner needs) is said in the card, not guessed.

Everything read from the file or the bench JSON (model names, recipe notes, dataset names) is data. Control
characters become visible escapes (`clean`), prose is markdown-escaped and identifiers go in code spans, so a
hostile `general.name` shows as text on the Hub, in an editor and in a terminal alike; the YAML front matter holds
only values checked against a strict pattern.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dynq.core.atomic import atomic_write_text, check_output_folder
from dynq.core.context import RunContext, context
from dynq.core.sizes import census
from dynq.core.tensors import TensorClass
from dynq.core.units import GIB, MIB, parse_memory
from dynq.core.visible import clean
from dynq.deploy.offload import AUTO_KV_TYPES, Hardware, OffloadPlan, Settings, default_gpu, llama_command, offload
from dynq.deploy.ollama import Modelfile, modelfile, read_vocab
from dynq.deploy.shards import model_stem
from dynq.errors import DynqError, OutputExists
from dynq.eval.bench import BenchRow, pareto_front, read_bench
from dynq.eval.bench import shown as num
from dynq.gguf_io.reader import GGUFModel
from dynq.inspect import FileSummary, summarize
from dynq.recipe.rules import Recipe, recipe_from_dict
from dynq.sources.open import gguf_path
from dynq.version import __version__

DEFAULT_VRAM = ("8GB", "24GB", "80GB")  # a gaming card, a workstation card, a datacenter card
CARD_NAME = "README.md"  # what the Hub shows as a repository's model card

_CLASS_LABELS = {TensorClass.ROUTED_EXPERTS: "routed experts", TensorClass.SHARED_EXPERTS: "shared experts",
                 TensorClass.ATTENTION: "attention", TensorClass.DENSE_FFN: "dense FFN",
                 TensorClass.EMBEDDINGS: "embeddings", TensorClass.OUTPUT: "output",
                 TensorClass.OTHER: "other (norms, router, biases)"}  # fmt: skip
_SOURCE_KEYS = (("basename", "basename"), ("size_label", "size label"), ("finetune", "finetune"),
                ("version", "version"), ("organization", "organization"), ("author", "author"),
                ("license", "license"), ("source.url", "source"), ("source.repo_url", "source repository"),
                ("source.huggingface.repository", "source repository"))  # fmt: skip
_ARCH_KEYS = (("block_count", "blocks"), ("context_length", "context length"), ("expert_count", "experts"),
              ("expert_used_count", "experts per token"), ("expert_shared_count", "shared experts"))  # fmt: skip
_MAX_BASE_MODELS = 16  # a merge lists a few; a count from a damaged file must not make a card of millions of rows
_HF_REPO = re.compile(r"^(?:https?://huggingface\.co/)?([A-Za-z0-9][\w.-]*/[\w.-]+?)/?$")
_TOKEN = re.compile(r"^[A-Za-z0-9][\w.+-]{0,63}$")  # a license id or a tag, safe as a bare YAML scalar
# Markdown that would act on prose: emphasis, links and images (`(` and `!` act only beside an escaped `[`), HTML
# and entities, table cells, code spans, math, strikeout.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>#|~&$])")


@dataclass(frozen=True)
class GpuPlan:
    """The offload planner's answer for one GPU size."""

    vram: int  # bytes
    plan: OffloadPlan


@dataclass(frozen=True)
class ModelCard:
    path: Path  # where the card was written
    text: str
    recipe: str | None  # None: the file records no recipe (dynq did not write it)
    notes: tuple[str, ...]  # what the card leaves out, and why


# --- markdown that treats data as data ---


def _md(value: object) -> str:
    """Prose from a file: one line, control characters visible, markdown syntax escaped."""
    return _MARKDOWN.sub(r"\\\1", " ".join(clean(value).split()))


def _code(value: object, cell: bool = False) -> str:
    """An inline code span (markup inside is inert); in a table cell `|` is escaped, which GFM undoes in spans."""
    text = " ".join(clean(value).split())
    if cell:
        text = text.replace("|", "\\|")
    ticks = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fence(text: str, lang: str = "") -> list[str]:
    """A fenced block longer than any backtick run inside it, so no content can close it early."""
    body = clean(text).rstrip("\n")
    fence = "`" * max(3, max((len(r) for r in re.findall(r"`{3,}", body)), default=0) + 1)
    return [fence + lang, body, fence]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] = ()) -> list[str]:
    align = ["---:" if i < len(right) and right[i] else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]  # fmt: skip


def _gpu(vram: int) -> str:
    return f"{vram / GIB:.3g} GB"


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


# --- what the file says ---


def _recipe(model: GGUFModel, notes: list[str]) -> tuple[str | None, Recipe | None]:
    name, raw = model.field("dynq.recipe.name"), model.field("dynq.recipe")
    if raw is None:
        return (str(name) if name is not None else None), None
    try:
        recipe = recipe_from_dict(json.loads(str(raw)), "dynq.recipe")
    except (ValueError, DynqError) as e:
        notes.append(f"the recipe this file records could not be read ({e}); its rules are left out")
        return str(name) if name is not None else "unknown", None
    return (str(name) if name is not None else recipe.name), recipe


def _said(e: DynqError, model: GGUFModel) -> str:
    """An error for the card, which is published: the model's files by name, not by where they sit on this machine."""
    text = str(e)
    for shard in model.shards:
        text = text.replace(str(shard), shard.name)
    return text


def _offload_plans(model: GGUFModel, vram: Sequence[int], n_ctx: int, notes: list[str]) -> list[GpuPlan]:
    plans = []
    for v in vram:
        try:
            plan = offload(model, Hardware(vram=v), settings=Settings(n_ctx=n_ctx), kv_types=AUTO_KV_TYPES)
        except DynqError as e:  # the same gap for every size: say it once
            notes.append(f"no offload plan: {_said(e, model)}")
            return []
        plans.append(GpuPlan(v, plan))
    return plans


def _modelfile(model: GGUFModel, gguf_name: str, notes: list[str]) -> Modelfile | None:
    try:
        return modelfile(model, read_vocab(model.shards[0]), gguf_name, temperature=0.6, min_p=0.05)
    except DynqError as e:
        notes.append(f"no Ollama Modelfile: {_said(e, model)}")
        return None


def _hf_repo(value: object) -> str | None:
    m = _HF_REPO.match(str(value)) if isinstance(value, str) else None
    return m.group(1) if m and ".." not in m.group(1) else None


def _front_matter(model: GGUFModel, imatrix: bool) -> str:
    meta: dict[str, Any] = {}
    sources = (model.field(f"general.source.{k}") for k in ("repo_url", "huggingface.repository", "url"))
    repo = next((r for r in map(_hf_repo, sources) if r), None)
    if repo:
        meta |= {"base_model": repo, "base_model_relation": "quantized"}
    license_id = model.field("general.license")
    if isinstance(license_id, str) and _TOKEN.match(license_id):
        meta["license"] = license_id
    meta |= {"library_name": "gguf", "pipeline_tag": "text-generation"}
    tags = ["gguf", "dynq", "quantized", *(["imatrix"] if imatrix else [])]
    meta["tags"] = tags + ([model.arch] if _TOKEN.match(model.arch) and model.arch not in tags else [])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=False) + "---"


# --- the sections ---


def _source_section(model: GGUFModel, s: FileSummary) -> list[str]:
    rows = [["name", _md(model.field("general.name") or model_stem(model.path))]]
    rows += [[label, _md(v)] for key, label in _SOURCE_KEYS if (v := model.field(f"general.{key}")) is not None]
    if (quantized_from := model.field("dynq.source")) is not None:
        rows.append(["quantized from", _code(quantized_from, cell=True)])
    rows.append(["architecture", _code(s.arch, cell=True)])
    rows.append(["parameters", f"{s.n_parameters / 1e9:.3f} B ({s.n_parameters:,})"])
    rows += [[label, _md(v)] for key, label in _ARCH_KEYS if (v := model.field(f"{s.arch}.{key}")) is not None]
    count = model.field("general.base_model.count")
    for i in range(min(count, _MAX_BASE_MODELS) if isinstance(count, int) else 0):
        parts = [model.field(f"general.base_model.{i}.{k}") for k in ("organization", "name", "version", "repo_url")]
        rows.append([f"base model {i + 1}", _md(" ".join(str(p) for p in parts if p is not None) or "unnamed")])
    if "general.file_type" in s.metadata:
        rows.append(["general.file_type", _md(s.metadata["general.file_type"])])
    return ["## Source model", "", *_table(["field", "value"], rows)]


def _recipe_section(name: str | None, recipe: Recipe | None, has_raw: bool) -> list[str]:
    out = ["## Recipe", ""]
    if name is None:
        return [*out, "The recipe is **unknown**: this file records no `dynq.recipe`, so dynq did not write it. The "
                "sizes and types below are what the file holds."]  # fmt: skip
    if recipe is None:
        return [*out, f"Recipe {_code(name)}; its rules are not readable" + (" (see the notes)." if has_raw else ".")]
    out.append(f"Recipe {_code(name)}" + (f": {_md(recipe.description)}" if recipe.description else "."))
    out += ["", "Its rules, as the file records them; the first that matches a tensor's name sets its type:", ""]
    rows = [[str(r.index), _code(r.pattern.pattern, cell=True), _code(r.qtype.name, cell=True),
             _code(r.blocks.text, cell=True) if r.blocks else "all", r.when.value if r.when else "all",
             _md(r.note)] for r in recipe.rules]  # fmt: skip
    out += _table(["#", "tensor names (regex)", "type", "blocks", "models", "note"], rows)
    tail = f"Tensors no rule matches: {_code(recipe.default.name)}. " if recipe.default else ""
    kept = ", ".join(_code(p.pattern) for p in recipe.keep)
    return [*out, "", tail + f"Kept at their source type (F32 in practice): {kept}."]


def _class_section(model: GGUFModel, s: FileSummary) -> list[str]:
    types: dict[TensorClass, dict[str, int]] = {}
    for cls in s.classes:
        types[cls] = census(t.dtype for t in model.tensors if t.tensor_class is cls)
    rows = []
    for cls, st in s.classes.items():
        share = 100.0 * st.nbytes / s.total_bytes if s.total_bytes else 0.0
        used = ", ".join(f"{_code(t, cell=True)} ×{n}" for t, n in types[cls].items())
        rows.append([_CLASS_LABELS[cls], str(st.n_tensors), f"{st.n_elements:,}", f"{st.nbytes:,}", _size(st.nbytes),
                     f"{share:.1f}%", f"{st.bpw:.3f}", used])  # fmt: skip
    overall = ", ".join(f"{_code(t, cell=True)} ×{n}" for t, n in s.type_counts.items())
    rows.append(["**total**", f"**{s.n_tensors}**", f"**{s.n_parameters:,}**", f"**{s.total_bytes:,}**",
                 f"**{_size(s.total_bytes)}**", "**100.0%**", f"**{s.bpw:.3f}**", overall])  # fmt: skip
    header = ["tensor class", "tensors", "parameters", "bytes", "size", "share", "bpw", "types (tensors)"]
    return ["## Bits per weight per tensor class", "", *_table(header, rows, [False] + [True] * 6)]


def _imatrix_section(model: GGUFModel, by_dynq: bool) -> list[str]:
    out = ["## Importance matrix", ""]
    datasets = model.field("dynq.imatrix.datasets") or model.field("quantize.imatrix.dataset")
    chunks = model.field("dynq.imatrix.chunk_count") or model.field("quantize.imatrix.chunks_count")
    source = model.field("quantize.imatrix.file")
    if datasets is None and chunks is None:
        said = "No importance matrix was used." if by_dynq else "The file records no importance matrix."
        return [*out, said]
    line = f"Made from {chunks} chunks of calibration text" if chunks is not None else "Made from calibration text"
    out.append(line + (f" (file {_code(source)})" if source is not None else "") + "; the text:")
    items = datasets if isinstance(datasets, list) else [datasets]
    return [*out, "", *(f"- {_md(d)}" for d in items)]


def _bench_section(rows: Sequence[BenchRow], origin: str, recipe: str | None, s: FileSummary) -> list[str]:
    front = {(r.maker, r.name) for r in pareto_front(rows)}
    ours = [r for r in rows if r.maker == "dynq" and r.name == recipe]
    out = ["## Measured quality", "",
           f"From {_code(origin)} (`dynq bench`): every quant of the model judged against its F16/BF16 reference on "
           "the same evaluation text. KLD is the KL divergence of the token distributions to the reference's, top-1 "
           "the share of tokens where both pick the same one, loops the share of fixed prompts whose continuation "
           "falls into endless repetition; Pareto marks the quants no other beats on both size and KLD.",
           ""]  # fmt: skip

    table = []
    for r in sorted(rows, key=lambda r: r.bytes):
        cells = [_md(r.name), _md(r.maker), f"{r.bytes / 2**20:.1f}", f"{r.bpw:.3f}", num(r.ppl, ".3f"),
                 num(r.kld_mean, ".4f"), num(r.kld_p99, ".4f"), num(r.kld_p999, ".3f"),
                 num(100 * r.kld_over_1, ".2f", "%"), num(100 * r.top1, ".1f", "%"),
                 num(100 * r.loop_rate, ".0f", "%"), "yes" if (r.maker, r.name) in front else ""]  # fmt: skip
        if r in ours:
            cells = [f"**{c}**" if c else c for c in cells] + ["**◀ this file**"]
        table.append(cells + ([""] if r not in ours else []))
    header = ["quant", "by", "size (MiB)", "bpw", "PPL", "KLD mean", "KLD p99", "KLD p99.9", "> 1 nat", "top-1",
              "loops", "Pareto", ""]  # fmt: skip
    out += _table(header, table, [False, False] + [True] * 10)
    if not ours:
        which = _code(recipe) if recipe else "(unknown)"
        out += ["", f"No row is this file's recipe {which}, so none is marked."]
    elif ours[0].bytes != s.total_bytes:
        out += ["", f"The marked row measured {ours[0].bytes:,} bytes of tensors; this file holds {s.total_bytes:,}: "
                "it was measured on another model or another build of the recipe."]  # fmt: skip
    return out


def _gpu_row(g: GpuPlan) -> list[str]:
    b = g.plan.best
    speed = f"{b.tokens_per_s:.1f}" + ("" if b.fits else " (does not fit)")
    return [f"{_gpu(g.vram)} ({_md(default_gpu(g.vram)[0].split(' (')[0])} class)", str(b.n_gpu_layers),
            str(b.experts_on_cpu) if g.plan.model.is_moe else "-", " + ".join(f"{x / GIB:.2f}" for x in b.gpu_bytes),
            f"{b.cpu_bytes / GIB:.2f}", _code(g.plan.settings.kv_type, cell=True), speed]  # fmt: skip


def _llama_section(first: str, plans: Sequence[GpuPlan], n_ctx: int) -> list[str]:
    if not plans:
        return _fence(_plain_command("llama-server", first, n_ctx), "sh")
    out = [f"Placements by dynq's offload planner (`dynq offload FILE --vram SIZE`) for a {n_ctx}-token "
           "context; speeds are its predictions from memory bandwidth, not measurements; system RAM is not checked.",
           ""]  # fmt: skip
    header = ["GPU", "-ngl", "expert tensors on CPU", "GPU GiB", "CPU GiB", "KV cache", "tokens/s (predicted)"]
    out += [*_table(header, map(_gpu_row, plans), [False] + [True] * 6), ""]
    commands: dict[str, list[str]] = {}  # one line for the sizes that get the same command
    for g in plans:
        command = llama_command(first, g.plan.best, g.plan.settings, "llama-server")
        commands.setdefault(command, []).append(_gpu(g.vram))
    out += _fence("\n".join(f"# {', '.join(sizes)} GPU\n{cmd}" for cmd, sizes in commands.items()), "sh")
    out += ["", f"To chat in a terminal, run `llama-cli` with the same options (here: {_gpu(plans[0].vram)}):", ""]
    out += _fence(llama_command(first, plans[0].plan.best, plans[0].plan.settings, "llama-cli"), "sh")
    planner_notes = [f"- {_gpu(g.vram)}: {_md(n)}" for g in plans for n in g.plan.notes]
    return out + (["", *planner_notes] if planner_notes else [])  # fmt: skip


def _run_section(model: GGUFModel, plans: Sequence[GpuPlan], mf: Modelfile | None, n_ctx: int) -> list[str]:
    first, n_files = model.shards[0].name, len(model.shards)
    out = ["## How to run it", "", "### llama.cpp", ""]
    if n_files > 1:
        out += [f"The model is split into {n_files} files; llama.cpp loads them all from the first.", ""]
    out += [*_llama_section(first, plans, n_ctx), "", "### Ollama", ""]
    if mf is None:
        return [*out, "No Modelfile: see the notes below."]
    export = _code(shlex.join(["dynq", "export-ollama", first, "-o", "DIR"]))
    create = _code(shlex.join(["ollama", "create", model_stem(model.path), "-f", "DIR/Modelfile"]))
    does = "merges the shards into one file" if n_files > 1 else "copies the file"
    return [*out, f"{export} {does} and writes this Modelfile beside it; then {create}.", "", *_fence(mf.text)]


def _plain_command(binary: str, model_file: str, n_ctx: int) -> str:
    """The llama.cpp command when no offload plan could be made: llama.cpp's own defaults place the layers."""
    return shlex.join([binary, "-m", model_file, "-c", str(n_ctx)])


def render_card(model: GGUFModel, *, bench: Sequence[BenchRow] = (), bench_origin: str = "",
                vram: Sequence[int] = (), n_ctx: int = 4096) -> tuple[str, str | None, list[str]]:  # fmt: skip
    """The card's markdown for `model`, the recipe it records (None: none) and what it had to leave out."""
    notes: list[str] = []
    s = summarize(model)
    name, recipe = _recipe(model, notes)
    by_dynq = model.field("dynq.version") is not None
    has_imatrix = any(model.field(k) is not None for k in ("dynq.imatrix.datasets", "quantize.imatrix.dataset"))
    plans = _offload_plans(model, vram, n_ctx, notes)
    mf = _modelfile(model, model_stem(model.path) + ".gguf", notes)
    title = _md(model.field("general.name") or model_stem(model.path))
    written = f"by dynq {_md(model.field('dynq.version'))}" if by_dynq else "by a tool other than dynq"
    what = f"with the recipe {_code(name)}" if name else "with an unknown recipe"
    lines = [_front_matter(model, has_imatrix), "", f"# {title} ({_code(name or 'GGUF')})", "",
             f"{_code(model.shards[0].name)} is a GGUF quantization written {written} {what}: {s.bpw:.3f} bits per "
             f"weight, {_size(s.total_bytes)} of tensor data for {s.n_parameters / 1e9:.3f} B parameters "
             f"({s.file_bytes:,} bytes in {len(s.shards)} file{'s' if len(s.shards) > 1 else ''}).", ""]  # fmt: skip
    lines += [*_source_section(model, s), ""]
    lines += [*_recipe_section(name, recipe, model.field("dynq.recipe") is not None), ""]
    lines += [*_class_section(model, s), ""]
    lines += [*_imatrix_section(model, by_dynq), ""]
    if bench:
        lines += [*_bench_section(bench, bench_origin, name, s), ""]
    lines += [*_run_section(model, plans, mf, n_ctx), ""]
    lines += ["## Provenance", "",
              f"Quantized {written}; the recipe, the importance matrix's provenance and the version are read from "
              f"the file's `dynq.*` metadata. This card was written by `dynq card` (dynq {__version__})."]  # fmt: skip
    if notes:
        lines += ["", "Left out of this card:", "", *(f"- {_md(n)}" for n in notes)]
    return "\n".join(lines) + "\n", name, notes


def _write_new(path: Path, text: str, overwrite: bool) -> None:
    """Write `text` to a temporary name beside `path`, fsync, rename: no half-written card under the final name."""
    if path.exists() and not overwrite:
        raise OutputExists(path)
    atomic_write_text(path, text)


def card(
    source: str | os.PathLike[str] | GGUFModel,
    *,
    output: str | os.PathLike[str] | None = None,
    bench: str | os.PathLike[str] | None = None,
    vram: Sequence[int | str] = DEFAULT_VRAM,
    n_ctx: int = 4096,
    overwrite: bool = False,
    ctx: RunContext | None = None,
) -> ModelCard:
    """Write a model card for the GGUF `source` (a path, any shard of a split model, or `zoo:NAME`) to `output`
    (default: README.md beside it): source model, recipe and rules, bits per weight and bytes per tensor class, the
    importance matrix's provenance, `bench`'s rows (a `dynq bench` JSON) with this file's row marked, and llama.cpp
    and Ollama instructions with offload plans for each `vram` size (bytes or '24GB')."""
    ctx = context(ctx)
    model = source if isinstance(source, GGUFModel) else GGUFModel(gguf_path(source, ctx.cache_dir))
    path = Path(output) if output is not None else model.path.parent / CARD_NAME
    check_output_folder(path)
    if any(path.resolve() == p.resolve() for p in model.shards):
        raise DynqError(f"{path}: the card would overwrite the model; choose another name")
    if path.exists() and not overwrite:  # before any work, as the writers do
        raise OutputExists(path)
    rows = read_bench(bench) if bench is not None else []
    sizes = [v if isinstance(v, int) else parse_memory(v) for v in vram]
    text, recipe, notes = render_card(model, bench=rows, bench_origin=Path(bench).name if bench else "",
                                      vram=sizes, n_ctx=n_ctx)  # fmt: skip
    for n in notes:
        ctx.logger.info("%s: %s", path, n)
    _write_new(path, text, overwrite)
    return ModelCard(path, text, recipe, tuple(notes))
