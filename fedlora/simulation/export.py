"""The global update as a PEFT LoRA adapter (loadable with ``PeftModel.from_pretrained``)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from fedlora.federated.ranks import module_ranks
from fedlora.federated.update import temp_dir_beside
from fedlora.models.loading import model_dir_if_ready
from fedlora.ops import lowrank_svd
from fedlora.strategies import Strategy

from .config import SimConfig


def base_model_path(spec) -> str | None:
    """What an adapter's ``base_model_name_or_path`` should say: the absolute local folder of the base
    model (a converted GGUF file's cache folder), so PEFT loads it offline; None for a random model."""
    try:
        folder = model_dir_if_ready(spec)
    except ValueError:  # not on this machine (a Flower server without the model): keep the name given
        folder = None
    if folder is not None:
        return str(folder.resolve())
    return str(spec) if isinstance(spec, (str, os.PathLike)) and spec != "tiny-random-llama" else None


def export_peft_adapter(strategy: Strategy, path: Path, rank: int, cfg: SimConfig, tokenizer=None) -> Path:
    """Save the global update as a PEFT LoRA adapter of ``rank`` (best rank-r approximation per module).

    With ``cfg.rank_pattern`` each module gets the rank the pattern gives a
    client of ``rank`` (PEFT's rank_pattern). lora_alpha = the module's rank, so
    PEFT's scaling is 1 and B A is the truncated update. The truncation is the
    exact SVD (``lowrank_svd(method="dense")``) in float64, batched over the
    modules of one shape and rank.
    Loadable with ``PeftModel.from_pretrained(base_model, path)`` and, with the
    base model's local folder as ``base_model_name_or_path`` and the tokenizer
    saved beside the adapter, with ``AutoPeftModelForCausalLM.from_pretrained(path)`` offline.
    """
    from peft import LoraConfig
    from safetensors.torch import save as st_save

    per_module = module_ranks(rank, strategy.module_shapes, cfg.rank_pattern)
    deltas = strategy.global_deltas()
    groups: dict[tuple, list[str]] = {}
    for name, delta in deltas.items():
        k = min(per_module[name], *delta.shape)
        groups.setdefault((tuple(delta.shape), k), []).append(name)
    tensors = {}
    for (_, k), names in groups.items():
        U, S, V = lowrank_svd(torch.stack([deltas[n].double() for n in names]), rank=k, method="dense")
        root = S.sqrt()
        for j, name in enumerate(names):
            B = (U[j] * root[j]).float().contiguous()
            A = (root[j][:, None] * V[j].T).float().contiguous()
            rank_m = per_module[name]
            if k < rank_m:  # keep every module at the declared rank
                A = torch.cat([A, A.new_zeros(rank_m - k, A.shape[1])])
                B = torch.cat([B, B.new_zeros(B.shape[0], rank_m - k)], dim=1)
            tensors[f"base_model.model.{name}.lora_A.weight"] = A
            tensors[f"base_model.model.{name}.lora_B.weight"] = B
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(path.parent, ".adapter-")
    # Exact module names as patterns; PEFT matches a pattern at the end of the name.
    pattern = {re.escape(n): r for n, r in per_module.items() if r != rank}
    LoraConfig(r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=dict(pattern),
               target_modules=list(cfg.target_modules), lora_dropout=0.0,
               use_rslora=False, task_type="CAUSAL_LM",
               base_model_name_or_path=base_model_path(cfg.model)).save_pretrained(str(tmp))
    (tmp / "adapter_model.safetensors").write_bytes(st_save(tensors, metadata={"format": "pt"}))
    if tokenizer is not None:  # AutoPeftModel and AutoTokenizer then find it here, not on the Hub
        tokenizer.save_pretrained(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
