"""Fused low-rank reconstruction  dW_l = B_l diag(c_l) A_l  for L layers in one launch.

FlexLoRA's server sums every client's dense product, sum_i w_i s_i B_i A_i. On the
packed bank that sum is one GEMM with K = R (the bank's total rank), with B's rank
columns scaled by c = w_i s_i of the adapter that owns them: no per-client product
is ever formed.

L banks of one layer shape (e.g. the q_proj of every transformer layer, each with
its own client ranks) are concatenated along the rank axis:

    A_cat      [R_tot, n]   rows     layer_offsets[l] .. layer_offsets[l+1] are layer l's A
    B_cat      [m, R_tot]   columns  layer_offsets[l] .. layer_offsets[l+1] are layer l's B
    col_scale  [R_tot] fp32          c of the adapter owning each rank column
    out        [L, m, n]             out[l] = B_l diag(col_scale_l) A_l

Each program owns one (layer, m-tile, n-tile) and loops over that layer's own
R_l only (rounded up to BLOCK_K): no padding to the largest layer's rank.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import dot_precision, use_triton_for, work_dtype
from .segmented import _configs


@triton.autotune(
    configs=_configs(
        [
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8},
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 8},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32},
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
            {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16},
        ],
        {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16},
    ),
    key=["M", "N", "max_rank"],
)
@triton.jit
def _reconstruct_kernel(
    b_ptr, a_ptr, scale_ptr, out_ptr, layer_offsets_ptr,
    M, N, max_rank,
    stride_bm, stride_bk, stride_ak, stride_an, stride_ol, stride_om, stride_on,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    layer = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    rows = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    k_lo = tl.load(layer_offsets_ptr + layer)
    k_hi = tl.load(layer_offsets_ptr + layer + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_hi
        bt = tl.load(
            b_ptr + rows[:, None].to(tl.int64) * stride_bm + ks[None, :] * stride_bk,
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        at = tl.load(
            a_ptr + ks[:, None].to(tl.int64) * stride_ak + cols[None, :] * stride_an,
            mask=k_mask[:, None] & col_mask[None, :], other=0.0,
        )
        # Scale in fp32 before the dot: a 16-bit operand would round w_i * s_i away.
        c = tl.load(scale_ptr + ks, mask=k_mask, other=0.0)
        bt = bt.to(tl.float32) * c[None, :]
        acc = tl.dot(bt, at.to(tl.float32), acc, input_precision=PRECISION)
    out_ptrs = (out_ptr + layer.to(tl.int64) * stride_ol + rows[:, None].to(tl.int64) * stride_om
                + cols[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def reconstruct_triton(B_cat: torch.Tensor, A_cat: torch.Tensor, col_scale: torch.Tensor,
                       layer_ranks: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    """out [L, m, n] with out[l] = B_l diag(col_scale_l) A_l (layout in the module docstring)."""
    M, N = B_cat.shape[0], A_cat.shape[1]
    L = len(layer_ranks)
    out = torch.empty((L, M, N), device=A_cat.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    offsets = [0]
    for r in layer_ranks:
        offsets.append(offsets[-1] + r)
    layer_offsets = torch.tensor(offsets, dtype=torch.int32).to(A_cat.device, non_blocking=True)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), L)

    _reconstruct_kernel[grid](
        B_cat, A_cat, col_scale, out, layer_offsets,
        M, N, max(layer_ranks),
        B_cat.stride(0), B_cat.stride(1), A_cat.stride(0), A_cat.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        PRECISION=dot_precision(A_cat.dtype),
    )
    return out


def reconstruct_torch(B_cat: torch.Tensor, A_cat: torch.Tensor, col_scale: torch.Tensor,
                      layer_ranks: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    """Torch twin of :func:`reconstruct_triton`; fp64 inputs stay fp64, others run in fp32."""
    work = work_dtype(A_cat.dtype)
    out = torch.empty((len(layer_ranks), B_cat.shape[0], A_cat.shape[1]), device=A_cat.device, dtype=out_dtype)
    start = 0
    for layer, r in enumerate(layer_ranks):
        ks = slice(start, start + r)
        b = B_cat[:, ks].to(work) * col_scale[ks].to(work)
        out[layer] = (b @ A_cat[ks].to(work)).to(out_dtype)
        start += r
    return out


def reconstruct(B_cat, A_cat, col_scale, layer_ranks, out_dtype):
    # Triton has no fp64 tensor-core dot worth using; fp64 references take the twin.
    if use_triton_for(A_cat):
        return reconstruct_triton(B_cat, A_cat, col_scale, layer_ranks, out_dtype)
    return reconstruct_torch(B_cat, A_cat, col_scale, layer_ranks, out_dtype)
