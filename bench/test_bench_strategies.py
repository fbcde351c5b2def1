"""One server round per aggregation strategy, against the public FlexLoRA way.

A round = aggregate the n clients' updates (validation included) and hand every
client its starting factors for the next round (FLoRA: also the merged
full-precision delta its clients fold into their base). Modules are one
transformer layer's q, k, v, o projections (square d x d); client ranks are
drawn (seeded) from RANKS, alpha = 2 r, examples per client from 10..1000.

  public_flexlora  role=baseline   plain-torch re-statement of FlexLoRA's public
                                   server: per module, sum the dense per-client
                                   products p_k s_k B_k A_k on the CPU, full SVD
                                   (torch.linalg.svd), then slice U S and V^T per client.
  flexlora         fedlora.strategies.FlexLoRA (factored SVD on the packed bank
                                   while R < d, else reconstruction + dense SVD: exact)
  flexlora_auto    the same with svd_method="auto": lowrank_svd's own choice, a
                                   seeded randomized SVD once R >= d (approximate there)
  flora, hetlora, fedavg, ffalora  the other strategies on the same clients
                                   (FedAvg: bucket mode, everyone at the smallest
                                   rank; FFA-LoRA: A frozen, so updates carry it).

Shapes: GPU d = 4096 (LLaMA-7B) with 10 / 100 / 500 clients; CPU d = 1024 with
10 / 40 clients and d = 512 with 100 clients (R > d: the dense path). The
baseline always runs on the CPU, as the public code does. Before timing, the
flexlora clients' products are checked against the baseline's.
"""
from __future__ import annotations

import random

import pytest
import torch

from fedlora.federated import ClientUpdate
from fedlora.strategies import FedAvg, FFALoRA, FlexLoRA, FLoRA, HetLoRA

from .conftest import DEVICE, SHAPE_SET, device_name, sync

CASES = {"gpu": [(4096, n) for n in (10, 100, 500)],
         "cpu": [(1024, 10), (1024, 40), (512, 100)]}[SHAPE_SET]
RANKS = (4, 8, 16, 32)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
VARIANTS = ("public_flexlora", "flexlora", "flexlora_auto", "flora", "hetlora", "fedavg", "ffalora")
ROUNDS = {"cpu": 3, "gpu": 3}[SHAPE_SET]


def make_clients(d: int, n: int, device, seed: int = 0):
    """(shapes, [(client id, rank, examples, {name: (A, B)})]) with Gaussian factors."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"model.layers.0.self_attn.{p}": (d, d) for p in PROJ}
    clients = []
    for k in range(n):
        r = rng.choice(RANKS)
        mods = {name: ((torch.randn(r, d, generator=gen) / d**0.5).to(device),
                       (torch.randn(d, r, generator=gen) / r**0.5).to(device)) for name in shapes}
        clients.append((f"c{k}", r, rng.randint(10, 1000), mods))
    return shapes, clients


def updates_at(clients, rank_of=lambda r: r, A_of=None):
    """ClientUpdates; rank_of maps a client's rank to the one it trains at, A_of(name, r) pins A."""
    ups = []
    for cid, r, n, mods in clients:
        rr = rank_of(r)
        ups.append(ClientUpdate(cid, n, rr, {name: (a[:rr] if A_of is None else A_of(name, rr), b[:, :rr], 2.0 * rr)
                                             for name, (a, b) in mods.items()}))
    return ups


def public_flexlora_round(updates, shapes):
    """FlexLoRA's public server step: dense products summed on the CPU, full SVD, slicing per client."""
    total = sum(u.num_examples for u in updates)
    out = {}
    for name, (d_out, d_in) in shapes.items():
        W = torch.zeros(d_out, d_in)
        for u in updates:
            a, b, alpha = u.modules[name]
            W += (u.num_examples / total) * (alpha / u.rank) * (b.cpu() @ a.cpu())
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        # client k: B = U_r S_r / s_k, A = V_r^T (all singular values in B, as the public code)
        out[name] = [(Vh[:u.rank], U[:, :u.rank] * S[:u.rank] / (u.modules[name][2] / u.rank)) for u in updates]
    return out


def strategy_round(strategy, updates, rank):
    strategy.aggregate(updates)
    factors = [strategy.distribute(r, cid) for cid, r in rank]
    if isinstance(strategy, FLoRA):
        factors.append(strategy.global_deltas())
    sync()
    return factors


def build(variant: str, d: int, n: int):
    """(callable timed, setup callable, updates) for one variant."""
    shapes, clients = make_clients(d, n, DEVICE if variant != "public_flexlora" else "cpu")
    min_rank, max_rank = min(c[1] for c in clients), max(c[1] for c in clients)
    if variant == "public_flexlora":
        ups = updates_at(clients)
        return (lambda: public_flexlora_round(ups, shapes)), (lambda: None), ups
    strategy = {"flexlora": lambda: FlexLoRA(), "flexlora_auto": lambda: FlexLoRA(svd_method="auto"),
                "flora": lambda: FLoRA(), "hetlora": lambda: HetLoRA(),
                "fedavg": lambda: FedAvg(heterogeneous="bucket"), "ffalora": lambda: FFALoRA()}[variant]()
    strategy.device = torch.device(DEVICE)
    global_rank = min_rank if variant == "fedavg" else max_rank

    def init():
        strategy.init_global(shapes, rank=global_rank)

    init()
    if variant == "fedavg":
        ups = updates_at(clients, rank_of=lambda r: min_rank)
    elif variant == "ffalora":
        frozen = strategy.distribute(max_rank)
        ups = updates_at(clients, A_of=lambda name, r: frozen[name][0][:r])
    else:
        ups = updates_at(clients)
    ranks = [(u.client_id, u.rank) for u in ups]
    return (lambda: strategy_round(strategy, ups, ranks)), init, ups


def _check_flexlora_against_baseline(d: int, n: int) -> None:
    run, setup, ups = build("flexlora", d, n)
    setup()
    ours = run()
    theirs = build("public_flexlora", d, n)[0]()
    name = next(iter(theirs))
    for k in (0, n - 1):
        s = 2.0  # alpha = 2 r
        a, b, alpha = ours[k][name]
        a_ref, b_ref = theirs[name][k]
        prod = (alpha / ups[k].rank) * (b.cpu().double() @ a.cpu().double())
        ref = s * (b_ref.double() @ a_ref.double())
        err = ((prod - ref).norm() / ref.norm()).item()
        assert err < 1e-3, f"flexlora client {k} differs from the public FlexLoRA result: rel err {err:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d,n", CASES, ids=[f"d{d}-n{n}" for d, n in CASES])
def test_server_round(benchmark, variant, d, n):
    if variant == "flexlora":
        _check_flexlora_against_baseline(d, n)
    run, setup, ups = build(variant, d, n)
    benchmark.group = f"server round d={d} n={n} q,k,v,o fp32"
    benchmark.extra_info.update({
        "variant": variant, "role": "baseline" if variant == "public_flexlora" else "candidate",
        "d": d, "clients": n, "modules": len(PROJ), "total_rank": sum(u.rank for u in ups),
        "device": device_name() if variant != "public_flexlora" else device_name(torch.device("cpu")),
    })
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
