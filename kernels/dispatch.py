"""Backend choice shared by every op family.

CUDA tensors run the Triton kernels, CPU tensors run the torch twins.
``FEDLORA_BACKEND=triton`` forces Triton (on the CPU this needs
``TRITON_INTERPRET=1``), ``FEDLORA_BACKEND=torch`` forces the twins.
The environment is read at call time so tests can switch backends per case.
"""
from __future__ import annotations

import os

import torch

_BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_name() -> str:
    name = os.environ.get("FEDLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"FEDLORA_BACKEND={name!r} is not one of {_BACKENDS}")
    return name


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` should run its Triton kernel."""
    name = backend_name()
    if name == "torch":
        return False
    if name == "triton":
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                "FEDLORA_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
                "(Triton only runs on the CPU through its interpreter)"
            )
        return True
    return tensor.is_cuda


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for fp32 tl.dot operands.

    Operands that came from 16-bit data lose nothing in tf32; genuine fp32 data
    follows torch's own matmul setting (full fp32 unless the user allowed tf32).
    """
    if dtype in (torch.float16, torch.bfloat16) or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def native_16bit_dot(a: torch.dtype, b: torch.dtype) -> bool:
    """Feed 16-bit operands to tl.dot as they are (fp32 accumulation).

    The interpreter computes bf16 dots wrongly, so it always gets fp32 operands.
    """
    return a == b and a in (torch.float16, torch.bfloat16) and not interpreting()


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the torch twins compute in: float64 for float64 inputs, float32 otherwise (16-bit upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def use_triton_for(tensor: torch.Tensor) -> bool:
    """:func:`use_triton`, except that float64 always runs the torch twin: the kernels accumulate in
    float32, and a float64 caller asked for float64 arithmetic."""
    return tensor.dtype != torch.float64 and use_triton(tensor)
