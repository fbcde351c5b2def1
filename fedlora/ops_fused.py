"""segmented_lora_add_: accumulate segmented LoRA into an existing output, in place.

A LoRA layer computes base(x) + lora(x). Writing the LoRA expand straight into
the base output saves a full-size [T, d_out] read/write pass: on the Triton
backend the expand kernel loads the base output tile, adds its fp32 LoRA tile
and stores once (``kernels.segmented.expand(..., out=...)``); the torch twin on
the CPU does the same add in plain torch.

Autograd: torch.library cannot attach a backward to an op that mutates an
input, so the mutating op ``fedlora::segmented_lora_add_`` is wrapped in an
autograd.Function that marks the output dirty (autograd then rebases the base
output's history exactly as for ``y.add_(z)``). Under torch.compile the op is
functionalized and Inductor re-inplaces it. The backward reuses
``fedlora::segmented_lora_backward``.

Unlike :func:`fedlora.ops.segmented_lora` this takes raw factor tensors, so
callers that keep per-adapter parameters elsewhere (PEFT's lora_A / lora_B)
can pass a view or a concatenation of them without building an AdapterBank.
"""
from __future__ import annotations

import contextlib
import math

import torch

from fedlora.kernels import segmented as K

from . import ops_segmented  # noqa: F401  (registers fedlora::segmented_lora_backward)
from .ops_segmented import check_segments


@torch.library.custom_op("fedlora::segmented_lora_add_", mutates_args=("out",))
def _segmented_lora_add_op(
    out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scalings: torch.Tensor,
    seg_lens: torch.Tensor, adapter_ids: torch.Tensor, ranks: list[int],
) -> torch.Tensor:
    plan = K.make_plan(seg_lens.tolist(), adapter_ids.tolist(), ranks, scalings, x.device)
    h = K.shrink(x, A, plan)
    K.expand(h, B.t(), plan, out=out)
    return h


@_segmented_lora_add_op.register_fake
def _(out, x, A, B, scalings, seg_lens, adapter_ids, ranks):
    return x.new_empty((x.shape[0], max(ranks)), dtype=torch.float32)


class _SegmentedLoRAAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, x, A, B, scalings, seg_lens, adapter_ids, ranks):
        h = _segmented_lora_add_op(out, x, A, B, scalings, seg_lens, adapter_ids, ranks)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, scalings, seg_lens, adapter_ids, h)
        ctx.ranks = ranks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, scalings, seg_lens, adapter_ids, h = ctx.saved_tensors
        need_dx, need_dA, need_dB = ctx.needs_input_grad[1:4]
        dx = dA = dB = None
        if need_dx or need_dA or need_dB:
            dx, dA, dB = torch.ops.fedlora.segmented_lora_backward(
                grad_out, x, A, B, scalings, seg_lens, adapter_ids, h, ctx.ranks, need_dx, need_dA, need_dB
            )
        return (
            grad_out,
            dx if need_dx else None,
            dA if need_dA else None,
            dB if need_dB else None,
            None, None, None, None,
        )


def segmented_lora_add_(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ranks,
                        scalings: torch.Tensor, seg_lens, adapter_ids=None) -> torch.Tensor:
    """``out += segmented LoRA of x``, in place; returns ``out``.

    out [T, d_out] (any float dtype; the LoRA tile is added in fp32 and rounded
    once), x [T, d_in], A [R, d_in], B [d_out, R] with R = sum(ranks), adapter a
    owning rows/columns offset_a .. offset_a + ranks[a]; scalings fp32 [n].
    Segment j (``seg_lens[j]`` rows) uses adapter ``adapter_ids[j]`` (default j).
    Differentiable in out, x, A and B.
    """
    ranks = [int(r) for r in ranks]
    if not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of integers >= 1, got {ranks}")
    if x.dim() != 2 or out.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"out, x, A, B must be 2-D; got {tuple(out.shape)}, {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}"
        )
    if A.shape[0] != sum(ranks) or B.shape[1] != sum(ranks):
        raise ValueError(f"A has {A.shape[0]} rows and B {B.shape[1]} columns but ranks {ranks} sum to {sum(ranks)}")
    if x.shape[1] != A.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but A expects d_in={A.shape[1]}")
    if out.shape != (x.shape[0], B.shape[0]):
        raise ValueError(f"out is {tuple(out.shape)} but x and B give [{x.shape[0]}, {B.shape[0]}]")
    if not (x.dtype == A.dtype == B.dtype):
        raise ValueError(f"x, A, B must share one dtype; got {x.dtype}, {A.dtype}, {B.dtype}")
    if not out.dtype.is_floating_point:
        raise ValueError(f"out must be a floating tensor, got {out.dtype}")
    if len({t.device for t in (out, x, A, B)}) != 1:
        raise ValueError(f"out, x, A, B are on different devices: {out.device}, {x.device}, {A.device}, {B.device}")
    if scalings.shape != (len(ranks),):
        raise ValueError(f"scalings has shape {tuple(scalings.shape)} but there are {len(ranks)} adapters")
    seg_lens, adapter_ids = check_segments(x.shape[0], len(ranks), seg_lens, adapter_ids)
    return _SegmentedLoRAAdd.apply(
        out, x, A, B, scalings.to(device=x.device, dtype=torch.float32),
        torch.tensor(seg_lens, dtype=torch.int64), torch.tensor(adapter_ids, dtype=torch.int64), ranks,
    )


def writable(result: torch.Tensor) -> torch.Tensor:
    """``result``, or a copy of it when autograd would refuse an in-place add.

    A view may have been made inside another autograd.Function (bitsandbytes'
    4-bit and 8-bit matmuls return one); with grad mode on, autograd forbids
    modifying such views in place, so that case pays one copy (PEFT clones
    every 4-bit output). Inference (no grad) always adds in place, and so does
    a compiled graph, which AOTAutograd functionalizes as a whole.
    """
    if not torch.compiler.is_compiling() and torch.is_grad_enabled() and result._is_view():
        return result.clone()
    return result


def sample_segments_to_rows(x_shape, seg_lens) -> list[int]:
    """Per-sample segment lengths -> per-row lengths for an input of ``x_shape``.

    Dim 0 of the input counts samples and every dim between it and the last
    (features) is part of a sample: a [batch, seq, d_in] input has seq rows per
    sample, a [T, d_in] input one. Raises ValueError when the layout does not
    cover exactly x_shape[0] samples.
    """
    seg_lens = [int(n) for n in seg_lens]
    samples = x_shape[0] if len(x_shape) >= 2 else 1
    if any(n < 0 for n in seg_lens):
        raise ValueError(f"segment lengths must be non-negative, got {seg_lens}")
    if sum(seg_lens) != samples:
        raise ValueError(
            f"the segment layout covers {sum(seg_lens)} samples but the input has {samples} "
            f"(input shape {tuple(x_shape)}; lengths count samples along dim 0)"
        )
    rows_per_sample = math.prod(x_shape[1:-1])
    return [n * rows_per_sample for n in seg_lens]


LAYOUT_ATTR = "_fedlora_layout"


@contextlib.contextmanager
def segment_layout(modules, layout):
    """Set ``module._fedlora_layout = layout`` on every module; restore the previous ones on exit.

    The layers read their per-sample segment layout from this attribute, so a
    whole model is told once per batch and nested contexts unwind correctly.
    """
    modules = list(modules)
    previous = [getattr(m, LAYOUT_ATTR, None) for m in modules]
    for m in modules:
        setattr(m, LAYOUT_ATTR, layout)
    try:
        yield
    finally:
        for m, prev in zip(modules, previous):
            setattr(m, LAYOUT_ATTR, prev)
