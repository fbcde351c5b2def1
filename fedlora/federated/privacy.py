"""Optional client-level differential privacy for updates: clip, then add Gaussian noise.

Each update is privatised on its own (the Gaussian mechanism applied per client):
the change the client made, theta - theta_0 (theta_0 = the factors the strategy
handed it, public and data-independent), is concatenated over all modules and
over the *trainable* factors only (FFA-LoRA: B), clipped to L2 norm
``clip_norm`` = C, and every coordinate gets independent N(0, (z * C)^2) noise,
z = ``noise_multiplier``. The L2 sensitivity of the clipped change is C, so
each released update is the Gaussian mechanism with noise multiplier z; turning
z, the number of rounds and the sampling rate into (epsilon, delta) is left to
an accountant (e.g. Opacus' RDP accountant). Off unless a strategy gets a
:class:`DPConfig`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .rng import stable_seed
from .update import ClientUpdate


@dataclass(frozen=True)
class DPConfig:
    clip_norm: float
    noise_multiplier: float
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")


def privatize(
    update: ClientUpdate,
    reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    config: DPConfig,
    *,
    round_idx: int = 0,
    trainable: tuple[str, ...] = ("A", "B"),
) -> ClientUpdate:
    """A copy of ``update`` whose change from ``reference`` is clipped and noised.

    reference: module -> (A_0, B_0), the factors the client started from.
    The noise is seeded by (config.seed, round_idx, client id): reproducible, and
    different for every client and round.
    """
    if not set(trainable) <= {"A", "B"} or not trainable:
        raise ValueError(f"trainable must be a non-empty subset of ('A', 'B'), got {trainable}")
    idx = [i for i, f in enumerate("AB") if f in trainable]
    deltas = {}
    for name, (a, b, _) in update.modules.items():
        ref = reference[name]
        deltas[name] = [(a, b)[i].double() - ref[i].to(device=a.device, dtype=torch.float64) for i in idx]
    norm = math.sqrt(sum(float(d.square().sum()) for ds in deltas.values() for d in ds))
    factor = min(1.0, config.clip_norm / norm) if norm > 0 else 1.0
    gen = torch.Generator().manual_seed(stable_seed("dp", config.seed, round_idx, update.client_id))
    std = config.noise_multiplier * config.clip_norm
    modules = {}
    for name in sorted(update.modules):  # fixed order: the noise must not depend on dict order
        a, b, alpha = update.modules[name]
        new = [a, b]
        for i, d in zip(idx, deltas[name]):
            noise = torch.randn(d.shape, dtype=torch.float64, generator=gen).to(d.device) * std
            ref = reference[name][i].to(device=d.device, dtype=torch.float64)
            new[i] = (ref + d * factor + noise).to(a.dtype)
        modules[name] = (new[0], new[1], alpha)
    return ClientUpdate(update.client_id, update.num_examples, update.rank, modules, update.use_rslora,
                        dict(update.metrics))
