"""Offline model loading: tiny random Llama, local HF dirs, GGUF conversion cache, quantization."""
import importlib.util
import json
import os

import pytest
import torch

from fedlora.models import byte_tokenizer, load_model
from fedlora.models import loading as fm


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "O, Romeo — ¿dónde estás? 🌹\n\tend"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 260 and tok.pad_token_id == 0 and tok.eos_token == "</s>"


def test_tiny_random_forward_and_seed():
    model, tok = load_model("tiny-random-llama", seed=1)
    enc = tok(["to be, or not", "to be"], padding=True, return_tensors="pt")
    out = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
    assert out.logits.shape == (2, enc["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # Random init: loss near ln(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(float(model.config.vocab_size))).item()) < 1.0
    same, _ = load_model("tiny-random-llama", seed=1)
    other, _ = load_model("tiny-random-llama", seed=2)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], same.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_tiny_from_config_dict_and_dtype():
    model, tok = load_model({"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2,
                             "num_key_value_heads": 1, "vocab_size": 300}, dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 3 and model.dtype == torch.bfloat16
    assert model.config.pad_token_id == tok.pad_token_id
    with pytest.raises(ValueError, match="smaller than the byte tokenizer"):
        load_model({"vocab_size": 100})


def test_local_hf_directory(tmp_path):
    model, tok = load_model("tiny-random-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(str(tmp_path))
    ids = tok("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok2.decode(ids[0]) == "hello"


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown model spec"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="unknown model spec"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(str(tmp_path / "w.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    monkey_cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="cannot load GGUF"):
        fm.converted_gguf_dir(tmp_path / "broken.gguf", cache_dir=monkey_cache)
    assert list((monkey_cache / "models").iterdir()) == []  # no half-written cache entry
    with pytest.raises(ValueError, match="model spec must be"):
        load_model(42)
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model("tiny-random-llama", quantization="int4")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-random-llama", dtype="float32")


def test_missing_bitsandbytes_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match="bitsandbytes"):
        load_model("tiny-random-llama", quantization="nf4")


@pytest.mark.parametrize("quantization,layer_type", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bnb_quantized_tiny(quantization, layer_type):
    pytest.importorskip("bitsandbytes")
    ref, tok = load_model("tiny-random-llama")
    model, _ = load_model("tiny-random-llama", quantization=quantization)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer_type
    ids = tok("quantized", return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        got, want = model(ids).logits.float().cpu(), ref(ids.cpu()).logits
    assert torch.isfinite(got).all()
    # Quantization error is small relative to the logits, not zero.
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.2


def test_gguf_cache_converts_once_atomically(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def fake_convert(src, out_dir):
        calls.append(src)
        (out_dir / "config.json").write_text("{}")
        (out_dir / fm.SOURCE_FILE).write_text(json.dumps({"gguf": str(src)}))

    monkeypatch.setattr(fm, "_convert_gguf", fake_convert)
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    first = fm.resolve_model_dir(str(gguf))
    second = fm.resolve_model_dir(str(gguf))
    assert first == second and len(calls) == 1
    assert first.parent == tmp_path / "cache" / "models"
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # temp dir renamed, none left
    # Replacing the file (new mtime/size) invalidates the entry.
    gguf.write_bytes(b"GGUF fake, new version")
    os.utime(gguf, ns=(1, 1))
    assert fm.resolve_model_dir(str(gguf)) != first and len(calls) == 2


@pytest.fixture(scope="module")
def smollm2():
    # Uses the real cache ($FEDLORA_CACHE or ~/.cache/fedlora): the first run
    # converts the GGUF (~40 s on 2 cores), later runs load safetensors (~1.5 s).
    return load_model("smollm2-135m-instruct")


def test_smollm2_gguf_predicts(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == " Paris"
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_smollm2_cache_is_reused(smollm2, monkeypatch):
    model, tok = smollm2
    cached = fm.converted_gguf_dir(fm.smollm2_gguf_path())
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()

    def no_convert(*_):
        raise AssertionError("GGUF converted again although the cache holds it")

    monkeypatch.setattr(fm, "_convert_gguf", no_convert)
    again, tok2 = load_model("smollm2-135m-instruct")
    ids = tok("Hello", return_tensors="pt")["input_ids"]
    assert tok2("Hello", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    w = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(again.state_dict()[w], model.state_dict()[w])
