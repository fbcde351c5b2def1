"""Public fedlora ops over the packed adapter bank (see DESIGN.md, "Public surface")."""
from .ops_segmented import segmented_lora
from .ops_server import lora_delta, lowrank_svd

__all__ = ["segmented_lora"]
__all__ += ["lora_delta", "lowrank_svd"]
