"""Segmented multi-rank LoRA: many adapters of different ranks over one batch, differentiable.

Two public entry points over one backward:

- :func:`segmented_lora` returns the LoRA output of an :class:`AdapterBank`
  (``fedlora::segmented_lora``, registered with torch.library so torch.compile
  traces it as one opaque node with a known output shape, and autograd reaches
  x, bank.A and bank.B);
- :func:`segmented_lora_add_` accumulates the LoRA output into an existing base
  output in place (``fedlora::segmented_lora_add_``), which saves a full-size
  [T, d_out] read/write pass: on the Triton backend the expand kernel loads the
  base output tile, adds its fp32 LoRA tile and stores once. It takes raw packed
  factors, so callers that keep per-adapter parameters elsewhere (PEFT's lora_A /
  lora_B) pass a view or a concatenation of them without building an AdapterBank.

Autograd of the in-place op: torch.library cannot attach a backward to an op
that mutates an input, so ``fedlora::segmented_lora_add_`` is wrapped in an
autograd.Function that marks the output dirty (autograd then rebases the base
output's history exactly as for ``y.add_(z)``). Under torch.compile the op is
functionalized and Inductor re-inplaces it. Both reuse
``fedlora::segmented_lora_backward``.
"""
from __future__ import annotations

import torch

from fedlora.bank import AdapterBank
from fedlora.kernels import segmented as K
from fedlora.kernels.dispatch import work_dtype
from fedlora.kernels.plan import SegmentPlan, cached_plan, padded_width

from .checks import check_factors, check_segmented_inputs, check_segments


# ------------------------------------------------------------------ custom ops
def _layout_tensors(seg_lens: list[int], adapter_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # On the CPU whatever torch's default device: the ops read them back on the host.
    return (torch.tensor(seg_lens, dtype=torch.int64, device="cpu"),
            torch.tensor(adapter_ids, dtype=torch.int64, device="cpu"))


def _plan(x, ranks, seg_lens, adapter_ids) -> SegmentPlan:
    # seg_lens / adapter_ids are CPU tensors: reading them never waits for the device.
    # Every layer with these ranks, forward and backward, gets the same cached plan.
    return cached_plan(seg_lens.tolist(), adapter_ids.tolist(), ranks, x.device)


@torch.library.custom_op("fedlora::segmented_lora", mutates_args=())
def _segmented_lora_op(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scalings: torch.Tensor,
    seg_lens: torch.Tensor, adapter_ids: torch.Tensor, ranks: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan(x, ranks, seg_lens, adapter_ids)
    h = K.shrink(x, A, plan)
    y = K.expand(h, B.t(), plan, scalings, dtype=x.dtype)
    return y, h


@_segmented_lora_op.register_fake
def _(x, A, B, scalings, seg_lens, adapter_ids, ranks):
    h = x.new_empty((x.shape[0], padded_width(max(ranks))), dtype=work_dtype(x.dtype))
    return x.new_empty((x.shape[0], B.shape[0])), h


@torch.library.custom_op("fedlora::segmented_lora_backward", mutates_args=())
def _segmented_lora_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scalings: torch.Tensor,
    seg_lens: torch.Tensor, adapter_ids: torch.Tensor, h: torch.Tensor, ranks: list[int],
    need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(x, ranks, seg_lens, adapter_ids)
    # One empty tensor per skipped gradient: a custom op's outputs may not alias each other.
    dx, dA, dB = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_dx or need_dA:
        g = K.shrink(grad_y, B.t(), plan)  # G = dY B_a [T, h_width], fp32 (fp64 for fp64 inputs)
        if need_dx:
            dx = K.expand(g, A, plan, scalings, dtype=x.dtype)  # s_a G A_a
        if need_dA:
            dA = K.outer(g, x, plan, scalings, torch.empty_like(A))  # s_a G^T x
    if need_dB:
        dB = torch.empty_like(B)
        K.outer(h, grad_y, plan, scalings, dB.t())  # dB^T = s_a H^T dY
    return dx, dA, dB


@_segmented_lora_backward_op.register_fake
def _(grad_y, x, A, B, scalings, seg_lens, adapter_ids, h, ranks, need_dx, need_dA, need_dB):
    return (
        torch.empty_like(x) if need_dx else x.new_empty(0),
        torch.empty_like(A) if need_dA else x.new_empty(0),
        torch.empty_like(B) if need_dB else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, A, B, scalings, seg_lens, adapter_ids, ranks = inputs
    ctx.save_for_backward(x, A, B, scalings, seg_lens, adapter_ids, output[1])
    ctx.ranks = ranks
    # H is an output only so that backward can reuse it; never fill its gradient with zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_h):
    x, A, B, scalings, seg_lens, adapter_ids, h = ctx.saved_tensors
    need_dx, need_dA, need_dB = ctx.needs_input_grad[:3]
    if grad_y is None or not (need_dx or need_dA or need_dB):
        return (None,) * 7
    dx, dA, dB = _segmented_lora_backward_op(
        grad_y, x, A, B, scalings, seg_lens, adapter_ids, h, ctx.ranks, need_dx, need_dA, need_dB
    )
    return (
        dx if need_dx else None,
        dA if need_dA else None,
        dB if need_dB else None,
        None, None, None, None,
    )


_segmented_lora_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------ in-place add into out
@torch.library.custom_op("fedlora::segmented_lora_add_", mutates_args=("out",))
def _segmented_lora_add_op(
    out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scalings: torch.Tensor,
    seg_lens: torch.Tensor, adapter_ids: torch.Tensor, ranks: list[int],
) -> torch.Tensor:
    plan = _plan(x, ranks, seg_lens, adapter_ids)
    h = K.shrink(x, A, plan)
    K.expand(h, B.t(), plan, scalings, out=out)
    return h


@_segmented_lora_add_op.register_fake
def _(out, x, A, B, scalings, seg_lens, adapter_ids, ranks):
    return x.new_empty((x.shape[0], padded_width(max(ranks))), dtype=work_dtype(x.dtype))


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
            dx, dA, dB = _segmented_lora_backward_op(
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
    ranks = check_factors(out, x, A, B, ranks, scalings)
    seg_lens, adapter_ids = check_segments(x.shape[0], len(ranks), seg_lens, adapter_ids)
    return _SegmentedLoRAAdd.apply(
        out, x, A, B, scalings.to(device=x.device, dtype=torch.float32),
        *_layout_tensors(seg_lens, adapter_ids), ranks,
    )


# --------------------------------------------------------------------- public
def segmented_lora(x: torch.Tensor, bank: AdapterBank, seg_lens, adapter_ids=None) -> torch.Tensor:
    """LoRA outputs for a batch that mixes adapters.

    x [T, d_in] is cut into consecutive segments of ``seg_lens[j]`` rows (zero
    allowed); segment j goes through adapter ``adapter_ids[j]`` (default j).
    Returns [T, d_out] with rows of segment j equal to
    ``scaling_a * x_j @ A_a^T @ B_a^T``. Differentiable in x, bank.A and bank.B.
    """
    check_segmented_inputs(x, bank)
    seg_lens, adapter_ids = check_segments(x.shape[0], bank.num_adapters, seg_lens, adapter_ids)
    y, _ = _segmented_lora_op(
        x, bank.A, bank.B, bank.scalings,
        *_layout_tensors(seg_lens, adapter_ids),
        bank.ranks,
    )
    return y
