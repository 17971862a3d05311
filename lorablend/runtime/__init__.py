"""Running the base model: loading it (and converting GGUF bases), prompts, scoring with the model (ce and the
first-order scorer), greedy evaluation, llama.cpp, GGUF export, and LoRA training steps."""
