"""MultiLoRALinear and patched PEFT over bitsandbytes 4-bit (NF4/FP4, +/- double quant) and 8-bit bases (CPU)."""
import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import fedlora
from fedlora import MultiLoRALinear

from .conftest import REL_TOL, rel_err

D_IN, D_OUT = 64, 48
BASES = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]


def _quantized(kind: str, lin: nn.Linear, compute_dtype=torch.float32) -> nn.Module:
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, double = kind.split("-")[0], kind.endswith("-dq")
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=compute_dtype,
                              quant_type=quant_type, compress_statistics=double)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # bitsandbytes quantizes on the move to a device


def _factors(ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, D_IN, generator=g) / D_IN ** 0.5, torch.randn(D_OUT, r, generator=g)) for r in ranks]


def _lora_reference(factors, scalings, x, sample_adapter):
    """float64 LoRA part only, sample by sample."""
    return torch.stack([
        scalings[a] * (x[i].double() @ factors[a][0].double().t() @ factors[a][1].double().t())
        for i, a in enumerate(sample_adapter)
    ])


@pytest.mark.parametrize("kind", BASES)
def test_quantized_base_forward_backward(kind):
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT)
    base = _quantized(kind, lin)
    assert not base.weight.dtype.is_floating_point  # really quantized
    factors, alphas = _factors([3, 8, 5]), [6.0, 4.0, 5.0]
    layer = MultiLoRALinear(base, factors=factors, alphas=alphas)
    assert layer.base_kind == ("bnb-8bit" if kind == "int8" else "bnb-4bit")
    assert not any(p.requires_grad for p in base.parameters())
    scalings = [a / r for a, r in zip(alphas, [3, 8, 5])]
    x = torch.randn(5, 4, D_IN, requires_grad=True)
    sample_adapter = [2, 2, 0, 1, 1]
    y = layer(x, seg_lens=[2, 1, 2], adapter_ids=[2, 0, 1])
    # The base part is bitsandbytes' own forward/backward; the LoRA part is checked in float64.
    xr = x.detach().clone().requires_grad_()
    fr = [(A.double().requires_grad_(), B.double().requires_grad_()) for A, B in factors]
    ref = base(xr).double() + _lora_reference(fr, scalings, xr, sample_adapter)
    assert rel_err(y, ref) < REL_TOL[torch.float32]
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    assert rel_err(x.grad, xr.grad) < 10 * REL_TOL[torch.float32]
    for i, (A, B) in enumerate(fr):
        dA, dB = layer.bank.A.grad, layer.bank.B.grad
        rows = slice(layer.bank.offsets[i], layer.bank.offsets[i] + A.shape[0])
        assert rel_err(dA[rows], A.grad) < 10 * REL_TOL[torch.float32]
        assert rel_err(dB[:, rows], B.grad) < 10 * REL_TOL[torch.float32]


def test_nf4_bf16_compute_dtype():
    """16-bit activations: adapters stay fp32 (PEFT's default), the output keeps the base's dtype."""
    torch.manual_seed(1)
    base = _quantized("nf4-dq", nn.Linear(D_IN, D_OUT), compute_dtype=torch.bfloat16)
    factors = _factors([4, 6], seed=1)
    layer = MultiLoRALinear(base, factors=factors, alphas=[8.0, 3.0])
    assert layer.bank.dtype == torch.float32
    x = torch.randn(3, 5, D_IN, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x, seg_lens=[1, 2], adapter_ids=[0, 1])
    assert y.dtype == torch.bfloat16
    ref = base(x.detach()).double() + _lora_reference(factors, [2.0, 0.5], x.detach(), [0, 1, 1])
    assert rel_err(y, ref) < REL_TOL[torch.bfloat16]
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.bank.A.grad.dtype == torch.float32
    assert layer.bank.A.grad.abs().sum() > 0


def test_peft_8bit_base_patched_equals_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                            device_map="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            rank_pattern={"v_proj": 2}, init_lora_weights=False))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    results = []
    for patch in (False, True):
        (fedlora.patch_peft if patch else fedlora.unpatch_peft)(model)
        model.zero_grad()
        logits = model(input_ids=ids).logits
        logits.sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, got_grads) = results
    assert rel_err(got, ref) < 1e-5 and ref_grads.keys() == got_grads.keys() and ref_grads
    for name in ref_grads:
        assert rel_err(got_grads[name], ref_grads[name]) < 1e-4, name


def test_error_unsupported_quantized_base():
    class OtherQuantLinear(nn.Linear):
        pass

    layer = OtherQuantLinear(8, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"q8: base layer of type .*OtherQuantLinear is not supported"):
        MultiLoRALinear(layer, ranks=[2], name="q8")


def test_training_after_an_evaluation_keeps_the_4bit_backward():
    """bitsandbytes repacks a 4-bit weight for CPU inference on the first eval() forward
    (AVX512-BF16 CPUs) into a layout whose kernel has no autograd; a layer must train
    identically before and after an evaluation."""
    gen = torch.Generator().manual_seed(3)
    base = _quantized("nf4", nn.Linear(64, 48))
    layer = MultiLoRALinear(base, factors=_factors([4, 2]), alphas=[8, 4])
    x = torch.randn(2, 5, 64, generator=gen)

    def grads():
        xi = x.clone().requires_grad_()
        layer.train()
        layer(xi, seg_lens=[1, 1], adapter_ids=[1, 0]).square().sum().backward()
        out = [xi.grad.clone(), layer.bank.A.grad.clone(), layer.bank.B.grad.clone()]
        layer.zero_grad()
        return out

    before = grads()
    layer.eval()
    with torch.no_grad():
        layer(x, seg_lens=[1, 1], adapter_ids=[1, 0])
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    for got, want in zip(grads(), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
