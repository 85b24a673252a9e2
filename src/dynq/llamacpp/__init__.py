"""llama.cpp, from the one llama-cpp-python release dynq pins: its runtime, its command-line tools and its converter."""
