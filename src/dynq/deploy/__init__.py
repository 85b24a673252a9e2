"""Running what dynq makes: offload planning, run and chat, shards, Ollama export."""
