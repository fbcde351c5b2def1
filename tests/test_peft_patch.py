"""fedlora.patch_peft: patched PEFT models compute what PEFT computes; adapter_batch trains mixed batches."""
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

import fedlora

from .conftest import rel_err

TOL = 1e-5  # fp32 model; only the order of the LoRA ops differs


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128)
    return LlamaForCausalLM(cfg)


def _peft(seed=0, **kw):
    # init_lora_weights=False: B is random too, so the LoRA path is not zero and A gets gradient.
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    cfg.update(kw)
    model = get_peft_model(_llama(seed), LoraConfig(**cfg))
    torch.manual_seed(seed + 1)
    return model


def _run(model, ids, seed=None):
    """logits and the gradients of every trainable parameter for a sum-of-logits-and-loss objective."""
    model.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    (out.loss + 1e-3 * out.logits.sum()).backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, ref, tol=TOL):
    assert rel_err(got[0], ref[0]) < tol
    assert got[1].keys() == ref[1].keys() and ref[1]
    for name in ref[1]:
        assert rel_err(got[1][name], ref[1][name]) < 10 * tol, name


def _patched_vs_peft(model, ids, seed=None):
    fedlora.unpatch_peft(model)
    ref = _run(model, ids, seed)
    fedlora.patch_peft(model)
    assert any("forward" in m.__dict__ for m in model.modules())
    got = _run(model, ids, seed)
    return got, ref


IDS = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_single_adapter_heterogeneous_ranks(use_rslora):
    model = _peft(rank_pattern={"v_proj": 7, "layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3},
                  use_rslora=use_rslora)
    model.train()
    _assert_same(*_patched_vs_peft(model, IDS))


def test_several_active_adapters():
    model = _peft()
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"],
                                          use_rslora=True, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    model.train()
    _assert_same(*_patched_vs_peft(model, IDS))


def test_dropout_same_masks_as_peft():
    model = _peft(lora_dropout=0.3)
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"], lora_dropout=0.5,
                                          init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    model.train()
    got, ref = _patched_vs_peft(model, IDS, seed=7)
    _assert_same(got, ref)
    model.eval()  # no dropout: a different result, so the masks above did matter
    assert rel_err(model(input_ids=IDS).logits, got[0]) > 1e-3


def test_disabled_adapters():
    model = fedlora.patch_peft(_peft())
    base_logits = None
    with model.disable_adapter():
        logits = model(input_ids=IDS).logits
        fedlora.unpatch_peft(model)
        base_logits = model(input_ids=IDS).logits
    assert torch.equal(logits, base_logits)
    assert rel_err(model(input_ids=IDS).logits, logits) > 1e-3  # adapters do change the output


def test_merged_adapters():
    model = fedlora.patch_peft(_peft()).eval()
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        model.merge_adapter()
        merged = model(input_ids=IDS).logits
        fedlora.unpatch_peft(model)
        assert torch.equal(merged, model(input_ids=IDS).logits)
        model.unmerge_adapter()
    assert rel_err(merged, unmerged) < 1e-5


def test_state_dict_save_and_unpatch(tmp_path):
    model = _peft()
    keys = list(model.state_dict().keys())
    names = [n for n, _ in model.named_parameters()]
    fedlora.patch_peft(model)
    assert list(model.state_dict().keys()) == keys and [n for n, _ in model.named_parameters()] == names
    sd = get_peft_model_state_dict(model)
    model.save_pretrained(tmp_path)
    logits = model(input_ids=IDS).logits
    loaded = PeftModel.from_pretrained(_llama(), tmp_path)
    assert get_peft_model_state_dict(loaded).keys() == sd.keys()
    assert torch.allclose(loaded(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-6)
    fedlora.unpatch_peft(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.allclose(model(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-6)


def test_4bit_base_from_transformers(tmp_path):
    from transformers import BitsAndBytesConfig

    _llama().save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            rank_pattern={"v_proj": 6}, init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and type(layer).__module__ == "peft.tuners.lora.bnb"
    model.train()
    _assert_same(*_patched_vs_peft(model, IDS))


def test_conv1d_base_with_fan_in_fan_out():
    """GPT-2's Conv1D base (fan_in_fan_out): only merging transposes, so the patched forward applies."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))
    model = get_peft_model(gpt2, LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                            init_lora_weights=False))
    model.eval()  # GPT-2's own dropouts would draw different masks in the two runs
    _assert_same(*_patched_vs_peft(model, IDS))


def test_unsupported_layers_keep_peft_path_with_one_warning():
    model = _peft(target_modules=["q_proj", "embed_tokens"])
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "dora"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fedlora.unpatch_peft(model)
        ref = _run(model, IDS)
        fedlora.patch_peft(model)
        got = _run(model, IDS)
    messages = [str(w.message) for w in caught if "fedlora" in str(w.message)]
    assert sum("peft.tuners.lora.layer.Embedding" in m for m in messages) == 1
    assert sum("DoraLinearVariant" in m and "peft.tuners.lora.layer.Linear" in m for m in messages) == 1
    _assert_same(got, ref)


def test_compiles_without_graph_breaks():
    model = fedlora.patch_peft(_peft(rank_pattern={"v_proj": 6}))
    explanation = torch._dynamo.explain(model)(input_ids=IDS)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    with fedlora.adapter_batch(model, ["default", "default", "__base__"]):
        explanation = torch._dynamo.explain(model)(input_ids=IDS)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---------------------------------------------------------- mixed-adapter training
def _three_adapters():
    model = _peft(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model.add_adapter("b", LoraConfig(r=5, lora_alpha=3, target_modules=["q_proj", "o_proj", "down_proj"],
                                      init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=3, lora_alpha=6, use_rslora=True, target_modules=["v_proj"],
                                      init_lora_weights=False))
    model.set_requires_grad(["default", "b", "c"])
    return model.train()


def _loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))


def test_adapter_batch_gradients_equal_separate_peft_training():
    """Each adapter gets exactly the gradient of a PEFT step on its own samples alone."""
    model = _three_adapters()
    ids = torch.randint(0, 128, (6, 5), generator=torch.Generator().manual_seed(1))
    names = ["b", "default", "default", "c", "b", "__base__"]
    fedlora.patch_peft(model)
    with fedlora.adapter_batch(model, names):
        logits = model(input_ids=ids).logits
    # Sum of per-adapter mean losses: adapter a's gradient is that of its own loss.
    total = sum(_loss(logits[[i for i, n in enumerate(names) if n == a]], ids[[i for i, n in enumerate(names) if n == a]])
                for a in ("default", "b", "c"))
    total.backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fedlora.unpatch_peft(model)
    model.zero_grad()
    for a in ("default", "b", "c"):
        model.base_model.set_adapter(a)
        model.set_requires_grad(["default", "b", "c"])
        rows = [i for i, n in enumerate(names) if n == a]
        out = model(input_ids=ids[rows]).logits
        assert rel_err(logits[rows], out) < TOL
        _loss(out, ids[rows]).backward()
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == separate.keys() and {k.split(".")[-2] for k in mixed} == {"default", "b", "c"}
    for name in separate:
        assert rel_err(mixed[name], separate[name]) < 10 * TOL, name
    with torch.no_grad():
        model.base_model.set_adapter("default")
        assert rel_err(logits[5], model.base_model.model(input_ids=ids[5:6]).logits[0]) > 1e-3
        with model.disable_adapter():
            assert rel_err(logits[5], model(input_ids=ids[5:6]).logits[0]) < TOL


def test_adapter_batch_matches_peft_inference_adapter_names():
    model = fedlora.patch_peft(_three_adapters().eval())
    names = ["c", "c", "default", "b", "__base__"]
    ids = torch.randint(0, 128, (5, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, adapter_names=names).logits  # PEFT's own mixed inference
        with fedlora.adapter_batch(model, names):
            got = model(input_ids=ids).logits
    assert rel_err(got, ref) < TOL


# ------------------------------------------------------------------ bad input
def test_error_adapter_batch_unknown_names():
    model = fedlora.patch_peft(_peft())
    with pytest.raises(ValueError, match=r"unknown adapter names \['nope'\]; the model holds \['default'\]"):
        with fedlora.adapter_batch(model, ["default", "nope"]):
            pass


def test_error_adapter_batch_layout_does_not_match_batch():
    model = fedlora.patch_peft(_peft())
    with fedlora.adapter_batch(model, ["default", "__base__"]):
        with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj.*covers 2 samples but the input has 3"):
            model(input_ids=IDS)


def test_error_adapter_batch_on_unpatched_model():
    model = _peft()
    with pytest.raises(ValueError, match=r"q_proj' \(peft\.tuners\.lora\.layer\.Linear\).*not patched by fedlora"):
        with fedlora.adapter_batch(model, ["default"] * 3):
            pass


def test_error_patch_model_without_lora():
    with pytest.raises(ValueError, match="LlamaForCausalLM holds no PEFT LoRA layer"):
        fedlora.patch_peft(_llama())


def test_adapter_batch_dropout_per_adapter():
    """In a mixed batch each adapter's own lora_dropout (own p) masks its own samples' LoRA input."""
    torch.manual_seed(0)
    holder = torch.nn.Sequential()
    holder.add_module("proj", torch.nn.Linear(16, 12))
    model = get_peft_model(holder, LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], lora_dropout=0.25,
                                              init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=5, lora_alpha=4, target_modules=["proj"], lora_dropout=0.6,
                                      init_lora_weights=False))
    fedlora.patch_peft(model.train())
    layer = model.base_model.model.proj
    x = torch.randn(3, 4, 16)
    with fedlora.adapter_batch(model, ["a", "a", "b"]):
        torch.manual_seed(3)
        y = model(x)
    torch.manual_seed(3)  # the same draws, in segment order
    mask_a = torch.nn.functional.dropout(torch.ones(8, 16), 0.25).view(2, 4, 16)
    mask_b = torch.nn.functional.dropout(torch.ones(4, 16), 0.6).view(1, 4, 16)

    def lora(name, xs):
        return layer.scaling[name] * layer.lora_B[name](layer.lora_A[name](xs))

    with torch.no_grad():
        ref = layer.base_layer(x) + torch.cat([lora("a", x[:2] * mask_a), lora("b", x[2:] * mask_b)])
        no_drop = layer.base_layer(x) + torch.cat([lora("a", x[:2]), lora("b", x[2:])])
    assert rel_err(y, ref) < TOL and rel_err(y, no_drop) > 1e-3
