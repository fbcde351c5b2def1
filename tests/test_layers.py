"""MultiLoRALinear over an nn.Linear base and the fedlora.segments context."""
import math

import pytest
import torch
from .conftest import REL_TOL, rel_err
from torch import nn

import fedlora
from fedlora import MultiLoRALinear, segments

D_IN, D_OUT = 24, 20


def _factors(ranks, d_in=D_IN, d_out=D_OUT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=g) / math.sqrt(d_in), torch.randn(d_out, r, generator=g)) for r in ranks]


def _reference(base, factors, scalings, x, sample_adapter, drop_mask=None):
    """float64: base(x) + s_a * (x*mask) A_a^T B_a^T, sample by sample."""
    W = base.weight.double()
    b = base.bias.double() if base.bias is not None else 0.0
    x = x.double()
    lx = x if drop_mask is None else x * drop_mask.double()
    rows = []
    for i, a in enumerate(sample_adapter):
        A, B = factors[a]
        rows.append(x[i] @ W.t() + b + scalings[a] * (lx[i] @ A.double().t() @ B.double().t()))
    return torch.stack(rows)


def _check_grads(layer, x, factors, scalings, sample_adapter, y, dtype=torch.float32):
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().double().requires_grad_()
    fr = [(A.double().requires_grad_(), B.double().requires_grad_()) for A, B in factors]
    _reference(layer.base_layer, fr, scalings, xr, sample_adapter).backward(g.double())
    tol = 20 * REL_TOL[dtype]
    assert rel_err(x.grad, xr.grad) < tol
    for i, (A, B) in enumerate(fr):
        gA, gB = layer.bank.factors(i)
        used = i in sample_adapter
        dA = layer.bank.A.grad[layer.bank.offsets[i]:][: A.shape[0]]
        dB = layer.bank.B.grad[:, layer.bank.offsets[i]:][:, : A.shape[0]]
        if used:
            assert rel_err(dA, A.grad) < tol and rel_err(dB, B.grad) < tol
        else:
            assert dA.abs().max() == 0 and dB.abs().max() == 0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_backward_match_float64(use_rslora):
    torch.manual_seed(0)
    ranks, alphas = [3, 16, 5, 2], [6.0, 8.0, 1.0, 4.0]
    base = nn.Linear(D_IN, D_OUT)
    factors = _factors(ranks)
    layer = MultiLoRALinear(base, factors=factors, alphas=alphas, use_rslora=use_rslora)
    scalings = [fedlora.lora_scaling(a, r, use_rslora) for a, r in zip(alphas, ranks)]
    assert torch.allclose(layer.bank.scalings, torch.tensor(scalings))
    x = torch.randn(6, 5, D_IN, requires_grad=True)  # 6 sequences of 5 tokens
    seg_lens, adapter_ids = [2, 0, 3, 1], [2, 3, 0, 2]  # adapter 1 unused, one empty segment
    y = layer(x, seg_lens=seg_lens, adapter_ids=adapter_ids)
    sample_adapter = [2, 2, 0, 0, 0, 2]
    assert y.shape == (6, 5, D_OUT)
    assert rel_err(y, _reference(base, factors, scalings, x, sample_adapter)) < REL_TOL[torch.float32]
    _check_grads(layer, x, factors, scalings, sample_adapter, y)
    assert base.weight.grad is None and not base.weight.requires_grad


def test_backends_agree(backend):
    torch.manual_seed(1)
    base = nn.Linear(16, 12)
    factors = _factors([2, 5], d_in=16, d_out=12)
    layer = MultiLoRALinear(base, factors=factors, alphas=[4.0, 5.0])
    x = torch.randn(3, 4, 16, requires_grad=True)
    y = layer(x, seg_lens=[1, 2], adapter_ids=[1, 0])
    assert rel_err(y, _reference(base, factors, [2.0, 1.0], x, [1, 0, 0])) < REL_TOL[torch.float32]
    _check_grads(layer, x, factors, [2.0, 1.0], [1, 0, 0], y)


def test_peft_initialisation_and_single_adapter_default():
    torch.manual_seed(2)
    base = nn.Linear(D_IN, D_OUT)
    layer = MultiLoRALinear(base, ranks=[4], alphas=[8])
    bound = 1 / math.sqrt(D_IN)
    assert layer.bank.A.abs().max() <= bound and layer.bank.A.std() > 0.4 * bound
    assert layer.bank.B.abs().max() == 0
    x = torch.randn(7, D_IN)
    assert torch.equal(layer(x), base(x))  # one adapter: no layout needed; B = 0 adds nothing
    assert layer.bank.scalings.item() == 2.0


def test_dropout_same_semantics_as_peft():
    """Dropout applies to the LoRA input only, in training mode (PEFT's lora_dropout)."""
    base = nn.Linear(D_IN, D_OUT)
    factors = _factors([3, 4])
    layer = MultiLoRALinear(base, factors=factors, lora_dropout=0.4)
    x = torch.randn(4, 3, D_IN)
    torch.manual_seed(5)
    y = layer(x, seg_lens=[3, 1], adapter_ids=[1, 0])
    torch.manual_seed(5)
    mask = nn.functional.dropout(torch.ones(12, D_IN), p=0.4).view(4, 3, D_IN)  # same RNG draw as the layer
    assert rel_err(y, _reference(base, factors, [1.0, 1.0], x, [1, 1, 1, 0], drop_mask=mask)) < REL_TOL[torch.float32]
    assert (mask == 0).any() and rel_err(y, _reference(base, factors, [1.0, 1.0], x, [1, 1, 1, 0])) > 1e-3
    layer.eval()
    y_eval = layer(x, seg_lens=[3, 1], adapter_ids=[1, 0])
    assert rel_err(y_eval, _reference(base, factors, [1.0, 1.0], x, [1, 1, 1, 0])) < REL_TOL[torch.float32]


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def _add_multilora(model, ranks, seed=0):
    model.requires_grad_(False)
    for i, block in enumerate(model.model.layers):
        for proj in ("q_proj", "v_proj"):
            base = getattr(block.self_attn, proj)
            factors = _factors(ranks, base.in_features, base.out_features, seed=seed + 10 * i + len(proj))
            setattr(block.self_attn, proj, MultiLoRALinear(base, factors=factors, alphas=[2 * r for r in ranks]))
    return model


def test_segments_context_runs_unchanged_transformers_model():
    """A mixed batch through segments() equals each client's sequences run alone, gradients too."""
    model = _add_multilora(_tiny_llama(), [2, 7, 4])
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(n.endswith((".A", ".B")) for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 128, (5, 6))
    seg_lens, adapter_ids = [2, 1, 2], [1, 0, 2]
    with segments(model, seg_lens, adapter_ids):
        logits = model(input_ids=ids).logits
    logits.sum().backward()
    mixed_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    refs, start = [], 0
    for n, a in zip(seg_lens, adapter_ids):
        with segments(model, [n], [a]):
            out = model(input_ids=ids[start:start + n]).logits
        out.sum().backward()
        refs.append(out.detach())
        start += n
    assert rel_err(logits, torch.cat(refs)) < 1e-5
    for got, p in zip(mixed_grads, params):
        assert rel_err(got, p.grad) < 1e-4
    with torch.no_grad(), segments(model, [5], [2]):
        outer = model(input_ids=ids).logits
        with segments(model, [5], [0]):  # the inner context wins ...
            inner = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, outer)  # ... and the outer one comes back
    assert rel_err(inner, outer) > 1e-3
    assert all(getattr(m, "_fedlora_layout", None) is None for m in model.modules())


def test_compile_fullgraph_layer_and_model():
    torch.manual_seed(3)
    layer = MultiLoRALinear(nn.Linear(16, 12), factors=_factors([2, 5], 16, 12), alphas=[1.0, 3.0])
    x = torch.randn(4, 3, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)  # Inductor, CPU
    y = compiled(x, seg_lens=[3, 1], adapter_ids=[1, 0])
    y.sum().backward()
    gA = layer.bank.A.grad.clone()
    layer.zero_grad()
    y_eager = layer(x, seg_lens=[3, 1], adapter_ids=[1, 0])
    y_eager.sum().backward()
    assert rel_err(y, y_eager) < 1e-6 and rel_err(gA, layer.bank.A.grad) < 1e-6
    model = _add_multilora(_tiny_llama(), [2, 3])
    ids = torch.randint(0, 128, (3, 5))
    with segments(model, [1, 2], [1, 0]):
        explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ------------------------------------------------------------------ bad input
def test_error_layout_does_not_match_batch():
    layer = MultiLoRALinear(nn.Linear(8, 4), ranks=[2, 3], name="blk.q")
    with pytest.raises(ValueError, match=r"blk\.q.*covers 3 samples but the input has 4"):
        layer(torch.randn(4, 5, 8), seg_lens=[1, 2], adapter_ids=[0, 1])


def test_error_adapter_id_out_of_range():
    model = nn.Sequential(MultiLoRALinear(nn.Linear(8, 4), ranks=[2, 3]))
    with pytest.raises(ValueError, match=r"'0' has 2 adapters; adapter ids \[2\] do not exist"):
        with segments(model, [1, 1], [0, 2]):
            pass
    with pytest.raises(ValueError, match=r"adapter_ids \[5\] out of range"):
        model[0](torch.randn(2, 8), seg_lens=[2], adapter_ids=[5])


def test_error_rank_zero():
    with pytest.raises(ValueError, match=r"my\.proj: every adapter needs rank >= 1, got ranks \[4, 0\]"):
        MultiLoRALinear(nn.Linear(8, 4), ranks=[4, 0], name="my.proj")


def test_error_unsupported_base():
    with pytest.raises(TypeError, match=r"emb: base layer of type torch\.nn\.modules\.sparse\.Embedding is not supported"):
        MultiLoRALinear(nn.Embedding(10, 4), ranks=[2], name="emb")


def test_error_missing_layout_with_several_adapters():
    layer = MultiLoRALinear(nn.Linear(8, 4), ranks=[2, 3], name="blk.v")
    with pytest.raises(ValueError, match=r"blk\.v: 2 adapters but no segment layout"):
        layer(torch.randn(2, 8))


def test_error_factors_for_another_shape():
    with pytest.raises(ValueError, match=r"lyr: adapters are for a 24 -> 20 layer but the base is 8 -> 4"):
        MultiLoRALinear(nn.Linear(8, 4), factors=_factors([2]), name="lyr")
