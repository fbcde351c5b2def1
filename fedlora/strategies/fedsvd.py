"""FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with
LoRA", NeurIPS 2025, arXiv 2505.12805): clients train only B against a shared A with
orthonormal rows; the server averages B and re-factorises the product by its SVD, so A
follows the principal directions of the global update and keeps orthonormal rows.

    B_bar = sum_k p_k s_k pad(B_k)                (p_k = n_k / sum_j n_j; A frozen in the round)
    B_bar A = U S V^T   (rank <= R)               A <- V^T [R, d_in],   B <- U S [d_out, R]

The product is unchanged by the re-factorisation and, A being shared and frozen during the
round, equal to the weighted average of the clients' products:
B_bar A = sum_k p_k s_k B_k A[:r_k]  (exact). The SVD is computed factored, never from the
d_out x d_in product: ``lowrank_svd(method="factored")`` takes QR(B_bar) and QR(A^T) and an
SVD of the R x R core R_B R_A^T (O((d_out + d_in) R^2 + R^3), one batched call per shape and
rank), so A's new rows are orthonormal to working precision every round, not only as far as
the previous round's were. A starts as the orthonormalised (QR) seeded PEFT initialisation,
B at zero.

Heterogeneous ranks: R is the largest client rank; a rank-r client gets A[:r] and B[:, :r],
the top-r singular triplets of the global update: its best rank-r approximation
(Eckart-Young), as FlexLoRA serves it; its B is zero-padded to R on the way back, which
keeps the average exact. R must stay below min(d_out, d_in) (the factored SVD's domain and
room for R orthonormal rows). Updates whose A differs from the A sent (beyond 16-bit
rounding) are rejected. No server optimizer: the factors change basis every round, so a
momentum on them has no fixed coordinates.
"""
from __future__ import annotations

import torch

from fedlora import ops
from fedlora.bank import AdapterBank

from .base import TruncatedFactors, padded_factor_average


class FedSVD(TruncatedFactors):
    name = "fedsvd"
    trainable = ("B",)
    server_opt_space = None
    # The server re-factorises B_bar A every round: B's coordinates change with A, so SCAFFOLD's c_B
    # of one round would mean nothing in the next.
    admits_scaffold = False

    def _init_state(self) -> None:
        super()._init_state()
        for name, rank in self.module_ranks.items():
            d_out, d_in = self.module_shapes[name]
            if rank >= min(d_out, d_in):
                raise ValueError(f"FedSVD needs the global rank of {name} ({rank}) below min(d_out, d_in) = "
                                 f"{min(d_out, d_in)}: A keeps that many orthonormal rows of a factored SVD")
            q, _ = torch.linalg.qr(self._tensors[f"{name}.A"].T.double())  # orthonormal rows spanning the seed's
            self._tensors[f"{name}.A"] = q.T.to(self.dtype).contiguous()

    def _check_update(self, update) -> str | None:
        return self._frozen_reason(update, "A", "the shared A (FedSVD trains B only)")

    def _aggregate(self, updates, weights):
        w = weights.tolist()
        groups: dict[tuple, list[str]] = {}
        for name, (d_out, d_in) in self.module_shapes.items():
            groups.setdefault((d_out, d_in, self.module_ranks[name]), []).append(name)
        for (_, _, rank), names in groups.items():
            banks = []
            for name in names:
                _, B_bar = padded_factor_average(updates, name, w, rank, with_A=False)
                banks.append(AdapterBank(self._tensors[f"{name}.A"], B_bar, [rank], 1.0))
            U, S, V = ops.lowrank_svd(banks, rank=rank, method="factored")
            for i, name in enumerate(names):
                self._tensors[f"{name}.A"] = V[i].T.to(self.dtype).contiguous()
                self._tensors[f"{name}.B"] = (U[i] * S[i]).to(self.dtype).contiguous()
