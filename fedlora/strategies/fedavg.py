"""FedAvg over LoRA factors, as in FedIT (Zhang et al., "Towards Building the Federated GPT:
Federated Instruction Tuning", ICASSP 2024, arXiv 2305.05644).

    A_g = sum_k p_k A_k,    B_g = sum_k p_k s_k B_k      (p_k = n_k / sum_j n_j)

A and B are averaged separately, so the global product B_g A_g is *not* the
average of the clients' products (the known inexactness FLoRA and FlexLoRA fix).
All clients must train at one rank R. With heterogeneous ranks the strategy
refuses other ranks, or, with ``heterogeneous="bucket"``, runs the "bucket
effect" baseline: every client trains at the smallest rank R (pass it to
``init_global``) whatever rank it could afford.
"""
from __future__ import annotations

from .base import TruncatedFactors, mixed_client_ranks, padded_factor_average


class FedAvg(TruncatedFactors):
    name = "fedavg"

    def __init__(self, *, heterogeneous: str = "refuse", **kwargs):
        if heterogeneous not in ("refuse", "bucket"):
            raise ValueError(f"heterogeneous must be 'refuse' or 'bucket', got {heterogeneous!r}")
        super().__init__(**kwargs)
        self.heterogeneous = heterogeneous

    def global_rank(self, ranks):
        """The smallest rank: the one rank everyone trains at (bucket mode) or shares (homogeneous)."""
        return min(ranks)

    def check_client_ranks(self, module_ranks):
        ranks = mixed_client_ranks(module_ranks)
        if ranks and self.heterogeneous != "bucket":
            raise ValueError(
                f"FedAvg averages A and B separately, so every client needs one rank per module, but the "
                f"ranks are {ranks}; use rank_distribution='homogeneous' or "
                "--strategy_options.heterogeneous bucket (everyone trains at the smallest rank)"
            )

    def _rank_check(self, rank: int, name: str) -> str | None:
        if rank != self.module_ranks[name]:
            return (f"rank {rank} differs from the global rank {self.module_ranks[name]}; "
                    "FedAvg averages factors of one rank")
        return None

    def _served_rank(self, rank: int, name: str) -> int:
        limit = self.module_ranks[name]
        if rank == limit or (self.heterogeneous == "bucket" and rank > limit):
            return limit  # bucket: a client that could afford more still trains at the smallest rank
        hint = "" if self.heterogeneous == "bucket" else "; use heterogeneous='bucket' to train everyone at it"
        raise ValueError(f"FedAvg's global rank of {name} is {limit}, a client cannot start at rank {rank}{hint}")

    def _aggregate(self, updates, weights):
        for name in self.module_shapes:
            A, B = padded_factor_average(updates, name, weights.tolist(), self.module_ranks[name])
            self._tensors[f"{name}.A"], self._tensors[f"{name}.B"] = A, B
