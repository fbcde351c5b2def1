"""segmented_lora: many LoRA adapters of different ranks over one batch, differentiable.

Registered with torch.library (``fedlora::segmented_lora`` and its backward) so
torch.compile traces modules that call it as one opaque node with a known
output shape, and autograd reaches x, bank.A and bank.B.
"""
from __future__ import annotations

import torch

from fedlora.kernels import segmented as K

from .bank import AdapterBank


# ----------------------------------------------------------------- validation
def _int_list(values, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
        return [int(v) for v in values.tolist()]
    try:
        out = [int(v) for v in values]
    except TypeError as exc:
        raise ValueError(f"{name} must be a sequence of ints or a 1-D integer tensor") from exc
    if any(float(o) != float(v) for o, v in zip(out, values)):
        raise ValueError(f"{name} must hold integers, got {list(values)}")
    return out


def check_segments(num_rows: int, num_adapters: int, seg_lens, adapter_ids) -> tuple[list[int], list[int]]:
    """Validate a segment layout; return (seg_lens, adapter_ids) as int lists."""
    seg_lens = _int_list(seg_lens, "seg_lens")
    if any(n < 0 for n in seg_lens):
        raise ValueError(f"seg_lens must be non-negative, got {seg_lens}")
    if sum(seg_lens) != num_rows:
        raise ValueError(f"seg_lens sum to {sum(seg_lens)} but x has {num_rows} rows")
    if adapter_ids is None:
        if len(seg_lens) > num_adapters:
            raise ValueError(
                f"adapter_ids is None, so segment j uses adapter j, but there are {len(seg_lens)} "
                f"segments and only {num_adapters} adapters"
            )
        adapter_ids = list(range(len(seg_lens)))
    else:
        adapter_ids = _int_list(adapter_ids, "adapter_ids")
        if len(adapter_ids) != len(seg_lens):
            raise ValueError(f"adapter_ids has {len(adapter_ids)} entries but seg_lens has {len(seg_lens)}")
        bad = [a for a in adapter_ids if not 0 <= a < num_adapters]
        if bad:
            raise ValueError(f"adapter_ids {bad} out of range for a bank of {num_adapters} adapters")
    return seg_lens, adapter_ids


def _check_inputs(x: torch.Tensor, bank: AdapterBank) -> None:
    if not isinstance(bank, AdapterBank):
        raise ValueError(f"bank must be a fedlora.AdapterBank, got {type(bank).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D tensor [T, d_in], got {shape}")
    if x.shape[1] != bank.d_in:
        raise ValueError(f"x has {x.shape[1]} features but the bank's d_in is {bank.d_in}")
    if x.dtype != bank.dtype:
        raise ValueError(f"x is {x.dtype} but the bank is {bank.dtype}")
    if x.device != bank.device:
        raise ValueError(f"x is on {x.device} but the bank is on {bank.device}")


# ------------------------------------------------------------------ custom ops
def _plan(x, ranks, scalings, seg_lens, adapter_ids) -> K.SegmentPlan:
    return K.make_plan(seg_lens.tolist(), adapter_ids.tolist(), ranks, scalings, x.device)


@torch.library.custom_op("fedlora::segmented_lora", mutates_args=())
def _segmented_lora_op(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scalings: torch.Tensor,
    seg_lens: torch.Tensor, adapter_ids: torch.Tensor, ranks: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan(x, ranks, scalings, seg_lens, adapter_ids)
    h = K.shrink(x, A, plan)
    y = K.expand(h, B.t(), plan, dtype=x.dtype)
    return y, h


@_segmented_lora_op.register_fake
def _(x, A, B, scalings, seg_lens, adapter_ids, ranks):
    return x.new_empty((x.shape[0], B.shape[0])), x.new_empty((x.shape[0], max(ranks)), dtype=torch.float32)


@torch.library.custom_op("fedlora::segmented_lora_backward", mutates_args=())
def _segmented_lora_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scalings: torch.Tensor,
    seg_lens: torch.Tensor, adapter_ids: torch.Tensor, h: torch.Tensor, ranks: list[int],
    need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(x, ranks, scalings, seg_lens, adapter_ids)
    # One empty tensor per skipped gradient: a custom op's outputs may not alias each other.
    dx, dA, dB = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_dx or need_dA:
        g = K.shrink(grad_y, B.t(), plan)  # G = dY B_a, fp32 [T, max_rank]
        if need_dx:
            dx = K.expand(g, A, plan, dtype=x.dtype)  # s_a G A_a
        if need_dA:
            dA = K.outer(g, x, plan, torch.empty_like(A))  # s_a G^T x
    if need_dB:
        dB = torch.empty_like(B)
        K.outer(h, grad_y, plan, dB.t())  # dB^T = s_a H^T dY
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


# --------------------------------------------------------------------- public
def segmented_lora(x: torch.Tensor, bank: AdapterBank, seg_lens, adapter_ids=None) -> torch.Tensor:
    """LoRA outputs for a batch that mixes adapters.

    x [T, d_in] is cut into consecutive segments of ``seg_lens[j]`` rows (zero
    allowed); segment j goes through adapter ``adapter_ids[j]`` (default j).
    Returns [T, d_out] with rows of segment j equal to
    ``scaling_a * x_j @ A_a^T @ B_a^T``. Differentiable in x, bank.A and bank.B.
    """
    _check_inputs(x, bank)
    seg_lens, adapter_ids = check_segments(x.shape[0], bank.num_adapters, seg_lens, adapter_ids)
    y, _ = _segmented_lora_op(
        x, bank.A, bank.B, bank.scalings,
        torch.tensor(seg_lens, dtype=torch.int64), torch.tensor(adapter_ids, dtype=torch.int64),
        bank.ranks,
    )
    return y
