"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024, arXiv 2402.11505).

Per module the server forms the weighted sum of the clients' full-size updates
and hands every client the best approximation of it at the client's own rank:

    dW = sum_k p_k s_k B_k A_k                    (p_k = n_k / sum_j n_j)
    dW ~ U S V^T  (top-K SVD),  client k gets  s_k B A = U_r S_r V_r^T,  r = r_k

Computed with fedlora's ops: the clients' factors are packed into an
AdapterBank and ``lowrank_svd`` factorises dW without forming it while the
total rank is below the layer's size (QR of the packed factors + a small SVD).

State: per module the top-K singular triplets (U [d_out, K], S [K], V [d_in, K]),
K = ``max_rank`` if given, else the module's largest rank in the federation (the
global rank ``init_global(rank=..., module_ranks=...)`` sets: ``make_strategy``
passes the largest of every client's rank, sampled this round or not) or, above
it, the largest among the round's accepted clients; never more than the round's
total rank or min(d_out, d_in). So every client, also one of a larger rank than
any the round sampled, starts from its exact best rank-r_k approximation of dW
(FlexLoRA's public code keeps dW whole for the same reason), and a 7B-shaped
model keeps K (d_out + d_in + 1) numbers per module instead of d_out d_in.
``max_rank`` caps K (clients above it get the K triplets plus fresh directions).
``global_delta(name)`` materialises U S V^T when asked.

Split of the singular values (``sv_split``):
    "sqrt" (default)  A = sqrt(S_r) V_r^T / sqrt(s),  B = U_r sqrt(S_r) / sqrt(s)
                      balanced factors, ||A|| = ||B||, the usual choice for training on.
    "B"               A = V_r^T,  B = U_r S_r / s  (what FlexLoRA's public code does).
A client asking for more rank than K gets the K triplets plus rows of a fresh
seeded lora_A and zero columns of B, so its product is still U_K S_K V_K^T.
SVD method (``svd_method``):
    "auto" (default)  lowrank_svd's cheapest method that is exact to its tol: the exact
                      factored or dense SVD where those are cheapest, block Krylov where
                      the round's total rank reaches the layer's size (FlexLoRA's regime of
                      ~100 clients), which matches the exact top-K to 1e-4 relative (S and
                      U_K S_K V_K^T; a layer it cannot certify is recomputed exactly) in
                      4-12x less server time than the dense SVD (bench/NOTES_server.md).
    "exact"           lowrank_svd's "factored" while the round's total rank is below
                      min(d_out, d_in), "dense" otherwise: the truncation to fp32 rounding,
                      what FlexLoRA's public code computes.
    "randomized"      trades accuracy for speed, no tolerance checked.
Why "auto" is the default: 1e-4 relative on the kept product is far below what one more
client or one more local step changes, and FlexLoRA's float64 reference tests pass with it
at their own tolerances (at their sizes auto takes the exact methods; one test holds the
Krylov regime, 100 clients, to 1e-4). Before issue 13 the default was "exact".
Before the first aggregation dW = 0 and clients get fresh LoRA (seeded A, B = 0).

Server optimizers (``server_opt``, :mod:`fedlora.strategies.server_opt`) act in weight space:
the pseudo-gradient is  dW_t - U S V^T  (this round's weighted sum minus the kept top-K), held
as stacked factors of rank R_t + K, and the new state is the top-K SVD of U S V^T + the step
(K as above): factored while the stack's rank is below min(d_out, d_in), from the dense matrix
when the step has a dense part (adam, yogi, adagrad) or the stack is larger.
"""
from __future__ import annotations

import logging

import torch

from fedlora import ops
from fedlora.bank import AdapterBank

from .base import Strategy

log = logging.getLogger("fedlora.strategies")

_SVD_METHODS = ("auto", "exact", "factored", "randomized", "dense")  # all but "exact": lowrank_svd's


class FlexLoRA(Strategy):
    name = "flexlora"
    server_opt_space = "delta"

    def __init__(self, *, max_rank: int | None = None, sv_split: str = "sqrt", svd_method: str = "auto",
                 **kwargs):
        if sv_split not in ("sqrt", "B"):
            raise ValueError(f"sv_split must be 'sqrt' or 'B', got {sv_split!r}")
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if svd_method not in _SVD_METHODS:
            raise ValueError(f"svd_method must be one of {_SVD_METHODS}, got {svd_method!r}")
        super().__init__(**kwargs)
        self.max_rank = max_rank
        self.sv_split = sv_split
        self.svd_method = svd_method

    def _init_state(self) -> None:
        for name, (d_out, d_in) in self.module_shapes.items():
            self._set(name, torch.zeros(d_out, 0, dtype=self.dtype, device=self.device),
                      torch.zeros(0, dtype=self.dtype, device=self.device),
                      torch.zeros(d_in, 0, dtype=self.dtype, device=self.device))

    def _set(self, name, U, S, V) -> None:
        self._tensors[f"{name}.U"], self._tensors[f"{name}.S"], self._tensors[f"{name}.V"] = U, S, V

    def _state_layout(self, name: str):
        return {"U": [("d_out", "k")], "S": [("k",)], "V": [("d_in", "k")]}

    def global_delta(self, name: str) -> torch.Tensor:
        """The global update U S V^T of module ``name`` as a dense [d_out, d_in] matrix."""
        self._require_init()
        U, S, V = (self._tensors[f"{name}.{k}"] for k in "USV")
        return (U * S) @ V.T

    def _aggregate(self, updates, weights):
        for (d_out, d_in), names in self._groups().items():
            # Per module: K = max_rank, or the largest rank of the federation (or of this round, when
            # larger), never above the round's total rank.
            totals = {n: sum(u.module_rank(n) for u in updates) for n in names}
            keep = {n: min(self.max_rank or self._kept_rank(n, updates), totals[n], d_out, d_in) for n in names}
            factors = {n: [u.modules[n][:2] for u in updates] for n in names}
            scalings = {n: [u.scaling(n) for u in updates] for n in names}
            method = self.svd_method
            if method == "exact":
                method = "factored" if max(totals.values()) < min(d_out, d_in) else "dense"
            # One batched SVD per shape group at the group's largest K; the leading
            # k triplets of a rank-K truncation are the rank-k truncation.
            U, S, V = robust_svd(factors, scalings, weights.tolist(), max(keep.values()), method, self.dtype)
            for i, name in enumerate(names):
                k = keep[name]
                self._set(name, U[i][:, :k].to(self.dtype).contiguous(), S[i][:k].to(self.dtype).contiguous(),
                          V[i][:, :k].to(self.dtype).contiguous())

    def _pseudo_gradient(self, updates, weights):
        """dW_t - U S V^T per module as stacked factors (None, A [R_t + K, d_in], B [d_out, R_t + K])."""
        w = weights.tolist()
        out = {}
        for name in self.module_shapes:
            U, S, V = (self._tensors[f"{name}.{key}"] for key in "USV")
            A = torch.cat([u.modules[name][0] for u in updates] + [V.T], dim=0)
            B = torch.cat([u.modules[name][1] * (wk * u.scaling(name)) for u, wk in zip(updates, w)] + [-(U * S)],
                          dim=1)
            out[name] = (None, A, B)
        return out

    def _apply_step(self, steps, updates):
        """U S V^T <- the top-K SVD of U S V^T + step."""
        for name, (dense, A, B) in steps.items():
            d_out, d_in = self.module_shapes[name]
            U, S, V = (self._tensors[f"{name}.{key}"] for key in "USV")
            A, B = torch.cat([V.T, A], dim=0), torch.cat([U * S, B], dim=1)
            total = A.shape[0] if dense is None else min(d_out, d_in)
            k = min(self.max_rank or self._kept_rank(name, updates), total, d_out, d_in)
            method = self.svd_method
            if dense is None:
                if method == "exact":
                    method = "factored" if total < min(d_out, d_in) else "dense"
                U, S, V = (t[0] for t in robust_svd({name: [(A, B)]}, {name: [1.0]}, [1.0], k, method, self.dtype))
            else:  # an elementwise (adaptive) step is dense: the SVD of the whole matrix
                method = "dense" if method in ("exact", "factored") else method
                U, S, V = ops.lowrank_svd(dense + B @ A, rank=k, method=method)
            self._set(name, U.to(self.dtype).contiguous(), S.to(self.dtype).contiguous(),
                      V.to(self.dtype).contiguous())

    def _kept_rank(self, name, updates) -> int:
        """K without ``max_rank``: the federation's largest rank of ``name``, or the round's when larger."""
        return max(self.module_ranks.get(name, 0), *(u.module_rank(name) for u in updates))

    def _distribute(self, ranks, alphas, client_id):
        out = {}
        for name, rank in ranks.items():
            s = self._scaling(alphas[name], rank)
            U, S, V = (self._tensors[f"{name}.{key}"] for key in "USV")
            k = min(rank, S.shape[0])
            Ur, Sr, Vr = U[:, :k], S[:k], V[:, :k]
            if self.sv_split == "sqrt":
                root = Sr.sqrt()
                A = (Vr * root).T / s**0.5
                B = Ur * root / s**0.5
            else:
                A = Vr.T.clone()
                B = Ur * Sr / s
            if k < rank:  # more rank than the global keeps: fresh, product-neutral directions
                A = torch.cat([A, self._fresh_A(name, rank, "pad", self.round, client_id)[k:]], dim=0)
                B = torch.cat([B, self._zeros_B(name, rank - k)], dim=1)
            out[name] = (A.contiguous(), B.contiguous())
        return out


def robust_svd(factors: dict[str, list], scalings: dict[str, list[float]], weights: list[float], rank: int,
               method: str, dtype: torch.dtype):
    """``ops.lowrank_svd`` of each module's weighted sum of products, batched over ``factors``' modules.

    An SVD can fail to converge (LinAlgError) or come back non-finite on ill-conditioned
    input; then it is retried in float64, then as float64 "dense" (the reconstructed
    matrix's SVD). RuntimeError if all of them fail: the strategy keeps its state.
    """
    attempts = [(dtype, method), (torch.float64, method), (torch.float64, "dense")]
    errors = []
    for work, how in dict.fromkeys(attempts):  # in order, without repeats
        try:
            banks = [AdapterBank.from_factors([(a.to(work), b.to(work)) for a, b in factors[n]], scalings=scalings[n])
                     for n in factors]
            U, S, V = ops.lowrank_svd(banks, weights=weights, rank=rank, method=how)
            if all(torch.isfinite(t).all() for t in (U, S, V)):
                if errors:
                    log.warning("flexlora: SVD fell back to %s %s after %s", str(work).removeprefix("torch."),
                                how, "; ".join(errors))
                return U, S, V
            errors.append(f"{str(work).removeprefix('torch.')} {how}: non-finite result")
        except (RuntimeError, ValueError) as exc:  # torch.linalg.LinAlgError is a RuntimeError
            errors.append(f"{str(work).removeprefix('torch.')} {how}: {type(exc).__name__.lstrip('_')}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:200])
    raise RuntimeError("SVD failed in every precision and method: " + "; ".join(errors))
