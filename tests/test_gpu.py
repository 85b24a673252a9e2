"""The CUDA paths, where a CUDA device is present (marked gpu: elsewhere each test skips, saying why; `make test-gpu`
runs them alone): dynq's torch encoders on the GPU give bytes llama.cpp accepts and gguf-py decodes to their own
values, no worse than llama.cpp's encoder and equal in error to the same encoders on the CPU; a quantize with the
torch backend on the GPU loads in llama.cpp; `run` offloads layers where llama.cpp was built with a GPU backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dynq
from dynq.core.qtypes import qtype
from dynq.eval.loops import generate
from dynq.kernels.compare import compare, decode, weighted_error
from dynq.kernels.encoders import encoders
from dynq.kernels.ggml import GgmlBackend, ggml_library
from dynq.kernels.torch_backend import TorchBackend
from dynq.lab.synthetic import write_synthetic
from test_encoders_torch import MAX_RATIO, TYPES, random_rows

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", TYPES)
def test_torch_encoders_on_cuda(name: str) -> None:
    t = qtype(name)
    rows, importance = random_rows(7, n=64, k=1024)
    encoded = encoders()[name](torch.from_numpy(rows).cuda(), torch.from_numpy(importance).cuda())
    data = encoded.data.cpu().numpy()
    np.testing.assert_array_equal(decode(t, data, rows.shape[1]), encoded.values.cpu().numpy())
    assert ggml_library().ggml_validate_row_data(int(t.ggml.value), data.ctypes.data, data.nbytes), name
    cuda, cpu, ggml = TorchBackend("cuda"), TorchBackend("cpu", threads=2), GgmlBackend(threads=2)
    assert compare(t, rows, importance, cuda, ggml).ratio <= MAX_RATIO
    k = rows.shape[1]
    on_gpu = weighted_error(rows, decode(t, cuda.encode(t, rows, importance), k), importance)
    on_cpu = weighted_error(rows, decode(t, cpu.encode(t, rows, importance), k), importance)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-3), (name, on_gpu, on_cpu)


def test_a_quantize_on_the_gpu_loads_in_llama_cpp(tmp_path: Path) -> None:
    source = write_synthetic("deepseek2", tmp_path / "ds.gguf")
    ctx = dynq.RunContext(threads=2, device="cuda")
    result = dynq.quantize(dynq.plan(source, "uniform-q4_k"), tmp_path / "q4k.gguf", backend="torch", ctx=ctx)
    assert all(c.n_tokens > 0 for c in generate(result.files[0], n_tokens=8, threads=2))


def test_run_offloads_layers_to_the_gpu(tmp_path: Path) -> None:
    import llama_cpp

    from dynq.deploy.run import Runner, Sampling

    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python was built without a GPU backend (make setup builds the CPU one)")
    source = write_synthetic("llama", tmp_path / "tiny.gguf")
    with Runner(source, n_ctx=64, threads=1, seed=3) as runner:
        assert runner.offload.n_gpu_layers != 0 and "offload planner" in runner.offload.reason
        assert runner.complete("the of and", Sampling(max_tokens=8)).n_tokens > 0
