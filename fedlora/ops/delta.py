"""The aggregated LoRA delta and its truncated SVD: fused reconstruction and low-rank SVD over packed banks.

FlexLoRA's server step is  dW = sum_i w_i s_i B_i A_i  followed by a rank-k SVD,
per module. On the packed bank dW = B diag(d) A with d_i = w_i s_i on adapter i's
rank columns, so

- :func:`lora_delta` forms dW as one GEMM over the packed rank axis (one Triton
  launch for a whole list of banks), never the per-client products;
- :func:`lowrank_svd` gets the top-k triplets from the factors themselves
  (exact QR-based, or randomized), without the m x n matrix unless it must.

Both are server-side (no autograd): inputs are read under ``torch.no_grad``.

Weights (``weights=``), per adapter: None (all 1), a sequence of floats or a 1-D
tensor of length num_adapters. For a list of banks: None, one such sequence applied
to every bank (all banks then need the same num_adapters), or a list/tuple of per-bank
sequences / a 2-D tensor [L, n] (one row per bank, so banks may differ in clients).
Weights must be finite and >= 0.
"""
from __future__ import annotations


import torch

from fedlora.kernels import lowrank as LR
from fedlora.kernels.reconstruct import reconstruct

from fedlora.bank import AdapterBank

from .checks import as_bank_list, check_finite, check_int, check_rank, per_bank_weights

METHODS = ("auto", "factored", "randomized", "dense")


# --------------------------------------------------------------------- pieces
def _column_scales(bank: AdapterBank, weights: list[float], dtype: torch.dtype) -> torch.Tensor:
    """[R]: w_i s_i repeated over adapter i's rank columns."""
    d = bank.scalings.detach().to(dtype) * torch.tensor(weights, dtype=dtype, device=bank.device)
    return torch.repeat_interleave(d, torch.tensor(bank.ranks, device=bank.device))


def _packed(banks: list[AdapterBank], weights: list[list[float]]):
    """(B_cat [m, R_tot], A_cat [R_tot, n], col_scale [R_tot], per-bank R); col_scale is fp32 (fp64 banks: fp64)."""
    work = LR.work_dtype(banks[0].dtype)
    scales = [_column_scales(b, w, work) for b, w in zip(banks, weights)]
    if len(banks) == 1:
        return banks[0].B.detach(), banks[0].A.detach(), scales[0], [banks[0].total_rank]
    B_cat = torch.cat([b.B.detach() for b in banks], dim=1)
    A_cat = torch.cat([b.A.detach() for b in banks], dim=0)
    return B_cat, A_cat, torch.cat(scales), [b.total_rank for b in banks]


def _run_grouped(banks: list[AdapterBank], weights: list[list[float]], work: torch.dtype, fn):
    """fn(layer indices, B diag(d) [G, m, R], A [G, R, n]) -> (U, S, V) per group of banks.

    Banks with the same total rank stack into one batched QR/SVD (in federated rounds
    all layers of a projection usually share their clients' ranks). Each factor is
    copied once per group: B's stacked copy is scaled in place, A is a view when G = 1.
    """
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(banks):
        groups.setdefault(b.total_rank, []).append(i)
    results: list = [None] * len(banks)
    for idx in groups.values():
        scales = torch.stack([_column_scales(banks[i], weights[i], work) for i in idx]).unsqueeze(1)
        if len(idx) == 1:
            B = banks[idx[0]].B.detach().unsqueeze(0).to(work) * scales
            A = banks[idx[0]].A.detach().unsqueeze(0).to(work)
        else:
            B = torch.stack([banks[i].B.detach() for i in idx]).to(work).mul_(scales)
            A = torch.stack([banks[i].A.detach() for i in idx]).to(work)
        U, S, V = fn(idx, B, A)
        del B, A
        for j, i in enumerate(idx):
            results[i] = (U[j], S[j], V[j])
    return tuple(torch.stack([r[t] for r in results]) for t in range(3))


# "auto" (bench/NOTES_server.md has the timings). Flop models, fitted on the 2-core dev CPU:
#   factored  2 (m + n) R^2 + c R^3      two compact Householder QRs + the R x R core SVD
#   dense     2 m n R + c m n min(m, n)   reconstruction + the full SVD
# with c = 10 fitting the measured square ratios (1024 x 1024: dense / factored = 1.6 at
# R = 0.75 min, 1.2 at 0.85, 1.03 at 0.94; crossover ~0.95 min). Oblong layers favour
# factored more (1024 x 2752: 8.6x at R = 0.62 min).
# Past R >= min(m, n) only dense or randomized remain; the randomized sketch is taken when
# it is small (k + p <= min(m, n) / 8; at R = 1536, m = n = 1024 it was 3.8x faster than the
# full SVD at k + p = 74, 2.6x at 128, only 1.2x at 256, not worth its approximation),
# on whichever operator needs fewer flops: factored products cost (m + n) R per column,
# dense ones m n per column plus the one-off reconstruction m n R.
AUTO_SVD_FLOP_CONSTANT = 10.0
AUTO_RANDOMIZED_MAX_SKETCH = 0.125


def _auto_method(R: int, m: int, n: int, rank: int, oversample: int, n_iter: int) -> str:
    c, short = AUTO_SVD_FLOP_CONSTANT, min(m, n)
    if R < short:
        factored = 2 * (m + n) * R**2 + c * R**3
        dense = 2 * m * n * R + c * m * n * short
        return "factored" if factored < dense else "dense"
    if rank + oversample > AUTO_RANDOMIZED_MAX_SKETCH * short:
        return "dense"
    products = 2 * n_iter + 2
    return "randomized" if products * (m + n) * R <= m * n * R / (rank + oversample) + products * m * n \
        else "randomized_dense"


def _generators(seed: int, layers, device: torch.device) -> list[torch.Generator]:
    # Layer l of a batch sketches with seed + l: batched equals looped, whatever the grouping.
    return [torch.Generator(device=device).manual_seed(seed + layer) for layer in layers]


# --------------------------------------------------------------------- public
def lora_delta(bank, weights=None, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dW = sum_i w_i s_i B_i A_i, fused: B's rank columns scaled in-kernel, times A.

    ``bank``: an AdapterBank -> [d_out, d_in]; a list of banks of one layer shape
    (each with its own ranks) -> [L, d_out, d_in] from a single kernel launch.
    ``weights``: see the module docstring. Accumulates in fp32 (fp64 for fp64
    banks); the result has ``dtype`` (default: the banks' dtype). Not differentiable.
    """
    banks, batched = as_bank_list(bank)
    w = per_bank_weights(weights, banks, batched)
    check_finite(banks)
    with torch.no_grad():
        B_cat, A_cat, col_scale, layer_ranks = _packed(banks, w)
        out = reconstruct(B_cat, A_cat, col_scale, layer_ranks, dtype or banks[0].dtype)
    return out if batched else out[0]


def lowrank_svd(bank, weights=None, rank: int | None = None, method: str = "auto", *,
                oversample: int = 10, n_iter: int = 2, seed: int = 0):
    """Top-``rank`` singular triplets (U [d_out, k], S [k], V [d_in, k]) of lora_delta(bank, weights).

    ``bank``: an AdapterBank, a list of them (outputs gain a leading [L] axis), or a
    dense matrix tensor [m, n] / [L, m, n] (then ``weights`` must be None and
    ``method`` one of "auto", "randomized", "dense").

    methods
      factored    exact, from QR(B diag(d)), QR(A^T) and an SVD of the R x R core;
                  never allocates m x n. Valid while R = sum(ranks) < min(d_out, d_in).
      randomized  Halko-Martinsson-Tropp subspace iteration with ``oversample`` extra
                  columns and ``n_iter`` power iterations (QR between products), on the
                  factored operator (banks) or the dense matrix (tensor input). Seeded:
                  the same ``seed`` on the same device gives bit-identical results; layer l
                  of a batch uses seed + l, so it equals a single call with that seed.
                  Expected spectral error (HMT Cor. 10.10 plus the truncation term of
                  Sec. 9.4), with p = oversample >= 2, q = n_iter:
                    E||M - U S V^T|| <= s_{k+1} + [(1 + sqrt(k/(p-1))) s_{k+1}^(2q+1)
                                       + e sqrt(k+p)/p (sum_{j>k} s_j^(2(2q+1)))^(1/2)]^(1/(2q+1))
      dense       torch.linalg.svd of the reconstructed matrix (the reference).
      auto        exact unless R >= min(d_out, d_in): below it, factored or dense, whichever
                  a measured flop model says is cheaper (factored up to R ~ 0.95 min(m, n) for
                  square layers, further for oblong ones); at or above it, randomized when
                  rank + oversample <= min(d_out, d_in) / 8 (on the factored operator or the
                  reconstructed matrix, whichever costs fewer flops), else dense. For a dense
                  matrix input: randomized under the same sketch-size condition, else dense.
                  Rule and timings: bench/NOTES_server.md.

    Computes in fp32 (fp64 banks in fp64); 16-bit factors are upcast. Signs are fixed
    so that the largest-magnitude entry of each U column is positive (V flips with it).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    oversample = check_int(oversample, "oversample", 0)
    n_iter = check_int(n_iter, "n_iter", 0)
    if isinstance(bank, torch.Tensor):
        return _lowrank_svd_dense_input(bank, weights, rank, method, oversample, n_iter, seed)
    banks, batched = as_bank_list(bank)
    m, n = banks[0].d_out, banks[0].d_in
    rank = check_rank(rank, m, n)
    w = per_bank_weights(weights, banks, batched)
    check_finite(banks)
    R_max = max(b.total_rank for b in banks)
    if method == "factored" and R_max >= min(m, n):
        raise ValueError(
            f"method='factored' needs R = sum of ranks < min(d_out, d_in) = {min(m, n)}, but a bank has "
            f"R = {R_max}; use method='dense' (exact) or 'randomized', or 'auto' to choose"
        )
    if method == "auto":
        method = _auto_method(R_max, m, n, rank, oversample, n_iter)
    work = LR.work_dtype(banks[0].dtype)
    with torch.no_grad():
        if method in ("factored", "randomized"):
            if method == "factored":
                U, S, V = _run_grouped(banks, w, work, lambda idx, B, A: LR.factored_svd(B, A, rank))
            else:
                U, S, V = _run_grouped(banks, w, work, lambda idx, B, A: LR.randomized_svd_factored(
                    B, A, rank, oversample, n_iter, _generators(seed, idx, B.device)))
        else:
            B_cat, A_cat, col_scale, layer_ranks = _packed(banks, w)
            dense = reconstruct(B_cat, A_cat, col_scale, layer_ranks, work)
            if method == "dense":
                U, S, V = LR.dense_svd(dense, rank)
            else:  # "randomized_dense", chosen by auto
                gens = _generators(seed, range(len(banks)), dense.device)
                U, S, V = LR.randomized_svd_dense(dense, rank, oversample, n_iter, gens)
    return (U, S, V) if batched else (U[0], S[0], V[0])


def _lowrank_svd_dense_input(M: torch.Tensor, weights, rank, method, oversample, n_iter, seed):
    if weights is not None:
        raise ValueError("weights apply to adapter banks; a dense matrix input takes weights=None")
    if M.dim() not in (2, 3):
        raise ValueError(f"a dense matrix input must be [m, n] or [L, m, n], got shape {tuple(M.shape)}")
    if not (M.dtype.is_floating_point and M.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)):
        raise ValueError(f"a dense matrix input must be a float tensor, got {M.dtype}")
    if method == "factored":
        raise ValueError("method='factored' needs an AdapterBank (the factors); for a dense matrix use "
                         "'dense', 'randomized' or 'auto'")
    m, n = M.shape[-2:]
    rank = check_rank(rank, m, n)
    if not torch.isfinite(M).all():
        raise ValueError("the dense matrix holds NaN or Inf")
    batch = M if M.dim() == 3 else M.unsqueeze(0)
    if method == "auto":
        method = "dense" if rank + oversample > AUTO_RANDOMIZED_MAX_SKETCH * min(m, n) else "randomized"
    with torch.no_grad():
        if method == "dense":
            U, S, V = LR.dense_svd(batch, rank)
        else:
            gens = _generators(seed, range(batch.shape[0]), M.device)
            U, S, V = LR.randomized_svd_dense(batch, rank, oversample, n_iter, gens)
    return (U, S, V) if M.dim() == 3 else (U[0], S[0], V[0])
