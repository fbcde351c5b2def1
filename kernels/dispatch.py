"""Backend choice, autotune configs and the one launch path shared by every kernel family.

CUDA tensors run the Triton kernels, CPU tensors run the torch twins.
``FEDLORA_BACKEND=triton`` forces Triton (on the CPU this needs
``TRITON_INTERPRET=1``), ``FEDLORA_BACKEND=torch`` forces the twins.
The environment is read at call time so tests can switch backends per case.

Every launcher starts its kernel through :func:`launch`. Inside
:func:`capture_launches` nothing runs: each launch (kernel, grid, arguments) is
recorded instead, and the Triton path is taken whatever the tensors' device.
``bench.kernels`` (the compile gate) and ``bench.roofline`` read kernel
signatures, grids and tiles that way, from the launchers' own code.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton

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
    if _CAPTURE.get() is not None:
        return True
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


def use_triton_for(tensor: torch.Tensor) -> bool:
    """:func:`use_triton`, except that float64 always runs the torch twin: the kernels accumulate in
    float32, and a float64 caller asked for float64 arithmetic."""
    return tensor.dtype != torch.float64 and use_triton(tensor)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the torch twins compute in: float64 for float64 inputs, float32 otherwise (16-bit upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of a tl.dot on fp32 operands.

    Operands that came from 16-bit data lose nothing in tf32; genuine fp32 data
    follows torch's own matmul setting (full fp32 unless the user allowed tf32).
    """
    if dtype in (torch.float16, torch.bfloat16) or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def native_dot(dtype: torch.dtype) -> bool:
    """Whether data of ``dtype`` reaches tl.dot as 16-bit operands (fp32 accumulation).

    Kernels then round their fp32 operand (H, L) to the data's dtype in
    registers. The interpreter computes bf16 dots wrongly, so under it every
    dot takes fp32 operands; captured launches (nothing runs) get the GPU's choice.
    """
    return dtype in (torch.float16, torch.bfloat16) and (_CAPTURE.get() is not None or not interpreting())


# ------------------------------------------------------------------ autotune
def aligned16(*tensors: torch.Tensor) -> bool:
    """Every tensor starts 16-byte aligned and each stride is 1 or a multiple of 16.

    Triton then vectorises the tile loads. Launchers pass the answer to their kernel
    as the ALIGNED constexpr, so wide tiles are offered only where they fit in registers.
    """
    return all(t.data_ptr() % 16 == 0 and all(s == 1 or s % 16 == 0 for s in t.stride()) for t in tensors)


def autotune(configs: list[dict], interp: dict, key: list[str], warps: int = 4, stages: int = 3, **kwargs):
    """``triton.autotune`` over ``configs``: dicts of meta-parameters, with optional
    ``num_warps`` / ``num_stages`` (default ``warps`` / ``stages``) and ``needs``, a tuple of
    the kernel's constexprs that must be true (a name, e.g. ``"ALIGNED"``) or equal a value
    (a ``(name, value)`` pair) for the config to be offered: a wide tile that spills on
    unaligned or fp32 data is pruned there.

    Under the interpreter the tuner gets ``interp`` alone (it cannot autotune over several
    configs). ``tuner.gpu_configs`` keeps the GPU list either way and
    :func:`shipped_configs` says which of them a launch may run: the compile gate builds those.
    """
    gpu = []
    for c in configs:
        c = dict(c)
        needs = tuple(c.pop("needs", ()))
        config = triton.Config(c, num_warps=c.pop("num_warps", warps), num_stages=c.pop("num_stages", stages))
        config.fedlora_needs = needs
        gpu.append(config)
    if not any(not c.fedlora_needs for c in gpu):
        raise ValueError("autotune: at least one config must have no `needs` (it serves every launch)")
    if interpreting():
        used, prune = [triton.Config(dict(interp), num_warps=4, num_stages=1)], None
    else:
        used = gpu
        prune = {"early_config_prune": lambda cfgs, nargs, **kw: _offered(cfgs, {**nargs, **kw})}

    def wrap(fn):
        tuner = triton.autotune(configs=used, key=key, prune_configs_by=prune, **kwargs)(fn)
        tuner.gpu_configs = tuple(gpu)
        return tuner

    return wrap


def _holds(need, args: dict) -> bool:
    if isinstance(need, tuple):
        name, value = need
        return args.get(name) == value
    return bool(args.get(need))


def _offered(configs, args: dict) -> list:
    return [c for c in configs if all(_holds(need, args) for need in getattr(c, "fedlora_needs", ()))]


def shipped_configs(kernel, args: dict) -> list:
    """The GPU configs an autotuned ``kernel`` may run for a launch with ``args`` (name -> value)."""
    return _offered(kernel.gpu_configs, args)


# -------------------------------------------------------------------- launch
@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher issued it."""

    kernel: Any  # the @triton.autotune / @triton.jit object
    grid: Any  # a tuple, or a callable of the chosen config's meta-parameters
    args: tuple
    kwargs: dict


_CAPTURE: contextvars.ContextVar[list | None] = contextvars.ContextVar("fedlora_capture", default=None)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or a recorded :class:`Launch` while capturing."""
    sink = _CAPTURE.get()
    if sink is not None:
        sink.append(Launch(kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def capture_launches():
    """Record every launch made inside the block instead of running it; yields the list.

    Tensors written by the skipped kernels keep whatever they held, so only
    shapes, dtypes, strides and grids mean anything inside the block.
    """
    sink: list[Launch] = []
    token = _CAPTURE.set(sink)
    try:
        yield sink
    finally:
        _CAPTURE.reset(token)

