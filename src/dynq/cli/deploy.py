"""The deployment commands: `run` (complete or chat on llama.cpp), `merge` and `split` (llama.cpp shards),
`export-ollama` (one GGUF plus a Modelfile) and `card` (a Hugging Face model card for a GGUF)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from dynq import api
from dynq.cli.shell import THREADS, ensure_source, err, progress_bar, run_context, say
from dynq.cli.text import clean, data, line
from dynq.core.units import parse_size
from dynq.errors import DynqError


def _model_file(spec: str) -> Path:
    return api.gguf_file(ensure_source(spec))


def _stream(piece: str) -> None:
    # Model output is data: a completion may hold escape sequences (even split over tokens), so every control
    # character is shown, not sent. Cleaning piece by piece is enough because each is replaced on its own.
    sys.stdout.write(clean(piece))
    sys.stdout.flush()


def _stats(g: api.Generation) -> None:
    end = "end of text" if g.stopped else "token budget"
    err.print(line(f"{g.n_prompt} prompt tokens in {g.prompt_seconds:.2f} s; {g.n_tokens} tokens at "
                   f"{g.tokens_per_s:.1f} tok/s; stopped at {end}", style="dim"), soft_wrap=True)  # fmt: skip


def run(
    model: Annotated[str, typer.Argument(help="GGUF file (any shard of a split model) or zoo:NAME")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="text to continue, or with --chat the question")
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="use the file's chat template; without -p, talk on stdin")] = (
        False
    ),
    system: Annotated[str | None, typer.Option(help="system prompt for --chat")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="tokens to generate at most")] = 512,
    temperature: Annotated[float, typer.Option(help="sampling temperature (0.6 suits low-bit files)")] = 0.6,
    min_p: Annotated[float, typer.Option(help="drop tokens below this share of the top one's probability")] = 0.05,
    top_p: Annotated[float, typer.Option(help="nucleus cut (1.0: off)")] = 1.0,
    top_k: Annotated[int, typer.Option(help="keep the k most likely tokens (0: off)")] = 0,
    repeat_penalty: Annotated[float, typer.Option(help="repetition penalty (1.0: off)")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed (default: random)")] = None,
    n_ctx: Annotated[int, typer.Option("--ctx", help="context size in tokens")] = 4096,
    threads: Annotated[int, typer.Option(help="llama.cpp threads")] = THREADS,
    n_gpu_layers: Annotated[
        int | None, typer.Option("--n-gpu-layers", "-ngl", help="layers on the GPU (default: the offload planner's)")
    ] = None,
) -> None:
    """Run a model on llama.cpp: continue a prompt, or chat through the file's own chat template; tokens stream."""
    if prompt is None and not chat:
        raise DynqError("nothing to do: give a prompt with -p, or --chat to talk")
    if max_tokens < 1 or n_ctx < 8:
        raise DynqError("--max-tokens must be at least 1 and --ctx at least 8")
    sampling = api.Sampling(temperature, min_p, top_p, top_k, repeat_penalty, max_tokens)
    ensure_source(model)
    with err.status(line("loading ", data(model))):
        runner = api.runner(model, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, seed=seed, ctx=run_context(threads))
    with runner:
        layers = runner.offload.n_gpu_layers
        err.print(line(data(runner.path.name), f": GPU layers {'all' if layers < 0 else layers} (",
                       data(runner.offload.reason), f"); {sampling.summary()}", style="dim"),
                  soft_wrap=True)  # fmt: skip
        if not chat:
            assert prompt is not None
            _stream(prompt)
            done = runner.complete(prompt, sampling, _stream)
            _stream("\n")
            _stats(done)
            return
        messages: list[api.Message] = [{"role": "system", "content": system}] if system else []
        if prompt is not None:
            messages.append({"role": "user", "content": prompt})
            done = runner.chat(messages, sampling, _stream)
            _stream("\n")
            _stats(done)
            return
        err.print(line("chat: one message per line; an empty line or end of input stops", style="dim"))
        while True:
            err.print(line(data(">>>", "bold"), " "), end="")
            question = sys.stdin.readline()
            if not question.strip():
                break
            messages.append({"role": "user", "content": question.rstrip("\n")})
            answer = runner.chat(messages, sampling, _stream)
            _stream("\n")
            _stats(answer)
            messages.append({"role": "assistant", "content": answer.text})


def merge_command(
    shard: Annotated[Path, typer.Argument(help="any shard of a split model")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="merged .gguf (default: beside the shards)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
) -> None:
    """Merge llama.cpp split shards into one GGUF; tensor bytes are copied unchanged."""
    with progress_bar("merging") as on_step:
        result = api.merge(shard, output, overwrite=force, ctx=run_context(progress=on_step))
    counts = f": {result.n_tensors} tensors, {result.tensor_bytes:,} tensor bytes"
    say("wrote ", data(result.files[0]), counts)


def split_command(
    model: Annotated[Path, typer.Argument(help="GGUF file (or a split model, to split differently)")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="shards are named after it: NAME-00001-of-0000N.gguf")
    ] = None,
    max_size: Annotated[str | None, typer.Option(help="at most this many tensor bytes per shard (e.g. 2G)")] = None,
    shards: Annotated[int | None, typer.Option(help="this many shards, as even as tensor boundaries allow")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace existing shards")] = False,
) -> None:
    """Split a GGUF into llama.cpp shards (llama-gguf-split's format); tensor bytes are copied unchanged."""
    size = parse_size(max_size) if max_size is not None else None
    with progress_bar("splitting") as on_step:
        result = api.split(
            model, output, max_size=size, n_shards=shards, overwrite=force, ctx=run_context(progress=on_step)
        )
    for f in result.files:
        say("wrote ", data(f), f" ({f.stat().st_size:,} bytes)")
    say(f"{len(result.files)} shards, {result.n_tensors} tensors; llama.cpp loads them from the first")


def export_ollama_command(
    model: Annotated[str, typer.Argument(help="GGUF file (any shard of a split model) or zoo:NAME")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for the GGUF and the Modelfile")],
    temperature: Annotated[float, typer.Option(help="PARAMETER temperature")] = 0.6,
    min_p: Annotated[float, typer.Option(help="PARAMETER min_p")] = 0.05,
    link: Annotated[bool, typer.Option(help="hard-link a single-file model instead of copying it")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace existing files")] = False,
) -> None:
    """Write one GGUF (shards merged) and a Modelfile with the model's chat template, sampling and stop tokens."""
    with progress_bar("exporting") as on_step:
        result = api.export_ollama(_model_file(model), output, temperature=temperature, min_p=min_p, link=link,
                                   overwrite=force, ctx=run_context(progress=on_step))  # fmt: skip
    m = result.content
    if m.family is None:
        err.print(line("no chat template dynq can translate; see the comment in the Modelfile", style="yellow"))
    for problem in m.problems:  # problems quote the model's template
        err.print(line(data("template differs:", "yellow"), " ", data(problem)), soft_wrap=True)
    template = data(m.family or "none")
    say("wrote ", data(result.gguf), " and ", data(result.modelfile), " (template: ", template, ")")
    say("import it with: ", data(ollama_create_hint(result.gguf, result.modelfile)))


def ollama_create_hint(gguf: Path, modelfile: Path) -> str:
    """The `ollama create` command a user pastes into a shell: quoted, and no argument starts with `-` (a model file
    named `--insecure.gguf` would otherwise pass an option). The model's name drops leading characters an Ollama name
    cannot start with; a relative path that starts with `-` gets `./`."""
    name = re.sub(r"^[^A-Za-z0-9]+", "", gguf.stem) or "model"
    path = str(modelfile)
    return shlex.join(["ollama", "create", name, "-f", f"./{path}" if path.startswith("-") else path])


def card_command(
    model: Annotated[str, typer.Argument(help="GGUF file (any shard of a split model) or zoo:NAME")],
    bench: Annotated[
        Path | None, typer.Option(help="dynq bench JSON (bench/results/NAME.json): its rows, this recipe's marked")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="card file (default: README.md beside the GGUF)")
    ] = None,
    vram: Annotated[
        list[str] | None,
        typer.Option(help=f"GPU memory to plan llama.cpp offload for (repeat; default {', '.join(api.DEFAULT_VRAM)})"),
    ] = None,
    n_ctx: Annotated[int, typer.Option("--ctx", help="context length (tokens) the run commands plan for")] = 4096,
    force: Annotated[bool, typer.Option("--force", help="replace an existing card")] = False,
) -> None:
    """Write a Hugging Face model card (README.md) from what the GGUF records: source model, recipe, bits per weight
    per tensor class, imatrix provenance, measured quality, llama.cpp and Ollama instructions."""
    if n_ctx < 1:
        raise DynqError("--ctx must be positive")
    written = api.card(_model_file(model), output=output, bench=bench, vram=vram or api.DEFAULT_VRAM, n_ctx=n_ctx,
                   overwrite=force, ctx=run_context())  # fmt: skip
    for note in written.notes:  # notes quote the file's metadata and llama.cpp's errors
        err.print(line("left out: ", data(note), style="yellow"), soft_wrap=True)
    recipe = data(written.recipe) if written.recipe else "unknown (not written by dynq)"
    say("wrote ", data(written.path), " (recipe ", recipe, f", {written.path.stat().st_size:,} bytes)")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the dynq app."""
    app.command()(run)
    app.command(name="merge")(merge_command)
    app.command(name="split")(split_command)
    app.command(name="export-ollama")(export_ollama_command)
    app.command(name="card")(card_command)
