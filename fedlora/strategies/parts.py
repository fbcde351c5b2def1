"""A delta accumulated over rounds as *parts*  dense + B A  in a strategy's ``_tensors``
(FLoRA's global update, FedEx-LoRA's residual).

Per module the keys ``{name}.{prefix}dense`` (shape [0] until first needed, then
[d_out, d_in]), ``{name}.{prefix}A`` [k, d_in] and ``{name}.{prefix}B`` [d_out, k]. New
low-rank terms are appended to the stack; once it holds more numbers than a dense matrix
(k (d_out + d_in) > d_out d_in) it is added into ``dense`` (one batched lora_delta per
shape) and emptied, so memory stays at most about twice a dense matrix while early rounds
stay small. Entries are replaced, never written into (a failed round restores the dict).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import stack_products

Parts = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]  # (dense or None, A [k, d_in], B [d_out, k])


def init_parts(tensors: dict, shapes: Mapping[str, tuple[int, int]], prefix: str, dtype, device) -> None:
    """Empty parts (a zero delta, no d_out x d_in allocation) for every module."""
    for name, (d_out, d_in) in shapes.items():
        for key, shape in (("dense", (0,)), ("A", (0, d_in)), ("B", (d_out, 0))):
            tensors[f"{name}.{prefix}{key}"] = torch.zeros(shape, dtype=dtype, device=device)


def get_parts(tensors: Mapping, name: str, prefix: str) -> Parts:
    dense = tensors[f"{name}.{prefix}dense"]
    return (dense if dense.dim() == 2 else None, tensors[f"{name}.{prefix}A"], tensors[f"{name}.{prefix}B"])


def add_parts(tensors: dict, shapes: Mapping[str, tuple[int, int]], prefix: str, terms: Mapping[str, Parts]) -> None:
    """Add ``terms`` (module -> (dense or None, A, B)) to the accumulated parts: dense into dense,
    factors appended to the stack, stacks that outgrew a dense matrix folded into it."""
    full = []
    for name, (dense, A_new, B_new) in terms.items():
        d_out, d_in = shapes[name]
        dtype = tensors[f"{name}.{prefix}A"].dtype  # the state's
        if dense is not None:
            tensors[f"{name}.{prefix}dense"] = _dense(tensors, name, prefix, shapes) + dense.to(dtype)
        A = torch.cat([tensors[f"{name}.{prefix}A"], A_new.to(dtype)], dim=0)
        B = torch.cat([tensors[f"{name}.{prefix}B"], B_new.to(dtype)], dim=1)
        tensors[f"{name}.{prefix}A"], tensors[f"{name}.{prefix}B"] = A, B
        if A.shape[0] * (d_out + d_in) > d_out * d_in:
            full.append(name)
    stacks = {n: (tensors[f"{n}.{prefix}A"], tensors[f"{n}.{prefix}B"]) for n in full}
    for name, delta in stack_products(stacks).items():
        A = tensors[f"{name}.{prefix}A"]
        tensors[f"{name}.{prefix}dense"] = _dense(tensors, name, prefix, shapes) + delta.to(A.dtype)
        tensors[f"{name}.{prefix}A"] = A[:0].contiguous()
        tensors[f"{name}.{prefix}B"] = tensors[f"{name}.{prefix}B"][:, :0].contiguous()


def _dense(tensors: Mapping, name: str, prefix: str, shapes) -> torch.Tensor:
    dense = tensors[f"{name}.{prefix}dense"]
    if dense.dim() == 2:
        return dense
    A = tensors[f"{name}.{prefix}A"]
    return torch.zeros(shapes[name], dtype=A.dtype, device=A.device)
