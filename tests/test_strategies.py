"""The five aggregation rules against float64 references written out by hand."""
import logging
import math
import pickle
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.bank import lora_scaling
from fedlora.federated import DPConfig
from fedlora.layers import fold_deltas
from fedlora.strategies import (FedAvg, FFALoRA, FlexLoRA, FLoRA, HetLoRA, Strategy, rank_self_pruning_penalty,
                                self_pruned_rank, tail_norm)

from .fl_helpers import (SHAPES, best_rank64, client_product, data_weights, product64, random_update, rel,
                         updates_for, weighted_delta64)

TOL = 2e-6  # fp32 state against float64 references
NAMES = list(SHAPES)


def _init(strategy, rank=None, shapes=SHAPES, alpha=None):
    strategy.init_global(shapes, rank=rank, alpha=alpha)
    return strategy


# ------------------------------------------------------------------- FLoRA
def test_flora_round_delta_is_the_exact_weighted_sum():
    s = _init(FLoRA())
    ups = updates_for([2, 5, 3, 8])
    res = s.aggregate(ups)
    assert res.changed and res.accepted == ["c0", "c1", "c2", "c3"] and s.round == 1
    for name in NAMES:
        ref = weighted_delta64(ups, name)
        assert rel(s.global_delta(name), ref) < TOL
        A, B = s.round_factors(name)
        assert A.shape[0] == 18 and rel(B @ A, ref) < TOL


def test_flora_accumulates_rounds_across_the_dense_switch():
    s = _init(FLoRA())
    total = {n: 0 for n in NAMES}
    for rnd, ranks in enumerate([[2, 3], [4, 4, 8], [16], [1, 2, 3]]):  # stack passes 24 = 48*40/88 in round 3
        ups = updates_for(ranks, seed=rnd)
        s.aggregate(ups)
        for n in NAMES:
            total[n] = total[n] + weighted_delta64(ups, n)
        if rnd == 1:
            assert s._tensors[f"{NAMES[0]}.A"].shape[0] == 21 and s._tensors[f"{NAMES[0]}.dense"].numel() == 0
    assert s._tensors[f"{NAMES[0]}.dense"].shape == (48, 40) and s._tensors[f"{NAMES[0]}.A"].shape[0] == 6
    deltas = s.global_deltas()
    for n in NAMES:
        assert rel(deltas[n], total[n]) < TOL


def test_flora_clients_start_fresh_and_seeded():
    s = _init(FLoRA())
    f1, f2 = s.distribute(4, "c1"), s.distribute(4, "c2")
    a1, b1, alpha = f1[NAMES[0]]
    assert alpha == 4.0 and not b1.any() and a1.shape == (4, 40)
    assert torch.equal(a1, s.distribute(4, "c1")[NAMES[0]][0]) and not torch.equal(a1, f2[NAMES[0]][0])
    s.aggregate(updates_for([4]))
    assert not torch.equal(a1, s.distribute(4, "c1")[NAMES[0]][0])  # a new round draws a new A


def test_flora_folded_beside_a_4bit_base_is_exact():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.o_proj": (64, 64)}
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    attn = model.model.layers[0].self_attn = torch.nn.Module()
    for proj in ("q_proj", "o_proj"):
        q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, quant_type="nf4")
        setattr(attn, proj, q.to("cpu"))  # .to quantizes
    x = torch.randn(7, 64)
    base_out = {p: getattr(attn, p)(x) for p in ("q_proj", "o_proj")}

    s = _init(FLoRA(), shapes=shapes)
    total = {n: 0 for n in shapes}
    for rnd in range(3):
        ups = updates_for([2, 8, 4], shapes, seed=rnd)
        s.aggregate(ups)
        for n in shapes:
            total[n] = total[n] + weighted_delta64(ups, n)
        fold_deltas(model, s.global_deltas(), mode="set")
        for n, proj in zip(shapes, ("q_proj", "o_proj")):
            expect = base_out[proj].double() + x.double() @ total[n].T
            assert rel(getattr(attn, proj)(x), expect) < TOL
    # the wrapper really holds a full-precision delta beside the still-4-bit weight
    assert isinstance(attn.q_proj.base, bnb.nn.Linear4bit) and attn.q_proj.delta.dtype == torch.float32
    # re-quantizing base + delta would not meet the tolerance this test demands
    q_total = total["model.layers.0.self_attn.q_proj"]
    w = bnb.functional.dequantize_4bit(attn.q_proj.base.weight.data, attn.q_proj.base.weight.quant_state)
    requant = bnb.nn.Params4bit(w + q_total.float(), requires_grad=False, quant_type="nf4").to("cpu")
    lossy = bnb.functional.dequantize_4bit(requant.data, requant.quant_state)
    assert rel(x @ lossy.T - base_out["q_proj"], x.double() @ q_total.T) > 100 * TOL


def test_fold_add_mode_accumulates_round_updates():
    lin = torch.nn.Linear(40, 48)
    model = torch.nn.Sequential(lin)
    x = torch.randn(3, 40)
    y0 = lin(x)
    d1, d2 = torch.randn(48, 40), torch.randn(48, 40)
    fold_deltas(model, {"0": d1}, mode="add")
    fold_deltas(model, {"0": d2}, mode="add")
    assert rel(model(x), y0.double() + x.double() @ (d1 + d2).double().T) < TOL
    with pytest.raises(ValueError, match="delta has shape"):
        fold_deltas(model, {"0": torch.zeros(40, 48)})


# ---------------------------------------------------------------- FlexLoRA
@pytest.mark.parametrize("ranks", [[2, 4, 8, 3], [8] * 7])  # R = 17 < 40 (factored) and 56 >= 40 (dense)
@pytest.mark.parametrize("split", ["sqrt", "B"])
def test_flexlora_clients_get_the_best_rank_r_approximation(ranks, split):
    s = _init(FlexLoRA(sv_split=split), alpha=None)
    ups = updates_for(ranks)
    s.aggregate(ups)
    for name in NAMES:
        dW = weighted_delta64(ups, name)
        for r, alpha in [(2, 2.0), (3, 16.0), (8, 8.0)]:
            f = s.distribute(r, "x", alpha=alpha)
            assert f[name][0].shape == (r, SHAPES[name][1]) and f[name][2] == alpha
            assert rel(client_product(f, name, r), best_rank64(dW, r)) < 1e-5
        assert rel(s.global_delta(name), best_rank64(dW, max(ranks))) < 1e-5
    a, b, _ = s.distribute(4)[NAMES[0]]
    if split == "sqrt":  # balanced: each factor carries sqrt(S)
        assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-4)
    else:  # A = V^T has orthonormal rows
        assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)


def test_flexlora_full_rank_reproduces_the_weighted_average_of_products():
    ranks = [3, 3, 3]
    s = _init(FlexLoRA(max_rank=9))
    ups = updates_for(ranks)
    s.aggregate(ups)
    f = s.distribute(9, alpha=4.0)
    for name in NAMES:
        assert rel(client_product(f, name, 9), weighted_delta64(ups, name)) < 1e-5


def test_flexlora_before_any_round_and_above_the_kept_rank():
    s = _init(FlexLoRA())
    a, b, _ = s.distribute(4, "c")[NAMES[0]]
    assert not b.any() and a.abs().max() > 0  # fresh LoRA: zero product, trainable A
    ups = updates_for([2, 3])
    s.aggregate(ups)  # keeps K = 3 triplets
    f = s.distribute(6, "c", alpha=6.0)
    a, b, _ = f[NAMES[0]]
    assert a.shape == (6, 40) and not b[:, 3:].any() and a[3:].abs().max() > 0
    assert rel(client_product(f, NAMES[0], 6), best_rank64(weighted_delta64(ups, NAMES[0]), 3)) < 1e-5


def test_flexlora_keeps_the_federations_largest_rank_across_rounds():
    """A rank-8 client that was not sampled in a round whose largest rank was 4 still starts from the
    best rank-8 approximation of that round's dW (K = the federation's largest rank, not the round's)."""
    s = _init(FlexLoRA(), rank=8)  # make_strategy's global rank: the federation's largest (8)
    ups = updates_for([2, 3, 4])  # total rank 9 > 8: the rank-8 truncation is not dW itself
    s.aggregate(ups)
    for name in NAMES:
        dW = weighted_delta64(ups, name)
        assert s._tensors[f"{name}.S"].shape == (8,)
        f = s.distribute(8, "skipped", alpha=16.0)
        assert rel(client_product(f, name, 8), best_rank64(dW, 8)) < 1e-5
        assert rel(best_rank64(dW, 8), best_rank64(dW, 4)) > 1e-2  # the old K = 4 state would be far off
    capped = _init(FlexLoRA(max_rank=4), rank=8)  # max_rank still caps K
    capped.aggregate(ups)
    f = capped.distribute(8, "skipped", alpha=16.0)
    assert rel(client_product(f, NAMES[0], 8), best_rank64(weighted_delta64(ups, NAMES[0]), 4)) < 1e-5


def test_flexlora_default_in_its_own_regime_is_krylov_to_its_tolerance(monkeypatch):
    """100 clients of ranks 4..24 on a 384 x 384 module: the total rank (~1300) is past the layer's
    size, FlexLoRA's regime. The default svd_method ("auto") runs block Krylov there; the kept
    top-K (K = 24) is the float64 best rank-24 approximation to lowrank_svd's tol = 1e-4 (relative,
    the bound Krylov certifies on U_K S_K V_K^T), and so is what a rank-K client gets."""
    import fedlora.strategies.flexlora as flexlora_module
    real, methods = flexlora_module.ops.lowrank_svd, []

    def spy(*args, **kw):
        info = {}
        out = real(*args, info=info, **kw)
        methods.append(info["method"])
        return out
    monkeypatch.setattr(flexlora_module.ops, "lowrank_svd", spy)
    gen = torch.Generator().manual_seed(13)
    ranks = [int(r) for r in torch.tensor([4, 8, 16, 24])[torch.randint(0, 4, (100,), generator=gen)]]
    shapes = {"m": (384, 384)}
    s = _init(FlexLoRA(), rank=24, shapes=shapes)
    ups = updates_for(ranks, shapes, seed=7)
    s.aggregate(ups)
    assert sum(ranks) > 384 and methods == ["krylov"]
    best = best_rank64(weighted_delta64(ups, "m"), 24)
    assert rel(s.global_delta("m"), best) < 1e-4
    assert rel(client_product(s.distribute(24, "x", alpha=48.0), "m", 24), best) < 1e-4


def test_make_strategy_gives_flexlora_the_federations_ranks():
    from fedlora.simulation.config import SimConfig
    from fedlora.simulation.setup import make_strategy

    cfg = SimConfig(strategy="flexlora", rank_pattern={"o_proj": 0.5})
    s = make_strategy(cfg, SHAPES, [4, 16, 8])
    assert s.module_ranks == {NAMES[0]: 16, NAMES[1]: 16, NAMES[2]: 8}
    ups = updates_for([4, 8], module_ranks={NAMES[2]: 2})
    s.aggregate(ups)
    # K per module: the federation's largest rank of the module, capped by the round's total rank
    assert [s._tensors[f"{n}.S"].shape[0] for n in NAMES] == [12, 12, 4]


@settings(max_examples=12, deadline=None)
@given(ranks=st.lists(st.integers(1, 9), min_size=1, max_size=6), r=st.integers(1, 9),
       d_out=st.integers(10, 30), d_in=st.integers(10, 30), seed=st.integers(0, 10**6))
def test_flexlora_property(ranks, r, d_out, d_in, seed):
    shapes = {"m": (d_out, d_in)}
    s = _init(FlexLoRA(max_rank=9, dtype=torch.float64), shapes=shapes)
    ups = updates_for(ranks, shapes, seed=seed, dtype=torch.float64)
    s.aggregate(ups)
    dW = weighted_delta64(ups, "m")
    S = torch.linalg.svdvals(dW)
    k = min(r, sum(ranks), d_out, d_in)
    if k < len(S) and S[k - 1] - S[k] < 1e-6 * S[0]:
        return  # no unique best approximation at a repeated singular value
    f = s.distribute(r, alpha=3.0)
    assert rel(client_product(f, "m", r), best_rank64(dW, k)) < 1e-9


# ------------------------------------------------------------------ HetLoRA
def _hetlora_reference(ups, name, R, weights):
    """Zero-pad to R, average A and s*B separately: written out client by client."""
    d_out, d_in = SHAPES[name]
    A = torch.zeros(R, d_in, dtype=torch.float64)
    B = torch.zeros(d_out, R, dtype=torch.float64)
    for u, w in zip(ups, weights):
        a, b, alpha = u.modules[name]
        r = a.shape[0]
        a_pad = torch.cat([a.double(), torch.zeros(R - r, d_in, dtype=torch.float64)])
        b_pad = torch.cat([b.double(), torch.zeros(d_out, R - r, dtype=torch.float64)], dim=1)
        A += w * a_pad
        B += w * lora_scaling(alpha, r) * b_pad
    return A, B


@pytest.mark.parametrize("weighting", ["sparsity", "examples"])
def test_hetlora_padded_average_and_truncation(weighting):
    s = _init(HetLoRA(weighting=weighting), rank=8)
    ups = updates_for([2, 8, 5, 3])
    s.aggregate(ups)
    for name in NAMES:
        if weighting == "sparsity":
            norms = [product64(*u.modules[name][:2], u.scaling(name)).norm().item() for u in ups]
            weights = [v / sum(norms) for v in norms]
            assert max(weights) / min(weights) > 1.05  # the test would notice data weights instead
        else:
            weights = data_weights(ups)
        A, B = _hetlora_reference(ups, name, 8, weights)
        for r, alpha in [(3, 6.0), (8, 8.0)]:
            a, b, al = s.distribute(r, alpha=alpha)[name]
            assert rel(a, A[:r]) < TOL and rel(b * lora_scaling(al, r), B[:, :r]) < TOL


def test_hetlora_rejects_rank_above_global():
    s = _init(HetLoRA(), rank=4)
    res = s.aggregate(updates_for([2, 8]))
    assert res.accepted == ["c0"] and "exceeds the global rank 4" in res.rejected["c1"]
    with pytest.raises(ValueError, match="global rank of .* is 4"):
        s.distribute(8)


def test_hetlora_rank_self_pruning():
    torch.manual_seed(0)
    A = torch.randn(8, 40, dtype=torch.float64, requires_grad=True)
    B = torch.randn(48, 8, dtype=torch.float64, requires_grad=True)
    factors = {"m": (A, B), "n": (A * 2, B)}
    pen = rank_self_pruning_penalty(factors, 8, gamma=0.75, lam=0.1)  # tail = ranks 6..7
    ref = 0.1 * ((B[:, 6:] @ A[6:]).norm() + (B[:, 6:] @ (2 * A[6:])).norm())
    assert math.isclose(pen.item(), ref.item(), rel_tol=1e-12)
    pen.backward()
    assert A.grad[:6].abs().max() == 0 and A.grad[6:].abs().max() > 0  # only the tail is pushed
    zero = rank_self_pruning_penalty({"m": (A.detach(), torch.zeros(48, 8, requires_grad=True))}, 8, 0.75)
    assert zero.item() == 0
    assert math.isclose(tail_norm(factors, 8, 0.75), ref.item() / 0.1, rel_tol=1e-12)
    assert self_pruned_rank(8, 0.75, tail=1.0, previous_tail=2.0) == 6
    assert self_pruned_rank(8, 0.75, tail=3.0, previous_tail=2.0) == 8
    assert self_pruned_rank(8, 0.75, tail=1.0, previous_tail=None) == 8


@settings(max_examples=12, deadline=None)
@given(ranks=st.lists(st.integers(1, 6), min_size=1, max_size=5), seed=st.integers(0, 10**6))
def test_hetlora_property(ranks, seed):
    s = _init(HetLoRA(weighting="examples", dtype=torch.float64), rank=6)
    ups = updates_for(ranks, seed=seed, dtype=torch.float64)
    s.aggregate(ups)
    A, B = _hetlora_reference(ups, NAMES[2], 6, data_weights(ups))
    a, b, _ = s.distribute(6, alpha=6.0)[NAMES[2]]
    assert rel(a, A) < 1e-12 and rel(b, B) < 1e-12


# ------------------------------------------------------------- FedAvg / FFA
def test_fedavg_is_the_separate_average_of_A_and_B():
    s = _init(FedAvg(), rank=4, alpha=8.0)
    ups = updates_for([4, 4, 4])
    s.aggregate(ups)
    p = data_weights(ups)
    for name in NAMES:
        a, b, alpha = s.distribute(4)[name]
        assert alpha == 8.0
        A = sum(w * u.modules[name][0].double() for u, w in zip(ups, p))
        B = sum(w * u.modules[name][1].double() for u, w in zip(ups, p))  # all clients: same scaling 2
        assert rel(a, A) < TOL and rel(lora_scaling(alpha, 4) * b, 2.0 * B) < TOL


def test_fedavg_refuses_heterogeneous_ranks_or_buckets_them():
    s = _init(FedAvg(), rank=4)
    res = s.aggregate(updates_for([4, 8]))
    assert res.accepted == ["c0"] and "differs from the global rank 4" in res.rejected["c1"]
    with pytest.raises(ValueError, match="heterogeneous='bucket'"):
        s.distribute(8)
    bucket = _init(FedAvg(heterogeneous="bucket"), rank=4)
    a, b, alpha = bucket.distribute(8)[NAMES[0]]
    assert a.shape == (4, 40) and alpha == 4.0
    with pytest.raises(ValueError, match="cannot start at rank 2"):
        bucket.distribute(2)


def test_ffalora_keeps_A_and_averages_products_exactly():
    s = _init(FFALoRA(), rank=8)
    A0 = {n: s.distribute(8)[n][0].clone() for n in NAMES}
    ups = []
    for i, r in enumerate([8, 8, 3]):  # one rank for the first two, then a smaller one
        u = random_update(f"c{i}", r, n=5 + i, seed=i)
        for n in NAMES:
            _, b, alpha = u.modules[n]
            u.modules[n] = (s.distribute(r)[n][0], b, alpha)
        ups.append(u)
    s.aggregate(ups)
    for n in NAMES:
        a, b, alpha = s.distribute(8)[n]
        assert torch.equal(a, A0[n])
        assert rel(lora_scaling(alpha, 8) * b.double() @ a.double(), weighted_delta64(ups, n)) < TOL
    bad = random_update("bad", 8)
    res = s.aggregate([bad])
    assert not res.changed and "A differs from the frozen shared A" in res.rejected["bad"]


# --------------------------------------------------------------- robustness
def _bad_updates():
    nan = random_update("nan", 4, seed=10)
    a, b, al = nan.modules[NAMES[1]]
    nan.modules[NAMES[1]] = (a, b.clone().fill_(float("nan")), al)
    shape = random_update("shape", 4, seed=11)
    shape.modules[NAMES[0]] = (torch.ones(4, 39), shape.modules[NAMES[0]][1], 8.0)
    missing = random_update("missing", 4, seed=12)
    del missing.modules[NAMES[2]]
    wrong_rank = random_update("wrong_rank", 4, seed=13)
    wrong_rank.rank = 3
    return [nan, shape, missing, wrong_rank], {
        "nan": r"v_proj: B has non-finite values", "shape": r"q_proj: A has shape \(4, 39\)",
        "missing": r"missing modules \['model.layers.0.self_attn.o_proj'\]",
        # a module trained above the rank the client declares
        "wrong_rank": r"o_proj: A has shape \(4, 48\), expected \(r, 48\) with 1 <= r <= the client's rank 3"}


@pytest.mark.parametrize("make", [lambda: FLoRA(), lambda: FlexLoRA(), lambda: HetLoRA(), lambda: FedAvg(),
                                  lambda: FFALoRA()])
def test_bad_updates_are_rejected_and_the_rest_aggregated(make, caplog):
    good = updates_for([4, 4])
    bad, reasons = _bad_updates()
    s, clean = _init(make(), rank=4), _init(make(), rank=4)
    if isinstance(s, FFALoRA):  # FFA clients must send the frozen A back
        for u in good:
            u.modules = {n: (s.distribute(4)[n][0], b, al) for n, (_, b, al) in u.modules.items()}
    with caplog.at_level(logging.WARNING, logger="fedlora.strategies"):
        res = s.aggregate(bad[:2] + good + bad[2:] + [good[0]])
    assert res.accepted == ["c0", "c1"] and res.changed
    assert res.rejected.pop("c0") == "duplicate client id in this round"
    assert set(res.rejected) == set(reasons)
    for cid, frag in reasons.items():
        assert re.search(frag, res.rejected[cid]) and cid in caplog.text
    clean.aggregate(good)
    for k, v in clean._tensors.items():
        assert torch.equal(v, s._tensors[k]), k


def test_too_few_valid_updates_keep_the_previous_state():
    s = _init(FlexLoRA(min_updates=2))
    s.aggregate(updates_for([2, 3]))
    before = {k: v.clone() for k, v in s._tensors.items()}
    bad, _ = _bad_updates()
    res = s.aggregate(bad + [random_update("ok", 4)])
    assert not res.changed and res.accepted == ["ok"] and s.round == 1
    assert all(torch.equal(before[k], v) for k, v in s._tensors.items())


def test_norm_bound_rejects_large_updates():
    ups = updates_for([4, 4])
    big = random_update("big", 4, alpha=800.0)
    s = _init(FLoRA(max_update_norm=50.0))
    res = s.aggregate(ups + [big])
    assert "exceeds the bound 50" in res.rejected["big"]


def test_dp_clips_each_client_change_from_its_start():
    s = _init(FedAvg(dp=DPConfig(clip_norm=0.1, noise_multiplier=0.0)), rank=4)
    start = s.distribute(4, "c0", alpha=8.0)  # the client's own alpha: its factors are what DP compares
    upd = random_update("c0", 4, alpha=8.0)
    s.aggregate([upd])
    new = s.distribute(4, "c0", alpha=8.0)
    change = math.sqrt(sum((new[n][i].double() - start[n][i].double()).square().sum().item()
                           for n in NAMES for i in (0, 1)))
    assert math.isclose(change, 0.1, rel_tol=1e-5)
    noisy = _init(FedAvg(dp=DPConfig(clip_norm=0.1, noise_multiplier=1.0)), rank=4)
    noisy.aggregate([upd])
    assert not torch.equal(noisy.distribute(4)[NAMES[0]][1], new[NAMES[0]][1])


# --------------------------------------------------------------- save/load
@pytest.mark.parametrize("make", [lambda: FLoRA(), lambda: FlexLoRA(), lambda: HetLoRA(), lambda: FedAvg(),
                                  lambda: FFALoRA()])
def test_state_round_trips_bit_exactly_without_pickle(make, tmp_path, monkeypatch):
    s = _init(make(), rank=4, alpha=8.0)
    ups = updates_for([4, 4, 4], seed=5)
    if isinstance(s, FFALoRA):
        for u in ups:
            u.modules = {n: (s.distribute(4)[n][0], b, al) for n, (_, b, al) in u.modules.items()}
    s.aggregate(ups)
    s.save(tmp_path / "state.safetensors")

    def boom(*a, **k):
        raise AssertionError("pickle used in the load path")
    for mod, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, attr, boom)
    t = make()
    t.load(tmp_path / "state.safetensors")
    assert t.round == 1 and t.module_shapes == s.module_shapes and t.alpha == 8.0
    assert s._tensors.keys() == t._tensors.keys()
    for k, v in s._tensors.items():
        assert v.dtype == t._tensors[k].dtype and torch.equal(v, t._tensors[k]), k
    for name, (a, b, al) in s.distribute(4, "z").items():
        a2, b2, al2 = t.distribute(4, "z")[name]
        assert torch.equal(a, a2) and torch.equal(b, b2) and al == al2
    with pytest.raises(ValueError, match="saved by strategy"):
        (FedAvg() if not isinstance(s, FedAvg) else FLoRA()).load(tmp_path / "state.safetensors")


def test_float64_state_loads_as_float64(tmp_path):
    s = _init(HetLoRA(dtype=torch.float64), rank=4)
    s.aggregate(updates_for([2, 4], dtype=torch.float64))
    s.save(tmp_path / "s.safetensors")
    t = HetLoRA()  # constructed for float32; the file says float64
    t.load(tmp_path / "s.safetensors")
    assert t.dtype == torch.float64 and all(torch.equal(v, t._tensors[k]) for k, v in s._tensors.items())
    t.aggregate(updates_for([3], dtype=torch.float32))  # updates are cast to the state's dtype
    assert t._tensors[f"{NAMES[0]}.A"].dtype == torch.float64


def test_strategy_base_is_enough_for_a_new_rule():
    class LastWins(Strategy):
        """Toy rule: the global factors are the last valid client's."""
        name = "lastwins"

        def _init_state(self):
            for n in self.module_shapes:
                self._tensors[f"{n}.A"] = self._fresh_A(n, self.rank, "init")
                self._tensors[f"{n}.B"] = self._zeros_B(n, self.rank)

        def _aggregate(self, updates, weights):
            for n, (a, b, _) in updates[-1].modules.items():
                self._tensors[f"{n}.A"], self._tensors[f"{n}.B"] = a, b * updates[-1].scaling(n)

        def _distribute(self, ranks, alphas, client_id):
            return {n: (self._tensors[f"{n}.A"], self._tensors[f"{n}.B"] / self._scaling(alphas[n], r))
                    for n, r in ranks.items()}

    s = _init(LastWins(), rank=4)
    ups = updates_for([4, 4])
    assert s.aggregate(ups).changed
    f = s.distribute(4)
    assert rel(client_product(f, NAMES[0], 4), product64(*ups[1].modules[NAMES[0]][:2], 2.0)) < TOL
