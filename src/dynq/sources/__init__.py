"""Where tensors come from: a GGUF file (or split), a zoo model, or a built-in shape inventory."""
