"""One optimizer per client, over packed adapter banks.

In a batched round every sampled client's adapter lives in one AdapterBank per
layer (rows of A, columns of B). A stock torch optimizer over the packed
parameters would share one step count, one learning rate and, worse, would
keep moving a client that has finished its steps (momentum with a zero
gradient). This optimizer keeps a step count and a learning rate per client and
touches only the rank rows/columns of the clients that stepped, so every
client follows exactly the trajectory of a torch.optim.AdamW / SGD run on its
own factors (same update formulas, same order of operations).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlora.bank import AdapterBank


class PerClientOptimizer:
    """AdamW (``kind="adamw"``) or SGD with momentum (``kind="sgd"``), per client.

    ``banks``: the layers' banks; adapter k of every bank belongs to client k.
    ``step(clients, lrs)`` applies one step for the listed clients with their
    learning rates for this step.
    """

    def __init__(self, banks: Sequence[AdapterBank], kind: str = "adamw", betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0):
        if kind not in ("adamw", "sgd"):
            raise ValueError(f"kind must be 'adamw' or 'sgd', got {kind!r}")
        self.banks = list(banks)
        if not self.banks:
            raise ValueError("no banks to optimize")
        self.num_clients = self.banks[0].num_adapters
        if any(b.num_adapters != self.num_clients for b in self.banks):
            raise ValueError("every bank must hold one adapter per client")
        self.kind, self.betas, self.eps = kind, betas, eps
        self.weight_decay, self.momentum = weight_decay, momentum
        self.steps = [0] * self.num_clients
        self._state: dict[int, dict[str, torch.Tensor]] = {}
        # owner[i] = client of rank index i, per bank (ranks may differ per layer).
        self._owner = [
            torch.repeat_interleave(torch.arange(self.num_clients), torch.tensor(b.ranks)).to(b.device)
            for b in self.banks
        ]

    def parameters(self):
        for b in self.banks:
            yield b.A
            yield b.B

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    @torch.no_grad()
    def step(self, clients: Sequence[int], lrs: Sequence[float]) -> None:
        if len(clients) != len(lrs):
            raise ValueError(f"{len(clients)} clients but {len(lrs)} learning rates")
        lr_of = [0.0] * self.num_clients
        active = [False] * self.num_clients
        for k, lr in zip(clients, lrs):
            self.steps[k] += 1
            lr_of[k], active[k] = float(lr), True
        for bank, owner in zip(self.banks, self._owner):
            per_client = self._per_client_scalars(lr_of, active, bank.device)
            rows = {name: t[owner] for name, t in per_client.items()}  # one value per rank index
            for param, axis in ((bank.A, 0), (bank.B, 1)):
                if param.grad is None:
                    continue
                shape = (-1, 1) if axis == 0 else (1, -1)
                self._update(param, {k: v.view(shape) for k, v in rows.items()})

    def _per_client_scalars(self, lr_of, active, device) -> dict[str, torch.Tensor]:
        b1, b2 = self.betas
        f64 = dict(dtype=torch.float64)
        out = {"lr": torch.tensor(lr_of, **f64), "active": torch.tensor(active)}
        if self.kind == "adamw":
            steps = [max(s, 1) for s in self.steps]
            bc1 = [1 - b1**s for s in steps]
            out["step_size"] = torch.tensor([lr / c for lr, c in zip(lr_of, bc1)], **f64)
            out["bc2_sqrt"] = torch.tensor([math.sqrt(1 - b2**s) for s in steps], **f64)
        else:
            out["first"] = torch.tensor([s == 1 for s in self.steps])
        return {k: v.to(device) for k, v in out.items()}

    def _update(self, p: torch.Tensor, r: dict[str, torch.Tensor]) -> None:
        g = p.grad
        state = self._state.setdefault(id(p), {})
        active = r["active"]
        dt = p.dtype
        if self.kind == "adamw":
            b1, b2 = self.betas
            m = state.setdefault("exp_avg", torch.zeros_like(p))
            v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
            new_p = p * (1 - r["lr"] * self.weight_decay).to(dt)
            new_m = m.lerp(g, 1 - b1)
            new_v = v * b2 + (1 - b2) * g * g
            denom = new_v.sqrt() / r["bc2_sqrt"].to(dt) + self.eps
            new_p = new_p - r["step_size"].to(dt) * new_m / denom
            m.copy_(torch.where(active, new_m, m))
            v.copy_(torch.where(active, new_v, v))
        else:
            d_p = g + self.weight_decay * p if self.weight_decay else g
            if self.momentum:
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                new_buf = torch.where(r["first"], d_p, buf * self.momentum + d_p)
                buf.copy_(torch.where(active, new_buf, buf))
                d_p = new_buf
            new_p = p - r["lr"].to(dt) * d_p
        p.copy_(torch.where(active, new_p, p))


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of a client's ``step``-th step (0-based) of ``total_steps``."""
    if schedule == "constant" or total_steps <= 1:
        return base_lr
    frac = step / total_steps
    if schedule == "linear":
        return base_lr * (1 - frac)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}")
