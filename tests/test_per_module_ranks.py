"""Per-module ranks (PEFT's rank_pattern): every strategy against float64 references when a
client's modules train at different ranks, plus the wire format, validation and config."""
import math

import pytest
import torch

from fedlora.bank import lora_scaling
from fedlora.federated import ClientUpdate, DPConfig, validate_update
from fedlora.simulation.config import SimConfig
from fedlora.federated.ranks import module_ranks
from fedlora.simulation.setup import make_strategy
from fedlora.strategies import FedAvg, FFALoRA, FlexLoRA, FLoRA, HetLoRA

from .fl_helpers import SHAPES, best_rank64, client_product, data_weights, random_update, rel, weighted_delta64
from .test_strategies import _hetlora_reference

TOL = 2e-6
Q, V, O = SHAPES  # q_proj and v_proj share a shape (one batched SVD), o_proj is rectangular


def _split(rank: int) -> dict[str, int]:
    """The pattern the tests use: q at the client's rank, v at half of it, o at a fixed 2."""
    return {Q: rank, V: max(1, rank // 2), O: 2}


def _updates(ranks, seed=0, **kw):
    return [random_update(f"c{i}", r, n=3 + 7 * i, seed=seed * 100 + i, module_ranks=_split(r), **kw)
            for i, r in enumerate(ranks)]


def _global_ranks(ranks, pick=max):
    return {n: pick(_split(r)[n] for r in ranks) for n in SHAPES}


def test_update_scaling_and_wire_format_use_each_module_rank():
    u = random_update("c", 8, alpha=16.0, module_ranks=_split(8))
    assert u.module_ranks() == {Q: 8, V: 4, O: 2}
    assert [u.scaling(n) for n in SHAPES] == [2.0, 4.0, 8.0]
    back = ClientUpdate.from_bytes(u.to_bytes())
    assert back.rank == 8 and back.module_ranks() == u.module_ranks()
    assert validate_update(back, SHAPES) is None


def test_validation_of_module_ranks():
    u = random_update("c", 4, module_ranks={V: 6})
    assert "expected (r, 40) with 1 <= r <= the client's rank 4" in validate_update(u, SHAPES)
    u = random_update("c", 4, module_ranks={V: 2})
    a, b, al = u.modules[V]
    u.modules[V] = (a, b[:, :1], al)
    assert "B has shape (48, 1), expected (48, 2) to match A's rank 2" in validate_update(u, SHAPES)


def test_flora_stacks_mixed_module_ranks_exactly():
    s = FLoRA()
    s.init_global(SHAPES)
    ups = _updates([2, 8, 5])
    s.aggregate(ups)
    for n in SHAPES:
        assert rel(s.global_delta(n), weighted_delta64(ups, n)) < TOL
        assert s.round_factors(n)[0].shape[0] == sum(_split(r)[n] for r in [2, 8, 5])
    f = s.distribute(8, "z", module_ranks=_split(8))
    assert {n: a.shape[0] for n, (a, _, _) in f.items()} == _split(8)


@pytest.mark.parametrize("svd_method", ["exact", "randomized"])
def test_flexlora_keeps_each_module_top_k_and_serves_each_module_rank(svd_method):
    ranks = [2, 8, 5]
    s = FlexLoRA(svd_method=svd_method, dtype=torch.float64)
    keep = _global_ranks(ranks)  # q 8, v 4, o 2: q and v share one batched SVD at K = 8
    s.init_global(SHAPES, rank=8, module_ranks=keep)  # each module's largest rank, as make_strategy gives
    ups = _updates(ranks, dtype=torch.float64)
    s.aggregate(ups)
    tol = 1e-10 if svd_method == "exact" else 1e-6  # randomized: exact here (K + oversample >= total rank)
    for n in SHAPES:
        dW = weighted_delta64(ups, n)
        assert s._tensors[f"{n}.S"].numel() == keep[n]
        assert rel(s.global_delta(n), best_rank64(dW, keep[n])) < tol
    f = s.distribute(6, "z", alpha=12.0, module_ranks=_split(6))
    for n, r in _split(6).items():
        assert f[n][0].shape[0] == r
        want = best_rank64(weighted_delta64(ups, n), min(r, keep[n]))
        assert rel(client_product(f, n, r), want) < tol


@pytest.mark.parametrize("weighting", ["examples", "sparsity"])
def test_hetlora_pads_each_module_to_its_global_rank(weighting):
    ranks = [2, 8, 5]
    s = HetLoRA(weighting=weighting)
    s.init_global(SHAPES, rank=8, module_ranks=_global_ranks(ranks))
    ups = _updates(ranks)
    s.aggregate(ups)
    for n, R in _global_ranks(ranks).items():
        weights = data_weights(ups) if weighting == "examples" else s.module_weights(ups, n, torch.tensor(
            data_weights(ups), dtype=torch.float64)).tolist()
        A, B = _hetlora_reference(ups, n, R, weights)
        a, b, al = s.distribute(8, alpha=8.0, module_ranks=_global_ranks(ranks))[n]
        assert a.shape[0] == R and rel(a, A) < TOL and rel(b * lora_scaling(al, R), B) < TOL


def test_ffalora_products_are_exact_with_module_ranks():
    ranks = [8, 3, 6]
    s = FFALoRA()
    s.init_global(SHAPES, rank=8, module_ranks=_global_ranks(ranks))
    ups = []
    for u in _updates(ranks):
        start = s.distribute(u.rank, u.client_id, module_ranks=u.module_ranks())
        u.modules = {n: (start[n][0], b, al) for n, (_, b, al) in u.modules.items()}
        ups.append(u)
    assert s.aggregate(ups).changed
    for n in SHAPES:
        assert rel(s.global_delta(n), weighted_delta64(ups, n)) < TOL


def test_fedavg_needs_one_rank_per_module_and_buckets_per_module():
    fixed = {Q: 4, V: 2, O: 2}
    s = FedAvg()
    s.init_global(SHAPES, rank=4, module_ranks=fixed)
    ups = [random_update(f"c{i}", 4, n=2 + i, seed=i, module_ranks=fixed) for i in range(3)]
    odd = random_update("odd", 4, seed=9)  # v and o at 4: not FedAvg's rank for them
    res = s.aggregate(ups + [odd])
    assert res.accepted == ["c0", "c1", "c2"]
    assert "rank 4 differs from the global rank 2" in res.rejected["odd"]
    p = data_weights(ups)
    for n in SHAPES:
        a, b, al = s.distribute(4, alpha={Q: 8.0, V: 4.0, O: 4.0}, module_ranks=fixed)[n]
        A = sum(w * u.modules[n][0].double() for u, w in zip(ups, p))
        B = sum(w * u.scaling(n) * u.modules[n][1].double() for u, w in zip(ups, p))
        assert rel(a, A) < TOL and rel(lora_scaling(al, fixed[n]) * b, B) < TOL
    bucket = FedAvg(heterogeneous="bucket")
    bucket.init_global(SHAPES, rank=2, module_ranks={Q: 2, V: 1, O: 2})
    f = bucket.distribute(8, module_ranks=_split(8))
    assert {n: a.shape[0] for n, (a, _, _) in f.items()} == {Q: 2, V: 1, O: 2}


def test_dp_reference_is_the_start_at_each_module_rank():
    s = FedAvg(dp=DPConfig(clip_norm=0.1, noise_multiplier=0.0))
    fixed = {Q: 4, V: 2, O: 1}
    s.init_global(SHAPES, rank=4, module_ranks=fixed)
    alphas = {n: 2.0 * r for n, r in fixed.items()}  # the client's own alphas: its factors are what DP compares
    start = s.distribute(4, "c0", alpha=alphas, module_ranks=fixed)
    s.aggregate([random_update("c0", 4, module_ranks=fixed)])
    new = s.distribute(4, "c0", alpha=alphas, module_ranks=fixed)
    change = math.sqrt(sum((new[n][i].double() - start[n][i].double()).square().sum().item()
                           for n in SHAPES for i in (0, 1)))
    assert math.isclose(change, 0.1, rel_tol=1e-5)


def test_module_ranks_survive_save_and_load(tmp_path):
    s = HetLoRA()
    s.init_global(SHAPES, rank=8, module_ranks={V: 4, O: 2})
    s.aggregate(_updates([8, 4]))
    s.save(tmp_path / "s.safetensors")
    t = HetLoRA()
    t.load(tmp_path / "s.safetensors")
    assert t.module_ranks == {Q: 8, V: 4, O: 2}
    assert "exceeds the global rank 2" in t.aggregate([random_update("big", 8, module_ranks={V: 4})]).rejected["big"]


def test_distribute_names_bad_module_ranks():
    s = FLoRA()
    s.init_global(SHAPES)
    with pytest.raises(ValueError, match=r"module_ranks names modules this model does not adapt: \['nope'\]"):
        s.distribute(4, module_ranks={"nope": 2})
    with pytest.raises(ValueError, match="rank of .*v_proj must be an int >= 1, got 0"):
        s.distribute(4, module_ranks={V: 0})
    with pytest.raises(ValueError, match="module_ranks needs rank="):
        FLoRA().init_global(SHAPES, module_ranks={V: 2})


# ---------------------------------------------------------------- configuration
def test_rank_pattern_resolution_and_config_errors():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    pattern = {r"layers\.1\.self_attn\.q_proj": 3, "q_proj": 0.5, "proj": 1}  # first match wins; 'proj' is no suffix
    assert module_ranks(8, names, pattern) == {names[0]: 4, names[1]: 3, names[2]: 8}
    assert module_ranks(1, names, {"q_proj": 0.25})[names[0]] == 1  # never below 1
    assert SimConfig.load(overrides=["--rank_pattern.v_proj", "0.5"]).rank_pattern == {"v_proj": 0.5}
    for bad, match in [({"v_proj": 0}, "an absolute rank must be >= 1"), ({"v_proj": 1.5}, r"must be in \(0, 1\]"),
                       ({"v_proj": "half"}, "must be an int rank or a float fraction"),
                       ({"(": 2}, "is not a regular expression")]:
        with pytest.raises(ValueError, match=match):
            SimConfig(rank_pattern=bad).validate()


def test_make_strategy_global_module_ranks():
    shapes = {"m.0.q_proj": (32, 32), "m.0.v_proj": (16, 32)}
    cfg = SimConfig(strategy="hetlora", rank_pattern={"v_proj": 0.5})
    assert make_strategy(cfg, shapes, [2, 8, 4], "cpu").module_ranks == {"m.0.q_proj": 8, "m.0.v_proj": 4}
    cfg = SimConfig(strategy="fedavg", rank_pattern={"v_proj": 2})
    assert make_strategy(cfg, shapes, [4, 4], "cpu").module_ranks == {"m.0.q_proj": 4, "m.0.v_proj": 2}
    with pytest.raises(ValueError, match="one rank per module"):
        make_strategy(SimConfig(strategy="fedavg", rank_pattern={"v_proj": 0.5}), shapes, [4, 2], "cpu")
    cfg = SimConfig(strategy="fedavg", strategy_options={"heterogeneous": "bucket"}, rank_pattern={"v_proj": 0.5})
    assert make_strategy(cfg, shapes, [8, 4], "cpu").module_ranks == {"m.0.q_proj": 4, "m.0.v_proj": 2}
