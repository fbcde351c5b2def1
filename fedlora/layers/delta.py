"""Fold a full-precision weight delta beside a (possibly quantized) base layer.

Adding FLoRA's accumulated update into a 4-bit weight and re-quantizing would
round it away; instead the delta stays a full-precision buffer next to the
untouched base:  y = base(x) + x @ delta^T.  Works for nn.Linear and for
bitsandbytes Linear4bit / Linear8bitLt (anything mapping [..., d_in] -> [..., d_out]).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class DeltaLinear(nn.Module):
    """``base`` plus a full-precision delta [d_out, d_in]; the base is never modified."""

    def __init__(self, base: nn.Module, d_out: int, d_in: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        device = next((p.device for p in base.parameters()), torch.device("cpu"))
        self.register_buffer("delta", torch.zeros(d_out, d_in, dtype=dtype, device=device))
        self.has_delta = False  # a zero delta costs a dense GEMM per call: skip it until one is set

    def set_delta_(self, delta: torch.Tensor) -> None:
        self._check(delta)
        self.delta.copy_(delta)
        self.has_delta = True

    def add_delta_(self, delta: torch.Tensor) -> None:
        self._check(delta)
        self.delta.add_(delta.to(device=self.delta.device, dtype=self.delta.dtype))
        self.has_delta = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.has_delta = bool(self.delta.any())

    def _check(self, delta: torch.Tensor) -> None:
        if tuple(delta.shape) != tuple(self.delta.shape):
            raise ValueError(f"delta has shape {tuple(delta.shape)}, the layer needs {tuple(self.delta.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.has_delta:
            return y
        # Computed in the delta's precision and only then cast to the output's dtype.
        return y + (x.to(self.delta.dtype) @ self.delta.T).to(y.dtype)


def _shape(module: nn.Module) -> tuple[int, int]:
    d_in = getattr(module, "in_features", None)
    d_out = getattr(module, "out_features", None)
    if d_in is None or d_out is None:
        raise ValueError(f"{type(module).__name__} has no in_features/out_features; cannot fold a delta beside it")
    return int(d_out), int(d_in)


def fold_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], *, mode: str = "set",
                dtype: torch.dtype = torch.float32) -> None:
    """Put ``deltas`` (module name -> [d_out, d_in]) beside the named layers of ``model``.

    The first time a layer is wrapped in a :class:`DeltaLinear` in place; later
    calls reuse the wrapper. mode="set" replaces the delta (e.g. FLoRA's
    merged_delta, already the sum of all rounds); mode="add" accumulates (a
    round's update).
    """
    if mode not in ("set", "add"):
        raise ValueError(f"mode must be 'set' or 'add', got {mode!r}")
    for name, delta in deltas.items():
        module = model.get_submodule(name)
        if not isinstance(module, DeltaLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = DeltaLinear(module, *_shape(module), dtype=dtype)
            setattr(parent, child, module)
        (module.set_delta_ if mode == "set" else module.add_delta_)(delta)
