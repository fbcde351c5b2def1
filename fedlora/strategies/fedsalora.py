"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025, arXiv 2410.01463): clients train both LoRA factors, but only A is
shared and averaged; each client's B stays with it across rounds (its personalised part).

    A_g = sum_k p_k A_k                          (p_k = n_k / sum_j n_j)
    client k's model:  W + s_k B_k A_g           (B_k its own, kept from its previous round)

A client uploads A only (half of FedAvg's bytes up) and receives A_g only; B never leaves
it (the runtime keeps it on the client's disk between rounds: ``personal = ("B",)``, see
:mod:`fedlora.simulation.personal`, and zeroes it in what the client sends). A client that
has not trained yet starts its B at zero (PEFT's init). Not exact (no global product is
formed); the paper's results are the personalised models, which ``fedlora simulate``
evaluates on each client's own held-out data (``eval_personal_*``).

The global model: with B private there is none beyond A_g (``global_B="none"``, the paper:
the global update is zero, so the global evaluation and the exported adapter are the base
model's). ``global_B="average"`` has clients also upload B (bytes up counted) so the server
keeps B_g = sum_k p_k s_k B_k for a global model B_g A_g, never sent to clients.

Heterogeneous ranks: R is the largest client rank; a rank-r client gets A_g[:r]. Row i of
A_g (column i of B_g) is averaged over the clients that trained it, with their weights
renormalised; a row no client of the round trained keeps its value.
"""
from __future__ import annotations


from .base import TruncatedFactors


class FedSALoRA(TruncatedFactors):
    name = "fedsalora"
    personal = ("B",)

    def __init__(self, *, global_B: str = "none", **kwargs):
        if global_B not in ("none", "average"):
            raise ValueError(f"global_B must be 'none' or 'average', got {global_B!r}")
        super().__init__(**kwargs)
        self.global_B = global_B

    def uploaded_at(self, round_idx: int) -> tuple[str, ...]:
        return ("A", "B") if self.global_B == "average" else ("A",)

    def _distribute(self, ranks, alphas, client_id):
        # B is the client's own: the server sends A; a client new to the run starts B at zero
        return {n: (self._tensors[f"{n}.A"][:r].clone(), self._zeros_B(n, r)) for n, r in ranks.items()}

    def _aggregate(self, updates, weights):
        for name, R in self.module_ranks.items():
            A = self._tensors[f"{name}.A"].clone()
            B = self._tensors[f"{name}.B"].clone()
            ranks = [u.module_rank(name) for u in updates]
            for lo, hi in _rank_bands(ranks, R):  # rows lo..hi-1 are held by the same clients
                held = [(u, w) for u, w, r in zip(updates, weights.tolist(), ranks) if r >= hi]
                total = sum(w for _, w in held)
                A[lo:hi] = sum(u.modules[name][0][lo:hi] * (w / total) for u, w in held)
                if self.global_B == "average":
                    B[:, lo:hi] = sum(u.modules[name][1][:, lo:hi] * (w / total * u.scaling(name)) for u, w in held)
            self._tensors[f"{name}.A"], self._tensors[f"{name}.B"] = A, B


def _rank_bands(ranks, limit: int) -> list[tuple[int, int]]:
    """The row ranges [lo, hi) of a rank-``limit`` factor in which the same clients hold every row."""
    edges = sorted({0, *(r for r in ranks if r <= limit)})
    return list(zip(edges[:-1], edges[1:]))
