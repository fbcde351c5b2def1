"""Argument checks of the public ops: one place, so every op rejects bad input the same way.

Each check raises ValueError naming the argument, before any kernel runs: a bad
layout must never turn into an out-of-bounds read or a silently wrong result.
"""
from __future__ import annotations

import math

import torch

from fedlora.bank import AdapterBank, check_ranks

__all__ = [
    "all_finite", "as_bank_list", "check_factors", "check_finite", "check_int", "check_rank", "check_ranks",
    "check_segments", "check_segmented_inputs", "int_list", "per_bank_weights", "weight_vector",
]


# ------------------------------------------------------------------ integers
def int_list(values, name: str) -> list[int]:
    """A sequence of ints or a 1-D integer tensor as a list of ints (floats, bools refused)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
        return [int(v) for v in values.tolist()]
    try:
        out = [int(v) for v in values]
    except TypeError as exc:
        raise ValueError(f"{name} must be a sequence of ints or a 1-D integer tensor") from exc
    if any(float(o) != float(v) for o, v in zip(out, values)):
        raise ValueError(f"{name} must hold integers, got {list(values)}")
    return out


def check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_rank(rank, m: int, n: int) -> int:
    """A truncation rank of an m x n matrix: an int in 1..min(m, n)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int, got {rank!r}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in 1..min(d_out, d_in) = 1..{min(m, n)}, got {rank}")
    return rank


# -------------------------------------------------------- segmented layouts
def check_segments(num_rows: int, num_adapters: int, seg_lens, adapter_ids) -> tuple[list[int], list[int]]:
    """Validate a segment layout; return (seg_lens, adapter_ids) as int lists."""
    seg_lens = int_list(seg_lens, "seg_lens")
    if any(n < 0 for n in seg_lens):
        raise ValueError(f"seg_lens must be non-negative, got {seg_lens}")
    if sum(seg_lens) != num_rows:
        raise ValueError(f"seg_lens sum to {sum(seg_lens)} but x has {num_rows} rows")
    if adapter_ids is None:
        if len(seg_lens) > num_adapters:
            raise ValueError(
                f"adapter_ids is None, so segment j uses adapter j, but there are {len(seg_lens)} "
                f"segments and only {num_adapters} adapters"
            )
        adapter_ids = list(range(len(seg_lens)))
    else:
        adapter_ids = int_list(adapter_ids, "adapter_ids")
        if len(adapter_ids) != len(seg_lens):
            raise ValueError(f"adapter_ids has {len(adapter_ids)} entries but seg_lens has {len(seg_lens)}")
        bad = [a for a in adapter_ids if not 0 <= a < num_adapters]
        if bad:
            raise ValueError(f"adapter_ids {bad} out of range for a bank of {num_adapters} adapters")
    return seg_lens, adapter_ids


def check_segmented_inputs(x: torch.Tensor, bank: AdapterBank) -> None:
    """x [T, d_in] of the bank's dtype and device."""
    if not isinstance(bank, AdapterBank):
        raise ValueError(f"bank must be a fedlora.AdapterBank, got {type(bank).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D tensor [T, d_in], got {shape}")
    if x.shape[1] != bank.d_in:
        raise ValueError(f"x has {x.shape[1]} features but the bank's d_in is {bank.d_in}")
    if x.dtype != bank.dtype:
        raise ValueError(f"x is {x.dtype} but the bank is {bank.dtype}")
    if x.device != bank.device:
        raise ValueError(f"x is on {x.device} but the bank is on {bank.device}")


def check_factors(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ranks,
                  scalings: torch.Tensor) -> list[int]:
    """Raw packed factors (no AdapterBank) for an in-place add into ``out``; returns the ranks as ints."""
    ranks = check_ranks(ranks)
    if x.dim() != 2 or out.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"out, x, A, B must be 2-D; got {tuple(out.shape)}, {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}"
        )
    if A.shape[0] != sum(ranks) or B.shape[1] != sum(ranks):
        raise ValueError(f"A has {A.shape[0]} rows and B {B.shape[1]} columns but ranks {ranks} sum to {sum(ranks)}")
    if x.shape[1] != A.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but A expects d_in={A.shape[1]}")
    if out.shape != (x.shape[0], B.shape[0]):
        raise ValueError(f"out is {tuple(out.shape)} but x and B give [{x.shape[0]}, {B.shape[0]}]")
    if not (x.dtype == A.dtype == B.dtype):
        raise ValueError(f"x, A, B must share one dtype; got {x.dtype}, {A.dtype}, {B.dtype}")
    if not out.dtype.is_floating_point:
        raise ValueError(f"out must be a floating tensor, got {out.dtype}")
    if len({t.device for t in (out, x, A, B)}) != 1:
        raise ValueError(f"out, x, A, B are on different devices: {out.device}, {x.device}, {A.device}, {B.device}")
    if scalings.shape != (len(ranks),):
        raise ValueError(f"scalings has shape {tuple(scalings.shape)} but there are {len(ranks)} adapters")
    return ranks


# ------------------------------------------------------------- server ops
def as_bank_list(banks) -> tuple[list[AdapterBank], bool]:
    """(list of banks of one layer shape, dtype and device; whether the caller passed a list)."""
    if isinstance(banks, AdapterBank):
        return [banks], False
    if not isinstance(banks, (list, tuple)) or not banks:
        raise ValueError(f"bank must be a fedlora.AdapterBank or a non-empty list of them, got {type(banks).__name__}")
    for i, b in enumerate(banks):
        if not isinstance(b, AdapterBank):
            raise ValueError(f"banks[{i}] is a {type(b).__name__}, not a fedlora.AdapterBank")
    first = banks[0]
    for i, b in enumerate(banks[1:], 1):
        if (b.d_out, b.d_in) != (first.d_out, first.d_in):
            raise ValueError(
                f"banks[{i}] is a {b.d_out}x{b.d_in} layer but banks[0] is {first.d_out}x{first.d_in}: "
                "one batched call takes banks of one layer shape"
            )
        if b.dtype != first.dtype:
            raise ValueError(f"banks[{i}] is {b.dtype} but banks[0] is {first.dtype}")
        if b.device != first.device:
            raise ValueError(f"banks[{i}] is on {b.device} but banks[0] is on {first.device}")
    return list(banks), True


def weight_vector(values, n: int, name: str) -> list[float]:
    """n finite, non-negative per-adapter weights."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    try:
        values = [float(v) for v in values]
    except TypeError as exc:
        raise ValueError(f"{name} must be a sequence of floats or a 1-D tensor") from exc
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but the bank has {n} adapters")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0, got {values}")
    return values


def per_bank_weights(weights, banks: list[AdapterBank], batched: bool) -> list[list[float]]:
    """One weight list per bank from None, one shared sequence, or one row per bank."""
    if weights is None:
        return [[1.0] * b.num_adapters for b in banks]
    per_bank = batched and (
        (isinstance(weights, torch.Tensor) and weights.dim() == 2)
        or (isinstance(weights, (list, tuple)) and len(weights) > 0
            and all(isinstance(w, (list, tuple, torch.Tensor)) for w in weights))
    )
    if per_bank:
        if len(weights) != len(banks):
            raise ValueError(f"weights has {len(weights)} per-bank rows but {len(banks)} banks were given")
        return [weight_vector(w, b.num_adapters, f"weights[{i}]") for i, (w, b) in enumerate(zip(weights, banks))]
    return [weight_vector(weights, b.num_adapters, "weights") for b in banks]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A NaN or Inf anywhere makes the sum non-finite, so one
    reduction (~1 ms for a 2048 x 2700 fp32 factor) settles the usual case; only a sum
    that overflowed on finite entries needs the elementwise test (~50x slower)."""
    return bool(torch.isfinite(t.detach().sum())) or bool(torch.isfinite(t).all())


def check_finite(banks: list[AdapterBank], indices: list[int] | None = None) -> None:
    """ValueError naming the first bank (by its index in ``banks``) whose factors or scalings
    hold NaN or Inf; ``indices``: check only those banks."""
    for i in range(len(banks)) if indices is None else indices:
        b = banks[i]
        for name, t in (("A", b.A), ("B", b.B), ("scalings", b.scalings)):
            if not all_finite(t):
                raise ValueError(f"bank {i}: {name} holds NaN or Inf")
