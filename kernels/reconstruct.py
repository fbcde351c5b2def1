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

Precision of 16-bit inputs. The scaled tile B diag(c) is fp32. For a 16-bit
output it is rounded to the data's dtype and dotted once (the output's own
rounding is as coarse). For an fp32 output it is split into two bf16 parts,
hi + lo, that carry 16 of its 24 bits, and A into its bf16 parts (exact for bf16
data, hi + lo for fp16), so every dot still runs on 16-bit tensor cores and the
products are good to about 2^-16 relative, closer than tf32's 2^-11.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import aligned16, autotune, dot_precision, launch, native_dot, use_triton_for, work_dtype

# Dot schemes (the DOT constexpr).
FP32_DOT, NATIVE_DOT, SPLIT_DOT = 0, 1, 2


@autotune(
    [
        # SPLIT_DOT holds two more 16-bit tiles: the 128 x 128 tiles spilled with it on sm_80
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "needs": ("ALIGNED", ("DOT", NATIVE_DOT))},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "needs": ("ALIGNED", ("DOT", NATIVE_DOT))},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "needs": ("ALIGNED", "DOT")},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "needs": ("ALIGNED",)},
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "num_stages": 2},
    ],
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16},
    key=["M", "N", "max_rank", "DOT", "ALIGNED"],
)
@triton.jit(do_not_specialize=["max_rank"])
def _reconstruct_kernel(
    b_ptr, a_ptr, scale_ptr, out_ptr, layer_offsets_ptr,
    M, N, max_rank,
    stride_bm, stride_bk, stride_ak, stride_an, stride_ol, stride_om, stride_on,
    DOT: tl.constexpr, A_IS_BF16: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[l] = B[:, k_l] diag(scale[k_l]) A[k_l, :] with k_l = layer_offsets[l]..layer_offsets[l+1].

    B_cat [m, R_tot], A_cat [R_tot, n] (fp32/fp16/bf16, any strides), scale [R_tot] fp32,
    out [L, m, n]. Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), L): program (i, l) owns the
    output tile (i // n_tiles, i % n_tiles) of layer l and loops over the layer's rank
    columns in BLOCK_K steps. DOT: FP32_DOT (fp32 operands, PRECISION), NATIVE_DOT (the
    scaled B tile rounded to the data's dtype), SPLIT_DOT (bf16 hi + lo parts; module docstring).
    ALIGNED: A and out rows are 16-byte aligned (dispatch.aligned16), so the autotuner may offer
    the wide tiles (those also need tensor-core dots, DOT != FP32_DOT). B is left out: its tiles
    start at each layer's rank offset, never vectorisable, and every config is sized for that.
    UPCAST (the interpreter only, whose bf16 dots are wrong): the 16-bit operands go to tl.dot
    as fp32, which holds their products exactly, so NATIVE_DOT and SPLIT_DOT are tested on
    the CPU with the GPU's arithmetic.
    """
    layer = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    m0 = (pid // n_tiles) * BLOCK_M
    n0 = (pid % n_tiles) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < M - m0
    col_mask = offs_n < N - n0
    k_lo = tl.load(layer_offsets_ptr + layer)
    k_hi = tl.load(layer_offsets_ptr + layer + 1)
    b_base = b_ptr + m0.to(tl.int64) * stride_bm + k_lo.to(tl.int64) * stride_bk
    a_base = a_ptr + n0.to(tl.int64) * stride_an + k_lo.to(tl.int64) * stride_ak
    b_offs = offs_m[:, None] * stride_bm + offs_k[None, :] * stride_bk
    a_offs = offs_k[:, None] * stride_ak + offs_n[None, :] * stride_an
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_hi - k_lo, BLOCK_K):  # k0 counts from the layer's first rank column
        k_mask = offs_k < k_hi - k_lo - k0
        bt = tl.load(b_base + k0 * stride_bk + b_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + k0 * stride_ak + a_offs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        c = tl.load(scale_ptr + k_lo + k0 + offs_k, mask=k_mask, other=0.0)
        bc = bt.to(tl.float32) * c[None, :]  # scaled in fp32: c = w_i s_i is not a 16-bit number
        if DOT == 1:
            b16 = bc.to(at.dtype)
            if UPCAST:
                acc = tl.dot(b16.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(b16, at, acc)
        elif DOT == 2:
            b_hi = bc.to(tl.bfloat16)
            b_lo = (bc - b_hi.to(tl.float32)).to(tl.bfloat16)
            a_hi = at.to(tl.bfloat16)
            # fp16 A has 3 bits more than bf16: its remainder is dotted too (exact in bf16)
            a_lo = (at.to(tl.float32) - a_hi.to(tl.float32)).to(tl.bfloat16)
            if UPCAST:
                acc = tl.dot(b_hi.to(tl.float32), a_hi.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(b_lo.to(tl.float32), a_hi.to(tl.float32), acc, input_precision="ieee")
                if not A_IS_BF16:
                    acc = tl.dot(b_hi.to(tl.float32), a_lo.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(b_hi, a_hi, acc)
                acc = tl.dot(b_lo, a_hi, acc)
                if not A_IS_BF16:
                    acc = tl.dot(b_hi, a_lo, acc)
        else:
            acc = tl.dot(bc, at.to(tl.float32), acc, input_precision=PRECISION)
    out_ptrs = (out_ptr + layer.to(tl.int64) * stride_ol + m0.to(tl.int64) * stride_om + n0.to(tl.int64) * stride_on
                + (offs_m[:, None] * stride_om + offs_n[None, :] * stride_on))
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _dot_scheme(dtype: torch.dtype, out_dtype: torch.dtype) -> int:
    if dtype not in (torch.float16, torch.bfloat16):
        return FP32_DOT
    return NATIVE_DOT if out_dtype in (torch.float16, torch.bfloat16) else SPLIT_DOT


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

    launch(
        _reconstruct_kernel, grid,
        B_cat, A_cat, col_scale, out, layer_offsets,
        M, N, max(layer_ranks),
        B_cat.stride(0), B_cat.stride(1), A_cat.stride(0), A_cat.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        DOT=_dot_scheme(A_cat.dtype, out_dtype), A_IS_BF16=A_cat.dtype == torch.bfloat16,
        PRECISION=dot_precision(A_cat.dtype), ALIGNED=aligned16(A_cat, out),
        UPCAST=A_cat.dtype in (torch.float16, torch.bfloat16) and not native_dot(A_cat.dtype),
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
