"""Real weights through the checkpoint source: the first two blocks of zoo:qwen2.5-coder-1.5b, written out as a
Hugging Face checkpoint (two safetensors shards, Qwen2.5's tokenizer and chat template), convert exactly as
llama.cpp's converter converts them, and their quant is the quant of that conversion and runs in llama.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

import dynq
from dynq.eval.loops import generate
from dynq.lab.hf_export import export_checkpoint
from dynq.llamacpp.converter import convert
from dynq.paths import cache_dir
from runs import TWO_THREADS, quantize_to

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The checkpoint (cached: it is rebuilt only when missing) and llama.cpp's F16 conversion of it."""
    directory = cache_dir() / "hf" / "qwen2.5-coder-1.5b-2blocks"
    if not (directory / "config.json").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        export_checkpoint(dynq.fetch("zoo:qwen2.5-coder-1.5b"), directory, blocks=2, max_shard_size="600MB")
    converted = tmp_path_factory.mktemp("qwen-2blocks") / "llama.cpp-f16.gguf"
    convert(directory, converted, cache_dir())
    return directory, converted


def _tensors(path: Path) -> list[tuple[str, tuple[int, ...], int, bytes]]:
    return [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), t.data.tobytes())
            for t in GGUFReader(path).tensors]  # fmt: skip


def test_the_checkpoint_is_sharded_with_a_tokenizer(two_blocks: tuple[Path, Path]) -> None:
    directory, _ = two_blocks
    assert len(list(directory.glob("model-*.safetensors"))) >= 2
    assert (directory / "model.safetensors.index.json").is_file()
    assert (directory / "tokenizer.json").is_file()


def test_f16_and_a_quant_equal_the_converters(two_blocks: tuple[Path, Path], tmp_path: Path) -> None:
    directory, converted = two_blocks
    f16 = tmp_path / "f16.gguf"
    quantize_to(directory, "f16", f16)
    assert _tensors(f16) == _tensors(converted)
    ours, theirs = GGUFReader(f16).fields, GGUFReader(converted).fields
    mine = {k: f.contents() for k, f in ours.items() if not k.startswith(("GGUF.", "dynq."))}
    assert mine == {k: f.contents() for k, f in theirs.items() if not k.startswith("GGUF.")}

    imatrix = dynq.save_imatrix(dynq.collect_imatrix(converted, chunks=1, n_ctx=256, ctx=TWO_THREADS),
                                tmp_path / "imatrix.gguf")  # fmt: skip
    quant, reference = tmp_path / "b.gguf", tmp_path / "ref-b.gguf"
    quantize_to(directory, "dyn-iq2_xxs", quant, imatrix=imatrix)
    quantize_to(converted, "dyn-iq2_xxs", reference, imatrix=imatrix)
    assert _tensors(quant) == _tensors(reference)
    completions = generate(quant, n_tokens=8, threads=2)
    assert completions and all(c.n_tokens > 0 for c in completions)
