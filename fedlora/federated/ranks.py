"""Client rank distributions from FlexLoRA (arXiv 2402.11505, Sec. 5: resource types).

Each client gets one of ``levels`` (ascending ranks). The share of clients per
level follows the distribution; assignment is a seeded shuffle so the counts
are exact rather than sampled:

  homogeneous  every client at the largest level
  uniform      equal shares of every level
  heavy_tail   share of level i proportional to 2^-i: most clients small
  normal       a discretized normal over the levels: most clients in the middle
  list         the explicit per-client ranks given

Per-module ranks (``rank_pattern``, PEFT's name): a pattern maps the modules it
matches to an absolute rank (an int) or to a fraction of the client's rank (a
float in (0, 1]), so e.g. the MLP can train at half the client's attention rank.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np


def level_shares(distribution: str, num_levels: int) -> list[float]:
    if distribution == "homogeneous":
        return [0.0] * (num_levels - 1) + [1.0]
    if distribution == "uniform":
        weights = [1.0] * num_levels
    elif distribution == "heavy_tail":
        weights = [2.0 ** -i for i in range(num_levels)]
    elif distribution == "normal":
        center, width = (num_levels - 1) / 2, max(num_levels / 4, 0.5)
        weights = [math.exp(-0.5 * ((i - center) / width) ** 2) for i in range(num_levels)]
    else:
        raise ValueError(f"unknown rank distribution {distribution!r}")
    total = sum(weights)
    return [w / total for w in weights]


def assign_ranks(num_clients: int, distribution: str, levels, seed: int = 0, explicit=None) -> list[int]:
    """Ranks for clients 0..num_clients-1."""
    levels = sorted(int(r) for r in levels)
    if distribution == "list":
        explicit = [int(r) for r in (explicit or [])]
        if len(explicit) < num_clients:
            raise ValueError(f"client_ranks has {len(explicit)} ranks for {num_clients} clients")
        return explicit[:num_clients]
    shares = level_shares(distribution, len(levels))
    # Largest-remainder rounding: exact counts summing to num_clients.
    raw = [s * num_clients for s in shares]
    counts = [int(math.floor(v)) for v in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: num_clients - sum(counts)]:
        counts[i] += 1
    ranks = [r for r, c in zip(levels, counts) for _ in range(c)]
    np.random.default_rng(seed).shuffle(ranks)
    return [int(r) for r in ranks]


def check_rank_pattern(pattern: Mapping[str, object]) -> None:
    """ValueError naming the first bad entry of a rank_pattern."""
    for key, value in pattern.items():
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"rank_pattern key {key!r} is not a regular expression: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"rank_pattern[{key!r}] must be an int rank or a float fraction, got {value!r}")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"rank_pattern[{key!r}] = {value}: an absolute rank must be >= 1")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"rank_pattern[{key!r}] = {value}: a fraction of the client's rank must be in (0, 1]")


def pattern_key(pattern: Mapping[str, object], module: str) -> str | None:
    """The first key of ``pattern`` that matches ``module``: the whole name or a dotted suffix of it."""
    for key in pattern:
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return key
    return None


def module_ranks(rank: int, modules: Iterable[str], pattern: Mapping[str, object] | None) -> dict[str, int]:
    """The rank of each module of a client of ``rank``: ``rank`` unless a pattern entry matches it."""
    out = {}
    for module in modules:
        key = pattern_key(pattern, module) if pattern else None
        value = rank if key is None else pattern[key]
        out[module] = int(value) if isinstance(value, int) else max(1, round(float(value) * rank))
    return out
