"""Public fedlora ops over the packed adapter bank (see docs/DESIGN.md, "Public surface").

segmented   segmented_lora, segmented_lora_add_ (custom ops with registered autograd)
delta       lora_delta (sum_i w_i s_i B_i A_i, fused) and lowrank_svd (its truncated SVD)
checks      the argument checks every op shares
"""
from .delta import lora_delta, lowrank_svd
from .segmented import segmented_lora, segmented_lora_add_

__all__ = ["lora_delta", "lowrank_svd", "segmented_lora", "segmented_lora_add_"]
