"""LoRA-FAIR against a float64 statement of its rule: FedAvg's averages, then B corrected so that
(B_bar + dB) A_bar is the least-squares closest product to the exact average M (ridge: + lam ||dB||^2)."""
import pytest
import torch

from fedlora.bank import lora_scaling
from fedlora.strategies import LoRAFAIR

from .fl_helpers import SHAPES, data_weights, rel, trained_updates, weighted_delta64

NAMES = list(SHAPES)
# float64 state vs a dense float64 solve: rounding ~1e-15 times cond(A_bar A_bar^T) (~10 here)
TOL64 = 1e-9
# fp32 state: fp32 averages and products (eps 6e-8) times the same conditioning
TOL32 = 5e-5


def _averages64(ups, name, R):
    p = data_weights(ups)
    d_out, d_in = SHAPES[name]
    A, B = torch.zeros(R, d_in, dtype=torch.float64), torch.zeros(d_out, R, dtype=torch.float64)
    for u, pk in zip(ups, p):
        a, b, alpha = u.modules[name]
        r = a.shape[0]
        A[:r] += pk * a.double()
        B[:, :r] += pk * lora_scaling(alpha, r) * b.double()
    return A, B


def _dense_fair(ups, name, R, lam):
    """The paper's correction with dense math: M formed, the regularised least squares solved directly."""
    A, B_bar = _averages64(ups, name, R)
    M = weighted_delta64(ups, name)
    # min ||(B_bar + dB) A - M||^2 + lam ||dB||^2  <=>  dB (A A^T + lam I) = (M - B_bar A) A^T
    lhs = A @ A.T + lam * torch.eye(R, dtype=torch.float64)
    dB = torch.linalg.solve(lhs, ((M - B_bar @ A) @ A.T).T).T
    return A, B_bar, B_bar + dB, M


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_rounds_follow_the_dense_statement_with_mixed_ranks(dtype, tol, lam):
    s = LoRAFAIR(ridge=lam, dtype=dtype)
    s.init_global(SHAPES, rank=6)
    for t in range(3):
        ups = trained_updates(s, [6, 3, 6, 4], seed=t, dtype=dtype)
        assert s.aggregate(ups).changed
        for n in NAMES:
            A, B_bar, B, M = _dense_fair(ups, n, 6, lam)
            assert rel(s._tensors[f"{n}.A"], A) < tol and rel(s._tensors[f"{n}.B"], B) < tol
            got = s.global_delta(n).double()
            # never further from the exact average than FedAvg's product; not exact in general
            assert (got - M).norm() <= (B_bar @ A - M).norm() * (1 + tol)
            if lam == 0.0:  # the least-squares optimum: the miss is orthogonal to A_bar's rows
                assert ((got - M) @ A.T).norm() < tol * M.norm() * A.norm()
                assert rel(got, M) > 1e-3  # M has rank 19 > 6: no product of rank 6 reaches it
            for r in (6, 3):  # truncation for smaller clients
                a, b, alpha = s.distribute(r, "x", alpha=2.0 * r)[n]
                assert torch.equal(a, s._tensors[f"{n}.A"][:r])
                assert rel(lora_scaling(alpha, r) * b.double(), s._tensors[f"{n}.B"][:, :r].double()) < 1e-6


def test_one_client_is_reproduced_exactly():
    """With one client M = s B_1 A_1 lies in A_bar's row space (A_bar = A_1): the correction is zero."""
    s = LoRAFAIR(dtype=torch.float64)
    s.init_global(SHAPES, rank=4)
    ups = trained_updates(s, [4], seed=5, dtype=torch.float64)
    s.aggregate(ups)
    for n in NAMES:
        assert rel(s.global_delta(n), weighted_delta64(ups, n)) < TOL64


def test_ridge_is_checked_and_a_server_optimizer_steps_the_corrected_factors():
    with pytest.raises(ValueError, match="ridge must be"):
        LoRAFAIR(ridge=-1.0)
    with pytest.raises(ValueError, match="ridge must be a number"):
        LoRAFAIR(ridge="0.1")
    alone, momentum = LoRAFAIR(dtype=torch.float64), LoRAFAIR(dtype=torch.float64, server_opt="avgm",
                                                             server_lr=0.5, server_momentum=0.0)
    for s in (alone, momentum):
        s.init_global(SHAPES, rank=4)
    start = {k: v.clone() for k, v in momentum._tensors.items()}
    ups = trained_updates(alone, [4, 4, 2], seed=6, dtype=torch.float64)
    alone.aggregate(ups)
    momentum.aggregate(ups)
    for key, x in start.items():  # x_1 = x_0 + 0.5 (x~_1 - x_0), x~_1 the corrected factors
        assert rel(momentum._tensors[key], x + 0.5 * (alone._tensors[key] - x)) < TOL64
