"""lora_delta: the fused dW = sum_i w_i s_i B_i A_i against a float64 per-client loop."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedlora
from fedlora.ops import lora_delta

from .conftest import DEVICE, REL_TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_bank(ranks, d_in, d_out, gen, dtype=torch.float32):
    """Random nonzero factors, scalings away from 1 so a dropped scale is caught."""
    factors = [(torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen) / r**0.5) for r in ranks]
    scalings = (0.25 + 2 * torch.rand(len(ranks), generator=gen)).tolist()
    return fedlora.AdapterBank.from_factors(factors, scalings).to(device=DEVICE, dtype=dtype)


def random_weights(n, gen):
    """Positive weights with, now and then, a zero (a client that sent nothing)."""
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    w[torch.rand(n, generator=gen) < 0.1] = 0.0
    w[0] += 0.5  # never an all-zero sum
    return w.tolist()


def reference_delta(bank, weights=None):
    """Float64 sum of every client's dense product: FlexLoRA's way."""
    w = [1.0] * bank.num_adapters if weights is None else [float(v) for v in weights]
    out = torch.zeros(bank.d_out, bank.d_in, dtype=torch.float64)
    for i, s in enumerate(bank.scalings.tolist()):
        A_i, B_i = bank.factors(i)
        out += w[i] * s * (B_i.detach().double().cpu() @ A_i.detach().double().cpu())
    return out


@st.composite
def bank_lists(draw, max_layers, max_adapters, max_rank, max_dim):
    L = draw(st.integers(1, max_layers))
    d_in, d_out = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    layers = []
    for _ in range(L):
        n = draw(st.integers(1, max_adapters))
        layers.append(draw(st.lists(st.integers(1, max_rank), min_size=n, max_size=n)))
    return layers, d_in, d_out, draw(st.integers(0, 2**31 - 1))


def check_batch(layers, d_in, d_out, seed, dtype, out_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    banks = [make_bank(ranks, d_in, d_out, gen, dtype) for ranks in layers]
    weights = [random_weights(len(ranks), gen) for ranks in layers]
    out = lora_delta(banks, weights, dtype=out_dtype)
    assert out.shape == (len(banks), d_out, d_in) and out.dtype == (out_dtype or dtype)
    for layer, (bank, w) in enumerate(zip(banks, weights)):
        ref = reference_delta(bank, w)
        assert ref.norm() > 0
        assert rel_err(out[layer], ref) < REL_TOL[out_dtype or dtype]


SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=25, **SLOW)
@given(bank_lists(max_layers=3, max_adapters=40, max_rank=64, max_dim=300), st.sampled_from(DTYPES))
def test_torch_twin_matches_reference(monkeypatch, case, dtype):
    monkeypatch.setenv("FEDLORA_BACKEND", "torch")
    check_batch(*case, dtype)


@pytest.mark.interpreter
@settings(max_examples=8, **SLOW)
@given(bank_lists(max_layers=3, max_adapters=4, max_rank=40, max_dim=64), st.sampled_from(DTYPES))
def test_triton_matches_reference(monkeypatch, case, dtype):
    monkeypatch.setenv("FEDLORA_BACKEND", "triton")
    check_batch(*case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_factors_fp32_output(backend, dtype):
    """With dtype=float32 the only error left is the fp32 accumulation: no 16-bit rounding of dW."""
    check_batch([[5, 17], [33]], 40, 24, 7, dtype, out_dtype=torch.float32)


def test_float64_bank_stays_exact(backend):
    gen = torch.Generator().manual_seed(3)
    bank = make_bank([3, 20, 9], 50, 37, gen, torch.float64)
    w = random_weights(3, gen)
    out = lora_delta(bank, w)
    assert out.dtype == torch.float64 and rel_err(out, reference_delta(bank, w)) < 1e-13


def test_batched_equals_looped(backend):
    gen = torch.Generator().manual_seed(11)
    banks = [make_bank(r, 48, 33, gen) for r in ([1, 16, 7], [40], [2, 2, 2, 30])]
    weights = [random_weights(b.num_adapters, gen) for b in banks]
    batched = lora_delta(banks, weights)
    for layer, (b, w) in enumerate(zip(banks, weights)):
        torch.testing.assert_close(batched[layer], lora_delta(b, w), rtol=1e-6, atol=1e-6)


def test_default_weights_are_one(backend):
    gen = torch.Generator().manual_seed(5)
    bank = make_bank([4, 9], 20, 30, gen)
    assert rel_err(lora_delta(bank), reference_delta(bank)) < REL_TOL[torch.float32]


def test_weight_forms_agree(backend):
    """A sequence for every bank, a 1-D tensor, per-bank lists and a 2-D tensor mean the same."""
    gen = torch.Generator().manual_seed(9)
    banks = [make_bank([3, 12], 24, 20, gen), make_bank([8, 1], 24, 20, gen)]
    w = [0.3, 1.7]
    ref = lora_delta(banks, [w, w])
    for form in (w, torch.tensor(w), torch.tensor([w, w]), (tuple(w), torch.tensor(w))):
        torch.testing.assert_close(lora_delta(banks, form), ref, rtol=0, atol=0)
    assert rel_err(ref[1], reference_delta(banks[1], w)) < REL_TOL[torch.float32]


def test_per_bank_weights_allow_different_client_counts(backend):
    gen = torch.Generator().manual_seed(13)
    banks = [make_bank([3, 12, 5], 24, 20, gen), make_bank([8], 24, 20, gen)]
    weights = [[0.2, 0.5, 0.3], [1.0]]
    out = lora_delta(banks, weights)
    for layer in range(2):
        assert rel_err(out[layer], reference_delta(banks[layer], weights[layer])) < REL_TOL[torch.float32]


# ---------------------------------------------------------------- bad input
def _bank(ranks=(3, 5), d_in=16, d_out=12, seed=0):
    return make_bank(list(ranks), d_in, d_out, torch.Generator().manual_seed(seed))


def test_rejects_wrong_weight_count():
    with pytest.raises(ValueError, match="weights has 3 entries but the bank has 2"):
        lora_delta(_bank(), [1.0, 1.0, 1.0])


def test_rejects_negative_weights():
    with pytest.raises(ValueError, match="weights must be >= 0"):
        lora_delta(_bank(), [1.0, -0.5])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_rejects_non_finite_weights(bad):
    with pytest.raises(ValueError, match="weights must be finite"):
        lora_delta(_bank(), torch.tensor([1.0, bad]))


@pytest.mark.parametrize("which, bad", [("A", math.nan), ("B", math.inf)])
def test_rejects_non_finite_factors(which, bad):
    bank = _bank()
    with torch.no_grad():
        getattr(bank, which)[1, 2] = bad
    with pytest.raises(ValueError, match=f"bank 0: {which} holds NaN or Inf"):
        lora_delta(bank)


def test_rejects_banks_of_different_shapes():
    with pytest.raises(ValueError, match=r"banks\[1\] is a 12x17 layer but banks\[0\] is 12x16"):
        lora_delta([_bank(), _bank(d_in=17)])


def test_rejects_per_bank_weight_rows_of_wrong_count():
    with pytest.raises(ValueError, match="weights has 1 per-bank rows but 2 banks"):
        lora_delta([_bank(), _bank()], [[1.0, 1.0]])


def test_rejects_a_non_bank():
    with pytest.raises(ValueError, match="fedlora.AdapterBank"):
        lora_delta(torch.zeros(3, 3))


def test_weights_beyond_float32_are_an_error_not_nan(backend):
    gen = torch.Generator().manual_seed(5)
    bank = make_bank([2, 3], 12, 10, gen, torch.float32)
    with pytest.raises(ValueError, match=r"weights\[0\] = 1e\+39 .* beyond torch.float32's range"):
        lora_delta(bank, [1e39, 1.0])
    with pytest.raises(ValueError, match=r"weights\[1\]\[0\] = 1e\+39"):
        lora_delta([bank, bank], [[1.0, 1.0], [1e39, 1.0]])
    with pytest.raises(ValueError, match=r"beyond torch.float32's range"):
        fedlora.ops.lowrank_svd(bank, [1e39, 1.0], rank=2)
    # representable weights whose products overflow: an error too, never inf or NaN in the result
    # (every entry of B A is 2 * 10 = 20, times w s = 1e38: 2e39, past float32's 3.4e38)
    tens = fedlora.AdapterBank.from_factors([(torch.full((2, 12), 10.0), torch.ones(10, 2))], [1.0]).to(DEVICE)
    with pytest.raises(ValueError, match="lora_delta overflows torch.float32"):
        lora_delta(tens, [1e38])
    # a float64 bank holds them: computed (and returned) in float64
    bank64 = make_bank([2, 3], 12, 10, gen, torch.float64)
    out = lora_delta(bank64, [1e39, 1.0])
    assert out.dtype == torch.float64 and rel_err(out, reference_delta(bank64, [1e39, 1.0])) < 1e-13
