"""Random client updates and float64 references for the federated tests."""
from __future__ import annotations

import torch

from fedlora.bank import lora_scaling
from fedlora.federated import ClientUpdate

SHAPES = {  # two modules share a shape (batched ops path), one is rectangular
    "model.layers.0.self_attn.q_proj": (48, 40),
    "model.layers.0.self_attn.v_proj": (48, 40),
    "model.layers.0.self_attn.o_proj": (40, 48),
}


def random_update(cid: str, rank: int, shapes=SHAPES, *, n: int = 10, alpha: float | None = None, seed: int = 0,
                  dtype=torch.float32, use_rslora: bool = False, module_ranks=None) -> ClientUpdate:
    """Nonzero Gaussian factors; alpha defaults to 2 * (module) rank (scaling 2).

    module_ranks: name -> rank for modules that train below ``rank`` (per-module ranks)."""
    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for name, (d_out, d_in) in shapes.items():
        r = (module_ranks or {}).get(name, rank)
        a = torch.randn(r, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
        b = torch.randn(d_out, r, generator=gen, dtype=torch.float64) / r**0.5
        mods[name] = (a.to(dtype), b.to(dtype), 2.0 * r if alpha is None else alpha)
    return ClientUpdate(cid, n, rank, mods, use_rslora)


def updates_for(ranks, shapes=SHAPES, *, seed: int = 0, **kw) -> list[ClientUpdate]:
    return [random_update(f"c{i}", r, shapes, n=3 + 7 * i, seed=seed * 1000 + i, **kw) for i, r in enumerate(ranks)]


def data_weights(updates) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def product64(a, b, scaling) -> torch.Tensor:
    return scaling * (b.double() @ a.double())


def weighted_delta64(updates, name, weights=None) -> torch.Tensor:
    """sum_k w_k s_k B_k A_k in float64."""
    weights = data_weights(updates) if weights is None else weights
    out = 0
    for u, w in zip(updates, weights):
        a, b, alpha = u.modules[name]
        out = out + w * product64(a, b, lora_scaling(alpha, a.shape[0], u.use_rslora))
    return out


def best_rank64(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def client_product(factors, name, rank, use_rslora=False) -> torch.Tensor:
    a, b, alpha = factors[name]
    return product64(a, b, lora_scaling(alpha, rank, use_rslora))


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def trained_updates(strategy, ranks, trained=("A", "B"), *, seed: int = 0, dtype=torch.float32,
                    client_ids=None, num_examples=None) -> list[ClientUpdate]:
    """What clients send after a round: each starts from ``strategy.distribute`` at its rank (alpha 2 r)
    and moves the factors in ``trained`` by fresh Gaussian steps (B ~ 1/sqrt(r), A ~ 1/sqrt(d_in));
    the other factor comes back as it was sent."""
    gen = torch.Generator().manual_seed(seed)
    ids = client_ids or [f"c{i}" for i in range(len(ranks))]
    sizes = num_examples or [3 + 7 * i for i in range(len(ranks))]
    out = []
    for cid, r, n in zip(ids, ranks, sizes):
        mods = {}
        for name, (a, b, alpha) in strategy.distribute(r, cid, alpha=2.0 * r).items():
            a, b = a.double(), b.double()
            if "A" in trained:
                a = a + torch.randn(a.shape, generator=gen, dtype=torch.float64) / a.shape[1] ** 0.5
            if "B" in trained:
                b = b + torch.randn(b.shape, generator=gen, dtype=torch.float64) / r**0.5
            mods[name] = (a.to(dtype), b.to(dtype), alpha)
        out.append(ClientUpdate(cid, n, r, mods))
    return out
