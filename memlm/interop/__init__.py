"""Import and export of other formats: Hugging Face folders (`hf`) and llama.cpp's GGUF (`gguf`)."""
