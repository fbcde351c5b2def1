"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of
LoRA", NeurIPS 2025, arXiv 2502.01755): clients alternate which LoRA factor they train.

    even rounds t:  A_g frozen, clients train B:   B_g <- sum_k p_k s_k pad(B_k)        (A_g unchanged)
    odd rounds t:   B_g frozen, clients train A:   A_g <- sum_k p_k pad(A_k)            (B_g unchanged)

(p_k = n_k / sum_j n_j; the global state is scale-free, B_g A_g is the global update.)
Because every client multiplies the same frozen factor, the new product is exactly the
weighted average of the clients' products in both kinds of round:

    B-round:  (sum_k p_k s_k pad(B_k)) A_g = sum_k p_k s_k B_k A_g[:r_k]
    A-round:  B_g (sum_k p_k pad(A_k))    = sum_k p_k (B_g[:, :r_k] / s_k) s_k A_k

Heterogeneous ranks: the global rank R is the largest client rank (``init_global(rank=R)``);
a rank-r client gets A_g[:r] and B_g[:, :r] / s (truncation: its start is exact only when
r = R), and zero-padding its trained factor to R keeps the identities above exact for the
products the clients trained. A_g starts seeded, B_g at zero (PEFT's init), so round 0
trains B, as FFA-LoRA does, and round 1 the A that B now gives a gradient.

A client uploads only the factor it trained (half the bytes of FedAvg); the frozen factor
it returns is checked against what it was sent (16-bit rounding allowed) and an update
whose frozen factor moved is rejected.
"""
from __future__ import annotations

from .base import TruncatedFactors, padded_factor_average


class RoLoRA(TruncatedFactors):
    name = "rolora"

    def trainable_at(self, round_idx: int) -> tuple[str, ...]:
        return ("B",) if round_idx % 2 == 0 else ("A",)

    def _check_update(self, update) -> str | None:
        frozen = "A" if self.trainable_at(self.round) == ("B",) else "B"
        trained = "B" if frozen == "A" else "A"
        return self._frozen_reason(update, frozen, f"the global {frozen}; RoLoRA round {self.round} trains "
                                                   f"{trained} only")

    def _aggregate(self, updates, weights):
        w = weights.tolist()
        train_A = "A" in self.trainable_at(self.round)
        for name in self.module_shapes:
            A, B = padded_factor_average(updates, name, w, self.module_ranks[name], with_A=train_A)
            if train_A:
                self._tensors[f"{name}.A"] = A
            else:
                self._tensors[f"{name}.B"] = B
