"""fedlora: fast, exact federated LoRA fine-tuning with heterogeneous client ranks.

The public names below are imported on first use (PEP 562), so that ``fedlora
--help`` and other light entry points start without importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "AdapterBank": "fedlora.bank",
    "lora_scaling": "fedlora.bank",
    "MultiLoRALinear": "fedlora.layers",
    "segments": "fedlora.layers",
    "patch_peft": "fedlora.integrations.peft",
    "unpatch_peft": "fedlora.integrations.peft",
    "adapter_batch": "fedlora.integrations.peft",
}

__all__ = ["AdapterBank", "lora_scaling", "ops", "__version__", "MultiLoRALinear", "segments", "patch_peft",
           "unpatch_peft", "adapter_batch"]


def __getattr__(name: str):
    if name == "ops":
        return importlib.import_module("fedlora.ops")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
