"""The aggregated LoRA delta and its truncated SVD: fused reconstruction and low-rank SVD over packed banks.

FlexLoRA's server step is  dW = sum_i w_i s_i B_i A_i  followed by a rank-k SVD,
per module. On the packed bank dW = B diag(d) A with d_i = w_i s_i on adapter i's
rank columns, so

- :func:`lora_delta` forms dW as one GEMM over the packed rank axis (one Triton
  launch for a whole list of banks), never the per-client products;
- :func:`lowrank_svd` gets the top-k triplets from the factors themselves
  (exact QR-based, block Krylov to a stated tolerance, or randomized when asked),
  without the m x n matrix unless it is cheaper.

Both are server-side (no autograd): inputs are read under ``torch.no_grad``.

Weights (``weights=``), per adapter: None (all 1), a sequence of floats or a 1-D
tensor of length num_adapters. For a list of banks: None, one such sequence applied
to every bank (all banks then need the same num_adapters), or a list/tuple of per-bank
sequences / a 2-D tensor [L, n] (one row per bank, so banks may differ in clients).
Weights must be finite and >= 0.
"""
from __future__ import annotations

import contextlib
import math

import torch

from fedlora.kernels import lowrank as LR
from fedlora.kernels.reconstruct import reconstruct

from fedlora.bank import AdapterBank

from .checks import all_finite, as_bank_list, check_finite, check_int, check_rank, per_bank_weights

METHODS = ("auto", "factored", "krylov", "randomized", "dense")


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


def _rank_groups(banks: list[AdapterBank]) -> list[list[int]]:
    """Bank indices grouped by total rank: one batched QR/SVD/Krylov run per group (in
    federated rounds all layers of a projection usually share their clients' ranks)."""
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(banks):
        groups.setdefault(b.total_rank, []).append(i)
    return list(groups.values())


def _stacked_factors(banks: list[AdapterBank], weights: list[list[float]], idx: list[int], work: torch.dtype):
    """(B diag(d) [G, m, R], A [G, R, n]) of banks ``idx`` (one total rank R).

    Each factor is copied once: B's stacked copy is scaled in place, A is a view when G = 1.
    """
    scales = torch.stack([_column_scales(banks[i], weights[i], work) for i in idx]).unsqueeze(1)
    if len(idx) == 1:
        return (banks[idx[0]].B.detach().unsqueeze(0).to(work) * scales,
                banks[idx[0]].A.detach().unsqueeze(0).to(work))
    B = torch.stack([banks[i].B.detach() for i in idx]).to(work).mul_(scales)
    A = torch.stack([banks[i].A.detach() for i in idx]).to(work)
    return B, A


def _dense_stack(banks: list[AdapterBank], weights: list[list[float]], idx: list[int], work: torch.dtype,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """dW of banks ``idx`` as [G, m, n], one GEMM per layer and no stacked factor copies.
    ``scratch`` [R, n]: where the scaled A goes (else a fresh tensor: at R x n = 2630 x 1024
    its ~10 MiB are mapped and faulted in anew every call)."""
    Bs = [banks[i].B.detach().to(work) for i in idx]
    if len(idx) == 1 and LR.onednn_gemm(Bs[0]):
        # oneDNN's GEMM (AVX-512): ~13 % faster than MKL's at 1024 x 2696 x 1024; its result is
        # used as it comes (copying 4 MiB into a buffer cost another ~1 %)
        return LR.rows_times(Bs[0], _scaled_A(banks[idx[0]], weights[idx[0]], work, scratch).t())[None]
    first = banks[idx[0]]
    out = torch.empty(len(idx), first.d_out, first.d_in, dtype=work, device=first.device)
    for j, (i, B) in enumerate(zip(idx, Bs)):
        torch.matmul(B, _scaled_A(banks[i], weights[i], work, scratch), out=out[j])
    return out


def _scaled_A(bank: AdapterBank, weights: list[float], work: torch.dtype, scratch: torch.Tensor | None):
    # The scales go on A's rows: a broadcast over rows runs ~2x faster than over columns.
    A, scales = bank.A.detach().to(work), _column_scales(bank, weights, work)[:, None]
    return A * scales if scratch is None else torch.mul(A, scales, out=scratch)


def _check_reconstruction(M: torch.Tensor, banks: list[AdapterBank], idx: list[int]) -> None:
    """ValueError unless the reconstructed dW of banks ``idx`` is finite: naming the bank whose
    inputs hold NaN or Inf, or else saying that their product overflows.

    This is also the input check of the banks behind M: in IEEE arithmetic a NaN or Inf in
    B or A reaches every output entry of its row or column (Inf x 0 = NaN, and a sum with a
    NaN or Inf term is not finite), so a finite M proves finite inputs, reading 4 MiB where
    the factors are ~22 MiB per 1024^2 layer of 100 clients. (Scalings and weights are
    checked before.) That assumes a GEMM that multiplies every term, as MKL, oneDNN,
    OpenBLAS, cuBLAS and torch's own fallback do; reference BLAS before 3.5 skipped terms
    whose right operand is 0. tests/test_lowrank_svd.py checks it on the GEMM in use, also
    where the bad entry meets only zeros.
    """
    if all_finite(M):
        return
    check_finite(banks, idx)
    bad = next(i for j, i in enumerate(idx) if not all_finite(M[j]))
    raise _overflow(f"the aggregated delta of bank {bad}", M.dtype)


def _overflow(what: str, dtype: torch.dtype, cause: str = "") -> ValueError:
    """lowrank_svd's one error for finite inputs whose products are beyond the working dtype's range."""
    return ValueError(f"{what} overflows {dtype}: weights x scalings x factors are too large for it "
                      f"(float64 banks compute in float64){cause}")


def _run_grouped(banks: list[AdapterBank], weights: list[list[float]], work: torch.dtype, fn):
    """fn(layer indices, B diag(d) [G, m, R], A [G, R, n]) -> (U, S, V) per group of banks."""
    results: list = [None] * len(banks)
    for idx in _rank_groups(banks):
        B, A = _stacked_factors(banks, weights, idx, work)
        U, S, V = fn(idx, B, A)
        del B, A
        for j, i in enumerate(idx):
            results[i] = (U[j], S[j], V[j])
    return _restack(results)


def _restack(results: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.stack([r[t] for r in results]) for t in range(3))


# "auto" (bench/NOTES_server.md has the timings): the cheapest method that is exact, or
# exact to ``tol`` (krylov), by a flop model in GEMM-equivalent flops fitted on the
# 2-core dev CPU (Householder QR runs at ~1/3, LAPACK's SVD of an n x n matrix at
# ~30 n^3 GEMM flops):
#   factored  6 (m + n) R^2 + 30 R^3        two compact Householder QRs + the R x R core SVD
#                                          (only while R < min(m, n))
#   dense     2 m n R + 30 m n min(m, n)    reconstruction + the full SVD
#   krylov    LR.krylov_flops at the predicted dimension d = 3 k + 6 b, on the factored
#             operator (2 (m + n) R per product column, b = 32) or on the reconstructed
#             matrix (2 m n R once, then 2 m n per column, b = 16), whichever is cheaper
# The factored/dense pair keeps the measured crossover (R ~ 0.9..0.95 min(m, n) on square
# layers). d = 3k + 6b covers what summed client updates (flat spectra) needed: k = 64,
# 100 clients: 224 (b = 16) .. 320 (b = 32) at 1024^2 and 2048^2; k = 16 at 512^2: ~150;
# k = 8 at 256^2: ~110. A flatter spectrum needs more, and the Krylov run is capped where
# its cost would pass the best exact method's (then that method runs: at most ~2x the
# exact cost, never an approximate answer).
AUTO_SVD_FLOP_CONSTANT = 30.0
AUTO_QR_FLOP_WEIGHT = 3.0
KRYLOV_PREDICTED_DIM = 3
KRYLOV_PREDICTED_STEPS = 6
# Block size per operator (lowrank_svd's block=None): products with the dense matrix are
# cheap, so fewer Krylov columns (smaller blocks: 224 columns at b = 16 against 288..320
# at b = 32 for k = 64, 100 clients) win; products with the factors cost 2 (m + n) R per
# column and stream both factors, so wider blocks (better GEMM efficiency) win there.
KRYLOV_BLOCK = {"dense": 16, "factored": 32}


def _exact_costs(R: int | None, m: int, n: int) -> dict[str, float]:
    """Flops of the exact methods for one layer; R None: a dense matrix input (nothing to reconstruct)."""
    c, short = AUTO_SVD_FLOP_CONSTANT, min(m, n)
    costs = {"dense": (0 if R is None else 2 * m * n * R) + c * m * n * short}
    if R is not None and R < short:
        costs["factored"] = 2 * AUTO_QR_FLOP_WEIGHT * (m + n) * R**2 + c * R**3
    return costs


def _predicted_dim(rank: int, block: int) -> int:
    return KRYLOV_PREDICTED_DIM * rank + KRYLOV_PREDICTED_STEPS * block


def _krylov_options(R: int | None, m: int, n: int, rank: int, block: int | None) -> dict[str, tuple[int, int]]:
    """{operator: (block, predicted dimension)} for the operators krylov can run on."""
    operators = ("dense",) if R is None else ("dense", "factored")
    out = {}
    for operator in operators:
        b = min(block or KRYLOV_BLOCK[operator], min(m, n))
        out[operator] = (b, min(min(m, n), _predicted_dim(rank, b)))
    return out


def _krylov_cost(R: int | None, m: int, n: int, operator: str, dim: int, block: int) -> float:
    """Flops of krylov_svd to dimension ``dim`` on ``operator``, reconstruction included."""
    if operator == "factored":
        return LR.krylov_flops(m, n, dim, 2 * (m + n) * R, block)
    return (0 if R is None else 2 * m * n * R) + LR.krylov_flops(m, n, dim, 2 * m * n, block)


def _auto_method(R: int | None, m: int, n: int, rank: int, block: int | None = None) -> str:
    """"factored", "dense" or "krylov": the cheapest by the flop model above."""
    exact = _exact_costs(R, m, n)
    best_exact = min(exact, key=exact.get)
    krylov = [_krylov_cost(R, m, n, op, d, b) for op, (b, d) in _krylov_options(R, m, n, rank, block).items()
              if d < min(m, n)]
    return "krylov" if krylov and min(krylov) < exact[best_exact] else best_exact


def _krylov_plan(R: int | None, m: int, n: int, rank: int, block: int | None) -> tuple[str, int, int]:
    """(operator "factored" | "dense", block, Krylov dimension cap) for method "krylov".

    The operator is the cheaper one at its predicted dimension; the cap is the largest
    dimension whose Krylov cost stays under the best exact method's cost (at least
    the predicted dimension, at most min(m, n)), so a run that must fall back has cost
    at most about twice the exact method's.
    """
    options = _krylov_options(R, m, n, rank, block)
    operator = min(options, key=lambda op: _krylov_cost(R, m, n, op, options[op][1], options[op][0]))
    b, cap = options[operator]
    budget = min(_exact_costs(R, m, n).values())
    while cap + b <= min(m, n) and _krylov_cost(R, m, n, operator, cap + b, b) <= budget:
        cap += b
    return operator, b, cap


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
    _check_scales_fit(banks, w)
    with torch.no_grad():
        B_cat, A_cat, col_scale, layer_ranks = _packed(banks, w)
        out = reconstruct(B_cat, A_cat, col_scale, layer_ranks, dtype or banks[0].dtype)
        if not torch.isfinite(out).all():
            raise ValueError(f"lora_delta overflows {out.dtype}: weights x scalings x factors are too large for it "
                             "(float64 banks compute and return float64)")
    return out if batched else out[0]


def _check_scales_fit(banks, weights: list[list[float]]) -> None:
    """ValueError when a weight, or a weight times its scaling, is beyond the working dtype (it would be inf)."""
    work = LR.work_dtype(banks[0].dtype)
    limit = torch.finfo(work).max
    for i, (bank, w) in enumerate(zip(banks, weights)):
        for k, (wk, sk) in enumerate(zip(w, bank.scalings.tolist())):
            if not math.isfinite(sk):
                raise ValueError(f"bank {i}: scalings holds NaN or Inf")
            if not (abs(wk) <= limit and abs(wk * sk) <= limit):
                where = f"weights[{i}][{k}]" if len(banks) > 1 else f"weights[{k}]"
                raise ValueError(f"{where} = {wk:g} (times scaling {sk:g}) is beyond {work}'s range "
                                 f"(max {limit:.3g}); weights are finite numbers >= 0 that {work} can hold")


def lowrank_svd(bank, weights=None, rank: int | None = None, method: str = "auto", *, tol: float = 1e-4,
                block: int | None = None, oversample: int = 10, n_iter: int = 2, seed: int = 0,
                info: dict | None = None):
    """Top-``rank`` singular triplets (U [d_out, k], S [k], V [d_in, k]) of lora_delta(bank, weights).

    ``bank``: an AdapterBank, a list of them (outputs gain a leading [L] axis), or a
    dense matrix tensor [m, n] / [L, m, n] (then ``weights`` must be None and
    ``method`` one of "auto", "krylov", "randomized", "dense").

    methods
      auto        the cheapest of "factored", "dense" and "krylov" by a flop model
                  (rule and timings: bench/NOTES_server.md). Never approximate beyond
                  ``tol``: S and the kept product U S V^T equal the exact rank-k
                  truncation's to ``tol`` relative (exactly, to rounding, when it picks
                  factored or dense). Where the stacked rank R reaches min(d_out, d_in)
                  (FlexLoRA rounds of ~100 clients) this is krylov.
      factored    exact, from QR(B diag(d)), QR(A^T) and an SVD of the R x R core;
                  never allocates m x n. Valid while R = sum(ranks) < min(d_out, d_in).
      krylov      block Golub-Kahan-Lanczos with ``block`` columns per step (None: 16 on
                  the dense matrix, 32 on the factors), on the
                  factored operator (products with B diag(d) and A, never the m x n
                  matrix) or on the matrix reconstructed by one GEMM, whichever the flop
                  model says is cheaper; stops when a residual-based estimate of the kept
                  product's relative error is <= ``tol`` (kernels/lowrank.py:krylov_svd).
                  A layer that does not get there within a flop budget (a spectrum so flat
                  past k that the iteration would cost more than an exact SVD, a tol below
                  the working precision) is recomputed by the exact method ("factored" or
                  "dense", the cheaper): the answer is always within ``tol``. The rank-k
                  truncation must itself be well defined: s_k > s_{k+1} (fp32 resolves it
                  to ~1e-7 s_1 / (s_k - s_{k+1}), like a dense fp32 SVD; with s_k = s_{k+1}
                  any of the equally optimal truncations may come back).
      randomized  approximate, only when asked for: Halko-Martinsson-Tropp subspace
                  iteration with ``oversample`` extra columns and ``n_iter`` power
                  iterations (QR between products), on the factored operator (banks) or
                  the dense matrix (tensor input). Its expected spectral error (HMT Cor.
                  10.10 plus the truncation term of Sec. 9.4), p = oversample >= 2, q = n_iter:
                    E||M - U S V^T|| <= s_{k+1} + [(1 + sqrt(k/(p-1))) s_{k+1}^(2q+1)
                                       + e sqrt(k+p)/p (sum_{j>k} s_j^(2(2q+1)))^(1/2)]^(1/(2q+1))
                  which on flat spectra (sums of independent client updates) is far from
                  the truncation: 7..33% relative error at k = 64, p = 10, q = 2 in
                  bench/NOTES_server.md. No tolerance is checked.
      dense       torch.linalg.svd of the reconstructed matrix (the reference).

    Seeds: krylov's start block and randomized's sketch draw from ``seed`` (layer l of
    a batch uses seed + l, so it equals a single call with that seed); the same seed on
    the same device gives bit-identical results. ``info``: a dict to fill with the
    method used and, for krylov, each layer's operator, Krylov dimension, final
    estimate and whether it converged (else the exact fallback ran).

    Computes in fp32 (fp64 banks in fp64); 16-bit factors are upcast. Signs are fixed
    so that the largest-magnitude entry of each U column is positive (V flips with it).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    oversample = check_int(oversample, "oversample", 0)
    n_iter = check_int(n_iter, "n_iter", 0)
    block = None if block is None else check_int(block, "block", 1)
    tol = _check_tol(tol)
    if info is not None and not isinstance(info, dict):
        raise ValueError(f"info must be a dict or None, got {type(info).__name__}")
    info = {} if info is None else info
    if isinstance(bank, torch.Tensor):
        return _lowrank_svd_dense_input(bank, weights, rank, method, tol, block, oversample, n_iter, seed, info)
    banks, batched = as_bank_list(bank)
    m, n = banks[0].d_out, banks[0].d_in
    rank = check_rank(rank, m, n)
    w = per_bank_weights(weights, banks, batched)
    _check_scales_fit(banks, w)
    R_max = max(b.total_rank for b in banks)
    if method == "factored" and R_max >= min(m, n):
        raise ValueError(
            f"method='factored' needs R = sum of ranks < min(d_out, d_in) = {min(m, n)}, but a bank has "
            f"R = {R_max}; use method='dense' or 'krylov', or 'auto' to choose"
        )
    if method == "auto":
        method = _auto_method(R_max, m, n, rank, block)
    if method != "krylov":  # krylov checks each group itself (_krylov_banks)
        check_finite(banks)
    info["method"] = method
    work = LR.work_dtype(banks[0].dtype)
    with torch.no_grad(), LR.ieee_fp32_matmul(), _linalg_errors_named(work):
        if method == "factored":
            U, S, V = _run_grouped(banks, w, work, lambda idx, B, A: LR.factored_svd(B, A, rank))
        elif method == "randomized":
            U, S, V = _run_grouped(banks, w, work, lambda idx, B, A: LR.randomized_svd_factored(
                B, A, rank, oversample, n_iter, _generators(seed, idx, B.device)))
        elif method == "krylov":
            U, S, V, info["krylov"] = _krylov_banks(banks, w, work, rank, tol, block, seed)
        else:
            B_cat, A_cat, col_scale, layer_ranks = _packed(banks, w)
            U, S, V = LR.dense_svd(reconstruct(B_cat, A_cat, col_scale, layer_ranks, work), rank)
    _check_result(U, S, V, work)
    return (U, S, V) if batched else (U[0], S[0], V[0])


@contextlib.contextmanager
def _linalg_errors_named(work: torch.dtype):
    """A LAPACK failure on finite inputs (checked before) means products beyond ``work``'s range:
    a ValueError that says so instead of torch's LinAlgError."""
    try:
        yield
    except torch.linalg.LinAlgError as err:
        raise _overflow("lowrank_svd", work, f"; LAPACK said: {err}") from err


def _check_result(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, work: torch.dtype) -> None:
    """ValueError when the triplets are not finite: finite factors whose products overflow the
    working dtype (the factored operator never forms dW, so nothing earlier can see it)."""
    if not (all_finite(S) and all_finite(U) and all_finite(V)):
        raise _overflow("lowrank_svd", work)


def _check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    return float(tol)


def _krylov_banks(banks: list[AdapterBank], weights: list[list[float]], work: torch.dtype, rank: int, tol: float,
                  block: int, seed: int):
    """Method "krylov" over banks: (U, S, V, per-layer records), one Krylov run per rank group."""
    results: list = [None] * len(banks)
    layers: list = [None] * len(banks)
    m, n = banks[0].d_out, banks[0].d_in
    for idx in _rank_groups(banks):
        R = banks[idx[0]].total_rank
        operator, b, cap = _krylov_plan(R, m, n, rank, block)
        factored_exact = _exact_method(R, m, n) == "factored"
        if operator == "dense":
            # On the CPU one layer at a time (and the scaled A into one scratch): its matrix (4 MiB
            # at 1024^2) stays in cache through the layer's products, where G layers in lockstep
            # stream G of them (1024^2, 4 layers, 100 clients: ~9% less time per call). Elsewhere
            # (CUDA) the group in lockstep: fewer launches.
            device = banks[idx[0]].device
            chunks = [[i] for i in idx] if _dense_krylov_one_layer_at_a_time(device) else [idx]
            scratch = torch.empty(R, n, dtype=work, device=device)
            for chunk in chunks:
                M = _dense_stack(banks, weights, chunk, work, scratch=scratch)
                _check_reconstruction(M, banks, chunk)

                def exact(j: int, chunk=chunk, M=M):  # the cheaper exact method, on what the chunk holds
                    if factored_exact:
                        return LR.factored_svd(*_stacked_factors(banks, weights, [chunk[j]], work), rank)
                    return LR.dense_svd(M[j:j + 1], rank)

                U, S, V = _run_krylov(LR.DenseOperator(M), operator, cap, chunk, rank, tol, b, seed, exact, layers)
                for j, i in enumerate(chunk):
                    results[i] = (U[j], S[j], V[j])
            continue
        check_finite(banks, idx)
        # Views of the banks' factors, the weights applied inside the products; layers in lockstep
        # (their factors are far larger than any cache, and the steps' small calls are shared).
        op = LR.FactoredOperator([banks[i].B.detach().to(work) for i in idx],
                                 [banks[i].A.detach().to(work) for i in idx],
                                 [_column_scales(banks[i], weights[i], work) for i in idx])

        def exact(j: int):  # the cheaper exact method, from the factors
            B, A = _stacked_factors(banks, weights, [idx[j]], work)
            return LR.factored_svd(B, A, rank) if factored_exact else LR.dense_svd(B @ A, rank)

        U, S, V = _run_krylov(op, operator, cap, idx, rank, tol, b, seed, exact, layers)
        for j, i in enumerate(idx):
            results[i] = (U[j], S[j], V[j])
        del op
    return (*_restack(results), layers)


def _dense_krylov_one_layer_at_a_time(device: torch.device) -> bool:
    return device.type == "cpu"


def _exact_method(R: int | None, m: int, n: int) -> str:
    exact = _exact_costs(R, m, n)
    return min(exact, key=exact.get)


def _run_krylov(op, operator: str, cap: int, idx: list[int], rank: int, tol: float, block: int, seed: int, exact,
                layers: list):
    """krylov_svd of one group; layers that do not converge are replaced by ``exact(position)``,
    and ``layers[idx[j]]`` records what happened to each."""
    res = LR.krylov_svd(op, rank, tol=tol, block=block, max_dim=cap, generators=_generators(seed, idx, op.device))
    U, S, V = res.U, res.S, res.V
    for j, layer in enumerate(idx):
        layers[layer] = {"operator": operator, "block": block, "dim": res.dims[j], "estimate": res.estimates[j],
                         "converged": res.converged[j]}
        if not res.converged[j]:
            u, s, v = exact(j)
            U[j], S[j], V[j] = u[0], s[0], v[0]
    return U, S, V


def _lowrank_svd_dense_input(M: torch.Tensor, weights, rank, method, tol, block, oversample, n_iter, seed, info):
    if weights is not None:
        raise ValueError("weights apply to adapter banks; a dense matrix input takes weights=None")
    if M.dim() not in (2, 3):
        raise ValueError(f"a dense matrix input must be [m, n] or [L, m, n], got shape {tuple(M.shape)}")
    if not (M.dtype.is_floating_point and M.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)):
        raise ValueError(f"a dense matrix input must be a float tensor, got {M.dtype}")
    if method == "factored":
        raise ValueError("method='factored' needs an AdapterBank (the factors); for a dense matrix use "
                         "'dense', 'krylov', 'randomized' or 'auto'")
    m, n = M.shape[-2:]
    rank = check_rank(rank, m, n)
    if not all_finite(M):
        raise ValueError("the dense matrix holds NaN or Inf")
    batch = M if M.dim() == 3 else M.unsqueeze(0)
    if method == "auto":
        method = _auto_method(None, m, n, rank, block)
    info["method"] = method
    with torch.no_grad(), LR.ieee_fp32_matmul():
        work = batch.to(LR.work_dtype(batch.dtype))
        if method == "dense":
            U, S, V = LR.dense_svd(work, rank)
        elif method == "krylov":
            info["krylov"] = [None] * work.shape[0]
            _, b, cap = _krylov_plan(None, m, n, rank, block)
            out = []
            for i in range(work.shape[0]):  # one layer at a time, as for banks
                layer = work[i:i + 1]
                out.append(_run_krylov(LR.DenseOperator(layer), "dense", cap, [i], rank, tol, b, seed,
                                       lambda j, layer=layer: LR.dense_svd(layer, rank), info["krylov"]))
            U, S, V = (torch.cat(t) for t in zip(*out))
        else:
            gens = _generators(seed, range(batch.shape[0]), M.device)
            U, S, V = LR.randomized_svd_dense(work, rank, oversample, n_iter, gens)
    return (U, S, V) if M.dim() == 3 else (U[0], S[0], V[0])
