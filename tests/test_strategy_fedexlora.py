"""FedEx-LoRA against a float64 statement of its rule: averaged factors plus a residual folded into
every client's frozen base, so that base + s B A is the exact weighted average, round after round."""
import pytest
import torch

from fedlora.bank import lora_scaling
from fedlora.simulation.config import SimConfig
from fedlora.simulation.round import base_bytes
from fedlora.simulation.setup import make_strategy
from fedlora.strategies import FedExLoRA
from fedlora.strategies.base import merge_parts

from .fl_helpers import SHAPES, data_weights, rel, trained_updates, weighted_delta64

NAMES = list(SHAPES)
# float64 state: sums of a few dozen float64 products, an SVD of the residual stack; relative ~1e-14 each
TOL64 = 1e-10
# float32 state: the same in fp32 (eps 6e-8), the residual's SVD adding K eps relative (K <= 24)
TOL32 = 2e-5


def _base(s):
    parts = s.client_base()
    return {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in NAMES} if parts is None else \
        {n: d.double() for n, d in merge_parts(parts).items()}


def _averages64(ups, name):
    """(A_bar, B_bar) = (sum p_k A_k, sum p_k s_k B_k) in float64."""
    p = data_weights(ups)
    A = sum(pk * u.modules[name][0].double() for u, pk in zip(ups, p))
    B = sum(pk * lora_scaling(u.modules[name][2], u.rank) * u.modules[name][1].double() for u, pk in zip(ups, p))
    return A, B


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["fp64", "fp32"])
def test_client_base_plus_its_start_is_the_exact_average_over_rounds(dtype, tol):
    s = FedExLoRA(dtype=dtype)
    s.init_global(SHAPES, rank=4)
    ref_base = {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in NAMES}
    ref_global = {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in NAMES}
    for t in range(5):  # 3 clients of rank 4: the residual stack grows by 8 rows a round, dense from round 3
        base = _base(s)
        for n in NAMES:
            assert t == 0 or rel(base[n], ref_base[n]) < tol
        for cid in ("c0", "c7"):  # the invariant: every client starts from the global model exactly
            for n, (a, b, alpha) in s.distribute(4, cid, alpha=8.0).items():
                start = base[n] + lora_scaling(alpha, 4) * b.double() @ a.double()
                assert t == 0 or rel(start, ref_global[n]) < tol
        ups = trained_updates(s, [4, 4, 4], seed=t, dtype=dtype)
        assert s.aggregate(ups).changed
        for n in NAMES:
            exact = base[n] + weighted_delta64(ups, n)  # what the clients' models average to
            A_bar, B_bar = _averages64(ups, n)
            ref_base[n] = exact - B_bar @ A_bar  # the rule as stated: W += sum p s B A - B_bar A_bar
            ref_global[n] = exact
            assert rel(s.global_delta(n), exact) < tol
            assert rel(s._tensors[f"{n}.A"], A_bar) < tol and rel(s._tensors[f"{n}.B"], B_bar) < tol
    assert s.client_base()[NAMES[0]][0] is not None  # the accumulated residual went dense on the way


def test_the_residual_travels_as_n_r_factors_until_dense_and_is_counted():
    s = FedExLoRA()
    s.init_global(SHAPES, rank=4)
    assert s.client_base() is None and base_bytes(s.client_base()) == 0
    s.aggregate(trained_updates(s, [4, 4, 4], seed=1))
    for rows in (8, 16):
        for n, (dense, A, B) in s.client_base().items():
            # (n - 1) r = 8 rows a round (not n r + r), no dense matrix while 16 <= 48 * 40 / 88
            assert dense is None and A.shape == (rows, SHAPES[n][1]) and B.shape == (SHAPES[n][0], rows)
        assert base_bytes(s.client_base()) == sum(4 * rows * (d_out + d_in) for d_out, d_in in SHAPES.values())
        s.aggregate(trained_updates(s, [4, 4, 4], seed=rows))  # 24 rows after the third round: dense
    for n, (dense, A, B) in s.client_base().items():
        assert dense.shape == SHAPES[n] and A.shape[0] == 0
    assert base_bytes(s.client_base()) == sum(4 * d_out * d_in for d_out, d_in in SHAPES.values())


def test_a_zero_residual_compresses_to_no_factors():
    """Clients that all keep one A (only B moves) average exactly: the SVD finds the residual's rank 0."""
    s = FedExLoRA()
    s.init_global(SHAPES, rank=4)
    ups = trained_updates(s, [4, 4, 4], ("B",), seed=3)
    s.aggregate(ups)
    for n, (dense, A, B) in s.client_base().items():
        assert dense is None and A.shape[0] == 0 and B.shape[1] == 0
        assert rel(s.global_delta(n), weighted_delta64(ups, n)) < TOL32


def test_mixed_ranks_are_refused_with_a_reason():
    with pytest.raises(ValueError, match=r"config: FedEx-LoRA folds one residual .* ranks are \[4, 8\]"):
        make_strategy(SimConfig(strategy="fedexlora"), SHAPES, [4, 8, 4])
    s = FedExLoRA()
    s.init_global(SHAPES, rank=4)
    with pytest.raises(ValueError, match="cannot start at rank 2"):
        s.distribute(2)
    other = FedExLoRA()
    other.init_global(SHAPES, rank=2)
    good, small = trained_updates(s, [4], seed=4)[0], trained_updates(other, [2], seed=4, client_ids=["c9"])[0]
    res = s.aggregate([good, small])
    assert res.accepted == ["c0"] and "differs from the global rank 4; FedEx-LoRA needs one rank" in res.rejected["c9"]


def test_state_round_trips_and_refuses_a_server_optimizer(tmp_path):
    s = FedExLoRA()
    s.init_global(SHAPES, rank=4)
    s.aggregate(trained_updates(s, [4, 4], seed=5))
    s.save(tmp_path / "s.safetensors")
    t = FedExLoRA()
    t.load(tmp_path / "s.safetensors")
    assert all(torch.equal(v, t._tensors[k]) for k, v in s._tensors.items())
    ups = trained_updates(s, [4, 4], seed=6)
    s.aggregate(ups)
    t.aggregate(ups)
    assert all(torch.equal(v, t._tensors[k]) for k, v in s._tensors.items())
    with pytest.raises(ValueError, match="fedexlora does not admit a server optimizer"):
        FedExLoRA(server_opt="avgm")


def test_a_generic_residual_keeps_every_direction():
    """26 clients of rank 8: a residual of rank (n - 1) r = 200 in 512 x 512 (factors while 200 < 256) whose
    singular values spread over orders of magnitude; the SVD may drop only what is at its own rounding level."""
    shapes = {"m": (512, 512)}
    s = FedExLoRA()
    s.init_global(shapes, rank=8)
    ups = trained_updates(s, [8] * 26, seed=7)
    for k, u in enumerate(ups):  # spread the clients' sizes (within the norm-outlier bound of 10x the median)
        a, b, alpha = u.modules["m"]
        u.modules["m"] = (a, b * (1.09 ** k), alpha)
    assert s.aggregate(ups).accepted == [u.client_id for u in ups]
    dense, A, B = s.client_base()["m"]
    assert dense is None and A.shape[0] == 200
    assert rel(s.global_delta("m"), weighted_delta64(ups, "m")) < TOL32
