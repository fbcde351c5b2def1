"""Seeds that every party derives the same way, and LoRA's starting factors drawn from them.

Python's ``hash`` is salted per process, so seeds come from SHA-256 of the parts:
a server and its clients on different machines agree on them.
"""
from __future__ import annotations

import hashlib
import math

import torch


def stable_seed(*parts) -> int:
    """A 63-bit seed that depends only on ``parts`` (their ``repr``)."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lora_init_A(rank: int, d_in: int, seed: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """PEFT's lora_A initialisation (Kaiming-uniform with a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))).

    Drawn on the CPU so the values do not depend on the device's RNG.
    """
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d_in)
    a = torch.empty(rank, d_in, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
    return a.to(dtype=dtype, device=device)
