"""RoLoRA against float64 statements of its rule: alternate rounds train B then A, the frozen factor
never moves, and the global product is the exact weighted average of the clients' products."""
import pytest
import torch

from fedlora.bank import lora_scaling
from fedlora.strategies import RoLoRA

from .fl_helpers import SHAPES, data_weights, rel, trained_updates, weighted_delta64

NAMES = list(SHAPES)
# fp32 state against float64: a sum of a few fp32 products of O(1) entries, relative error ~ k * 2^-24
TOL = 2e-6


def test_rounds_alternate_B_then_A_and_only_the_trained_factor_is_uploaded():
    s = RoLoRA()
    assert [s.trainable_at(t) for t in range(4)] == [("B",), ("A",), ("B",), ("A",)]
    assert [s.uploaded_at(t) for t in range(2)] == [("B",), ("A",)]


@pytest.mark.parametrize("ranks", [[8, 8, 8], [8, 3, 5, 8]], ids=["one-rank", "mixed-ranks"])
def test_global_product_is_the_exact_average_and_the_frozen_factor_is_unchanged(ranks):
    s = RoLoRA()
    s.init_global(SHAPES, rank=8)
    for t in range(4):
        trained = s.trainable_at(t)
        before = {k: v.clone() for k, v in s._tensors.items()}
        ups = trained_updates(s, ranks, trained, seed=t)
        assert s.aggregate(ups).changed and s.round == t + 1
        p = data_weights(ups)
        for n in NAMES:
            frozen = "A" if trained == ("B",) else "B"
            assert torch.equal(s._tensors[f"{n}.{frozen}"], before[f"{n}.{frozen}"])  # the invariant
            # the rule written out in float64: the trained factor is the zero-padded weighted average
            ref = torch.zeros_like(before[f"{n}.{trained[0]}"], dtype=torch.float64)
            for u, pk in zip(ups, p):
                a, b, alpha = u.modules[n]
                r = a.shape[0]
                if trained == ("B",):
                    ref[:, :r] += pk * lora_scaling(alpha, r) * b.double()
                else:
                    ref[:r] += pk * a.double()
            assert rel(s._tensors[f"{n}.{trained[0]}"], ref) < TOL
            # exactness: B_g A_g is the weighted average of what the clients trained
            assert rel(s.global_delta(n), weighted_delta64(ups, n)) < TOL


def test_clients_start_from_the_truncated_global_factors():
    s = RoLoRA()
    s.init_global(SHAPES, rank=8)
    for t in range(2):
        s.aggregate(trained_updates(s, [8, 4], s.trainable_at(t), seed=t))
    for r in (8, 4):
        for n, (a, b, alpha) in s.distribute(r, "new", alpha=2.0 * r).items():
            assert torch.equal(a, s._tensors[f"{n}.A"][:r])
            want = s._tensors[f"{n}.B"][:, :r].double()
            assert rel(lora_scaling(alpha, r) * b.double(), want) < TOL and want.norm() > 0


def test_an_update_whose_frozen_factor_moved_is_rejected_but_16_bit_rounding_is_not():
    s = RoLoRA()
    s.init_global(SHAPES, rank=4)
    good, moved_A, rounded = trained_updates(s, [4, 4, 4], ("B",), seed=1)
    name = NAMES[0]
    a, b, alpha = moved_A.modules[name]
    moved_A.modules[name] = (a * 1.01, b, alpha)
    for n, (a, b, alpha) in rounded.modules.items():  # what a bf16 model copy hands back
        rounded.modules[n] = (a.to(torch.bfloat16).float(), b, alpha)
    res = s.aggregate([good, moved_A, rounded])
    assert res.accepted == ["c0", "c2"]
    assert "A differs from the global A; RoLoRA round 0 trains B only" in res.rejected["c1"]
    good, moved_B = trained_updates(s, [4, 2], ("A",), seed=2)
    a, b, alpha = moved_B.modules[name]
    moved_B.modules[name] = (a, b + 1e-3, alpha)
    res = s.aggregate([good, moved_B])
    assert res.accepted == ["c0"] and "B differs from the global B; RoLoRA round 1 trains A only" in res.rejected["c1"]


def test_state_round_trip_keeps_the_round_parity(tmp_path):
    s = RoLoRA()
    s.init_global(SHAPES, rank=4)
    s.aggregate(trained_updates(s, [4, 4], ("B",)))
    s.save(tmp_path / "s.safetensors")
    t = RoLoRA()
    t.load(tmp_path / "s.safetensors")
    assert t.round == 1 and t.trainable_at(t.round) == ("A",)
    ups = trained_updates(t, [4, 4], ("A",), seed=3)
    s.aggregate(ups)
    t.aggregate(ups)
    assert all(torch.equal(v, t._tensors[k]) for k, v in s._tensors.items())


def test_a_server_optimizer_steps_only_the_rounds_factor():
    """FedAvgM on RoLoRA: x_t = x_{t-1} + eta m_t, m_t = mu m_{t-1} + (average - x_{t-1}), per factor, and
    only for the factor the round trained (the other keeps its value and its momentum)."""
    lr, mu = 0.5, 0.6
    s = RoLoRA(server_opt="avgm", server_lr=lr, server_momentum=mu, dtype=torch.float64)
    s.init_global(SHAPES, rank=6)
    x = {k: v.clone() for k, v in s._tensors.items()}
    m = {}
    for t in range(4):
        f = s.trainable_at(t)[0]
        ups = trained_updates(s, [6, 4, 6], (f,), seed=20 + t, dtype=torch.float64)
        s.aggregate(ups)
        p = data_weights(ups)
        for n in NAMES:
            avg = torch.zeros_like(x[f"{n}.{f}"])
            for u, pk in zip(ups, p):
                a, b, alpha = u.modules[n]
                r = a.shape[0]
                if f == "A":
                    avg[:r] += pk * a
                else:
                    avg[:, :r] += pk * lora_scaling(alpha, r) * b
            key = f"{n}.{f}"
            m[key] = mu * m.get(key, 0.0) + (avg - x[key])
            x[key] = x[key] + lr * m[key]
    for key, want in x.items():  # float64 both sides: only the order of additions differs
        assert rel(s._tensors[key], want) < 1e-10, key
