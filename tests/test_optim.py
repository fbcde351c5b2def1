"""PerClientOptimizer against stock torch optimizers run per client on its own factors."""
from __future__ import annotations

import pytest
import torch

from fedlora.bank import AdapterBank
from fedlora.simulation.optim import PerClientOptimizer, scheduled_lr

RANKS = [[2, 3, 5], [1, 4, 2]]  # per bank (layers may differ), one adapter per client
SHAPES = [(7, 6), (5, 9)]  # (d_out, d_in) per bank
# Which clients step at each step (client 1 skips steps, client 2 stops early), and their lrs.
SCHEDULE = [[0, 1, 2], [0, 2], [0, 1], [0], [1, 2], [0, 1]]


def lr_of(client: int, step: int) -> float:
    return 1e-2 * (1 + client) / (1 + 0.3 * step)


def _setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    factors = [[(torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)) for r in ranks]
               for ranks, (d_out, d_in) in zip(RANKS, SHAPES)]
    banks = [AdapterBank.from_factors([(a.clone(), b.clone()) for a, b in f], [1.0] * len(f)) for f in factors]
    for bank in banks:
        bank.requires_grad_(True)
    # Reference: client k owns a leaf copy of its factors in every bank.
    refs = [[torch.nn.Parameter(t.clone()) for f in factors for t in f[k]] for k in range(3)]
    return banks, refs, gen


def _run(kind, ref_opt, **kw):
    banks, refs, gen = _setup()
    opt = PerClientOptimizer(banks, kind, **kw)
    ref_opts = [ref_opt(params) for params in refs]
    for step, clients in enumerate(SCHEDULE):
        # One gradient for every factor; clients that do not step get garbage they must ignore.
        grads = [[(torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)) for r in ranks]
                 for ranks, (d_out, d_in) in zip(RANKS, SHAPES)]
        for bank, g in zip(banks, grads):
            bank.A.grad = torch.cat([a for a, _ in g])
            bank.B.grad = torch.cat([b for _, b in g], dim=1)
        opt.step(clients, [lr_of(k, step) for k in clients])
        opt.zero_grad()
        for k in clients:
            for p, gk in zip(refs[k], [t for g in grads for t in g[k]]):
                p.grad = gk.clone()
            for group in ref_opts[k].param_groups:
                group["lr"] = lr_of(k, step)
            ref_opts[k].step()
            ref_opts[k].zero_grad()
    worst = 0.0
    for k in range(3):
        got = [t for bank in banks for t in bank.factors(k)]
        for g, r in zip(got, refs[k]):
            torch.testing.assert_close(g, r.detach(), rtol=1e-6, atol=1e-7)
            worst = max(worst, (g - r.detach()).abs().max().item())
    assert opt.steps == [sum(k in c for c in SCHEDULE) for k in range(3)]
    return worst


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_per_client(weight_decay):
    worst = _run("adamw", lambda ps: torch.optim.AdamW(ps, lr=1.0, weight_decay=weight_decay),
                 weight_decay=weight_decay)
    assert worst < 1e-6


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05)])
def test_sgd_matches_torch_per_client(momentum, weight_decay):
    worst = _run("sgd", lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=momentum, weight_decay=weight_decay),
                 momentum=momentum, weight_decay=weight_decay)
    assert worst < 1e-6


def test_frozen_A_is_left_alone():
    banks, _, _ = _setup()
    before = [b.A.detach().clone() for b in banks]
    opt = PerClientOptimizer(banks, "adamw")
    for bank in banks:
        bank.A.grad = None  # FFA-LoRA: A takes no gradient
        bank.B.grad = torch.ones_like(bank.B)
    opt.step([0, 1, 2], [0.1] * 3)
    assert all(torch.equal(b.A, a) for b, a in zip(banks, before))


def test_rejects_bad_arguments():
    banks, _, _ = _setup()
    with pytest.raises(ValueError, match="kind"):
        PerClientOptimizer(banks, "adam")
    with pytest.raises(ValueError, match="no banks"):
        PerClientOptimizer([], "sgd")
    uneven = AdapterBank.from_factors([(torch.zeros(1, 3), torch.zeros(2, 1))], [1.0])
    with pytest.raises(ValueError, match="one adapter per client"):
        PerClientOptimizer([banks[0], uneven])
    with pytest.raises(ValueError, match="learning rates"):
        PerClientOptimizer(banks).step([0, 1], [0.1])


def test_scheduled_lr():
    assert scheduled_lr(0.1, "constant", 3, 4) == 0.1
    assert [scheduled_lr(1.0, "linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert scheduled_lr(1.0, "cosine", 0, 4) == 1.0 and scheduled_lr(1.0, "cosine", 2, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        scheduled_lr(1.0, "step", 1, 4)
