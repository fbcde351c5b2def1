"""Local-only training: the no-federation baseline (``fedlora benchmark``'s ``local-only``).

Each client trains its own adapter (A_k, B_k) at its own rank r_k and shares nothing:

    client k's model:  W + s_k B_k A_k        (A_k, B_k its own, continued from its last round)

Both factors are the client's personal factors (``personal = ("A", "B")``): the runtime
keeps them on the client's disk between rounds (:mod:`fedlora.simulation.personal`), so a
client trains only in the rounds that sample it, with the same local budget as under a
federated rule, starting each from where its previous round ended. A client's first round
starts at PEFT's init, A_k drawn from a seed of the client's own (it draws it itself:
nothing is sent) and B_k = 0. Nothing goes up or down (bytes 0); the "aggregation" accepts
the (empty) updates and changes nothing, and there is no global model (``has_global_model``
False): the held-out examples of each training client are scored with its own adapter (the
base model while it has not trained), unseen clients, who have no adapter, with the base
model; nothing is exported.
"""
from __future__ import annotations

import torch

from .base import Strategy


class LocalOnly(Strategy):
    name = "local"
    personal = ("A", "B")
    has_global_model = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.dp is not None:
            raise ValueError("local shares nothing, so client-level DP has nothing to noise (dp must be None)")

    def _init_state(self) -> None:
        pass  # the server holds nothing

    def _aggregate(self, updates, weights) -> None:
        pass  # nothing was uploaded (uploaded_at is empty): every client's model is its own

    def _distribute(self, ranks, alphas, client_id):
        # a client's starting point before its first round (later rounds start from its own stored factors)
        return {n: (self._fresh_A(n, r, "client", client_id), self._zeros_B(n, r)) for n, r in ranks.items()}

    def global_delta(self, name: str) -> torch.Tensor:
        self._require_init()
        d_out, d_in = self.module_shapes[name]
        return torch.zeros(d_out, d_in, dtype=self.dtype, device=self.device)

    def _state_layout(self, name: str):
        return {}  # no tensors at all
