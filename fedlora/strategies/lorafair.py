"""LoRA-FAIR (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025, arXiv 2411.14961): the server averages A and B as
FedAvg does, then corrects B so that the global product comes as close as the averaged A
allows to the exact average of the clients' products, and clients start the next round
from the corrected factors (the paper's "Avg-Initial").

    A_bar = sum_k p_k pad(A_k),   B_bar = sum_k p_k s_k pad(B_k)        (p_k = n_k / sum_j n_j)
    M     = sum_k p_k s_k B_k A_k                                        (the exact average)
    dB    = argmin_dB ||(B_bar + dB) A_bar - M||_F^2 + lam ||dB||_F^2
          = (M - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^+
    B     <- B_bar + dB                        (lam = 0: B = M A_bar^T (A_bar A_bar^T)^+ when G is invertible)

The paper states the objective with a similarity measure and a regulariser weight lam;
fedlora solves its Frobenius (least-squares) form in closed form, with ``ridge`` = lam
(default 0: the pseudo-inverse, the closest product in A_bar's row space). Solved in
factored form, never with a d_out x d_in matrix: since B_bar A_bar = sum_k p_k s_k B_k
A_bar[:r_k],

    (M - B_bar A_bar) A_bar^T = sum_k p_k s_k B_k ((A_k - A_bar[:r_k]) A_bar^T)     [d_out, R]

(r_k x R products per client, no cancellation between two large terms), and G = A_bar A_bar^T
is R x R (its pseudo-inverse in float64): O(n r R (d_in + d_out) + R^2 d_in + R^3) a module.
Not exact: (B_bar + dB) A_bar is M's projection onto A_bar's row space, the best any B can
do with A_bar (and never further from M than FedAvg's B_bar A_bar).

Heterogeneous ranks: R is the largest client rank; a rank-r client gets A[:r] and
B[:, :r] / s (truncation). A server optimizer acts on (A, B) with the correction in
(``TruncatedFactors``).
"""
from __future__ import annotations

import torch

from fedlora.federated.strict import strict_float

from .base import TruncatedFactors, padded_factor_average


class LoRAFAIR(TruncatedFactors):
    name = "lorafair"

    def __init__(self, *, ridge: float = 0.0, **kwargs):
        self.ridge = strict_float(ridge, "ridge", low=0.0)
        super().__init__(**kwargs)

    def _aggregate(self, updates, weights):
        w = weights.tolist()
        for name in self.module_shapes:
            rank = self.module_ranks[name]
            A_bar, B_bar = padded_factor_average(updates, name, w, rank)
            # (M - B_bar A_bar) A_bar^T, client by client
            target = torch.zeros_like(B_bar)
            for u, wk in zip(updates, w):
                a, b, _ = u.modules[name]
                r = a.shape[0]
                target += (b * (wk * u.scaling(name))) @ ((a - A_bar[:r]) @ A_bar.T)
            gram = (A_bar.double() @ A_bar.double().T)
            if self.ridge > 0:
                inverse = torch.linalg.inv(gram + self.ridge * torch.eye(rank, dtype=gram.dtype, device=gram.device))
            else:
                inverse = torch.linalg.pinv(gram, hermitian=True)
            self._tensors[f"{name}.A"] = A_bar
            self._tensors[f"{name}.B"] = B_bar + target @ inverse.to(B_bar.dtype)
