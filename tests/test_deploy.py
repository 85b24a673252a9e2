"""Running what dynq makes: split/merge round trips, llama.cpp loading shards, the Ollama export and `dynq run`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from typer.testing import CliRunner

from dynq.cli import app, in_flags
from dynq.core.qtypes import qtype
from dynq.core.tensors import TensorInfo
from dynq.deploy.ollama import FAMILIES, PROBES, check_family, export_ollama, render_jinja, render_ollama
from dynq.deploy.run import Runner, Sampling
from dynq.deploy.shards import count_shards, max_size_for, merge, split
from dynq.errors import DynqError, LeftoverRun, OutputExists
from dynq.gguf_io import writer
from dynq.gguf_io.partial import partial_dir
from dynq.gguf_io.reader import GGUFModel, field_value
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.runtime import LlamaRuntime

cli = CliRunner()

# Chat templates in the style their families ship (Llama 3, Gemma 3); ChatML is SmolLM2's, verbatim.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
UNKNOWN = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


def with_chat_template(source: Path, target: Path, template: str) -> Path:
    """A copy of `source` that carries `template` as its chat template."""
    model = GGUFModel(source)
    writer = GGUFWriter(target, model.arch)
    for key, field in model.readers[0].fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = GGUFValueType(field.types[0])
        sub_type = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)
    writer.add_chat_template(template)
    for info in model.tensors:
        # stored bytes (quantized: shaped rows x row bytes) or elements, as gguf-py takes them back
        writer.add_tensor(info.name, np.asarray(model.raw(info.name)), raw_dtype=info.dtype.ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic("llama", tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def tiny_chat(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(tiny_llama, tmp_path_factory.mktemp("chat") / "tiny-chat.gguf", CHATML)


# --- split and merge ---


def test_shard_counts_follow_the_writer_rule() -> None:
    assert count_shards([10, 10, 10], 20) == 2
    assert count_shards([10, 10, 10], 9) == 3  # a tensor over the limit gets a shard of its own
    assert count_shards([10, 10, 10], 30) == 1
    sizes = [7, 3, 9, 1, 4, 8, 2, 6]
    for n in range(2, len(sizes) + 1):
        limit = max_size_for(sizes, n)
        assert count_shards(sizes, limit) <= n
        # the smallest such limit, though never below the largest tensor (whose shard would exceed it)
        assert limit == max(sizes) or count_shards(sizes, limit - 1) > n


def test_split_then_merge_is_byte_identical(tiny_gguf: Path, tmp_path: Path) -> None:
    result = split(tiny_gguf, tmp_path / "parts.gguf", n_shards=3)
    assert [f.name for f in result.files] == [f"parts-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    original = GGUFModel(tiny_gguf)
    for i, f in enumerate(result.files):
        reader = GGUFReader(f)
        assert field_value(reader, "split.no") == i and field_value(reader, "split.count") == 3
        assert field_value(reader, "split.tensors.count") == len(original.tensors)
        # llama.cpp's layout: metadata in the first shard only; the split keys' types as llama-gguf-split writes them
        assert (field_value(reader, "general.name") is not None) == (i == 0)
        assert reader.fields["split.count"].types == [GGUFValueType.UINT16]
        assert reader.fields["split.tensors.count"].types == [GGUFValueType.INT32]
    parts = GGUFModel(result.files[1])  # any shard opens the whole model
    assert [t.name for t in parts.tensors] == [t.name for t in original.tensors]
    for t in original.tensors:
        np.testing.assert_array_equal(parts.raw(t.name).view(np.uint8), original.raw(t.name).view(np.uint8))
    merged = merge(result.files[2], tmp_path / "merged.gguf").files[0]
    assert merged.read_bytes() == tiny_gguf.read_bytes()
    assert not list(tmp_path.glob(".*tmp"))


def test_merge_of_gguf_py_shards_equals_the_single_file(tiny_split: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    merged = merge(tiny_split, tmp_path / "tiny.gguf").files[0]
    assert merged.read_bytes() == tiny_gguf.read_bytes()


def test_split_by_size_keeps_each_shard_under_it(tiny_gguf: Path, tmp_path: Path) -> None:
    limit = 40_000
    result = split(tiny_gguf, tmp_path / "s.gguf", max_size=limit)
    assert len(result.files) > 2
    for f in result.files:
        m = GGUFReader(f)
        assert sum(int(t.n_bytes) for t in m.tensors) <= limit or len(m.tensors) == 1


def test_split_and_merge_refuse_bad_requests(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(DynqError, match="between 2 and 21"):
        split(tiny_gguf, tmp_path / "x.gguf", n_shards=50)
    with pytest.raises(DynqError, match="fit in one shard"):
        split(tiny_gguf, tmp_path / "x.gguf", max_size=10**9)
    with pytest.raises(DynqError, match="either"):
        split(tiny_gguf, tmp_path / "x.gguf")
    with pytest.raises(DynqError, match="single file"):
        merge(tiny_gguf, tmp_path / "m.gguf")
    (tmp_path / "x-00002-of-00002.gguf").write_bytes(b"keep me")
    with pytest.raises(DynqError, match="already exists"):
        split(tiny_gguf, tmp_path / "x.gguf", n_shards=2)
    assert (tmp_path / "x-00002-of-00002.gguf").read_bytes() == b"keep me"
    assert not (tmp_path / "x-00001-of-00002.gguf").exists()


def test_a_failed_split_leaves_nothing(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_write(self: object, data: np.ndarray, made_from: object = None) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.StreamingWriter, "write", failing_write)
    with pytest.raises(DynqError, match="No space left"):
        split(tiny_gguf, tmp_path / "x.gguf", n_shards=2)
    assert list(tmp_path.iterdir()) == []


def test_a_split_quantize_replaces_no_shard_unasked(tiny_llama: Path, tmp_path: Path) -> None:
    """N6: every shard of a split output is an output: an existing one is replaced only with --force."""
    out = tmp_path / "sp.gguf"
    first = cli.invoke(app, ["quantize", str(tiny_llama), "-r", "q8_0", "-o", str(out), "--split-max-size", "1M"])
    assert first.exit_code == 0, first.output
    shards = sorted(tmp_path.glob("sp-*-of-*.gguf"))
    assert len(shards) > 1
    before = [p.read_bytes() for p in shards]
    again = ["quantize", str(tiny_llama), "-r", "uniform-q8_0", "-o", str(out), "--split-max-size", "1M"]
    refused = cli.invoke(app, again)
    assert refused.exit_code == 1 and isinstance(refused.exception, OutputExists)
    assert in_flags(refused.exception) == f"{shards[0]}: already exists; remove it or pass --force"
    assert [p.read_bytes() for p in shards] == before and not list(tmp_path.glob(".*"))
    shards[0].unlink()  # any one shard of the set is enough to refuse
    refused = cli.invoke(app, again)
    assert refused.exit_code == 1 and str(shards[1]) in str(refused.exception)
    forced = cli.invoke(app, [*again, "--force"])
    assert forced.exit_code == 0, forced.output
    assert all(p.exists() for p in shards) and shards[0].read_bytes() != before[0]


def leave_interrupted_copy(output: Path) -> None:
    """What a SIGKILL leaves of a split or merge writing `output`: its partial folder with tensors journaled."""
    w = writer.StreamingWriter(output, "llama", resumable=False)
    info = TensorInfo("t.weight", (32,), qtype("F32"))
    w.declare(info, 128, GGMLQuantizationType.F32)
    w.begin()
    w.write(np.zeros(128, np.uint8))
    w.partial.unlock()  # the process is gone: the kernel dropped its lock


@pytest.mark.parametrize("command", ["split", "merge", "export-ollama"])
def test_an_interrupted_copy_is_cleared_with_force(command: str, tiny_chat: Path, tmp_path: Path) -> None:
    """N8: split, merge and export-ollama do not resume; what a killed run left is named with the option that clears
    it, and --force starts over."""
    (tmp_path / "in").mkdir()
    shard = str(split(tiny_chat, tmp_path / "in" / "c.gguf", n_shards=2).files[0])
    out = tmp_path / ("x.gguf" if command != "export-ollama" else "o/c.gguf")
    out.parent.mkdir(exist_ok=True)
    args = {"split": ["split", str(tiny_chat), "-o", str(out), "--shards", "2"],
            "merge": ["merge", shard, "-o", str(out)],
            "export-ollama": ["export-ollama", shard, "-o", str(out.parent)]}[command]  # fmt: skip
    leave_interrupted_copy(out)
    refused = cli.invoke(app, args)
    assert refused.exit_code == 1 and isinstance(refused.exception, LeftoverRun), refused.output
    message = in_flags(refused.exception)
    assert "pass --force to start over" in message and "--resume" not in message and "\n" not in message
    assert partial_dir(out).is_dir()
    forced = cli.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert not partial_dir(out).exists()
    written = out if command != "split" else tmp_path / "x-00001-of-00002.gguf"
    assert [t.name for t in GGUFModel(written).tensors] == [t.name for t in GGUFModel(tiny_chat).tensors]


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OSError(28, "No space left on device")], ids=["signal", "disk"])
def test_an_interrupted_or_failed_copy_leaves_no_partial(stop: BaseException, tiny_split: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """SIGTERM or Ctrl-C (a KeyboardInterrupt in the CLI) or a full disk during a merge: nothing to resume is kept."""
    original = writer.StreamingWriter.write
    calls = []

    def write(self: writer.StreamingWriter, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise stop
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writer.StreamingWriter, "write", write)
    with pytest.raises(type(stop) if isinstance(stop, KeyboardInterrupt) else DynqError) as caught:
        merge(tiny_split, tmp_path / "m.gguf")
    assert "resume" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["llama", "deepseek2"])
def test_llama_cpp_loads_shards_and_merged_file_alike(kind: str, tmp_path: Path) -> None:
    source = write_synthetic(kind, tmp_path / f"{kind}.gguf")
    parts = split(source, tmp_path / "m.gguf", n_shards=3).files
    merged = merge(parts[0], tmp_path / "merged.gguf").files[0]
    assert merged.read_bytes() == source.read_bytes()
    tokens = [1, 40, 41, 42, 43, 44, 45, 46]
    logits = []
    for path in (source, parts[0], merged):
        with LlamaRuntime(path, n_ctx=16, threads=1, logits=True) as rt:
            out = rt.evaluate_chunk(tokens)
        assert out is not None and np.isfinite(out).all()
        logits.append(out)
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_array_equal(logits[0], logits[2])


def test_cli_split_and_merge(tiny_gguf: Path, tmp_path: Path) -> None:
    result = cli.invoke(app, ["split", str(tiny_gguf), "-o", str(tmp_path / "t.gguf"), "--shards", "2"])
    assert result.exit_code == 0, result.output
    assert "2 shards, 21 tensors" in result.stdout
    result = cli.invoke(app, ["merge", str(tmp_path / "t-00002-of-00002.gguf"), "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.gguf").read_bytes() == tiny_gguf.read_bytes()
    again = cli.invoke(app, ["merge", str(tmp_path / "t-00001-of-00002.gguf"), "-o", str(tmp_path / "m.gguf")])
    assert again.exit_code != 0 and isinstance(again.exception, DynqError)


# --- Ollama ---


@pytest.mark.parametrize(
    ("template", "family", "bos", "adds_bos"),
    [(CHATML, "chatml", "<|im_start|>", False), (LLAMA3, "llama3", "<|begin_of_text|>", True),
     (GEMMA, "gemma", "<bos>", True)],
)  # fmt: skip
def test_each_family_renders_as_the_model_template(template: str, family: str, bos: str, adds_bos: bool) -> None:
    fam = next(f for f in FAMILIES if f.name == family)
    assert check_family(fam, template, bos, "<eos>", adds_bos) == []
    # the check has teeth: a template that differs by one newline is caught
    assert check_family(fam, template.replace("\n", " ", 1), bos, "<eos>", adds_bos) != []


def test_ollama_rendering_of_a_conversation() -> None:
    chatml = FAMILIES[0]
    messages = list(PROBES[2])
    text = render_ollama(chatml, messages, "ignored: a system message is given")
    assert text == render_jinja(CHATML, messages, "", "")
    assert text.endswith("<|im_start|>user\nAnd a string?<|im_end|>\n<|im_start|>assistant\n")


def test_export_ollama_writes_gguf_and_modelfile(tiny_chat: Path, tmp_path: Path) -> None:
    result = export_ollama(tiny_chat, tmp_path / "ollama")
    assert result.gguf.read_bytes() == tiny_chat.read_bytes()
    text = result.modelfile.read_text()
    assert result.content.family == "chatml" and result.content.problems == []
    assert "FROM ./tiny-chat.gguf\n" in text
    assert 'TEMPLATE """{{ $system := .System }}' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert "PARAMETER temperature 0.6\nPARAMETER min_p 0.05\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    with pytest.raises(DynqError, match="already exists"):
        export_ollama(tiny_chat, tmp_path / "ollama")


def test_export_ollama_merges_shards(tiny_chat: Path, tmp_path: Path) -> None:
    parts = split(tiny_chat, tmp_path / "tiny-chat.gguf", n_shards=2).files
    result = export_ollama(parts[1], tmp_path / "out")
    assert result.gguf.name == "tiny-chat.gguf"
    assert result.gguf.read_bytes() == tiny_chat.read_bytes()


def test_export_ollama_says_when_a_template_is_unknown(tiny_llama: Path, tmp_path: Path) -> None:
    odd = with_chat_template(tiny_llama, tmp_path / "odd.gguf", UNKNOWN)
    text = export_ollama(odd, tmp_path / "o1").modelfile.read_text()
    assert "NOT RECOGNISED" in text and "TEMPLATE" not in text.replace("TEMPLATE line", "")
    assert "# {% for m in messages %}[{{ m['role'] }}]" in text
    plain = export_ollama(tiny_llama, tmp_path / "o2").modelfile.read_text()
    assert "no chat template" in plain and "\nTEMPLATE" not in plain


@pytest.mark.model
def test_export_ollama_for_qwen2_5_coder(tmp_path: Path) -> None:
    import dynq

    source = dynq.fetch("zoo:qwen2.5-coder-0.5b")
    result = export_ollama(source, tmp_path, link=True)
    m = result.content
    assert m.family == "chatml" and m.problems == []
    assert m.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    template = GGUFModel(source).field("tokenizer.chat_template")
    fam = FAMILIES[0]
    for probe in PROBES:  # the Modelfile's template renders what the model's own does
        assert render_ollama(fam, list(probe), m.default_system) == render_jinja(template, list(probe), "", "")
    assert 'PARAMETER stop "<|im_end|>"' in result.modelfile.read_text()
    assert os.path.samefile(result.gguf, source)


# --- run ---


def test_runner_streams_what_it_returns(tiny_llama: Path) -> None:
    pieces: list[str] = []
    import llama_cpp

    with Runner(tiny_llama, n_ctx=64, threads=1, seed=3) as runner:
        # nothing offloaded where llama.cpp has no GPU backend; where it has one, the planner's layers (test_gpu.py)
        assert (runner.offload.n_gpu_layers == 0) == (not llama_cpp.llama_supports_gpu_offload())
        g = runner.complete("the of and", Sampling(max_tokens=12), pieces.append)
        again = runner.complete("the of and", Sampling(max_tokens=12))
    assert "".join(pieces) == g.text and g.text
    assert 1 <= g.n_tokens <= 12 and g.n_prompt >= 3
    assert g.stopped or g.n_tokens == 12
    assert isinstance(again.text, str)


def test_gpu_offload_takes_the_planners_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a GPU (faked here: llama.cpp and torch both report one), the layer count is the offload planner's for
    the free VRAM; without one, nothing is offloaded."""
    import torch

    from dynq.deploy import run
    from dynq.deploy.memory import byte_model
    from dynq.deploy.offload import GPU_RESERVE, Hardware, Settings, plan_offload

    source = write_synthetic("deepseek2", tmp_path / "ds.gguf")

    class FakeLlama:
        gpu = False

        def llama_backend_init(self) -> None:
            pass

        def llama_supports_gpu_offload(self) -> bool:
            return self.gpu

    monkeypatch.setattr(run, "llama", FakeLlama)  # a llama.cpp without a GPU backend, whatever this machine's is
    assert run.gpu_offload(source, 256).n_gpu_layers == 0
    FakeLlama.gpu = True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = byte_model(GGUFModel(source).inventory())
    layers = []
    # all of it fits; 20 MB beside the reserve: some blocks, experts split (which Llama cannot do)
    for free in (2**30, GPU_RESERVE + 20_000_000):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i, free=free: (free, 2 * free))
        plan = plan_offload(model, Hardware(vram=free), Settings(n_ctx=256))
        # llama-cpp-python cannot place single tensors (-ot): the best whole-layer placement stands in
        want = plan.alternatives[0] if plan.best.override_tensors else plan.best
        got = run.gpu_offload(source, 256)
        assert got.n_gpu_layers == want.n_gpu_layers and "offload planner" in got.reason
        layers.append(got.n_gpu_layers)
    assert layers[0] == model.n_blocks + 1 and 0 < layers[1] < layers[0]


def test_runner_formats_chat_with_the_file_template(tiny_chat: Path, tiny_llama: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with Runner(tiny_chat, n_ctx=512, threads=1) as runner:
        assert runner.chat_prompt(messages) == render_jinja(CHATML, messages, "<s>", "</s>")
        assert runner.chat(messages, Sampling(max_tokens=4)).n_tokens <= 4
    with Runner(tiny_llama, n_ctx=64, threads=1) as runner, pytest.raises(DynqError, match="no chat template"):
        runner.chat(messages)


def test_cli_run_prompt_and_chat(tiny_llama: Path, tiny_chat: Path) -> None:
    args = ["--threads", "1", "--ctx", "64", "-n", "8", "--seed", "7"]
    first = cli.invoke(app, ["run", str(tiny_llama), "-p", "the of", *args])
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("the of") and len(first.stdout) > len("the of\n")
    assert "temperature 0.6, min_p 0.05" in first.stderr
    second = cli.invoke(app, ["run", str(tiny_llama), "-p", "the of", *args])
    assert second.stdout == first.stdout  # same seed, same text
    chat_args = [*args, "--ctx", "512"]  # the byte-level vocabulary spends a token per letter of the template
    chat = cli.invoke(app, ["run", str(tiny_chat), "--chat", "-p", "hello", *chat_args])
    assert chat.exit_code == 0, chat.output
    talk = cli.invoke(app, ["run", str(tiny_chat), "--chat", *chat_args], input="hello\nand again\n\n")
    assert talk.exit_code == 0, talk.output
    assert talk.stderr.count(">>>") == 3
    refused = cli.invoke(app, ["run", str(tiny_llama), *args])
    assert refused.exit_code != 0 and "give a prompt" in str(refused.exception)


@pytest.mark.model
def test_run_chat_answers_as_llama_cpp_python_chat_does() -> None:
    """Greedy `dynq run --chat` gives the very answer llama-cpp-python's own chat completion gives with the file's
    template (SmolLM2-135M is a base model: the answer is not a good one, but it must be the same)."""
    from llama_cpp import Llama

    from dynq import fetch

    question = "What is the capital of France?"
    result = cli.invoke(app, ["run", "zoo:smollm2-135m", "--chat", "-p", question, "-n", "24", "--threads", "1",
                              "--ctx", "256", "--temperature", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    llm = Llama(
        str(fetch("zoo:smollm2-135m")), n_ctx=256, n_threads=1, verbose=False, chat_format="chat_template.default"
    )
    reference = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0, max_tokens=24)
    llm.close()
    answer = reference["choices"][0]["message"]["content"]
    assert answer.strip() and result.stdout.strip() == answer.strip()


# --- transformers ---


TRANSFORMERS_CASES = [
    ("zoo:smollm2-135m", "LlamaForCausalLM",
     "The quick brown fox jumps over the lazy dog. In Python, a list comprehension builds a new list"),
    pytest.param("zoo:qwen2.5-coder-0.5b", "Qwen2ForCausalLM",
                 "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]",
                 marks=pytest.mark.slow),  # the same path on a second architecture: the long lane
]  # fmt: skip


@pytest.mark.model
@pytest.mark.parametrize(("source", "architecture", "text"), TRANSFORMERS_CASES)
def test_transformers_loads_a_dynq_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, architecture: str, text: str
) -> None:
    """A dynq quant loads with AutoModelForCausalLM(gguf_file=) and predicts as llama.cpp does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from runs import quantize_to

    out = tmp_path / "q2_k_xl.gguf"
    quantize_to(source, "dyn-q2_k_xl", out)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    assert type(model).__name__ == architecture
    with LlamaRuntime(out, n_ctx=64, threads=2, logits=True) as rt:
        rt.add_bos = False  # feed exactly the same tokens to both
        tokens = rt.tokenize(text)
        ll = rt.evaluate_chunk(tokens)
    with torch.no_grad():
        hf = model(torch.tensor([tokens])).logits[0].numpy()
    assert ll is not None
    # llama.cpp multiplies K-quants against 8-bit-quantized activations, so near-ties may flip
    corr = np.corrcoef(hf.ravel(), ll.ravel())[0, 1]
    agree = (hf.argmax(-1) == ll.argmax(-1)).mean()
    assert corr > 0.99 and agree >= 0.85, (corr, agree)
