"""lowrank_svd: every method against a float64 dense SVD of the float64 reference dW."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedlora
from fedlora.ops import lowrank_svd

from .conftest import DEVICE, rel_err
from .test_lora_delta import make_bank, random_weights, reference_delta

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FP32_TOL = 1e-5  # the bound for fp32 singular values and rank-k reconstructions


def reference_svd(bank, weights=None):
    """Float64 singular values and vectors of the float64 dense dW."""
    U, S, Vh = torch.linalg.svd(reference_delta(bank, weights), full_matrices=False)
    return U, S, Vh.t()


def well_separated_rank(S, k):
    """The rank nearest k (at or below) whose truncation is unique to fp32 precision.

    A rank-k truncation is only well defined when s_k > s_{k+1}: with a relative gap
    of 5% an fp32-accurate method reproduces it to ~1e-6. k = len(S) always qualifies
    (nothing is cut) and so does any k past the numerical rank.
    """
    s = S.tolist() + [0.0]
    for j in range(k, 0, -1):
        if s[j - 1] - s[j] >= 0.05 * s[j - 1] or s[j - 1] < 1e-9 * s[0]:
            return j
    return len(S)


def truncation(U, S, V):
    return (U.double() * S.double()) @ V.double().t()


def assert_sign_convention(U, V, S):
    idx = U.abs().argmax(dim=-2, keepdim=True)
    top = torch.gather(U, -2, idx)
    live = S > 1e-6 * S.max()  # zero singular values have arbitrary vectors
    assert (top.squeeze(-2)[live] > 0).all()
    assert U.shape[:-2] == V.shape[:-2]


def check_exact(bank, weights, k, method, tol=FP32_TOL):
    U64, S64, V64 = reference_svd(bank, weights)
    k = well_separated_rank(S64, k)
    U, S, V = lowrank_svd(bank, weights, rank=k, method=method)
    m, n = bank.d_out, bank.d_in
    assert U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k)
    assert rel_err(S, S64[:k]) < tol
    assert rel_err(truncation(U, S, V), truncation(U64[:, :k], S64[:k], V64[:, :k])) < tol
    assert_sign_convention(U, V, S)
    # Orthonormal factors, not just a good product.
    eye = torch.eye(k, dtype=torch.float64)
    assert (U.double().t() @ U.double() - eye).abs().max() < 1e-4
    assert (V.double().t() @ V.double() - eye).abs().max() < 1e-4
    return U, S, V


@st.composite
def small_total_rank_banks(draw, max_adapters=40, max_rank=64, max_dim=300):
    """Banks with R = sum(ranks) < min(d_out, d_in), where "factored" is valid."""
    d_in, d_out = draw(st.integers(2, max_dim)), draw(st.integers(2, max_dim))
    budget = min(d_in, d_out) - 1
    n = draw(st.integers(1, min(max_adapters, budget)))
    ranks = draw(st.lists(st.integers(1, max_rank), min_size=n, max_size=n))
    # Trim from the back until the total fits (keeps every rank >= 1).
    while sum(ranks) > budget:
        i = max(range(n), key=lambda j: ranks[j])
        ranks[i] -= 1
    return ranks, d_in, d_out, draw(st.integers(1, min(d_in, d_out))), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=20, **SLOW)
@given(small_total_rank_banks())
def test_factored_matches_dense_reference(case):
    ranks, d_in, d_out, k, seed = case
    gen = torch.Generator().manual_seed(seed)
    bank = make_bank(ranks, d_in, d_out, gen)
    check_exact(bank, random_weights(len(ranks), gen), k, "factored")


@settings(max_examples=12, **SLOW)
@given(st.integers(1, 40), st.integers(2, 120), st.integers(2, 120), st.integers(1, 120), st.integers(0, 2**31 - 1))
def test_dense_and_auto_match_reference_at_any_total_rank(n, d_in, d_out, k, seed):
    """R may exceed min(d_out, d_in) here: auto must then reconstruct; dense always does."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, 65, (n,), generator=gen).tolist()
    bank = make_bank(ranks, d_in, d_out, gen)
    w = random_weights(n, gen)
    k = min(k, d_in, d_out)
    U, S, V = check_exact(bank, w, k, "dense")
    k = S.shape[0]
    if bank.total_rank < min(d_in, d_out) or k + 10 > min(d_in, d_out) / 8:
        check_exact(bank, w, k, "auto")  # factored or full SVD: exact
    else:  # auto sketches (R >= min, small sketch): held to the HMT bound (oversample 10, 2 iterations)
        dense = reference_delta(bank, w)
        Ua, Sa, Va = lowrank_svd(bank, w, rank=k)
        err = torch.linalg.matrix_norm(dense - truncation(Ua, Sa, Va), ord=2).item()
        assert err <= 2 * hmt_bound(torch.linalg.svdvals(dense), k, 10, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_factors_are_upcast(dtype):
    """16-bit inputs are exact in fp32, so the factored SVD keeps fp32 accuracy."""
    gen = torch.Generator().manual_seed(21)
    bank = make_bank([7, 30, 16, 1], 120, 90, gen, dtype)
    U, S, V = check_exact(bank, random_weights(4, gen), 20, "factored")
    assert U.dtype == S.dtype == V.dtype == torch.float32


def test_float64_banks_compute_in_float64():
    gen = torch.Generator().manual_seed(22)
    bank = make_bank([9, 4, 33], 100, 80, gen, torch.float64)
    for method in ("factored", "dense"):
        U, S, V = check_exact(bank, None, 30, method, tol=1e-11)
        assert S.dtype == torch.float64


def test_rank_above_total_rank_pads_with_zero_singular_values():
    gen = torch.Generator().manual_seed(23)
    bank = make_bank([3, 5], 60, 50, gen)
    U, S, V = check_exact(bank, None, 12, "factored")
    assert (S[8:] == 0).all() and (S[:8] > 0).all()


# ------------------------------------------------------------- randomized
def decaying_bank(ranks, d_in, d_out, decay, gen):
    """A bank whose dW has singular values decay**j exactly (w = 1): clients own
    disjoint slices of random orthonormal bases, their scalings divided out."""
    R = sum(ranks)
    Ub = torch.linalg.qr(torch.randn(d_out, R, generator=gen, dtype=torch.float64))[0]
    Vb = torch.linalg.qr(torch.randn(d_in, R, generator=gen, dtype=torch.float64))[0]
    sigma = decay ** torch.arange(R, dtype=torch.float64)
    perm = torch.randperm(R, generator=gen)  # clients get interleaved, not leading, directions
    scalings = (0.25 + 2 * torch.rand(len(ranks), generator=gen, dtype=torch.float64)).tolist()
    factors, start = [], 0
    for r, s in zip(ranks, scalings):
        cols = perm[start:start + r]
        factors.append((Vb[:, cols].t(), Ub[:, cols] * sigma[cols] / s))
        start += r
    return fedlora.AdapterBank.from_factors(factors, scalings).to(device=DEVICE, dtype=torch.float32)


def hmt_bound(S, k, p, q):
    """Halko-Martinsson-Tropp expected spectral error of the rank-k truncation:
    Cor. 10.10 for ||(I - QQ^T) M|| (k + p samples, q power iterations), plus s_{k+1}
    for truncating Q^T M to rank k (HMT Sec. 9.4)."""
    s = S.tolist() + [0.0]
    tail = math.sqrt(sum(x ** (2 * (2 * q + 1)) for x in s[k:]))
    e = ((1 + math.sqrt(k / (p - 1))) * s[k] ** (2 * q + 1) + math.e * math.sqrt(k + p) / p * tail)
    return s[k] + e ** (1 / (2 * q + 1))


@settings(max_examples=20, **SLOW)
@given(st.integers(1, 40), st.integers(40, 300), st.integers(40, 300), st.floats(0.6, 0.97),
       st.integers(1, 30), st.integers(2, 12), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_randomized_within_hmt_bound(n, d_in, d_out, decay, k, p, q, seed):
    gen = torch.Generator().manual_seed(seed)
    budget = min(d_in, d_out) - 1
    ranks = [int(r) for r in torch.randint(1, 65, (n,), generator=gen)]
    while sum(ranks) > budget:
        ranks[ranks.index(max(ranks))] -= 1
    ranks = [r for r in ranks if r > 0]
    bank = decaying_bank(ranks, d_in, d_out, decay, gen)
    dense = reference_delta(bank)
    S64 = torch.linalg.svdvals(dense)
    k = min(k, sum(ranks))
    U, S, V = lowrank_svd(bank, rank=k, method="randomized", oversample=p, n_iter=q, seed=seed)
    err = torch.linalg.matrix_norm(dense - truncation(U, S, V), ord=2).item()
    # Safe constant 2 on an expected-value bound; 1e-5 s_1 is fp32's floor.
    assert err <= 2 * hmt_bound(S64, k, p, q) + 1e-5 * S64[0].item()
    assert_sign_convention(U, V, S)


def test_randomized_converges_to_exact_with_power_iterations():
    gen = torch.Generator().manual_seed(31)
    bank = decaying_bank([16, 8, 32, 4], 200, 150, 0.8, gen)
    U, S, V = lowrank_svd(bank, rank=10, method="factored")
    Ur, Sr, Vr = lowrank_svd(bank, rank=10, method="randomized", n_iter=6)
    assert rel_err(Sr, S) < FP32_TOL
    assert rel_err(truncation(Ur, Sr, Vr), truncation(U, S, V)) < FP32_TOL
    # Same signs, so the factors themselves agree, not just their products.
    assert rel_err(Ur, U) < 1e-4 and rel_err(Vr, V) < 1e-4


def test_randomized_on_a_dense_matrix():
    gen = torch.Generator().manual_seed(32)
    bank = decaying_bank([20, 12], 90, 70, 0.7, gen)
    dense = reference_delta(bank).float()
    U, S, V = lowrank_svd(dense, rank=8, method="randomized", n_iter=4)
    U64, S64, V64 = reference_svd(bank)
    assert rel_err(S, S64[:8]) < FP32_TOL
    assert rel_err(truncation(U, S, V), truncation(U64[:, :8], S64[:8], V64[:, :8])) < FP32_TOL


def test_seeded_randomized_repeats_exactly():
    gen = torch.Generator().manual_seed(33)
    banks = [make_bank([5, 40, 9], 150, 120, gen) for _ in range(2)]
    first = lowrank_svd(banks, rank=16, method="randomized", seed=7)
    again = lowrank_svd(banks, rank=16, method="randomized", seed=7)
    other = lowrank_svd(banks, rank=16, method="randomized", seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])  # the seed reaches the sketch


# ------------------------------------------------------------- batching
@pytest.mark.parametrize("method", ["factored", "randomized", "dense"])
def test_batched_equals_looped(method):
    """Layers of different total ranks (two rank groups) in one call; layer l of a
    randomized batch uses seed + l."""
    gen = torch.Generator().manual_seed(41)
    layers = [[4, 8, 16], [32, 4], [4, 8, 16], [1, 2, 3]]
    banks = [make_bank(r, 100, 80, gen) for r in layers]
    weights = [random_weights(len(r), gen) for r in layers]
    U, S, V = lowrank_svd(banks, weights, rank=6, method=method, seed=3)
    assert U.shape == (4, 80, 6) and S.shape == (4, 6) and V.shape == (4, 100, 6)
    for layer, (b, w) in enumerate(zip(banks, weights)):
        u, s, v = lowrank_svd(b, w, rank=6, method=method, seed=3 + layer)
        assert rel_err(S[layer], s) < 1e-6
        assert rel_err(truncation(U[layer], S[layer], V[layer]), truncation(u, s, v)) < 1e-5


def test_batched_dense_matrix_input_equals_looped():
    gen = torch.Generator().manual_seed(42)
    mats = torch.stack([reference_delta(make_bank([6, 10], 60, 50, gen)).float() for _ in range(3)])
    U, S, V = lowrank_svd(mats, rank=5, method="randomized", n_iter=3, seed=1)
    for layer in range(3):
        u, s, v = lowrank_svd(mats[layer], rank=5, method="randomized", n_iter=3, seed=1 + layer)
        assert rel_err(truncation(U[layer], S[layer], V[layer]), truncation(u, s, v)) < 1e-5


# ---------------------------------------------------------------- bad input
def _bank(ranks=(3, 5), d_in=16, d_out=12, seed=0):
    return make_bank(list(ranks), d_in, d_out, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rank", [0, -1])
def test_rejects_rank_below_one(rank):
    with pytest.raises(ValueError, match=r"rank must be in 1..min\(d_out, d_in\) = 1..12"):
        lowrank_svd(_bank(), rank=rank)


def test_rejects_rank_above_min_dim():
    with pytest.raises(ValueError, match=r"= 1..12, got 13"):
        lowrank_svd(_bank(), rank=13)


def test_rejects_missing_rank():
    with pytest.raises(ValueError, match="rank must be an int"):
        lowrank_svd(_bank())


def test_rejects_wrong_weight_count():
    with pytest.raises(ValueError, match="weights has 1 entries but the bank has 2"):
        lowrank_svd(_bank(), [1.0], rank=2)


def test_rejects_negative_weights():
    with pytest.raises(ValueError, match="weights must be >= 0"):
        lowrank_svd(_bank(), [-1.0, 1.0], rank=2)


def test_rejects_non_finite_weights():
    with pytest.raises(ValueError, match="weights must be finite"):
        lowrank_svd(_bank(), [1.0, math.inf], rank=2)


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_rejects_non_finite_factors(bad):
    bank = _bank()
    with torch.no_grad():
        bank.B[0, 0] = bad
    with pytest.raises(ValueError, match="B holds NaN or Inf"):
        lowrank_svd(bank, rank=2)


def test_rejects_factored_when_total_rank_reaches_min_dim():
    with pytest.raises(ValueError, match=r"R = 12.*use method='dense' \(exact\) or 'randomized'"):
        lowrank_svd(_bank(ranks=(4, 8)), rank=2, method="factored")


def test_rejects_banks_of_different_shapes():
    with pytest.raises(ValueError, match=r"banks\[1\] is a 13x16 layer"):
        lowrank_svd([_bank(), _bank(d_out=13)], rank=2)


def test_rejects_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        lowrank_svd(_bank(), rank=2, method="qr")


def test_rejects_factored_or_weights_for_a_dense_matrix():
    mat = torch.randn(12, 10)
    with pytest.raises(ValueError, match="needs an AdapterBank"):
        lowrank_svd(mat, rank=2, method="factored")
    with pytest.raises(ValueError, match="weights apply to adapter banks"):
        lowrank_svd(mat, [1.0], rank=2)


def test_rejects_non_finite_dense_matrix():
    mat = torch.randn(12, 10)
    mat[3, 3] = math.nan
    with pytest.raises(ValueError, match="dense matrix holds NaN or Inf"):
        lowrank_svd(mat, rank=2)


@pytest.mark.parametrize("name, value", [("oversample", -1), ("n_iter", 1.5)])
def test_rejects_bad_randomized_settings(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        lowrank_svd(_bank(), rank=2, method="randomized", **{name: value})


@pytest.mark.parametrize("ranks, rank, expected", [
    ([6, 4], 5, "factored"),           # R = 10 of min 192: far below the crossover
    ([64, 64, 22], 5, "factored"),     # R = 150 (0.78 min): the core SVD is still cheaper
    ([64, 64, 58], 5, "dense"),        # R = 186 (0.97 min): the full SVD is cheaper
    ([64, 64, 64], 5, "randomized"),   # R = 192 >= min, small sketch: factored operator
    ([64, 64, 64], 30, "dense"),       # same R, sketch 40 > 192 / 8
])
def test_auto_follows_the_documented_rule(ranks, rank, expected):
    gen = torch.Generator().manual_seed(51)
    bank = make_bank(ranks, 192, 192, gen)
    auto = lowrank_svd(bank, rank=rank, method="auto")
    chosen = lowrank_svd(bank, rank=rank, method=expected)
    assert all(torch.equal(a, b) for a, b in zip(auto, chosen))
