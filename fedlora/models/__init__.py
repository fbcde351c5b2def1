"""Offline model + tokenizer loading (GGUF, local Hugging Face folders, tiny random Llama); never downloads."""
from .loading import byte_tokenizer, cache_root, load_model, resolve_model_dir

__all__ = ["byte_tokenizer", "cache_root", "load_model", "resolve_model_dir"]
