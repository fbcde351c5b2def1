"""FedSVD against a float64 statement of its rule: B averaged against the shared A, then B_bar A
re-factorised by its SVD: A <- V^T (orthonormal rows), B <- U S; clients get the top-r triplets."""
import pytest
import torch

from fedlora.bank import lora_scaling
from fedlora.strategies import FedSVD

from .fl_helpers import SHAPES, best_rank64, data_weights, rel, trained_updates, weighted_delta64

NAMES = list(SHAPES)
# float64 state: a QR and an R x R SVD in float64, relative ~1e-15 each
TOL64 = 1e-10
# fp32 state: QR + SVD in fp32 (eps 6e-8) scaled by small condition numbers of R x R cores
TOL32 = 2e-5


def _orthonormality_error(A) -> float:
    A = A.double()
    return (A @ A.T - torch.eye(A.shape[0], dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["fp64", "fp32"])
def test_rounds_follow_the_rule_with_mixed_ranks(dtype, tol):
    s = FedSVD(dtype=dtype)
    s.init_global(SHAPES, rank=6)
    for n in NAMES:  # the invariant holds from the start
        assert _orthonormality_error(s._tensors[f"{n}.A"]) < tol
    for t in range(4):
        A_prev = {n: s._tensors[f"{n}.A"].double().clone() for n in NAMES}
        ups = trained_updates(s, [6, 3, 6, 2], ("B",), seed=t, dtype=dtype)
        assert s.aggregate(ups).changed
        p = data_weights(ups)
        for n in NAMES:
            B_bar = torch.zeros(SHAPES[n][0], 6, dtype=torch.float64)
            for u, pk in zip(ups, p):
                a, b, alpha = u.modules[n]
                B_bar[:, : a.shape[0]] += pk * lora_scaling(alpha, a.shape[0]) * b.double()
            M = B_bar @ A_prev[n]  # the rule's product, dense here only as the reference
            A, B = s._tensors[f"{n}.A"].double(), s._tensors[f"{n}.B"].double()
            assert _orthonormality_error(A) < tol  # FedSVD's defining invariant
            assert rel(B @ A, M) < tol and rel(B @ A, weighted_delta64(ups, n)) < tol  # exact average
            # B = U S: orthogonal columns whose norms are M's singular values, largest first
            gram = B.T @ B
            S = torch.linalg.svdvals(M)[:6]
            assert rel(gram.diagonal().sqrt(), S) < tol
            assert (gram - torch.diag(gram.diagonal())).abs().max() < tol * S[0] ** 2
            for r in (6, 3, 2):  # a rank-r client starts from the best rank-r approximation
                a, b, alpha = s.distribute(r, "x", alpha=2.0 * r)[n]
                assert rel(lora_scaling(alpha, r) * b.double() @ a.double(), best_rank64(M, r)) < tol


def test_a_changed_A_is_rejected_and_the_rank_must_leave_room():
    s = FedSVD()
    s.init_global(SHAPES, rank=4)
    good, moved = trained_updates(s, [4, 4], ("B",), seed=1)
    a, b, alpha = moved.modules[NAMES[1]]
    moved.modules[NAMES[1]] = (a + 0.01, b, alpha)
    res = s.aggregate([good, moved])
    assert res.accepted == ["c0"] and "A differs from the shared A (FedSVD trains B only)" in res.rejected["c1"]
    with pytest.raises(ValueError, match=r"global rank of .*o_proj \(40\) below min\(d_out, d_in\) = 40"):
        FedSVD().init_global(SHAPES, rank=4, module_ranks={NAMES[2]: 40})


def test_state_round_trips_and_refuses_a_server_optimizer(tmp_path):
    s = FedSVD()
    s.init_global(SHAPES, rank=4)
    s.aggregate(trained_updates(s, [4, 2], ("B",), seed=2))
    s.save(tmp_path / "s.safetensors")
    t = FedSVD()
    t.load(tmp_path / "s.safetensors")
    ups = trained_updates(s, [4, 3], ("B",), seed=3)
    s.aggregate(ups)
    t.aggregate(ups)
    assert all(torch.equal(v, t._tensors[k]) for k, v in s._tensors.items())
    with pytest.raises(ValueError, match="fedsvd does not admit a server optimizer"):
        FedSVD(server_opt="adam")
