"""`dynq card`: a model card made from what a quantized GGUF records, with text from the file kept inert."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from markdown_it import MarkdownIt
from typer.testing import CliRunner

import dynq
from dynq.cli import app
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.errors import DynqError, OutputExists
from dynq.eval.bench import read_bench
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import write_synthetic
from runs import quantize_to

RECIPE = "dyn-q2_k_xl"  # needs no imatrix; one is given anyway, for its provenance
# Rich markup, a terminal colour escape, an OSC 8 hyperlink, a bidi override, and markdown that would link, shout,
# open HTML and split a table cell.
NAME = "[/]\x1b[31mred[link=x]y[/link] \x1b]8;;http://evil\x07click\u202e\u200f <b>*hi*</b> [md](http://evil) a|b"
DATASET = "calib [link=y] text\x1b[2J"
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def relabelled(source: Path, target: Path, strings: dict[str, str]) -> Path:
    """A copy of `source` with these string metadata values set (tensor bytes as stored)."""
    model = GGUFModel(source)
    writer = GGUFWriter(target, model.arch)
    for key, field in model.readers[0].fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in strings:
            continue
        vtype = GGUFValueType(field.types[0])
        sub_type = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)
    for key, value in strings.items():
        writer.add_string(key, value)
    for info in model.tensors:
        writer.add_tensor(info.name, np.asarray(model.raw(info.name)), raw_dtype=model.ggml_type(info.name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def flat_imatrix(plan: dynq.QuantPlan) -> Imatrix:
    """Uniform importance for every quantized tensor (per expert for expert stacks), with a provenance to record."""
    entries = {}
    for t in plan.tensors:
        if not t.kept:
            n_mat = t.info.shape[2] if len(t.info.shape) == 3 else 1
            entries[t.info.name] = ImatrixEntry(np.ones((n_mat, t.info.shape[0]), np.float32),
                                                np.full(n_mat, 64, np.float32))  # fmt: skip
    return Imatrix(entries, datasets=[DATASET], chunk_count=3, chunk_size=64)


@pytest.fixture(scope="module")
def quant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE model quantized by dynq, with a hostile general.name and a Hugging Face source."""
    folder = tmp_path_factory.mktemp("card")
    source = relabelled(write_synthetic("qwen3moe", folder / "moe.gguf"), folder / "moe-named.gguf",
                        {"general.name": NAME, "general.source.repo_url": "https://huggingface.co/acme/tiny-moe",
                         "general.license": "apache-2.0"})  # fmt: skip
    out = folder / "model" / "tiny-moe-q2.gguf"
    out.parent.mkdir()
    quantize_to(source, RECIPE, out, imatrix=flat_imatrix(dynq.plan(str(source), RECIPE)))
    return out


def tensor_bytes(path: Path) -> int:
    """The file's tensor bytes as gguf-py's reader counts them (not dynq's summary, which the card uses)."""
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def table_after(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, row in enumerate(lines) if row.startswith(header_start))
    rows = []
    for row in lines[start + 2 :]:
        if not row.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]])
    return rows


def html(text: str) -> str:
    return str(MarkdownIt("commonmark").enable("table").render(text.split("\n---\n", 1)[1]))


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    loaded: dict[str, Any] = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    return loaded


def test_the_card_says_what_the_file_records(quant: Path, tmp_path: Path) -> None:
    made = dynq.card(quant, output=tmp_path / "card.md")
    text = made.path.read_text(encoding="utf-8")
    assert made.text == text and made.recipe == RECIPE and made.notes == ()
    meta = front_matter(text)
    assert meta["base_model"] == "acme/tiny-moe" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "gguf"
    assert {"gguf", "dynq", "quantized", "imatrix", "qwen3moe"} <= set(meta["tags"])
    assert f"with the recipe `{RECIPE}`" in text and "| 1 | `ffn_down_(ch)?exps` | `Q3_K` | `first:3` | moe |" in text
    assert f"written by dynq {dynq.__version__}" in text
    # the per-class table adds up to the file's tensor bytes, and names the types each class uses
    rows = table_after(text, "| tensor class |")
    by_class = {r[0]: r for r in rows}
    assert sum(int(r[3].replace(",", "")) for r in rows[:-1]) == tensor_bytes(quant)
    assert by_class["**total**"][3] == f"**{tensor_bytes(quant):,}**"
    assert {"routed experts", "attention", "embeddings", "output"} <= set(by_class)
    assert "`Q2_K` ×" in by_class["routed experts"][7]
    # imatrix provenance: chunk count and the dataset, as inert text
    assert "Made from 3 chunks of calibration text" in text
    assert "- calib \\[link=y\\] text\\\\x1b\\[2J" in text
    # how to run it: llama.cpp with the file's name and the planner's layers, and the Modelfile
    plan = dynq.offload(quant, dynq.Hardware(vram=8 << 30))
    assert f"llama-server -m tiny-moe-q2.gguf -ngl {plan.best.n_gpu_layers} -c 4096" in text
    assert "llama-cli -m tiny-moe-q2.gguf" in text
    assert "# 8 GB, 24 GB, 80 GB GPU" in text  # a tiny model gets one command for all three
    assert "FROM ./tiny-moe-q2.gguf\n" in text and "PARAMETER temperature 0.6" in text
    assert "## Measured quality" not in text  # no --bench


def test_file_text_stays_inert(quant: Path, tmp_path: Path) -> None:
    text = dynq.card(quant, output=tmp_path / "README.md").text
    assert not CONTROL.search(text.replace("\n", "").replace("\t", ""))
    assert "\\\\x1b\\[31mred" in text and "\\\\u202e" in text  # shown, as an escape
    for raw in ("[link=x]", "[md](http://evil)", "<b>", "*hi*"):
        assert raw not in text
    rendered = html(text)
    assert "<a " not in rendered and "<b>" not in rendered and "<em>" not in rendered
    assert "[/]\\x1b[31mred[link=x]y[/link]" in rendered  # the name as written, made visible
    # a `|` in the name does not split the source table's cells
    assert all(len(r) == 2 for r in table_after(text, "| field | value |"))


def test_bench_rows_with_this_file_marked(quant: Path, tmp_path: Path) -> None:
    size = tensor_bytes(quant)
    rows = [
        {"name": RECIPE, "maker": "dynq", "bytes": size, "bpw": 3.1, "ppl": 12.5, "kld_mean": 0.25, "kld_p99": 2.0,
         "top1": 0.8, "loop_rate": 0.0, "quantize_seconds": 1.0},
        {"name": "Q2_K", "maker": "llama.cpp", "bytes": size + 10, "bpw": 3.2, "ppl": 14.0, "kld_mean": 0.5,
         "kld_p99": 3.0, "top1": 0.7, "loop_rate": float("nan"), "quantize_seconds": 2.0},
        {"name": "odd|<b>name", "maker": "dynq", "bytes": size // 2, "bpw": 1.6, "ppl": 99.0, "kld_mean": 3.0,
         "kld_p99": 9.0, "top1": 0.2, "loop_rate": 0.5, "quantize_seconds": 1.0},
    ]  # fmt: skip
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(rows))
    text = dynq.card(quant, output=tmp_path / "README.md", bench=bench).text
    table = table_after(text, "| quant |")
    assert [r[0] for r in table] == ["odd\\|\\<b\\>name", "**dyn-q2\\_k\\_xl**", "Q2\\_K"]  # by size
    assert all(len(r) == 13 for r in table)
    marked = [r for r in table if r[-1]]
    assert len(marked) == 1 and marked[0][-1] == "**◀ this file**" and marked[0][4] == "**12.500**"
    assert table[2][10] == "-"  # loops not measured
    assert table[2][7] == table[2][8] == "-"  # the tail: rows written before it was measured
    assert "measured on another model" not in text
    # a row of another size is marked, and the card says the sizes differ
    bench.write_text(json.dumps([rows[0] | {"bytes": size * 2}]))
    other = dynq.card(quant, output=tmp_path / "README.md", bench=bench, overwrite=True).text
    assert "measured on another model or another build" in other


ROW = {"name": "q", "maker": "dynq", "bytes": 1, "bpw": 4.5, "ppl": 9.0, "kld_mean": 0.1, "kld_p99": 0.5,
       "top1": 0.9, "loop_rate": 0.0, "quantize_seconds": 1.0}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"name": "x"}', "not dynq bench results"),
        ('[{"name": "x"}]', "not a dynq bench row"),
        # probe N11: each of these was a traceback
        ("[" * 100_000 + "]" * 100_000, "nested deeper than any such file is"),
        (json.dumps([ROW | {"ppl": "abc"}]), "row 1: not a dynq bench row: ppl must be a number, not 'abc'"),
        (json.dumps([ROW | {"maker": ["a"]}]), "row 1: not a dynq bench row: maker must be text, not a list"),
        (json.dumps([ROW, ROW | {"kld_mean": "x"}]), "row 2: not a dynq bench row: kld_mean must be a number"),
        # the probe's rerun: a 401-digit byte count overflowed the table's MiB
        (json.dumps([ROW | {"bytes": 10**400}]), "row 1: not a dynq bench row: bytes must be a whole number within"),
    ],
)
def test_bad_bench_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(DynqError, match=message):
        read_bench(path)


def test_default_path_and_force(quant: Path, tmp_path: Path) -> None:
    model = tmp_path / quant.name
    model.hardlink_to(quant)
    first = dynq.card(model)
    assert first.path == tmp_path / "README.md"
    first.path.write_text("edited by hand")
    with pytest.raises(OutputExists, match="already exists"):
        dynq.card(model)
    assert first.path.read_text() == "edited by hand"
    assert dynq.card(model, overwrite=True).path.read_text(encoding="utf-8") == first.text
    with pytest.raises(DynqError, match="would overwrite the model"):
        dynq.card(model, output=model, overwrite=True)
    with pytest.raises(DynqError, match="does not exist"):
        dynq.card(model, output=tmp_path / "nowhere" / "README.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", quant.name]  # no temporary files left


def test_a_file_dynq_did_not_write(tmp_path: Path, tiny_gguf: Path) -> None:
    plain = write_synthetic("llama", tmp_path / "plain.gguf")
    made = dynq.card(plain, output=tmp_path / "plain.md")
    assert made.recipe is None and made.notes == ()
    assert "The recipe is **unknown**" in made.text and "by a tool other than dynq" in made.text
    assert "The file records no importance matrix." in made.text and "FROM ./plain.gguf" in made.text
    # no hparams and no vocabulary: no offload plan and no Modelfile, said in the card, still a card
    bare = dynq.card(tiny_gguf, output=tmp_path / "tiny.md")
    assert [n.split(":")[0] for n in bare.notes] == ["no offload plan", "no Ollama Modelfile"]
    assert "no Ollama Modelfile: tiny.gguf: llama.cpp could not read" in bare.notes[1]  # by name: the card is public
    assert "llama-server -m tiny.gguf -c 4096" in bare.text and "Left out of this card:" in bare.text
    assert "llama-server -m tiny.gguf -c 8192" in dynq.card(tiny_gguf, output=tmp_path / "8k.md", n_ctx=8192).text
    assert sum(int(r[3].replace(",", "")) for r in table_after(bare.text, "| tensor class |")[:-1]) == tensor_bytes(
        tiny_gguf
    )


def test_cli_card(quant: Path, tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"name": RECIPE, "maker": "dynq", "bytes": tensor_bytes(quant), "bpw": 3.0,
                                  "ppl": 10.0, "kld_mean": 0.1, "kld_p99": 1.0, "top1": 0.9, "loop_rate": 0.0,
                                  "quantize_seconds": 1.0}]))  # fmt: skip
    out = tmp_path / "README.md"
    runner = CliRunner()
    args = ["card", str(quant), "--bench", str(bench), "-o", str(out), "--vram", "12GB"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote " in result.stdout and RECIPE in result.stdout and not CONTROL.search(result.stdout)
    text = out.read_text(encoding="utf-8")
    assert "**◀ this file**" in text and "# 12 GB GPU" in text and "80 GB" not in text
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and isinstance(again.exception, DynqError)
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
