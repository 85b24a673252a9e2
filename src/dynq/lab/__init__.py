"""Models built for dynq's own experiments: the tests, the benches and the runs the README reports.

`synthetic` writes tiny random GGUF models of real llama.cpp architectures (deepseek2, qwen3moe, llama) with a small
vocabulary, the only way MoE paths are exercised without MoE weights (`dynq synthetic` writes one); `hf_export`
writes a dense GGUF back out as a Hugging Face checkpoint directory, so the checkpoint source is tested against real
trained weights. Nothing here is needed to quantize a model: only the API and the CLI import `lab` (a layer test
holds that), and this package imports none of its modules itself, so `hf_export`'s torch and transformers imports
happen only where it is used.
"""
