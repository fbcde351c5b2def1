"""lowrank_svd: every method against a float64 dense SVD of the float64 reference dW."""
import math

import numpy as np
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
# krylov (and auto when it picks krylov) promises the kept product and S to tol = 1e-4
# relative (lowrank_svd's default); its estimate runs ~2x above the true error, so a
# failure here is a broken promise, not noise.
AUTO_TOL = 1e-4


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
    """R may exceed min(d_out, d_in) here. Dense is exact; auto is exact or within its tol."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, 65, (n,), generator=gen).tolist()
    bank = make_bank(ranks, d_in, d_out, gen)
    w = random_weights(n, gen)
    k = min(k, d_in, d_out)
    U, S, V = check_exact(bank, w, k, "dense")
    check_exact(bank, w, S.shape[0], "auto", tol=AUTO_TOL)


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


# ------------------------------------------------------------------ krylov
def spectrum_bank(sigma, n_clients, d_in, d_out, gen, copies=1):
    """A bank whose dW (w = 1) has singular values exactly ``sigma`` (float64, len <= min dims).

    Each direction u_j sigma_j v_j^T is split over ``copies`` random clients (each holds
    sigma_j / copies of it), so R = copies * len(sigma) may exceed min(d_out, d_in) while
    the spectrum stays known; clients get random scalings (divided out of B).
    """
    r = len(sigma)
    Ub = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64))[0]
    Vb = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))[0]
    cols = torch.cat([torch.randperm(r, generator=gen) for _ in range(copies)])
    owner = torch.randint(0, n_clients, (len(cols),), generator=gen)
    owner[:n_clients] = torch.arange(min(n_clients, len(cols)))  # nobody empty
    factors, scalings = [], []
    for c in range(n_clients):
        mine = cols[owner == c]
        s = 0.25 + 2 * torch.rand(1, generator=gen, dtype=torch.float64).item()
        factors.append((Vb[:, mine].t(), Ub[:, mine] * sigma[mine] / (copies * s)))
        scalings.append(s)
    return fedlora.AdapterBank.from_factors(factors, scalings).to(device=DEVICE, dtype=torch.float32)


def truncation_errors(bank, U, S, V, k, weights=None):
    """(relative error of S, of the kept product) against the float64 dense truncation."""
    U64, S64, V64 = reference_svd(bank, weights)
    return rel_err(S, S64[:k]), rel_err(truncation(U, S, V), truncation(U64[:, :k], S64[:k], V64[:, :k]))


@settings(max_examples=15, **SLOW)
@given(st.integers(2, 60), st.integers(20, 260), st.integers(20, 260), st.integers(1, 24), st.integers(0, 2**31 - 1))
def test_krylov_matches_reference_below_and_above_min_dim(n, d_in, d_out, k, seed):
    """Random client sums (flat spectra), R on either side of min(d_out, d_in)."""
    gen = torch.Generator().manual_seed(seed)
    bank = make_bank(torch.randint(1, 65, (n,), generator=gen).tolist(), d_in, d_out, gen)
    w = random_weights(n, gen)
    k = well_separated_rank(reference_svd(bank, w)[1], min(k, d_in, d_out))
    for method in ("krylov", "auto"):
        U, S, V = lowrank_svd(bank, w, rank=k, method=method, seed=seed)
        assert U.shape == (d_out, k) and V.shape == (d_in, k)
        s_err, t_err = truncation_errors(bank, U, S, V, k, w)
        assert s_err < AUTO_TOL and t_err < AUTO_TOL
        assert_sign_convention(U, V, S)
        eye = torch.eye(k, dtype=torch.float64)
        assert (U.double().t() @ U.double() - eye).abs().max() < 1e-4
        assert (V.double().t() @ V.double() - eye).abs().max() < 1e-4


def flexlora_round(d, clients, gen):
    """FlexLoRA's regime in miniature: ranks from {4, .., 64}, PEFT scaling 16 / r, example weights."""
    ranks = [int(r) for r in torch.tensor([4, 8, 16, 32, 64])[torch.randint(0, 5, (clients,), generator=gen)]]
    factors = [(torch.randn(r, d, generator=gen) / d**0.5, torch.randn(d, r, generator=gen) / d**0.5) for r in ranks]
    bank = fedlora.AdapterBank.from_factors(factors, [16.0 / r for r in ranks]).to(device=DEVICE)
    examples = torch.randint(50, 500, (clients,), generator=gen, dtype=torch.float64)
    return bank, (examples / examples.sum()).tolist()


def test_auto_is_krylov_and_within_tol_in_flexlora_regime():
    """100 clients at 384^2: R ~ 2500 >> d, a flat spectrum; auto must pick krylov and hold tol."""
    gen = torch.Generator().manual_seed(61)
    bank, w = flexlora_round(384, 100, gen)
    assert bank.total_rank > 384
    info = {}
    U, S, V = lowrank_svd(bank, w, rank=24, info=info)
    assert info["method"] == "krylov" and info["krylov"][0]["converged"]
    s_err, t_err = truncation_errors(bank, U, S, V, 24, w)
    assert s_err < AUTO_TOL and t_err < AUTO_TOL


def krylov_on_factors(bank, k, block, tol=AUTO_TOL):
    """fedlora.kernels.lowrank.krylov_svd on the bank's factored operator, no flop cap."""
    from fedlora.kernels import lowrank as LR
    scale = torch.repeat_interleave(bank.scalings, torch.tensor(bank.ranks))
    op = LR.FactoredOperator([bank.B.detach()], [bank.A.detach()], [scale])
    res = LR.krylov_svd(op, k, tol=tol, block=block, max_dim=min(bank.d_in, bank.d_out),
                        generators=[torch.Generator().manual_seed(0)])
    return res, (res.U[0], res.S[0], res.V[0])


@pytest.mark.parametrize("gap", [1.1, 1.01, 1.001])
def test_krylov_resolves_small_gaps_at_k(gap):
    """s_k / s_{k+1} = gap on a slowly decaying spectrum: the kept product is still to tol."""
    gen = torch.Generator().manual_seed(62)
    k = 12
    sigma = 1 / (1 + 0.05 * torch.arange(120, dtype=torch.float64))
    sigma[k:] /= gap
    bank = spectrum_bank(sigma, 30, 200, 160, gen, copies=2)  # R = 240 > 160
    res, (U, S, V) = krylov_on_factors(bank, k, block=8)
    assert res.converged[0]
    s_err, t_err = truncation_errors(bank, U, S, V, k)
    assert s_err < AUTO_TOL and t_err < AUTO_TOL


def test_krylov_needs_more_steps_as_the_tail_flattens():
    """Power-law spectra s_j = j^-p: a flatter tail past k (smaller p) needs a larger Krylov space."""
    gen = torch.Generator().manual_seed(63)
    k, dims = 8, {}
    for p in (2.0, 0.5, 0.1):
        sigma = (1 + torch.arange(150, dtype=torch.float64)) ** -p
        bank = spectrum_bank(sigma, 20, 180, 170, gen, copies=2)
        res, (U, S, V) = krylov_on_factors(bank, k, block=8)
        assert res.converged[0]
        dims[p] = res.dims[0]
        s_err, t_err = truncation_errors(bank, U, S, V, k)
        assert s_err < AUTO_TOL and t_err < AUTO_TOL
    assert dims[2.0] < dims[0.5] < dims[0.1]


def test_flat_spectrum_falls_back_to_an_exact_svd():
    """s_j = 1 - 0.2 j / 150 (s_2k / s_k = 0.99): the Krylov space would have to grow past the
    point where an exact SVD is cheaper; the run stops at its cap, says so, and the exact
    SVD answers (to fp32's resolution of this 0.13% gap, ~3e-5)."""
    gen = torch.Generator().manual_seed(64)
    sigma = 1 - 0.2 * torch.arange(150, dtype=torch.float64) / 150
    bank = spectrum_bank(sigma, 40, 170, 160, gen, copies=2)
    info = {}
    U, S, V = lowrank_svd(bank, rank=10, method="krylov", info=info)
    assert not info["krylov"][0]["converged"]
    s_err, t_err = truncation_errors(bank, U, S, V, 10)
    assert s_err < FP32_TOL and t_err < AUTO_TOL


def test_degenerate_spectrum_returns_an_optimal_truncation():
    """s_1 = .. = s_150 = 1: every unit vector of the range is a singular vector and any 10 of
    them make an optimal rank-10 truncation, so none is "the" one; krylov returns one of them
    (S exact, Eckart-Young residual, orthonormal factors)."""
    gen = torch.Generator().manual_seed(64)
    bank = spectrum_bank(torch.ones(150, dtype=torch.float64), 40, 170, 160, gen, copies=2)
    U, S, V = lowrank_svd(bank, rank=10, method="krylov")
    dense = reference_delta(bank)
    assert rel_err(S, torch.ones(10)) < FP32_TOL
    assert abs(torch.linalg.matrix_norm(dense - truncation(U, S, V)).item() - 140**0.5) < 1e-4
    eye = torch.eye(10, dtype=torch.float64)
    assert (U.double().t() @ U.double() - eye).abs().max() < 1e-5
    assert (V.double().t() @ V.double() - eye).abs().max() < 1e-5


def test_tol_below_working_precision_falls_back():
    """fp32 cannot certify 1e-9: the estimate stagnates or hits the cap, the exact path answers."""
    gen = torch.Generator().manual_seed(65)
    bank, w = flexlora_round(384, 100, gen)
    info = {}
    U, S, V = lowrank_svd(bank, w, rank=24, method="krylov", tol=1e-9, info=info)
    assert not info["krylov"][0]["converged"] and info["krylov"][0]["dim"] < 384
    s_err, t_err = truncation_errors(bank, U, S, V, 24, w)
    assert s_err < FP32_TOL and t_err < FP32_TOL


@pytest.mark.parametrize("method", ["krylov", "auto"])
def test_rank_deficient_sum(method):
    """20 clients sending the same rank-6 update: R = 120 > min(100, 90) but rank(dW) = 6 < k = 10.
    The 4 extra singular values are zero and their vectors still orthonormal."""
    gen = torch.Generator().manual_seed(66)
    A, B = torch.randn(6, 100, generator=gen), torch.randn(90, 6, generator=gen)
    bank = fedlora.AdapterBank.from_factors([(A, B)] * 20, [0.5] * 20).to(device=DEVICE)
    U, S, V = lowrank_svd(bank, rank=10, method=method)
    U64, S64, V64 = reference_svd(bank)
    assert rel_err(S, S64[:10]) < AUTO_TOL
    assert (S[6:].abs() < 1e-5 * S[0]).all()
    assert rel_err(truncation(U, S, V), truncation(U64[:, :6], S64[:6], V64[:, :6])) < AUTO_TOL
    eye = torch.eye(10, dtype=torch.float64)
    assert (U.double().t() @ U.double() - eye).abs().max() < 1e-4
    assert (V.double().t() @ V.double() - eye).abs().max() < 1e-4


def test_krylov_zero_update():
    """Every client sent zeros (weights 0): S = 0, orthonormal vectors, no division by zero."""
    gen = torch.Generator().manual_seed(67)
    bank = make_bank([8, 8, 8], 40, 30, gen)
    U, S, V = lowrank_svd(bank, [0.0, 0.0, 0.0], rank=5, method="krylov")
    assert torch.isfinite(U).all() and torch.isfinite(V).all() and (S == 0).all()


def test_is_probe_follows_the_predicted_estimate():
    """A check is a probe (fp32 eigh) while a layer has no rate yet (fewer than two checks) or
    while the geometric rate of its last two checks predicts an estimate above _probe_limit
    there; a predicted estimate at or below it, or a rate that does not fall, means fp64."""
    from fedlora.kernels import lowrank as LR
    tol = 1e-4
    limit = LR._probe_limit(tol)
    assert limit == max(LR.PROBE_NEAR * tol, LR.STAGNATION_LEVEL)
    assert LR._is_probe([[]], [0], 80, tol) and LR._is_probe([[(80, 0.4)]], [0], 96, tol)
    assert not LR._is_probe([[(80, 0.3), (96, 0.4)]], [0], 192, tol)  # rising: no prediction
    rate = [(96, 0.3), (192, 1.6e-3)]  # e(d) = 1.6e-3 (1.6e-3 / 0.3)^((d - 192) / 96)
    assert not LR._is_probe([rate], [0], 224, tol)  # predicted 2.8e-4 <= 1e-3
    assert LR._is_probe([rate], [0], 200, tol)  # predicted 1.03e-3: just above
    assert LR._is_probe([[(96, 0.3), (192, 0.1)]], [0], 224, tol)  # predicted 0.069
    # one layer near is enough for an fp64 check
    assert not LR._is_probe([[(96, 0.3), (192, 0.1)], rate], [0, 1], 224, tol)


def test_probe_is_redone_in_fp64_where_fp32_cannot_see():
    """_probe_inconclusive: an estimate at or below the limit, a NaN one, or a k-th Ritz value
    below what an fp32 eigh resolves (PROBE_RESOLUTION eps_32 theta_1) sends the check to fp64."""
    from fedlora.kernels import lowrank as LR
    tol, k = 1e-4, 3
    theta = np.array([[1.0, 0.5, 0.25, 0.1]])
    assert not LR._probe_inconclusive(theta, np.array([0.5]), k, tol)
    assert LR._probe_inconclusive(theta, np.array([1e-3]), k, tol)
    assert LR._probe_inconclusive(theta, np.array([math.nan]), k, tol)
    steep = np.array([[1.0, 1e-2, 1e-5, 1e-6]])  # theta_3 below 1e3 eps_32 theta_1
    assert LR._probe_inconclusive(steep, np.array([0.5]), k, tol)


def test_a_nan_estimate_certifies_nothing():
    """An overflowing product turns the estimate NaN: it must read as unconverged, never as exact."""
    from fedlora.kernels import lowrank as LR
    eps = torch.finfo(torch.float32).eps
    assert LR._certified(math.nan, eps) == math.inf and LR._certified(math.inf, eps) == math.inf
    assert LR._certified(0.0, eps) == 0.0  # M = 0 is exact
    s = np.array([[math.nan, 1.0, 0.5]])
    assert math.isnan(LR._estimate(s, np.ones_like(s), 1, 3)[0])
    assert LR._lost(torch.tensor([math.nan]), 1e-5) == {0}


@pytest.mark.parametrize("case", ["flexlora", "steep", "small_gap"])
def test_probes_never_certify_a_stop(case, monkeypatch):
    """Every check forced to start as a probe (fp32 eigh): a layer still stops only on an fp64
    check (the probe at the stopping dimension came out near the rule and was redone), within
    one block of where the fp64-only run stops (probe estimates only steer the schedule), and
    within tol of the float64 truncation."""
    from fedlora.kernels import lowrank as LR
    gen = torch.Generator().manual_seed(95)
    if case == "flexlora":
        bank, w = flexlora_round(256, 60, gen)
        k, block = 16, 16
    else:
        sigma = (1 + torch.arange(120, dtype=torch.float64)) ** -3.0
        if case == "small_gap":
            sigma = 1 / (1 + 0.05 * torch.arange(120, dtype=torch.float64))
            sigma[12:] /= 1.01
        bank, w = spectrum_bank(sigma, 30, 200, 160, gen, copies=2), None
        k, block = 12, 8
    scale = torch.repeat_interleave(bank.scalings * (torch.tensor(w) if w else 1.0), torch.tensor(bank.ranks))
    def run():
        op = LR.FactoredOperator([bank.B.detach()], [bank.A.detach()], [scale.float()])
        return LR.krylov_svd(op, k, tol=AUTO_TOL, block=block, max_dim=160, generators=[torch.Generator().manual_seed(3)])
    monkeypatch.setattr(LR, "_is_probe", lambda *a: False)
    exact = run()
    calls = []
    real = LR._ritz_estimate
    monkeypatch.setattr(LR, "_ritz_estimate", lambda *a: calls.append((a[3], a[-1])) or real(*a))
    monkeypatch.setattr(LR, "_is_probe", lambda *a: True)
    probed = run()
    assert exact.converged[0] and probed.converged[0]
    assert abs(probed.dims[0] - exact.dims[0]) <= block and probed.estimates[0] <= AUTO_TOL
    assert calls[-1] == (probed.dims[0], torch.float64)  # the stop: certified in fp64
    assert (probed.dims[0], torch.float32) in calls  # ... after its probe came out near the rule
    U, S, V = probed.U[0], probed.S[0], probed.V[0]
    s_err, t_err = truncation_errors(bank, U, S, V, k, w)
    assert s_err < AUTO_TOL and t_err < AUTO_TOL


def test_krylov_residuals_are_what_the_estimate_used():
    """The free residual (from the last Lanczos block) equals the explicit one: M v - s u ~ 0 and
    ||M^T u - s v|| within the estimate's budget (each e_i >= 2 rho_i, est = ||e|| / ||S_k||)."""
    from fedlora.kernels import lowrank as LR
    gen = torch.Generator().manual_seed(68)
    bank, w = flexlora_round(128, 40, gen)
    M = reference_delta(bank, w)
    res = LR.krylov_svd(LR.DenseOperator(M[None]), 10, tol=1e-6, block=8, max_dim=128,
                        generators=[torch.Generator().manual_seed(0)])
    assert res.converged[0]
    U, S, V = res.U[0], res.S[0], res.V[0]
    left = (M @ V - U * S).norm(dim=0)
    right = (M.t() @ U - V * S).norm(dim=0)
    assert left.max() < 1e-12 * S[0]
    assert right.norm() <= res.estimates[0] * S.norm() / 2 + 1e-12 * S[0]


@pytest.mark.parametrize("path", ["onednn", "matmul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_rows_times_matches_float64(path, dtype, layout, monkeypatch):
    """x @ W^T for the Krylov products, through oneDNN (CPU fp32) or torch.matmul, against float64.
    fp32 GEMM rounding: |error| <= p eps sum_j |x_j w_j| (inner length p = 700); 4 sqrt(p) eps of
    the float64 norm bounds the random-sign case by a wide margin, and a bf16 (8-bit mantissa) or
    tf32 product would miss it by 10x."""
    from fedlora.kernels import lowrank as LR
    if path == "matmul":
        monkeypatch.setattr(LR, "_ONEDNN_LINEAR", None)
    elif LR._ONEDNN_LINEAR is None:
        pytest.skip("this torch build has no oneDNN")
    gen = torch.Generator().manual_seed(82)
    x = torch.randn(24, 700, generator=gen, dtype=dtype)
    W = {"contiguous": lambda: torch.randn(333, 700, generator=gen, dtype=dtype),
         "transposed": lambda: torch.randn(700, 333, generator=gen, dtype=dtype).t(),  # a factor's A^T view
         "strided": lambda: torch.randn(666, 900, generator=gen, dtype=dtype)[::2, 100:800]}[layout]()
    if layout == "strided":
        x = torch.randn(48, 800, generator=gen, dtype=dtype)[::2, 50:750]
    out = LR.rows_times(x, W)
    ref = x.double() @ W.double().t()
    assert out.dtype == dtype and out.shape == (24, 333)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 4 * 700**0.5 * torch.finfo(dtype).eps


def _orthonormal_rows(d, m, gen, dtype):
    return torch.linalg.qr(torch.randn(m, d, generator=gen, dtype=dtype))[0].t().unsqueeze(0)  # [1, d, m]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["fresh", "older_blocks", "in_span", "cholesky_fails"])
def test_extend_basis_paths(case, dtype, monkeypatch):
    """_extend_basis: X = basis C + N L with N orthonormal and orthogonal to the basis, on each path.

    fresh: a random block, pass 1 against the whole basis, so pass 2 removes only rounding
    (||C2||_F ~ eps): no re-normalisation, one Householder QR (pass 1's). older_blocks: X has
    components of ~1e-2 along basis rows before the last block, which pass 1 (last block only,
    as in Golub-Kahan-Lanczos) leaves: pass 2 removes them and the re-normalising QR is
    Cholesky QR (still one Householder QR). in_span: X lies in the span of a basis of 280 of
    300 dimensions (a rank-deficient M's Krylov block); what pass 1 leaves is rounding, which
    the first QR blows up to unit columns lying ~93 % along the basis, so pass 2 leaves a block
    far from orthonormal: the third pass and Householder run (two QRs). cholesky_fails: the
    older_blocks case with a Cholesky that reports failure falls back to Householder too.
    Tolerances: Householder and Cholesky QR at cond <= sqrt(3) are orthonormal to ~b eps
    (b = 16), and skipping the re-normalisation adds ||C2||_F^2 <= eps: 100 eps leaves room for
    the GEMMs' rounding; X is rebuilt to ~eps ||X||.
    """
    from fedlora.kernels import lowrank as LR
    gen = torch.Generator().manual_seed(80)
    m, d, b = 300, 280 if case == "in_span" else 48, 16
    basis = _orthonormal_rows(d, m, gen, dtype)
    last = 0
    if case == "in_span":
        X = basis.transpose(-2, -1) @ torch.randn(1, d, b, generator=gen, dtype=dtype)
    else:
        X = torch.randn(1, m, b, generator=gen, dtype=dtype)
    if case in ("older_blocks", "cholesky_fails"):
        # New directions (X without its basis part), O(1) along the last block, 1e-2 along the
        # older rows: pass 1 sees only the last block, the older components stay for pass 2.
        last = b
        X = X - basis.transpose(-2, -1) @ (basis @ X)
        along = torch.randn(1, d, b, generator=gen, dtype=dtype)
        along[:, : d - b] *= 1e-2
        X = X + basis.transpose(-2, -1) @ along
    if case == "cholesky_fails":
        monkeypatch.setattr(torch.linalg, "cholesky_ex",
                            lambda A: (A, torch.ones(A.shape[:-2], dtype=torch.int32)))
    qrs, renormalised = [], []
    real_qr, real_renormalise = LR._qr, LR._renormalise
    monkeypatch.setattr(LR, "_qr", lambda Y: qrs.append(1) or real_qr(Y))
    monkeypatch.setattr(LR, "_renormalise", lambda *a: renormalised.append(1) or real_renormalise(*a))
    N, C, L, lost = LR._extend_basis(basis, X, last=last)
    eps = torch.finfo(dtype).eps
    eye = torch.eye(b, dtype=dtype)
    assert len(qrs) == (2 if case in ("in_span", "cholesky_fails") else 1)
    assert len(renormalised) == (0 if case == "fresh" else 1)
    # Without re-normalising or with Cholesky QR, N is orthogonal to the basis by construction;
    # the Householder path measures it.
    assert lost is None if case in ("fresh", "older_blocks") else lost.item() < LR.LOST_ORTHOGONALITY_EPS * eps
    assert (N.transpose(-2, -1) @ N - eye).abs().max() < 100 * eps
    assert (basis @ N).abs().max() < 100 * eps
    rebuilt = basis.transpose(-2, -1) @ C + N @ L
    assert ((rebuilt - X).norm() / X.norm()).item() < 100 * eps


def test_extend_basis_flags_a_block_with_no_new_direction():
    """X inside the span of a basis of coordinate vectors: what the projections leave is rounding
    that lies in the span itself (as when a Krylov space outgrows rank(M) and M's products lie in
    range(M) to the last bit), so no amount of re-projection and normalising makes it orthogonal.
    _extend_basis must say so (lost above the limit), not return it as orthonormal."""
    from fedlora.kernels import lowrank as LR
    gen = torch.Generator().manual_seed(81)
    m, d, b = 200, 64, 16
    basis = torch.eye(m)[torch.randperm(m, generator=gen)[:d]].unsqueeze(0)  # [1, d, m] orthonormal rows
    X = basis.transpose(-2, -1) @ torch.randn(1, d, b, generator=gen)
    N, C, L, lost = LR._extend_basis(basis, X)
    assert lost.item() > LR.LOST_ORTHOGONALITY_EPS * torch.finfo(torch.float32).eps


def test_krylov_space_past_rank_falls_back_instead_of_a_wrong_answer():
    """Two clients (R = 93) at 221 x 127, k = 1, block 32: the third block finds no new direction in
    range(M) for 3 of its columns. Before the orthogonality check this "converged" with S 0.3 % and
    the product 9 % off (found by hypothesis); now the layer stops unconverged and the exact method
    answers."""
    gen = torch.Generator().manual_seed(0)
    bank = make_bank(torch.randint(1, 65, (2,), generator=gen).tolist(), 127, 221, gen)
    w = random_weights(2, gen)
    assert bank.total_rank == 93
    info = {}
    U, S, V = lowrank_svd(bank, w, rank=1, method="krylov", seed=0, info=info)
    assert not info["krylov"][0]["converged"]
    s_err, t_err = truncation_errors(bank, U, S, V, 1, w)
    assert s_err < FP32_TOL and t_err < FP32_TOL


@pytest.mark.parametrize("one_at_a_time", [True, False])  # False: CUDA's way (the group in lockstep)
@pytest.mark.parametrize("onednn", [True, False])
def test_krylov_on_the_reconstructed_matrix(one_at_a_time, onednn, monkeypatch):
    """Three layers of one rank group (R = 640 > 384, k = 16: Krylov on the reconstructed matrix).
    On the CPU one layer at a time: each layer bit-identical to a call on it alone (seed + l);
    in lockstep (CUDA) equal to that to fp32 rounding. Both GEMM paths; each
    layer within tol of its float64 truncation."""
    import fedlora.ops.delta as delta
    from fedlora.kernels import lowrank as LR
    if not onednn:
        monkeypatch.setattr(LR, "_ONEDNN_LINEAR", None)  # torch.matmul's path
    alone = []
    gen = torch.Generator().manual_seed(72)
    banks, weights = [], []
    for _ in range(3):
        banks.append(make_bank([64] * 10, 384, 384, gen))
        weights.append(random_weights(10, gen))
    for layer, (bank, w) in enumerate(zip(banks, weights)):
        alone.append(lowrank_svd(bank, w, rank=16, method="krylov", seed=5 + layer))
    monkeypatch.setattr(delta, "_dense_krylov_one_layer_at_a_time", lambda device: one_at_a_time)
    info = {}
    U, S, V = lowrank_svd(banks, weights, rank=16, method="auto", seed=5, info=info)
    assert info["method"] == "krylov" and [layer["operator"] for layer in info["krylov"]] == ["dense"] * 3
    for layer, (bank, w) in enumerate(zip(banks, weights)):
        u, s, v = alone[layer]
        if one_at_a_time:
            assert torch.equal(U[layer], u) and torch.equal(S[layer], s) and torch.equal(V[layer], v)
        else:  # lockstep: other GEMM rounding and checks; both within tol of the truncation, so within 2 tol
            assert rel_err(truncation(U[layer], S[layer], V[layer]), truncation(u, s, v)) < 2 * AUTO_TOL
        s_err, t_err = truncation_errors(bank, U[layer], S[layer], V[layer], 16, w)
        assert s_err < AUTO_TOL and t_err < AUTO_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_krylov_and_auto_dtypes(dtype):
    """16-bit factors are upcast to fp32 (exact: 16-bit values are fp32 values); fp64 banks
    compute in fp64, where tol = 1e-6 (fp32's rounding floor) is met with room to spare."""
    gen = torch.Generator().manual_seed(69)
    bank, w = flexlora_round(384, 100, gen)
    bank = bank.to(dtype)
    tol = 1e-6 if dtype == torch.float64 else AUTO_TOL
    for method in ("krylov", "auto"):
        info = {}
        U, S, V = lowrank_svd(bank, w, rank=24, method=method, tol=tol, info=info)
        assert info["method"] == "krylov" and info["krylov"][0]["converged"]
        assert S.dtype == U.dtype == V.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        s_err, t_err = truncation_errors(bank, U, S, V, 24, w)
        assert s_err < tol and t_err < tol


def test_krylov_on_a_dense_matrix():
    gen = torch.Generator().manual_seed(70)
    bank, w = flexlora_round(160, 60, gen)
    dense = reference_delta(bank, w)
    for method in ("krylov", "auto"):
        info = {}
        U, S, V = lowrank_svd(dense.float(), rank=12, method=method, info=info)
        s_err, t_err = truncation_errors(bank, U, S, V, 12, w)
        assert s_err < AUTO_TOL and t_err < AUTO_TOL


def test_seeded_krylov_repeats_exactly():
    gen = torch.Generator().manual_seed(71)
    bank, w = flexlora_round(96, 30, gen)
    first = lowrank_svd(bank, w, rank=8, method="krylov", seed=4)
    again = lowrank_svd(bank, w, rank=8, method="krylov", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ------------------------------------------------------------- batching
@pytest.mark.parametrize("method", ["factored", "randomized", "dense", "krylov"])
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


def test_batched_krylov_groups_match_reference_and_fall_back_per_layer():
    """Layers of two total ranks (two groups: 100 clients twice, 10 clients once; R > and < min)
    plus a flat layer that must fall back on its own: each within tol of its float64 truncation."""
    gen = torch.Generator().manual_seed(43)
    banks, weights = [], []
    for clients in (100, 10, 100):
        bank, w = flexlora_round(384, clients, gen)
        banks.append(bank)
        weights.append(w)
    flat = spectrum_bank(1 - 0.2 * torch.arange(300, dtype=torch.float64) / 300, 100, 384, 384, gen, copies=2)
    banks.append(flat)
    weights.append([1.0] * flat.num_adapters)
    info = {}
    U, S, V = lowrank_svd(banks, weights, rank=24, method="krylov", info=info)
    assert [layer["converged"] for layer in info["krylov"]] == [True, True, True, False]
    for layer in range(4):
        s_err, t_err = truncation_errors(banks[layer], U[layer], S[layer], V[layer], 24, weights[layer])
        assert s_err < AUTO_TOL and t_err < AUTO_TOL
    # Layer 2 alone, with its seed (seed + 2), repeats the batched result.
    u, s_, v = lowrank_svd(banks[2], weights[2], rank=24, method="krylov", seed=2)
    assert rel_err(truncation(U[2], S[2], V[2]), truncation(u, s_, v)) < 1e-5


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


def _dense_krylov_banks(seed):
    """Two layers where krylov runs on the reconstructed matrix (R = 640 > 384): there the factors'
    NaN/Inf check is the reconstruction's (_check_reconstruction)."""
    gen = torch.Generator().manual_seed(seed)
    return [make_bank([64] * 10, 384, 384, gen) for _ in range(2)], random_weights(10, gen)


@pytest.mark.parametrize("where", ["A", "B", "A_row_times_zero_B", "B_of_zero_weight"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_dense_krylov_names_a_non_finite_factor(where, bad):
    """A NaN or Inf anywhere in layer 1's inputs is reported as the eager check reports it, also
    where IEEE arithmetic has it meet a zero (Inf x 0 = NaN still reaches the product): an A entry
    whose B column is zero, a client whose weight is 0. (Scalings and weights are checked before
    any method runs.)"""
    banks, w = _dense_krylov_banks(90)
    info = {}
    lowrank_svd(banks, [w, w], rank=8, method="krylov", info=info)
    assert info["krylov"][1]["operator"] == "dense"
    w = list(w)
    with torch.no_grad():
        bank = banks[1]
        if where == "A":
            bank.A[70, 11] = bad
        elif where == "A_row_times_zero_B":  # A's row 70 meets B's column 70, zeroed
            bank.B[:, 70] = 0.0
            bank.A[70, 11] = bad
        elif where == "B":
            bank.B[5, 200] = bad
        else:  # client 3 (rank columns 192..255) weighs nothing this round
            w[3] = 0.0  # (weights are not re-normalised: the others stay as they were)
            bank.B[5, 200] = bad
    name = where.split("_")[0]
    with pytest.raises(ValueError, match=f"bank 1: {name} holds NaN or Inf"):
        lowrank_svd(banks, [w, w], rank=8, method="krylov")


def test_dense_krylov_rejects_a_product_that_overflows():
    """Finite factors whose sum overflows float32 in the reconstruction: an error that says so."""
    banks, w = _dense_krylov_banks(91)
    with torch.no_grad():
        banks[0].A.mul_(1e19)
        banks[0].B.mul_(1e19)
    assert all(torch.isfinite(t).all() for t in (banks[0].A, banks[0].B))
    with pytest.raises(ValueError, match=r"aggregated delta of bank 0 overflows torch.float32"):
        lowrank_svd(banks, [w, w], rank=8, method="krylov")


def test_factored_krylov_rejects_a_product_that_overflows(monkeypatch):
    """The factored operator never forms dW: finite factors whose products overflow float32 are
    caught on the result, an error that says so (not NaN triplets, not a "converged" NaN)."""
    import fedlora.ops.delta as delta
    gen = torch.Generator().manual_seed(92)
    bank = make_bank([8] * 6, 200, 180, gen)
    with torch.no_grad():
        bank.A.mul_(1e20)
        bank.B.mul_(1e20)
    monkeypatch.setattr(delta, "_krylov_plan", lambda R, m, n, rank, block: ("factored", 8, 176))
    from fedlora.kernels import lowrank as LR
    converged = []
    real = LR.krylov_svd
    monkeypatch.setattr(LR, "krylov_svd", lambda *a, **kw: converged.extend(real(*a, **kw).converged) or real(*a, **kw))
    with pytest.raises(ValueError, match="lowrank_svd overflows torch.float32"):
        lowrank_svd(bank, rank=4, method="krylov")
    assert converged == [False]  # the overflow never passed for a converged layer


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_rejects_non_finite_scalings_by_name(bad):
    banks, w = _dense_krylov_banks(93)
    with torch.no_grad():
        banks[1].scalings[2] = bad
    with pytest.raises(ValueError, match="bank 1: scalings holds NaN or Inf"):
        lowrank_svd(banks, [w, w], rank=8, method="auto")


@pytest.mark.parametrize("setting", ["legacy_medium", "legacy_high", "per_backend"])
def test_lowrank_svd_computes_in_ieee_fp32_and_restores_the_callers_matmul_precision(setting):
    """Krylov's certificate assumes IEEE fp32 products (under TF32, M v = s u holds only to ~1e-3
    and no estimate would see it): lowrank_svd runs in IEEE fp32 whatever the caller set, then
    restores the caller's settings exactly; a mix of the legacy and per-backend settings (on
    which torch.get_float32_matmul_precision raises) does not break it."""
    from fedlora.kernels import lowrank as LR
    switches = LR._precision_switches()
    def state():
        return [sw.fp32_precision for sw in switches]
    before = state()
    seen = []
    real = LR.krylov_svd
    try:
        if setting == "per_backend":
            if not switches:
                pytest.skip("this torch has only the legacy global setting")
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        else:
            torch.set_float32_matmul_precision(setting.split("_")[1])
        callers = state()
        LR.krylov_svd = lambda *a, **kw: seen.append(state()) or real(*a, **kw)
        banks, w = _dense_krylov_banks(94)
        U, S, V = lowrank_svd(banks[0], w, rank=8, method="krylov")
        assert state() == callers
        if setting != "per_backend":
            assert torch.get_float32_matmul_precision() == setting.split("_")[1]
    finally:
        LR.krylov_svd = real
        torch.set_float32_matmul_precision("highest")
        for sw, value in zip(switches, before):
            sw.fp32_precision = value
    assert seen and all(v == "ieee" for v in seen[0])
    s_err, t_err = truncation_errors(banks[0], U, S, V, 8, w)
    assert s_err < AUTO_TOL and t_err < AUTO_TOL


def test_rejects_factored_when_total_rank_reaches_min_dim():
    with pytest.raises(ValueError, match=r"R = 12.*use method='dense' or 'krylov'"):
        lowrank_svd(_bank(ranks=(4, 8)), rank=2, method="factored")


def test_finite_check_is_exact():
    """The one-reduction fast path of the NaN/Inf check must neither miss a bad entry nor
    reject finite entries whose sum overflows."""
    from fedlora.ops.checks import all_finite
    t = torch.randn(50, 40)
    assert all_finite(t)
    for bad in (math.nan, math.inf, -math.inf):
        u = t.clone()
        u[17, 3] = bad
        assert not all_finite(u)
    assert all_finite(torch.full((4, 4), 3e38))  # finite; its fp32 sum is inf


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


@pytest.mark.parametrize("name, value", [("oversample", -1), ("n_iter", 1.5), ("block", 0)])
def test_rejects_bad_randomized_settings(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        lowrank_svd(_bank(), rank=2, method="randomized", **{name: value})


@pytest.mark.parametrize("tol", [0, 1, -1e-3, math.nan, "1e-4", True])
def test_rejects_bad_tol(tol):
    with pytest.raises(ValueError, match="tol must be a float in"):
        lowrank_svd(_bank(), rank=2, method="krylov", tol=tol)


def test_rejects_non_dict_info():
    with pytest.raises(ValueError, match="info must be a dict"):
        lowrank_svd(_bank(), rank=2, info=[])


@pytest.mark.parametrize("shape, ranks, rank, expected", [
    ((192, 192), [6, 4], 5, "factored"),            # R = 10 of min 192: far below the crossover
    ((192, 192), [64, 64, 22], 5, "factored"),      # R = 150 (0.78 min): the core SVD is still cheaper
    ((192, 192), [64, 64, 58], 5, "dense"),         # R = 186 (0.97 min): the full SVD is cheaper
    ((192, 192), [64, 64, 64, 64], 30, "dense"),    # R > min, k = 30: Krylov's 5k + b reaches min
    ((512, 512), [64] * 10, 16, "krylov"),          # R = 640 > min: Krylov (on the reconstructed matrix)
    ((512, 512), [16, 16], 16, "factored"),         # R = 32: exact and cheap
])
def test_auto_follows_the_documented_rule(shape, ranks, rank, expected):
    gen = torch.Generator().manual_seed(51)
    bank = make_bank(ranks, shape[1], shape[0], gen)
    info = {}
    auto = lowrank_svd(bank, rank=rank, method="auto", info=info)
    assert info["method"] == expected
    chosen = lowrank_svd(bank, rank=rank, method=expected)
    assert all(torch.equal(a, b) for a, b in zip(auto, chosen))
