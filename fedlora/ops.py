"""Public fedlora ops over the packed adapter bank (see DESIGN.md, "Public surface")."""
from .ops_segmented import segmented_lora

__all__ = ["segmented_lora"]
