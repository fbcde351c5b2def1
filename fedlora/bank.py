"""The packed adapter bank: n LoRA adapters of ranks r_1..r_n on one linear layer.

    A [R, d_in]   rows    off_i .. off_i + r_i are adapter i's A   (peft: lora_A.weight)
    B [d_out, R]  columns off_i .. off_i + r_i are adapter i's B   (peft: lora_B.weight)
    R = sum(r_i), offsets = exclusive cumsum of ranks, scalings[i] = alpha_i / r_i (or rsLoRA)

A and B are the leaf parameters, so one optimizer over the bank trains every
adapter; each adapter only ever receives gradient from its own segments.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_ranks(ranks) -> list[int]:
    """Adapter ranks as a list of ints: non-empty, each an integer >= 1 (the package's one rank check)."""
    try:
        values = list(ranks)
    except TypeError:
        raise ValueError(f"ranks must be a sequence of integers, got {type(ranks).__name__}") from None
    if not values:
        raise ValueError("ranks is empty: an AdapterBank needs at least one adapter")
    def as_rank(r):
        try:  # ints, numpy ints, 0-d integer tensors; never floats or bools
            return None if isinstance(r, bool) else operator.index(r)
        except TypeError:
            return None

    out = [as_rank(r) for r in values]
    if any(r is None or r < 1 for r in out):
        raise ValueError(f"every adapter needs rank >= 1, got ranks {values} (ranks must all be >= 1 integers)")
    return out


def _as_float_list(values, n: int, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        if values.dim() > 1:
            raise ValueError(f"{name} must be a scalar or 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    if isinstance(values, (int, float)):
        values = [float(values)] * n
    values = [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but the bank has {n} adapters")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    return values


class AdapterBank(nn.Module):
    """n LoRA adapters of possibly different ranks, packed for the fedlora kernels."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, ranks: Sequence[int], scalings=1.0):
        super().__init__()
        ranks = check_ranks(ranks)
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"A must be [R, d_in] and B [d_out, R]; got A {tuple(A.shape)}, B {tuple(B.shape)}")
        total = sum(ranks)
        if A.shape[0] != total or B.shape[1] != total:
            raise ValueError(
                f"A has {A.shape[0]} rows and B has {B.shape[1]} columns, but ranks {ranks} sum to R={total}"
            )
        if A.dtype != B.dtype or A.dtype not in _DTYPES:
            raise ValueError(f"A and B must share one floating dtype of {_DTYPES}; got {A.dtype} and {B.dtype}")
        if A.device != B.device:
            raise ValueError(f"A is on {A.device} but B is on {B.device}")
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        self._ranks = tuple(ranks)
        scal = torch.tensor(_as_float_list(scalings, len(ranks), "scalings"), dtype=torch.float32)
        self.register_buffer("scalings", scal.to(A.device))

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_factors(cls, factors, scalings=1.0) -> AdapterBank:
        """Pack ``factors`` = [(A_i [r_i, d_in], B_i [d_out, r_i]), ...]."""
        factors = list(factors)
        if not factors:
            raise ValueError("factors is empty: an AdapterBank needs at least one (A, B) pair")
        for i, pair in enumerate(factors):
            if len(pair) != 2:
                raise ValueError(f"factors[{i}] must be an (A, B) pair")
            a, b = pair
            if a.dim() != 2 or b.dim() != 2:
                raise ValueError(f"factors[{i}]: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
            if a.shape[0] != b.shape[1]:
                raise ValueError(f"factors[{i}]: A has rank {a.shape[0]} but B has rank {b.shape[1]}")
            if a.shape[1] != factors[0][0].shape[1] or b.shape[0] != factors[0][1].shape[0]:
                raise ValueError(
                    f"factors[{i}] is for a {b.shape[0]}x{a.shape[1]} layer but factors[0] for "
                    f"{factors[0][1].shape[0]}x{factors[0][0].shape[1]}"
                )
        ranks = [a.shape[0] for a, _ in factors]
        A = torch.cat([a.detach() for a, _ in factors], dim=0)
        B = torch.cat([b.detach() for _, b in factors], dim=1)
        return cls(A, B, ranks, scalings)

    @classmethod
    def create(cls, d_in: int, d_out: int, ranks: Sequence[int], alphas=None, *, use_rslora: bool = False,
               init: str = "peft", dtype=torch.float32, device=None, generator=None) -> AdapterBank:
        """A new bank with PEFT's initialisation (A Kaiming-uniform, B zero).

        ``alphas`` defaults to each rank (scaling 1); ``init="gaussian"`` draws both
        factors from N(0, 1/d) instead (useful when B must not start at zero).
        """
        ranks = check_ranks(ranks)
        alphas = ranks if alphas is None else _as_float_list(alphas, len(ranks), "alphas")
        scalings = [lora_scaling(a, r, use_rslora) for a, r in zip(alphas, ranks)]
        total = sum(ranks)
        A = torch.empty(total, d_in, dtype=dtype, device=device)
        B = torch.empty(d_out, total, dtype=dtype, device=device)
        if init == "peft":
            # Kaiming-uniform(a=sqrt(5)) on each adapter's [r_i, d_in] block has the
            # bound 1/sqrt(d_in) for every block, so the packed draw is the same law.
            bound = 1.0 / math.sqrt(d_in)
            A.uniform_(-bound, bound, generator=generator)
            B.zero_()
        elif init == "gaussian":
            A.normal_(0.0, 1.0 / math.sqrt(d_in), generator=generator)
            B.normal_(0.0, 1.0 / math.sqrt(total), generator=generator)
        else:
            raise ValueError(f"init must be 'peft' or 'gaussian', got {init!r}")
        return cls(A, B, ranks, scalings)

    def _apply(self, fn, recurse=True):
        # .to(float16) must not round the scalings: they stay fp32 and only follow the device.
        scalings = self.scalings
        super()._apply(fn, recurse)
        self.scalings = scalings.to(self.scalings.device)
        return self

    # --------------------------------------------------------------- structure
    @property
    def ranks(self) -> list[int]:
        return list(self._ranks)

    @property
    def offsets(self) -> list[int]:
        """Exclusive cumulative sum of the ranks: adapter i starts at row offsets[i] of A."""
        out, acc = [], 0
        for r in self._ranks:
            out.append(acc)
            acc += r
        return out

    @property
    def num_adapters(self) -> int:
        return len(self._ranks)

    @property
    def total_rank(self) -> int:
        return sum(self._ranks)

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_i [r_i, d_in], B_i [d_out, r_i]) as views of the packed parameters."""
        if not 0 <= i < self.num_adapters:
            raise IndexError(f"adapter index {i} out of range for a bank of {self.num_adapters}")
        start = self.offsets[i]
        stop = start + self._ranks[i]
        return self.A[start:stop], self.B[:, start:stop]

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, ranks={self.ranks}, dtype={self.dtype}"
