"""Segmented multi-rank LoRA: fedlora against the two usual ways of doing it.

One batch of T tokens is cut into n contiguous segments (one per client);
segment i goes through adapter i of rank r_i (ranks mixed, 4..64, seeded) with
scaling alpha / r_i. Variants, each timed for the forward alone (under no_grad)
and for forward + backward (dx, dA, dB via autograd.grad with a fixed dY):

  peft_loop   role=baseline  PEFT's mixed-batch way: a Python loop over segments,
                             F.linear(F.linear(x_i, A_i), B_i) * s_i, one leaf
                             parameter pair per adapter, outputs concatenated.
  padded_bmm  role=candidate vLLM-style layout: every adapter padded to the
                             largest rank (A [n, r_max, d_in], B [n, d_out, r_max],
                             zeros past r_i) and every segment padded with zero
                             tokens to the longest segment, so the whole batch is
                             two torch.bmm calls on [n, L_max, *]. Per-segment
                             padding, not a per-token gather: a per-token gather
                             of A would materialize [T, r_max, d_in]. The padded
                             tensors are the leaf parameters (their padding gets
                             exactly zero gradient), the scaling multiplies the
                             narrow [n, L, r_max] intermediate, and the scatter /
                             gather of rows uses index_copy / index_select with
                             indices built once per batch layout, outside timing.
  fedlora     role=candidate fedlora.ops.segmented_lora on the packed AdapterBank.
  base_gemm   role=floor     the frozen base layer alone: y = x W^T (forward),
                             plus dx = dY W (forward + backward).

Each benchmark group is one (mode, shape) with all four variants; bench/report.py
turns the JSON into speedups vs the baseline and fractions of the floor.
Before timing, each variant's output (and dx, dA, dB) is checked against a
float64 reference computed once per shape from the same random inputs.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from fedlora import AdapterBank
from fedlora.ops import segmented_lora

from .conftest import DEVICE, DTYPE, SHAPE_SET, device_name, sync

# (T tokens, n adapters); layers are square d x d.
SHAPES = {
    "gpu": {"d": 4096, "cases": [(T, n) for T in (2048, 8192) for n in (8, 32, 64)]},
    "cpu": {"d": 512, "cases": [(T, n) for T in (512, 1024) for n in (8, 16)]},
}[SHAPE_SET]
RANK_RANGE = (4, 64)
LORA_ALPHA = 16.0  # one alpha for all, as PEFT configs usually have: scalings differ per rank
SEG_IMBALANCE = (0.5, 1.5)  # segment i gets a share of T drawn uniformly in this range, normalised
MODES = ("fwd", "fwd_bwd")
VARIANTS = ("peft_loop", "padded_bmm", "fedlora", "base_gemm")
ROLES = {"peft_loop": "baseline", "padded_bmm": "candidate", "fedlora": "candidate", "base_gemm": "floor"}
# Relative Frobenius error vs the float64 reference (bf16: 8 mantissa bits and
# per-segment sums over hundreds of tokens).
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
if DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
    REL_TOL[torch.float32] = 2e-3


# ------------------------------------------------------------------- the case
def split_tokens(T: int, n: int, rng: random.Random) -> list[int]:
    """n segment lengths >= 1 summing to T, moderately unequal (largest remainder rounding)."""
    shares = [rng.uniform(*SEG_IMBALANCE) for _ in range(n)]
    spare = T - n
    exact = [spare * s / sum(shares) for s in shares]
    lens = [1 + math.floor(e) for e in exact]
    by_remainder = sorted(range(n), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    for i in by_remainder[: T - sum(lens)]:
        lens[i] += 1
    return lens


@dataclass
class Case:
    T: int
    d: int
    n: int
    ranks: list[int]
    seg_lens: list[int]
    x: torch.Tensor
    dy: torch.Tensor
    W: torch.Tensor
    bank: AdapterBank
    refs: dict = field(default_factory=dict)

    @property
    def scalings(self) -> list[float]:
        return self.bank.scalings.tolist()

    def info(self) -> dict:
        r_max, n_tok_pad = max(self.ranks), self.n * max(self.seg_lens)
        return {
            "T": self.T, "d_in": self.d, "d_out": self.d, "n_adapters": self.n,
            "ranks": self.ranks, "total_rank": sum(self.ranks), "max_rank": r_max,
            "seg_lens": self.seg_lens,
            "dtype": str(self.x.dtype).removeprefix("torch."),
            "device": str(self.x.device), "device_name": device_name(self.x.device),
            # what the padded layout wastes: multiply-adds it does / the ones LoRA needs
            "padded_bmm_work_ratio": round(n_tok_pad * r_max / sum(r * s for r, s in zip(self.ranks, self.seg_lens)), 3),
        }


def layout(T: int, n: int) -> tuple[list[int], list[int]]:
    """The (ranks, seg_lens) of shape (T, n): seeded, so bench.roofline models the same batch."""
    rng = random.Random(1000 * T + n)
    ranks = [rng.randint(*RANK_RANGE) for _ in range(n)]
    return ranks, split_tokens(T, n, rng)


def make_case(T: int, n: int, d: int) -> Case:
    seed = 1000 * T + n  # a fixed, distinct seed per shape
    ranks, seg_lens = layout(T, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, std=1.0):
        # Drawn on the CPU so CPU and GPU runs of one shape see the same numbers.
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE, DTYPE)

    cpu = AdapterBank.create(d, d, ranks, alphas=[LORA_ALPHA] * n, init="gaussian", generator=gen)
    # Factors drawn in fp32 on the CPU (same numbers on every device), then cast; scalings stay fp32.
    bank = AdapterBank(cpu.A.detach().to(DEVICE, DTYPE), cpu.B.detach().to(DEVICE, DTYPE), ranks, cpu.scalings)
    return Case(T, d, n, ranks, seg_lens, x=randn(T, d), dy=randn(T, d), W=randn(d, d, std=d**-0.5), bank=bank)


# ------------------------------------------------------------------- variants
class PeftLoop:
    def __init__(self, case: Case):
        pairs = [case.bank.factors(i) for i in range(case.n)]
        self.A = [a.detach().clone().requires_grad_() for a, _ in pairs]
        self.B = [b.detach().clone().requires_grad_() for _, b in pairs]
        self.scalings = case.scalings
        self.seg_lens = case.seg_lens
        self.params = [*self.A, *self.B]

    def __call__(self, x):
        outs, start = [], 0
        for i, length in enumerate(self.seg_lens):
            xi = x[start:start + length]
            outs.append(F.linear(F.linear(xi, self.A[i]), self.B[i]) * self.scalings[i])
            start += length
        return torch.cat(outs)

    def packed_grads(self, grads):
        n = len(self.A)
        return torch.cat(grads[:n], dim=0), torch.cat(grads[n:], dim=1)


class PaddedBmm:
    def __init__(self, case: Case):
        n, d, r_max = case.n, case.d, max(case.ranks)
        self.ranks = case.ranks
        A = torch.zeros(n, r_max, d, device=DEVICE, dtype=DTYPE)
        B = torch.zeros(n, d, r_max, device=DEVICE, dtype=DTYPE)
        for i in range(n):
            a, b = case.bank.factors(i)
            A[i, : a.shape[0]] = a.detach()
            B[i, :, : b.shape[1]] = b.detach()
        self.A, self.B = A.requires_grad_(), B.requires_grad_()
        self.params = [self.A, self.B]
        self.L = max(case.seg_lens)
        # row t of x sits at slot (segment i, t - start_i) of the [n, L] grid
        slots = []
        for i, length in enumerate(case.seg_lens):
            slots.extend(range(i * self.L, i * self.L + length))
        self.slots = torch.tensor(slots, device=DEVICE)
        self.scale = torch.tensor(case.scalings, device=DEVICE, dtype=DTYPE).view(n, 1, 1)

    def __call__(self, x):
        n, d_in, d_out = self.A.shape[0], self.A.shape[2], self.B.shape[1]
        xp = x.new_zeros(n * self.L, d_in).index_copy(0, self.slots, x).view(n, self.L, d_in)
        h = torch.bmm(xp, self.A.transpose(1, 2)) * self.scale  # [n, L, r_max]
        yp = torch.bmm(h, self.B.transpose(1, 2))  # [n, L, d_out]
        return yp.view(n * self.L, d_out).index_select(0, self.slots)

    def packed_grads(self, grads):
        dA, dB = grads
        return (
            torch.cat([dA[i, :r] for i, r in enumerate(self.ranks)], dim=0),
            torch.cat([dB[i, :, :r] for i, r in enumerate(self.ranks)], dim=1),
        )


class Fedlora:
    def __init__(self, case: Case):
        b = case.bank
        self.bank = AdapterBank(b.A, b.B, b.ranks, b.scalings)  # its own leaves
        self.seg_lens = case.seg_lens
        self.params = [self.bank.A, self.bank.B]

    def __call__(self, x):
        return segmented_lora(x, self.bank, self.seg_lens)

    def packed_grads(self, grads):
        return grads[0], grads[1]


LORA_VARIANTS = {"peft_loop": PeftLoop, "padded_bmm": PaddedBmm, "fedlora": Fedlora}


# ------------------------------------------------------------ reference/check
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm()).item()


def references(case: Case) -> dict:
    """float64 y, dx, dA, dB of the LoRA delta and y, dx of the base layer."""
    if not case.refs:
        x = case.x.double().requires_grad_()
        A = case.bank.A.detach().double().requires_grad_()
        B = case.bank.B.detach().double().requires_grad_()
        dy = case.dy.double()
        outs, start = [], 0
        for i, (r, off, length) in enumerate(zip(case.ranks, case.bank.offsets, case.seg_lens)):
            outs.append(case.scalings[i] * (x[start:start + length] @ A[off:off + r].t() @ B[:, off:off + r].t()))
            start += length
        y = torch.cat(outs)
        dx, dA, dB = torch.autograd.grad(y, [x, A, B], dy)
        W = case.W.double()
        case.refs = {
            "lora": {"y": y.detach(), "dx": dx, "dA": dA, "dB": dB},
            "base": {"y": case.x.double() @ W.t(), "dx": dy @ W},
        }
    return case.refs


def check(name: str, got: dict, ref: dict) -> dict:
    errs = {k: rel_err(v, ref[k]) for k, v in got.items()}
    tol = REL_TOL[DTYPE]
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{name} disagrees with the float64 reference: rel errors {bad} > {tol}"
    return {k: float(f"{e:.3g}") for k, e in errs.items()}


# ---------------------------------------------------------- timed callables
def lora_runner(variant: str, case: Case, mode: str):
    """(run, results): run() is what gets timed; results(run()) names its outputs
    in the packed layout for the check (repacking per-adapter grads is not timed)."""
    impl = LORA_VARIANTS[variant](case)
    x, dy = case.x, case.dy
    if mode == "fwd":
        def run():
            with torch.no_grad():
                y = impl(x)
            sync()
            return y
        return run, lambda y: {"y": y}

    xg = x.detach().clone().requires_grad_()
    inputs = [xg, *impl.params]

    def run():
        y = impl(xg)
        grads = torch.autograd.grad(y, inputs, dy)
        sync()
        return y, grads

    def results(out):
        y, (dx, *dparams) = out
        dA, dB = impl.packed_grads(dparams)
        return {"y": y, "dx": dx, "dA": dA, "dB": dB}
    return run, results


def base_runner(case: Case, mode: str):
    x, W, dy = case.x, case.W, case.dy

    def run():
        with torch.no_grad():
            out = {"y": F.linear(x, W)}
            if mode == "fwd_bwd":
                out["dx"] = dy @ W  # the frozen base needs no dW
        sync()
        return out
    return run, lambda out: out


# ----------------------------------------------------------------- benchmarks
def _params():
    # shape outermost so one shape's tensors and float64 references are built once
    out = []
    for T, n in SHAPES["cases"]:
        for mode in MODES:
            for variant in VARIANTS:
                out.append(pytest.param(T, n, mode, variant, id=f"T{T}-n{n}-{mode}-{variant}"))
    return out


_CASE: dict = {}


def get_case(T: int, n: int) -> Case:
    key = (T, n)
    if key not in _CASE:
        _CASE.clear()  # keep one shape's tensors alive at a time
        _CASE[key] = make_case(T, n, SHAPES["d"])
    return _CASE[key]


@pytest.mark.parametrize("T, n, mode, variant", _params())
def test_segmented_lora(benchmark, T, n, mode, variant):
    case = get_case(T, n)
    if variant == "base_gemm":
        (run, results), ref = base_runner(case, mode), references(case)["base"]
    else:
        (run, results), ref = lora_runner(variant, case, mode), references(case)["lora"]
    errs = check(variant, results(run()), ref)  # the first call also warms up (Triton autotuning)
    run()
    dtype = str(DTYPE).removeprefix("torch.")
    benchmark.group = f"segmented_lora {mode} T={T} d={case.d} n={n} {dtype}"
    benchmark.extra_info.update(
        {"variant": variant, "role": ROLES[variant], "mode": mode, "rel_err": errs, **case.info()}
    )
    benchmark(run)
