"""fedlora: fast, exact federated LoRA fine-tuning with heterogeneous client ranks."""
from . import ops
from .bank import AdapterBank, lora_scaling

__version__ = "0.1.0"

__all__ = ["AdapterBank", "lora_scaling", "ops", "__version__"]
