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

The rules of the exact-aggregation family, one group per rule and shape
(``test_rule_round``), each against ``public_<rule>`` (role baseline): a
plain-torch re-statement of the rule's published formula with dense math, on
the same device as fedlora's rule (clients at one rank, 16, where the rule
needs one):

  public_fedexlora  averages, then the residual sum_k p_k s_k B_k A_k - B_bar A_bar as a
                    dense d x d matrix per module added into each client's base (the public
                    code's), the averaged factors handed out
  public_fedsvd     B averaged, then torch.linalg.svd of the dense B_bar A, A <- V_R^T,
                    B <- U_R S_R, truncations handed out
  public_lorafair   averages, the dense exact average M, then dB from a dense least squares
                    (torch.linalg.lstsq of A_bar^T dB^T = (M - B_bar A_bar)^T)
  public_rolora     the round's trained factor (round 0: B) averaged client by client
  public_fedsalora  A averaged client by client (B stays with the clients)

against fedexlora, fedsvd, lorafair, rolora, fedsalora (fedlora.strategies; the
FedEx-LoRA round includes merging the residual factors into the dense delta a
client folds). fedlora's rounds also validate every update (shapes, finite values,
norm bounds and outliers, a frozen factor unchanged), which the re-statements do
not: where the public server is only an average (RoLoRA, FedSA-LoRA) that check
is most of fedlora's time. Before timing, each rule's global result (FedSA-LoRA:
its A) is checked against its baseline's.
"""
from __future__ import annotations

import random

import pytest
import torch

from fedlora.federated import ClientUpdate
from fedlora.strategies import FedAvg, FedExLoRA, FedSALoRA, FedSVD, FFALoRA, FlexLoRA, FLoRA, HetLoRA, LoRAFAIR, RoLoRA
from fedlora.strategies.base import merge_parts

from .conftest import DEVICE, SHAPE_SET, device_name, sync

CASES = {"gpu": [(4096, n) for n in (10, 100, 500)],
         "cpu": [(1024, 10), (1024, 40), (512, 100)]}[SHAPE_SET]
RANKS = (4, 8, 16, 32)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
VARIANTS = ("public_flexlora", "flexlora", "flexlora_auto", "flora", "hetlora", "fedavg", "ffalora")
ROUNDS = {"cpu": 3, "gpu": 3}[SHAPE_SET]


def make_clients(d: int, n: int, device, seed: int = 0, ranks=RANKS):
    """(shapes, [(client id, rank, examples, {name: (A, B)})]) with Gaussian factors, ranks drawn from ``ranks``."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"model.layers.0.self_attn.{p}": (d, d) for p in PROJ}
    clients = []
    for k in range(n):
        r = rng.choice(ranks)
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
    base = strategy.client_base()  # FLoRA's update, FedEx-LoRA's residual: merged as a client folds it
    if base:
        factors.append(merge_parts(base))
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


# --------------------------------------------------- the exact-aggregation family
RULES = {"fedexlora": FedExLoRA, "fedsvd": FedSVD, "lorafair": LoRAFAIR, "rolora": RoLoRA, "fedsalora": FedSALoRA}
ONE_RANK = {"fedexlora": 16, "fedsalora": 16}  # the rule needs (FedEx-LoRA) or its paper uses (FedSA-LoRA) one rank
FROZEN_A = ("fedsvd", "rolora")  # clients train B against the A they were sent (RoLoRA's round 0)


def _p(updates):
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def _padded(updates, name, R, factor):
    """sum_k p_k pad(A_k) or sum_k p_k s_k pad(B_k), client by client."""
    a0, b0, _ = updates[0].modules[name]
    out = a0.new_zeros(R, a0.shape[1]) if factor == "A" else b0.new_zeros(b0.shape[0], R)
    for u, p in zip(updates, _p(updates)):
        a, b, alpha = u.modules[name]
        r = a.shape[0]
        if factor == "A":
            out[:r] += p * a
        else:
            out[:, :r] += (p * alpha / r) * b
    return out


def _dense_average(updates, name):
    return sum((p * alpha / a.shape[0]) * (b @ a) for u, p in zip(updates, _p(updates))
               for a, b, alpha in [u.modules[name]])


def public_rule_round(rule, updates, shapes, state):
    """The rule's published server step with dense math; ``state``: module -> its global tensors."""
    R = max(u.rank for u in updates)
    out = {}
    for name in shapes:
        if rule == "fedexlora":
            A, B = _padded(updates, name, R, "A"), _padded(updates, name, R, "B")
            state[name]["W"] = state[name]["W"] + (_dense_average(updates, name) - B @ A)  # into the base
            out[name] = (A, B, state[name]["W"])
        elif rule == "fedsvd":
            B = _padded(updates, name, R, "B")
            U, S, Vh = torch.linalg.svd(B @ state[name]["A"], full_matrices=False)
            out[name] = (Vh[:R], U[:, :R] * S[:R])
        elif rule == "lorafair":
            A, B = _padded(updates, name, R, "A"), _padded(updates, name, R, "B")
            target = _dense_average(updates, name) - B @ A
            dB = torch.linalg.lstsq(A.T, target.T).solution.T
            out[name] = (A, B + dB)
        elif rule == "rolora":
            out[name] = (state[name]["A"], _padded(updates, name, R, "B"))
        else:  # fedsalora
            out[name] = (_padded(updates, name, R, "A"),)
    # every client gets the global factors at its rank (B divided by its scaling s = 2: alpha = 2 r);
    # FedEx-LoRA's clients also the dense residual W, FedSA-LoRA's the shared A only
    handed = [{name: tuple(t[:u.rank].clone() if i == 0 else t[:, :u.rank] / 2.0 for i, t in enumerate(parts[:2]))
               for name, parts in out.items()} for u in updates]
    sync()
    return out, handed


def build_rule(rule: str, variant: str, d: int, n: int):
    """(callable timed, setup callable, updates, result of one round -> {module: global product})."""
    one = ONE_RANK.get(rule)
    shapes, clients = make_clients(d, n, DEVICE, ranks=(one,) if one else RANKS)
    R = one or max(c[1] for c in clients)
    strategy = RULES[rule]()
    strategy.device = torch.device(DEVICE)
    strategy.init_global(shapes, rank=R)
    frozen = strategy.distribute(R)
    A_of = (lambda name, r: frozen[name][0][:r]) if rule in FROZEN_A else None
    ups = updates_at(clients, A_of=A_of)
    if variant == "public":
        state = {}

        def init():
            state.update({name: {"A": frozen[name][0], "W": torch.zeros(shape, device=DEVICE)}
                          for name, shape in shapes.items()})

        def product(result):
            out = result[0]
            if rule == "fedsalora":
                return {name: parts[0] for name, parts in out.items()}
            return {name: parts[1] @ parts[0] + (parts[2] if rule == "fedexlora" else 0)
                    for name, parts in out.items()}

        return (lambda: public_rule_round(rule, ups, shapes, state)), init, ups, product

    def init():
        strategy.init_global(shapes, rank=R)

    def product(_):
        if rule == "fedsalora":
            return {name: strategy._tensors[f"{name}.A"] for name in shapes}
        return strategy.global_deltas()

    ranks = [(u.client_id, u.rank) for u in ups]
    return (lambda: strategy_round(strategy, ups, ranks)), init, ups, product


def _check_rule_against_baseline(rule: str, d: int, n: int) -> None:
    results = {}
    for variant in ("public", "fedlora"):
        run, setup, _, product = build_rule(rule, variant, d, n)
        setup()
        results[variant] = product(run())
    for name, ref in results["public"].items():
        got = results["fedlora"][name]
        # fp32 sums of n products and an SVD or a small solve: relative rounding ~1e-6, far under 1e-3
        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 1e-3, f"{rule} differs from its public formula on {name}: rel err {err:.2e}"


@pytest.mark.parametrize("variant", ["public", "fedlora"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("d,n", CASES, ids=[f"d{d}-n{n}" for d, n in CASES])
def test_rule_round(benchmark, rule, variant, d, n):
    if variant == "fedlora":
        _check_rule_against_baseline(rule, d, n)
    run, setup, ups, _ = build_rule(rule, variant, d, n)
    name = f"public_{rule}" if variant == "public" else rule
    benchmark.group = f"{rule} server round d={d} n={n} q,k,v,o fp32"
    benchmark.extra_info.update({
        "variant": name, "role": "baseline" if variant == "public" else "candidate",
        "d": d, "clients": n, "modules": len(PROJ), "total_rank": sum(u.rank for u in ups), "device": device_name(),
    })
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
