"""segmented_lora against a float64 loop reference: outputs and all three gradients."""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fedlora
from fedlora.ops import segmented_lora

from .conftest import DEVICE, REL_TOL, rel_err


def reference(x, A, B, ranks, scalings, seg_lens, adapter_ids):
    """Float64 per-segment loop: y_j = s_a x_j A_a^T B_a^T, differentiable."""
    offsets = [sum(ranks[:a]) for a in range(len(ranks))]
    rows, start = [], 0
    for length, a in zip(seg_lens, adapter_ids):
        sl = slice(offsets[a], offsets[a] + ranks[a])
        rows.append(float(scalings[a]) * (x[start:start + length] @ A[sl].t() @ B[:, sl].t()))
        start += length
    if not rows:  # no segments: an empty output that still carries (zero) gradients
        return x.new_zeros((0, B.shape[0])) + 0 * (x.sum() + A.sum() + B.sum())
    return torch.cat(rows)


def random_bank(ranks, d_in, d_out, dtype, gen):
    """Random nonzero factors; scalings away from 1 so a dropped scale is caught."""
    factors = [
        (torch.randn(r, d_in, generator=gen) / d_in**0.5, torch.randn(d_out, r, generator=gen) / r**0.5)
        for r in ranks
    ]
    scalings = (0.25 + 2 * torch.rand(len(ranks), generator=gen)).tolist()
    return fedlora.AdapterBank.from_factors(factors, scalings).to(device=DEVICE, dtype=dtype)


def check_against_reference(bank, seg_lens, adapter_ids, dtype, gen, tol_scale=1.0):
    T = sum(seg_lens)
    x = torch.randn(T, bank.d_in, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_()
    grad_y = torch.randn(T, bank.d_out, generator=gen).to(device=DEVICE, dtype=dtype)

    y = segmented_lora(x, bank, seg_lens, adapter_ids)
    y.backward(grad_y)

    x64 = x.detach().double().cpu().requires_grad_()
    A64 = bank.A.detach().double().cpu().requires_grad_()
    B64 = bank.B.detach().double().cpu().requires_grad_()
    ids = adapter_ids if adapter_ids is not None else list(range(len(seg_lens)))
    y64 = reference(x64, A64, B64, bank.ranks, bank.scalings.tolist(), seg_lens, ids)
    y64.backward(grad_y.double().cpu())

    tol = REL_TOL[dtype] * tol_scale
    assert y.shape == (T, bank.d_out) and y.dtype == dtype
    assert rel_err(y, y64) < tol
    assert rel_err(x.grad, x64.grad) < tol
    assert rel_err(bank.A.grad, A64.grad) < tol
    assert rel_err(bank.B.grad, B64.grad) < tol
    # An adapter no segment uses gets exactly zero gradient.
    used = {a for n, a in zip(seg_lens, ids) if n}
    for a in set(range(bank.num_adapters)) - used:
        gA, gB = bank.A.grad[bank.offsets[a]:][: bank.ranks[a]], bank.B.grad[:, bank.offsets[a]:][:, : bank.ranks[a]]
        assert torch.count_nonzero(gA) == 0 and torch.count_nonzero(gB) == 0


def check_layout(layout):
    """One drawn layout: a fresh random fp32 bank checked against the float64 reference."""
    ranks, d_in, d_out, seg_lens, adapter_ids, seed = layout
    gen = torch.Generator().manual_seed(seed)
    bank = random_bank(ranks, d_in, d_out, torch.float32, gen)
    check_against_reference(bank, seg_lens, adapter_ids, torch.float32, gen)


@st.composite
def layouts(draw, max_adapters, max_rank, max_dim, max_seg, max_segments):
    n = draw(st.integers(1, max_adapters))
    ranks = draw(st.lists(st.integers(1, max_rank), min_size=n, max_size=n))
    d_in = draw(st.integers(1, max_dim))
    d_out = draw(st.integers(1, max_dim))
    seg_lens = draw(
        st.lists(st.one_of(st.just(0), st.just(1), st.integers(0, max_seg)), min_size=0, max_size=max_segments)
    )
    adapter_ids = draw(st.lists(st.integers(0, n - 1), min_size=len(seg_lens), max_size=len(seg_lens)))
    return ranks, d_in, d_out, seg_lens, adapter_ids, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(layouts(max_adapters=12, max_rank=70, max_dim=200, max_seg=60, max_segments=10))
def test_torch_twin_matches_reference(monkeypatch_env, layout):
    check_layout(layout)


# No shrinking: each interpreted example costs ~1 s, and a failure prints its layout anyway.
@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(layouts(max_adapters=5, max_rank=40, max_dim=48, max_seg=20, max_segments=5))
def test_triton_matches_reference(triton_env, layout):
    check_layout(layout)


@pytest.fixture
def monkeypatch_env():
    """hypothesis forbids function-scoped fixtures that change per example; env is constant here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDLORA_BACKEND", "torch")
        yield


@pytest.fixture
def triton_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDLORA_BACKEND", "triton")
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_both_backends(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    # Ranks straddling the 16-wide rank blocks, one adapter used twice, one unused.
    bank = random_bank([1, 17, 33, 5], 40, 36, dtype, gen)
    check_against_reference(bank, [9, 0, 21, 1, 14], [1, 3, 2, 1, 0], dtype, gen)


def test_ranks_up_to_128(backend):
    gen = torch.Generator().manual_seed(3)
    bank = random_bank([128, 3, 64], 24, 20, torch.float32, gen)
    check_against_reference(bank, [5, 7, 4], [0, 1, 2], torch.float32, gen)


def test_default_adapter_ids_and_tensor_layout(backend):
    gen = torch.Generator().manual_seed(11)
    bank = random_bank([2, 9, 4], 20, 18, torch.float32, gen)
    x = torch.randn(12, 20, generator=gen).to(DEVICE)
    by_list = segmented_lora(x, bank, [4, 5, 3])
    by_tensor = segmented_lora(x, bank, torch.tensor([4, 5, 3]), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(by_list, by_tensor, rtol=0, atol=0)


def test_backends_agree_on_fp16_inputs():
    gen = torch.Generator().manual_seed(5)
    bank = random_bank([6, 19, 2], 33, 31, torch.float16, gen)
    x = torch.randn(30, 33, generator=gen).to(DEVICE, torch.float16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDLORA_BACKEND", "torch")
        y_torch = segmented_lora(x, bank, [10, 10, 10], [2, 0, 1])
        mp.setenv("FEDLORA_BACKEND", "triton")
        y_triton = segmented_lora(x, bank, [10, 10, 10], [2, 0, 1])
    assert rel_err(y_triton, y_torch.double()) < REL_TOL[torch.float16]


def test_one_optimizer_trains_each_adapter_only_on_its_segments():
    """A step on a mixed batch equals each adapter's own step on its own rows."""
    gen = torch.Generator().manual_seed(2)
    bank = random_bank([3, 8, 5], 16, 12, torch.float32, gen)
    before = [tuple(t.detach().clone() for t in bank.factors(i)) for i in range(3)]
    x = torch.randn(20, 16, generator=gen)
    target = torch.randn(20, 12, generator=gen)
    seg_lens, ids = [7, 13], [2, 0]

    opt = torch.optim.SGD(bank.parameters(), lr=0.1)
    loss = ((segmented_lora(x, bank, seg_lens, ids) - target) ** 2).sum()
    loss.backward()
    opt.step()

    # Adapter 1 is used by no segment: untouched.
    for got, old in zip(bank.factors(1), before[1]):
        torch.testing.assert_close(got, old, rtol=0, atol=0)
    # Adapters 0 and 2 move exactly as if each trained alone on its rows.
    rows = {2: slice(0, 7), 0: slice(7, 20)}
    for a, sl in rows.items():
        alone = fedlora.AdapterBank.from_factors([before[a]], bank.scalings[a].item())
        solo_opt = torch.optim.SGD(alone.parameters(), lr=0.1)
        ((segmented_lora(x[sl], alone, [sl.stop - sl.start]) - target[sl]) ** 2).sum().backward()
        solo_opt.step()
        for got, want in zip(bank.factors(a), alone.factors(0)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class _TwoLayer(torch.nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.base = torch.nn.Linear(16, 16)
        self.bank = random_bank([4, 9], 16, 16, torch.float32, gen)

    def forward(self, x):
        return self.base(x) + segmented_lora(x, self.bank, [6, 4], [1, 0])


def test_torch_compile_traces_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("FEDLORA_BACKEND", "torch")
    gen = torch.Generator().manual_seed(4)
    model = _TwoLayer(gen)
    x = torch.randn(10, 16, generator=gen, requires_grad=True)

    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    y_c = compiled(x)
    y_c.sum().backward()
    grads_c = [x.grad.clone(), model.bank.A.grad.clone(), model.bank.B.grad.clone()]
    x.grad = None
    model.zero_grad()
    y_e = model(x)
    y_e.sum().backward()
    torch.testing.assert_close(y_c, y_e)
    for got, want in zip(grads_c, [x.grad, model.bank.A.grad, model.bank.B.grad]):
        torch.testing.assert_close(got, want)


def test_backward_with_only_B_trainable():
    # Frozen A and an input without grad (FFA-LoRA's first adapted layer): two gradients are
    # skipped, and the op must not return one tensor for both (torch rejects aliased outputs).
    gen = torch.Generator().manual_seed(5)
    bank = random_bank([2, 3], 8, 6, torch.float32, gen)
    bank.A.requires_grad_(False)
    x = torch.randn(5, 8, generator=gen)
    segmented_lora(x, bank, [3, 2]).square().sum().backward()
    x64, A64 = x.double(), bank.A.detach().double()
    B64 = bank.B.detach().double().requires_grad_()
    reference(x64, A64, B64, bank.ranks, bank.scalings.tolist(), [3, 2], [0, 1]).square().sum().backward()
    assert bank.A.grad is None
    assert rel_err(bank.B.grad, B64.grad) < REL_TOL[torch.float32]


def test_float64_inputs_are_computed_in_float64(backend):
    """float64 x and bank: output and all three gradients agree with the float64 reference to float64
    rounding (REL_TOL[float64] = 1e-12, ~1e4 ulps for these short sums); float32 arithmetic would give
    ~1e-7. Under FEDLORA_BACKEND=triton too: float64 always takes the torch twin."""
    gen = torch.Generator().manual_seed(11)
    bank = random_bank([3, 17, 8], 40, 29, torch.float64, gen)
    check_against_reference(bank, [5, 0, 9, 4], [2, 0, 1, 0], torch.float64, gen)
    h = fedlora.ops.segmented._segmented_lora_op(
        torch.randn(4, 40, dtype=torch.float64), bank.A, bank.B, bank.scalings,
        torch.tensor([4]), torch.tensor([1]), bank.ranks)[1]
    assert h.dtype == torch.float64  # the saved intermediate too
