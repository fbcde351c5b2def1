"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025, arXiv 2410.09432).

Clients train (A_k, B_k) from the global (A_bar, B_bar) on top of a frozen base W_t. The
server averages the factors as FedAvg does and folds what that average misses into every
client's frozen base, so the effective global update is the exact weighted average:

    A_bar = sum_k p_k A_k,    B_bar = sum_k p_k s_k B_k            (p_k = n_k / sum_j n_j)
    Res_t = sum_k p_k s_k B_k A_k - B_bar A_bar
    W_{t+1} = W_t + Res_t,    so   W_{t+1} + B_bar A_bar = W_t + sum_k p_k s_k B_k A_k.

The public code ships Res_t to the clients as a dense d_out x d_in matrix per layer.
fedlora ships it as low-rank factors. With one rank r (the rule needs it: A_bar must be
the average of the very A_k the clients hold) A_bar = sum_k p_k A_k, and with
D_k = s_k B_k - B_bar, whose weighted sum is zero,

    Res_t = sum_k p_k D_k A_k = sum_{k<n} p_k D_k (A_k - A_n)
          = [p_1 D_1 | ... | p_{n-1} D_{n-1}] [A_1 - A_n; ...; A_{n-1} - A_n]

a stack of rank (n - 1) r (the sum_k r_k + r of the stacked form, less r + r), built
without a d_out x d_in matrix; a factored SVD (``lowrank_svd(method="factored")``, QRs
of the stack and an SVD of its core) then drops the directions whose singular values are
at the SVD's own rounding level (<= K eps S_max, a backward-stable SVD's error; all of
them when the residual is exactly zero, e.g. every client kept one A), and the
compressed factors are kept when they have fewer rows (skipped where the residual goes
dense anyway). The residuals
accumulate (the clients' frozen base is the base plus every past residual) as parts
dense + B A (:mod:`fedlora.strategies.parts`): stacked factors while they hold fewer
numbers than a dense matrix, dense beyond. ``client_base()`` hands those parts to every
client, which adds them in full precision beside its (possibly 4-bit) base, never
re-quantized; ``global_delta`` is the accumulated residual plus B_bar A_bar.

One rank per module for every client (mixed ranks are refused with a reason: a truncated
client would start from another product than the one the residual completes). No server
optimizer: a step would move A_bar, B_bar off the average the residual completes.
"""
from __future__ import annotations

import torch

from fedlora import ops
from fedlora.bank import AdapterBank

from .base import TruncatedFactors, merge_parts, mixed_client_ranks, padded_factor_average
from .parts import add_parts, get_parts, init_parts

_RES = "res_"  # the accumulated residual's keys: {name}.res_dense, .res_A, .res_B


class FedExLoRA(TruncatedFactors):
    name = "fedexlora"
    server_opt_space = None

    def _init_state(self) -> None:
        super()._init_state()
        init_parts(self._tensors, self.module_shapes, _RES, self.dtype, self.device)

    # ------------------------------------------------------------- ranks
    def check_client_ranks(self, module_ranks):
        ranks = mixed_client_ranks(module_ranks)
        if ranks:
            raise ValueError(
                f"FedEx-LoRA folds one residual into every client's base, exact only for clients that start "
                f"from the same averaged factors, so every client needs one rank per module, but the ranks are "
                f"{ranks}; use rank_distribution='homogeneous'")

    def _rank_check(self, rank: int, name: str) -> str | None:
        if rank != self.module_ranks[name]:
            return f"rank {rank} differs from the global rank {self.module_ranks[name]}; FedEx-LoRA needs one rank"
        return None

    def _served_rank(self, rank: int, name: str) -> int:
        if rank != self.module_ranks[name]:
            raise ValueError(f"FedEx-LoRA's global rank of {name} is {self.module_ranks[name]}; a client cannot "
                             f"start at rank {rank} (every client trains at one rank)")
        return rank

    # -------------------------------------------------------- aggregation
    def _aggregate(self, updates, weights):
        w = weights.tolist()
        residuals = {}
        for name in self.module_shapes:
            A_bar, B_bar = padded_factor_average(updates, name, w, self.module_ranks[name])
            self._tensors[f"{name}.A"], self._tensors[f"{name}.B"] = A_bar, B_bar
            last = updates[-1].modules[name][0]
            residuals[name] = (torch.cat([u.modules[name][0] - last for u in updates[:-1]] + [last[:0]], dim=0),
                               torch.cat([(u.modules[name][1] * u.scaling(name) - B_bar) * wk
                                          for u, wk in zip(updates[:-1], w)] + [B_bar[:, :0]], dim=1))
        compressed = self._compress(residuals)
        add_parts(self._tensors, self.module_shapes, _RES, {n: (None, A, B) for n, (A, B) in compressed.items()})

    def _compress(self, stacks):
        """Each module's residual stack (A [K, d_in], B [d_out, K]) as its factored SVD without the
        rounding-level directions, where that has fewer rows (one batched lowrank_svd per shape).

        Only where the accumulated residual would stay factors with the whole stack added: beyond
        that it is added into the dense part anyway, and the SVD (O((d_out + d_in) K^2 + K^3))
        would cost more than it could save."""
        out = dict(stacks)
        groups: dict[tuple[int, int], list[str]] = {}
        for name, (A, _) in stacks.items():
            d_out, d_in = self.module_shapes[name]
            rows = self._tensors[f"{name}.{_RES}A"].shape[0] + A.shape[0]
            if A.shape[0] > 0 and rows * (d_out + d_in) <= d_out * d_in:  # then also K < min(d_out, d_in)
                groups.setdefault((d_out, d_in), []).append(name)
        for names in groups.values():
            banks = [AdapterBank(stacks[n][0], stacks[n][1], [stacks[n][0].shape[0]], 1.0) for n in names]
            K = max(b.total_rank for b in banks)
            U, S, V = ops.lowrank_svd(banks, rank=K, method="factored")
            eps = torch.finfo(S.dtype).eps
            for i, name in enumerate(names):
                A, B = stacks[name]
                keep = int((S[i] > A.shape[0] * eps * S[i][0]).sum())  # S is sorted: S[i][0] = S_max
                if keep < A.shape[0]:
                    out[name] = ((V[i][:, :keep].T).to(self.dtype).contiguous(),
                                 (U[i][:, :keep] * S[i][:keep]).to(self.dtype).contiguous())
        return out

    # ------------------------------------------------------------ results
    def client_base(self, client_id=None):
        """Per module the accumulated residual (dense or None, A [k, d_in], B [d_out, k]): every
        client's frozen base is the base plus dense + B A. None before the first aggregation."""
        self._require_init()
        if self.round == 0:
            return None
        return {n: get_parts(self._tensors, n, _RES) for n in self.module_shapes}

    def global_delta(self, name: str) -> torch.Tensor:
        return self._deltas([name])[name]

    def global_deltas(self) -> dict[str, torch.Tensor]:
        return self._deltas(list(self.module_shapes))

    def _deltas(self, names) -> dict[str, torch.Tensor]:
        """Residual + B_bar A_bar of each module in ``names``: the residual's factors and the averaged
        factors as one stack per module, one batched lora_delta per shape."""
        self._require_init()
        parts = {}
        for n in names:
            dense, A, B = get_parts(self._tensors, n, _RES)
            parts[n] = (dense, torch.cat([A, self._tensors[f"{n}.A"]]), torch.cat([B, self._tensors[f"{n}.B"]], 1))
        return merge_parts(parts)
