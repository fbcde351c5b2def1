"""fedlora: fast, exact federated LoRA fine-tuning with heterogeneous client ranks."""
from . import ops
from .bank import AdapterBank, lora_scaling
from .integrations.peft import adapter_batch, patch_peft, unpatch_peft
from .layers import MultiLoRALinear, segments

__version__ = "0.1.0"

__all__ = ["AdapterBank", "lora_scaling", "ops", "__version__"]
__all__ += ["MultiLoRALinear", "segments", "patch_peft", "unpatch_peft", "adapter_batch"]
