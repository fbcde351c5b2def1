"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv 2401.06432).

The global adapter has rank R (``init_global(rank=R)``, the largest client rank).
A rank-r_k client starts from the first r_k rows of A_g and columns of B_g.
Aggregation zero-pads every client to R and averages A and B separately with
sparsity weights:

    q_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F          (per module)
    A_g = sum_k q_k pad(A_k),     B_g = sum_k q_k s_k pad(B_k)

``weighting="examples"`` uses p_k = n_k / sum n_j instead. If every product of a
module is zero the sparsity weights are undefined and the data weights are used.

Rank self-pruning (the paper's Sec. 3.2), on by default (``self_prune=False``
turns it off): every client adds :func:`rank_self_pruning_penalty` (lam = ``prune_lambda``,
gamma = ``prune_gamma``) to its local loss, which pushes the top ranks
t..r (t = floor(gamma r)) towards zero; after training it compares the tail norm
||B[:, t:r] A[t:r, :]|| with its previous round's and, when it fell, uploads only
the first t ranks and trains at rank t from then on (:func:`self_pruned_rank`).
The runtime keeps each client's previous tail norm and current rank.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from fedlora.bank import lora_scaling
from fedlora.federated.update import product_norm

from .base import TruncatedFactors, padded_factor_average


class HetLoRA(TruncatedFactors):
    name = "hetlora"

    def __init__(self, *, weighting: str = "sparsity", self_prune: bool = True, prune_gamma: float = 0.99,
                 prune_lambda: float = 1e-3, **kwargs):
        if weighting not in ("sparsity", "examples"):
            raise ValueError(f"weighting must be 'sparsity' or 'examples', got {weighting!r}")
        if not isinstance(self_prune, bool):
            raise ValueError(f"self_prune must be true or false, got {self_prune!r}")
        if isinstance(prune_gamma, bool) or not isinstance(prune_gamma, (int, float)) or not 0 < prune_gamma < 1:
            raise ValueError(f"prune_gamma must be in (0, 1), got {prune_gamma!r}")
        if (isinstance(prune_lambda, bool) or not isinstance(prune_lambda, (int, float))
                or not math.isfinite(prune_lambda) or prune_lambda < 0):
            raise ValueError(f"prune_lambda must be a finite number >= 0, got {prune_lambda!r}")
        super().__init__(**kwargs)
        self.weighting = weighting
        self.self_prune, self.prune_gamma, self.prune_lambda = self_prune, float(prune_gamma), float(prune_lambda)

    # Rank self-pruning on the client (see the module docstring).
    def local_penalty(self, factors, rank):
        if not self.self_prune or rank < 2 or self.prune_lambda == 0:
            return None
        return rank_self_pruning_penalty(factors, rank, self.prune_gamma, self.prune_lambda)

    def prune_update(self, update, state):
        if not self.self_prune or update.rank < 2:
            return update
        tail = tail_norm({n: m[:2] for n, m in update.modules.items()}, update.rank, self.prune_gamma)
        new_rank = self_pruned_rank(update.rank, self.prune_gamma, tail, state.get("tail"))
        state["tail"] = tail
        if new_rank == update.rank:
            return update
        # Every module keeps its first ranks (one already below the new rank stays as it is), with its
        # alpha rescaled so that its LoRA scaling, and so the kept product s B A, is unchanged.
        modules = {}
        for n, (a, b, alpha) in update.modules.items():
            r, kept = a.shape[0], min(a.shape[0], new_rank)
            scaling = lora_scaling(alpha, r, update.use_rslora)
            alpha_kept = scaling * (math.sqrt(kept) if update.use_rslora else kept)
            modules[n] = (a[:kept].clone(), b[:, :kept].clone(), alpha_kept)
        state["tail"] = None  # a new rank starts a new comparison
        return dataclasses.replace(update, rank=new_rank, modules=modules)

    def upload_rank_ok(self, served, uploaded):
        return uploaded == served or (self.self_prune and served >= 2 and uploaded == _tail_start(served, self.prune_gamma))

    def module_weights(self, updates, name: str, data_weights: torch.Tensor) -> torch.Tensor:
        """The aggregation weights of module ``name`` (sum to 1, float64)."""
        if self.weighting == "examples":
            return data_weights
        norms = torch.tensor([product_norm(u.modules[name][0], u.modules[name][1], u.scaling(name))
                              for u in updates], dtype=torch.float64)
        total = norms.sum().item()
        return norms / total if total > 0 and math.isfinite(total) else data_weights

    def _aggregate(self, updates, weights):
        for name in self.module_shapes:
            q = self.module_weights(updates, name, weights)
            A, B = padded_factor_average(updates, name, q.tolist(), self.module_ranks[name])
            self._tensors[f"{name}.A"], self._tensors[f"{name}.B"] = A, B


def _tail_start(rank: int, gamma: float) -> int:
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    return max(1, min(rank - 1, int(math.floor(gamma * rank))))


def rank_self_pruning_penalty(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                              gamma: float = 0.99, lam: float = 1e-3) -> torch.Tensor:
    """HetLoRA's local regulariser  lam * sum_m ||B_m[:, t:r] A_m[t:r, :]||_F,  t = floor(gamma * r).

    It pushes the highest ranks of each module towards zero so that
    :func:`self_pruned_rank` can drop them. Differentiable; the Frobenius norm is
    taken through the r x r Gram matrices, never the d_out x d_in product.
    factors: module -> (A [r, d_in], B [d_out, r]) (extra items such as alpha are ignored).
    """
    if rank < 2:
        raise ValueError("rank self-pruning needs rank >= 2")
    t = _tail_start(rank, gamma)
    total = None
    for entry in factors.values():
        a, b = entry[0][t:rank], entry[1][:, t:rank]
        sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
        # sqrt has an infinite derivative at 0: a zero tail (B initialised to 0) contributes 0 gradient
        term = torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), sq)
        total = term if total is None else total + term
    return lam * total


def tail_norm(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int, gamma: float = 0.99) -> float:
    """sum_m ||B_m[:, t:r] A_m[t:r, :]||_F (no lam, no gradient): the quantity pruning compares."""
    t = _tail_start(rank, gamma)
    return sum(product_norm(e[0][t:rank], e[1][:, t:rank]) for e in factors.values())


def self_pruned_rank(rank: int, gamma: float, tail: float, previous_tail: float | None) -> int:
    """HetLoRA's rank self-pruning: shrink to floor(gamma * r) when the regularised tail
    norm fell below the previous round's, else keep r (and never go below 1)."""
    if previous_tail is not None and tail < previous_tail and rank > 1:
        return _tail_start(rank, gamma)
    return rank
