"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024, arXiv 2403.12313): A is frozen at a shared seeded initialisation,
only B is trained and averaged.

    A_g = A_0 (never changes),    B_g = sum_k p_k s_k pad(B_k)

Because every client multiplies the same A_0, the global product is exactly the
weighted average of the clients' products:  B_g A_0 = sum_k p_k s_k B_k A_0[:r_k].
Heterogeneous ranks: A_0 has the global rank R (``init_global(rank=R)``, the
largest client rank); a rank-r client gets A_0[:r] and B_g[:, :r] (truncation,
exact only when r = R), and its B is zero-padded to R on the way back.
Updates whose A differs from A_0[:r] (beyond the rounding of a 16-bit model copy) are rejected.
"""
from __future__ import annotations

from .base import TruncatedFactors, padded_factor_average


class FFALoRA(TruncatedFactors):
    name = "ffalora"
    trainable = ("B",)

    def _check_update(self, update) -> str | None:
        return self._frozen_reason(update, "A", "the frozen shared A (FFA-LoRA trains B only)")

    def _aggregate(self, updates, weights):
        for name in self.module_shapes:
            _, B = padded_factor_average(updates, name, weights.tolist(), self.module_ranks[name], with_A=False)
            self._tensors[f"{name}.B"] = B
