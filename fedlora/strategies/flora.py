"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, arXiv 2409.05976).

Stacking: the round's global update is exactly

    dW_t = sum_k p_k s_k B_k A_k = [p_1 s_1 B_1 | ... | p_n s_n B_n] [A_1; ...; A_n]

(the stacked factors; any mix of ranks, no noise from cross terms). dW_t is
folded into the global model, and clients start the next round from fresh
LoRA (seeded A, B = 0) on top of base + sum_t dW_t.

State per module (full precision, kept *beside* the base weight so a 4-bit
base is never re-quantized): the accumulated delta  D = dense + B_stack A_stack.
New rounds append their stacked factors; once the stack holds more numbers
than a dense [d_out, d_in] matrix (R_stack (d_out + d_in) > d_out d_in) it is
added into ``dense`` (one lora_delta call) and emptied, so memory stays at
most about twice a dense delta while early rounds stay small (``dense`` is
not allocated until then). The last
round's stacked factors are kept too (``round_factors``): that is what the
paper broadcasts, for clients that add it to their own copy of the model.

Server optimizers (``server_opt``, :mod:`fedlora.strategies.server_opt`) act on D in weight
space: the pseudo-gradient is the round's stacked product dW_t (clients start from zero LoRA
on top of D, so the aggregate is exactly the change) and D_t = D_{t-1} + the step, appended to
the stack as factors (avgm) or added to ``dense`` (adam, yogi, adagrad: an elementwise step is
dense). ``round_factors`` then holds the factored part of the round's step.

``global_delta(name)`` / ``global_deltas()`` give D; fold it beside the base
with :func:`fedlora.layers.fold_deltas`. A client on another machine needs
only ``client_base()`` (the stack while it is smaller than a dense matrix)
and rebuilds D with :func:`~fedlora.strategies.base.merge_parts`.
"""
from __future__ import annotations

import torch

from .base import Strategy, merge_parts
from .parts import add_parts, get_parts, init_parts


class FLoRA(Strategy):
    name = "flora"
    server_opt_space = "delta"

    def _init_state(self) -> None:
        init_parts(self._tensors, self.module_shapes, "", self.dtype, self.device)
        for name, (d_out, d_in) in self.module_shapes.items():
            self._tensors[f"{name}.round_A"] = torch.zeros(0, d_in, dtype=self.dtype, device=self.device)
            self._tensors[f"{name}.round_B"] = torch.zeros(d_out, 0, dtype=self.dtype, device=self.device)

    def _state_layout(self, name: str):
        return {"dense": [(0,), ("d_out", "d_in")], "A": [("r", "d_in")], "B": [("d_out", "r")],
                "round_A": [("q", "d_in")], "round_B": [("d_out", "q")]}

    def _distribute(self, ranks, alphas, client_id):
        # Fresh LoRA each round; a client's A depends on (seed, round, client, module) only.
        return {n: (self._fresh_A(n, r, self.round, client_id), self._zeros_B(n, r)) for n, r in ranks.items()}

    def _aggregate(self, updates, weights):
        self._apply_step(self._pseudo_gradient(updates, weights), updates)

    def _pseudo_gradient(self, updates, weights):
        """The round's stacked product  sum_k p_k s_k B_k A_k  per module, as (None, A_stack, B_stack)."""
        w = weights.tolist()
        return {name: (None, torch.cat([u.modules[name][0] for u in updates], dim=0),
                       torch.cat([u.modules[name][1] * (wk * u.scaling(name)) for u, wk in zip(updates, w)], dim=1))
                for name in self.module_shapes}

    def _apply_step(self, steps, updates):
        """D += step: its factors appended to the stack, its dense part (if any) added into ``dense``."""
        for name in self.module_shapes:
            _, self._tensors[f"{name}.round_A"], self._tensors[f"{name}.round_B"] = steps[name]
        add_parts(self._tensors, self.module_shapes, "", steps)

    def client_base(self, client_id=None):
        """Per module (dense or None, A_stack [R, d_in], B_stack [d_out, R]): D = dense + B_stack A_stack.

        Every client trains on top of D (the sum of all rounds' updates), the same for
        all clients. What a client needs to rebuild it: R (d_out + d_in) numbers while
        the stack is smaller than a dense matrix (:func:`merge_parts` rebuilds D).
        None before the first aggregation (D is zero then).
        """
        self._require_init()
        if self.round == 0:
            return None
        return {n: self._parts(n) for n in self.module_shapes}

    def round_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The last round's stacked (A [R, d_in], B [d_out, R]) with B A = dW of that round (with a
        server optimizer: the factored part of the round's step)."""
        self._require_init()
        return self._tensors[f"{name}.round_A"], self._tensors[f"{name}.round_B"]

    def global_delta(self, name: str) -> torch.Tensor:
        """Sum of every round's global update for ``name``, dense [d_out, d_in], full precision."""
        self._require_init()
        return merge_parts({name: self._parts(name)})[name]

    def global_deltas(self) -> dict[str, torch.Tensor]:
        """global_delta of every module, one batched lora_delta per shape group."""
        self._require_init()
        return merge_parts({n: self._parts(n) for n in self.module_shapes})

    def _parts(self, name: str):
        return get_parts(self._tensors, name, "")
