"""Segmented multi-rank LoRA GEMMs over a packed adapter bank.

A packed bank holds n adapters; adapter a owns rows rank_offsets[a]:rank_offsets[a+1]
of A_packed [R, d_in] and the same columns of B_packed [d_out, R]. A batch
X [T, K] is cut into S consecutive segments (a :class:`~.plan.SegmentPlan`);
segment j uses adapter adapter_ids[j] with scaling scalings[a].

Three primitives cover the forward and the whole backward. W is a rank-major
strided view [R, C] (A itself, or B.t()); r_a, off_a are adapter a's rank/offset:

  shrink  H[t, :r_a]        = X[t, :] @ W[off_a:off_a+r_a, :]^T           x A^T   and  dY B
  expand  Y[t, :]         (+)= s_a * H[t, :r_a] @ W[off_a:off_a+r_a, :]     H B^T   and  G A
  outer   O[off_a+k, c]      = s_a * sum_{t in rows of a} L[t, k] X[t, c]   dA  and  dB^T

H and L are fp32 [T, h_width] (h_width = max_rank rounded up to 16); columns past
a row's own rank are never read (the Triton path leaves them unwritten). Every tile works on its own adapter's
rank only, rounded up to the tile's rank block: no padding to the largest rank.

16-bit data reaches tl.dot as 16-bit operands (fp32 accumulation): the fp32 H / L
tile is rounded to the data's dtype in registers. fp32 data takes fp32 dots
(tf32 only when torch allows it). Under the interpreter every dot is fp32.

Each launcher has a torch twin with the same signature (``*_torch``); the public
functions pick one through :mod:`.dispatch`. Scalings are an fp32 device tensor
[n] read by the kernels (and by the twins as tensors): nothing here syncs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import aligned16, autotune, dot_precision, launch, native_dot, use_triton_for, work_dtype
from .plan import SegmentPlan


# ------------------------------------------------------------------------ shrink
@autotune(
    [
        {"BLOCK_M": 64, "BLOCK_R": 32, "BLOCK_K": 64, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_M": 64, "BLOCK_R": 64, "BLOCK_K": 64, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_M": 128, "BLOCK_R": 64, "BLOCK_K": 32, "num_warps": 8, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_M": 64, "BLOCK_R": 32, "BLOCK_K": 32, "needs": ("ALIGNED",)},
        {"BLOCK_M": 32, "BLOCK_R": 32, "BLOCK_K": 32, "num_stages": 2},
    ],
    {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 32},
    key=["K", "max_rank", "NATIVE_DOT", "ALIGNED"],
)
@triton.jit(do_not_specialize=["max_rank", "max_seg_len"])
def _shrink_kernel(
    x_ptr, w_ptr, h_ptr,
    seg_starts_ptr, seg_adapters_ptr, rank_offsets_ptr,
    K, max_rank, max_seg_len,
    stride_xt, stride_xk, stride_wr, stride_wk, stride_ht,
    NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """H[t, :r_a] = X[t, :] @ W[off_a:off_a + r_a, :]^T for the rows t of every segment.

    X [T, K] fp32/fp16/bf16, W [R, K] (any strides), H [T, h_width] fp32 (unit column stride).
    Grid (S * cdiv(max_seg_len, BLOCK_M) * cdiv(max_rank, BLOCK_R),): program i owns rank
    columns (i % r_tiles)*BLOCK_R.. of row tile (i // r_tiles) % m_tiles (BLOCK_M rows) of
    segment i // (r_tiles * m_tiles). The rank tiles of one row tile are neighbours in launch
    order, so X is read from HBM about once (the other rank tiles hit L2). Programs past the
    segment's end or its adapter's rank return at once. Loops over K in BLOCK_K steps.
    NATIVE_DOT: X and W share a 16-bit dtype, dotted as is. ALIGNED: X and H rows are 16-byte
    aligned (dispatch.aligned16), so their loads vectorise and the autotuner may offer the wide
    tiles. W is left out: B.t() tiles are contiguous along the rank from an adapter's offset,
    never vectorisable, and every config is sized for that.
    """
    m_tiles = tl.cdiv(max_seg_len, BLOCK_M)
    r_tiles = tl.cdiv(max_rank, BLOCK_R)
    pid = tl.program_id(0)
    tile = pid // r_tiles
    seg = tile // m_tiles
    row0 = tl.load(seg_starts_ptr + seg) + (tile % m_tiles) * BLOCK_M
    seg_end = tl.load(seg_starts_ptr + seg + 1)
    adapter = tl.load(seg_adapters_ptr + seg)
    r_lo = tl.load(rank_offsets_ptr + adapter)
    rank = tl.load(rank_offsets_ptr + adapter + 1) - r_lo
    r0 = (pid % r_tiles) * BLOCK_R
    if (row0 >= seg_end) | (r0 >= rank):
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < seg_end - row0
    r_mask = offs_r < rank - r0
    # 64-bit scalar bases and 32-bit in-tile offsets: no 64-bit pointer tensor stays
    # live across the loop (those pushed the old kernels to 255 registers and spills).
    x_base = x_ptr + row0.to(tl.int64) * stride_xt
    w_base = w_ptr + (r_lo + r0).to(tl.int64) * stride_wr
    x_offs = offs_m[:, None] * stride_xt + offs_k[None, :] * stride_xk
    w_offs = offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        xt = tl.load(x_base + k0 * stride_xk + x_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_base + k0 * stride_wk + w_offs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(xt, wt, acc)
        else:
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision=PRECISION)
    h_ptrs = h_ptr + row0.to(tl.int64) * stride_ht + (offs_m[:, None] * stride_ht + r0 + offs_r[None, :])
    tl.store(h_ptrs, acc, mask=row_mask[:, None] & r_mask[None, :])


def shrink_triton(x: torch.Tensor, w: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """H [T, h_width] fp32 with H[t, :r_a] = x[t] @ w[off_a:off_a+r_a].T.

    Columns past a row's rank are left unwritten: no kernel ever reads them.
    """
    T, K = x.shape
    h = torch.empty((T, plan.h_width), device=x.device, dtype=torch.float32)
    if T == 0:
        return h

    def grid(meta):
        return (plan.num_segments * triton.cdiv(plan.max_seg_len, meta["BLOCK_M"])
                * triton.cdiv(plan.max_rank, meta["BLOCK_R"]),)

    launch(
        _shrink_kernel, grid,
        x, w, h,
        plan.seg_starts, plan.seg_adapters, plan.rank_offsets,
        K, plan.max_rank, plan.max_seg_len,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), h.stride(0),
        NATIVE_DOT=x.dtype == w.dtype and native_dot(x.dtype), PRECISION=dot_precision(w.dtype),
        ALIGNED=aligned16(x, h),
    )
    return h


def shrink_torch(x: torch.Tensor, w: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Torch twin of :func:`shrink_triton`; H in float32, or float64 for float64 inputs."""
    work = work_dtype(x.dtype)
    h = torch.zeros((x.shape[0], plan.h_width), device=x.device, dtype=work)
    for start, end, a in plan.segments():
        h[start:end, : plan.ranks[a]] = x[start:end].to(work) @ w[plan.rank_slice(a)].to(work).t()
    return h


# ------------------------------------------------------------------------ expand
@autotune(
    [
        # BLOCK_K 16: the rank loop is 1-4 steps, and a wider K tile of B.t() (unit stride
        # along the rank, not 16-byte aligned) pushed sm_80 to 255 registers and spills.
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16, "needs": ("ALIGNED",)},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "num_warps": 8, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 16, "num_warps": 8, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16},
    ],
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16},
    key=["N", "max_rank", "ACCUMULATE", "NATIVE_DOT", "ALIGNED"],
    restore_value=["out_ptr"],
    stages=2,
)
@triton.jit(do_not_specialize=["max_rank", "max_seg_len"])
def _expand_kernel(
    h_ptr, w_ptr, out_ptr,
    seg_starts_ptr, seg_adapters_ptr, rank_offsets_ptr, scalings_ptr,
    N, max_rank, max_seg_len,
    stride_ht, stride_wr, stride_wn, stride_ot, stride_on,
    ACCUMULATE: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[t, :] (+)= s_a * H[t, :r_a] @ W[off_a:off_a + r_a, :] for the rows t of every segment.

    H [T, h_width] fp32 (unit column stride), W [R, N] (any strides), out [T, N] any float
    dtype; ACCUMULATE adds to out's tile in fp32 and rounds once. Grid
    (S * cdiv(max_seg_len, BLOCK_M), cdiv(N, BLOCK_N)): program (i, j) owns BLOCK_M rows
    of segment i // m_tiles and output columns j*BLOCK_N..; its rank loop stops at the
    adapter's own rank (rounded up to BLOCK_K). NATIVE_DOT: W is 16-bit and the H tile is
    rounded to W's dtype in registers. ALIGNED: H and out rows are 16-byte aligned (W: see
    :func:`_shrink_kernel`).
    """
    m_tiles = tl.cdiv(max_seg_len, BLOCK_M)
    pid = tl.program_id(0)
    seg = pid // m_tiles
    row0 = tl.load(seg_starts_ptr + seg) + (pid % m_tiles) * BLOCK_M
    seg_end = tl.load(seg_starts_ptr + seg + 1)
    if row0 >= seg_end:
        return
    adapter = tl.load(seg_adapters_ptr + seg)
    r_lo = tl.load(rank_offsets_ptr + adapter)
    rank = tl.load(rank_offsets_ptr + adapter + 1) - r_lo
    scale = tl.load(scalings_ptr + adapter)
    n0 = tl.program_id(1) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < seg_end - row0
    col_mask = offs_n < N - n0
    h_base = h_ptr + row0.to(tl.int64) * stride_ht
    w_base = w_ptr + r_lo.to(tl.int64) * stride_wr + n0.to(tl.int64) * stride_wn
    h_offs = offs_m[:, None] * stride_ht + offs_k[None, :]
    w_offs = offs_k[:, None] * stride_wr + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        k_mask = offs_k < rank - k0
        ht = tl.load(h_base + k0 + h_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_base + k0 * stride_wr + w_offs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(ht.to(wt.dtype), wt, acc)
        else:
            acc = tl.dot(ht, wt.to(tl.float32), acc, input_precision=PRECISION)
    acc = acc * scale
    out_ptrs = (out_ptr + row0.to(tl.int64) * stride_ot + n0.to(tl.int64) * stride_on
                + (offs_m[:, None] * stride_ot + offs_n[None, :] * stride_on))
    mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _expand_out(h, w, out, dtype):
    if out is None:
        return torch.empty((h.shape[0], w.shape[1]), device=h.device, dtype=dtype), False
    return out, True


def expand_triton(h: torch.Tensor, w: torch.Tensor, plan: SegmentPlan, scalings: torch.Tensor,
                  out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[t] (+)= s_a * H[t, :r_a] @ w[off_a:off_a+r_a] for every row t.

    With ``out`` given the result is accumulated into it in place (one rounding);
    otherwise a new [T, C] tensor of ``dtype`` (default w.dtype) is returned.
    """
    out, accumulate = _expand_out(h, w, out, dtype or w.dtype)
    T, N = out.shape
    if T == 0 or N == 0:
        return out

    def grid(meta):
        return (plan.num_segments * triton.cdiv(plan.max_seg_len, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    launch(
        _expand_kernel, grid,
        h, w, out,
        plan.seg_starts, plan.seg_adapters, plan.rank_offsets, scalings,
        N, plan.max_rank, plan.max_seg_len,
        h.stride(0), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, NATIVE_DOT=native_dot(w.dtype), PRECISION=dot_precision(w.dtype),
        ALIGNED=aligned16(h, out),
    )
    return out


def expand_torch(h: torch.Tensor, w: torch.Tensor, plan: SegmentPlan, scalings: torch.Tensor,
                 out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch twin of :func:`expand_triton` (float32 arithmetic, float64 for float64 inputs)."""
    out, accumulate = _expand_out(h, w, out, dtype or w.dtype)
    work = work_dtype(h.dtype if h.dtype == torch.float64 else w.dtype)
    # Every row belongs to exactly one segment, so a fresh output needs no zero fill.
    for start, end, a in plan.segments():
        delta = (h[start:end, : plan.ranks[a]].to(work) @ w[plan.rank_slice(a)].to(work)) * scalings[a].to(work)
        if accumulate:
            delta += out[start:end].to(work)
        out[start:end] = delta.to(out.dtype)
    return out


# ------------------------------------------------------------------------- outer
@autotune(
    [
        # fp32 (FMA) dots spill at these tiles: fp32 data takes the last config.
        {"BLOCK_R": 16, "BLOCK_C": 128, "BLOCK_T": 64, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_R": 32, "BLOCK_C": 128, "BLOCK_T": 64, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_R": 64, "BLOCK_C": 128, "BLOCK_T": 32, "needs": ("ALIGNED", "NATIVE_DOT")},
        {"BLOCK_R": 16, "BLOCK_C": 64, "BLOCK_T": 32, "num_stages": 2},
    ],
    {"BLOCK_R": 16, "BLOCK_C": 32, "BLOCK_T": 16},
    key=["C", "max_rank", "NATIVE_DOT", "ALIGNED"],
)
@triton.jit(do_not_specialize=["max_rank"])
def _outer_kernel(
    l_ptr, x_ptr, out_ptr, part_ptr,
    chunk_adapters_ptr, chunk_piece_ptr, piece_bounds_ptr, chunk_slots_ptr, rank_offsets_ptr, scalings_ptr,
    C, max_rank,
    stride_lt, stride_xt, stride_xc, stride_or, stride_oc, stride_pr,
    NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """O[off_a + k, c] = s_a * sum_t L[t, k] X[t, c] over the rows t of one chunk of adapter a.

    L [T, h_width] fp32 (unit column stride), X [T, C] fp32/fp16/bf16, out [R, C], part
    [partial_rows, C] fp32. Grid (num_chunks * cdiv(max_rank, BLOCK_R), cdiv(C, BLOCK_C)):
    program (i, j) owns rank rows (i % r_tiles)*BLOCK_R.. of chunk i // r_tiles and columns
    j*BLOCK_C..; it loops over the chunk's row pieces in BLOCK_T steps. A chunk with slot -1
    is its adapter's only one and writes s_a * sum to out (an empty chunk writes zeros);
    otherwise the unscaled fp32 sum goes to part rows slot.. for :func:`_outer_reduce_kernel`.
    NATIVE_DOT: X and out are 16-bit; the L tile is rounded to X's dtype in registers.
    ALIGNED: L, X and part rows are 16-byte aligned (out is written once, at the end).
    """
    r_tiles = tl.cdiv(max_rank, BLOCK_R)
    pid = tl.program_id(0)
    chunk = pid // r_tiles
    r0 = (pid % r_tiles) * BLOCK_R
    adapter = tl.load(chunk_adapters_ptr + chunk)
    r_lo = tl.load(rank_offsets_ptr + adapter)
    rank = tl.load(rank_offsets_ptr + adapter + 1) - r_lo
    if r0 >= rank:
        return
    c0 = tl.program_id(1) * BLOCK_C
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    r_mask = offs_r < rank - r0
    c_mask = offs_c < C - c0
    l_offs = offs_t[:, None] * stride_lt + (r0 + offs_r)[None, :]
    x_offs = offs_t[:, None] * stride_xt + offs_c[None, :] * stride_xc
    x_col = x_ptr + c0.to(tl.int64) * stride_xc
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for p in range(tl.load(chunk_piece_ptr + chunk), tl.load(chunk_piece_ptr + chunk + 1)):
        t_lo = tl.load(piece_bounds_ptr + 2 * p)
        t_hi = tl.load(piece_bounds_ptr + 2 * p + 1)
        l_piece = l_ptr + t_lo.to(tl.int64) * stride_lt
        x_piece = x_col + t_lo.to(tl.int64) * stride_xt
        for t0 in range(0, t_hi - t_lo, BLOCK_T):  # a piece is at most chunk_rows rows: 32-bit offsets
            t_mask = offs_t < t_hi - t_lo - t0
            lt = tl.load(l_piece + t0 * stride_lt + l_offs, mask=t_mask[:, None] & r_mask[None, :], other=0.0)
            xt = tl.load(x_piece + t0 * stride_xt + x_offs, mask=t_mask[:, None] & c_mask[None, :], other=0.0)
            if NATIVE_DOT:
                acc = tl.dot(tl.trans(lt.to(xt.dtype)), xt, acc)
            else:
                acc = tl.dot(tl.trans(lt), xt.to(tl.float32), acc, input_precision=PRECISION)
    mask = r_mask[:, None] & c_mask[None, :]
    slot = tl.load(chunk_slots_ptr + chunk)
    if slot < 0:
        acc = acc * tl.load(scalings_ptr + adapter)
        out_ptrs = (out_ptr + (r_lo + r0).to(tl.int64) * stride_or + c0.to(tl.int64) * stride_oc
                    + (offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc))
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part_ptrs = (part_ptr + (slot + r0).to(tl.int64) * stride_pr + c0
                     + (offs_r[:, None] * stride_pr + offs_c[None, :]))
        tl.store(part_ptrs, acc, mask=mask)


@autotune(
    # a memory pass over a few MB: small tiles, so that one split adapter still gets many programs
    [{"BLOCK_R": 16, "BLOCK_C": 64}, {"BLOCK_R": 16, "BLOCK_C": 256}, {"BLOCK_R": 32, "BLOCK_C": 128}],
    {"BLOCK_R": 16, "BLOCK_C": 32},
    key=["C", "max_rank"],
    stages=1,
)
@triton.jit(do_not_specialize=["max_rank"])
def _outer_reduce_kernel(
    part_ptr, out_ptr, split_info_ptr, rank_offsets_ptr, scalings_ptr,
    C, max_rank,
    stride_pr, stride_or, stride_oc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[off_a + k, c] = s_a * sum over a's chunks, in chunk order, of part[slot + k, c].

    For the split adapters only (split_info: adapter, first workspace row, chunks).
    part [partial_rows, C] fp32, out [R, C]. Grid (len(split) * cdiv(max_rank, BLOCK_R),
    cdiv(C, BLOCK_C)). A fixed summation order: the result has the same bits on every run.
    """
    r_tiles = tl.cdiv(max_rank, BLOCK_R)
    pid = tl.program_id(0)
    item = pid // r_tiles
    r0 = (pid % r_tiles) * BLOCK_R
    adapter = tl.load(split_info_ptr + 3 * item)
    first = tl.load(split_info_ptr + 3 * item + 1)
    chunks = tl.load(split_info_ptr + 3 * item + 2)
    r_lo = tl.load(rank_offsets_ptr + adapter)
    rank = tl.load(rank_offsets_ptr + adapter + 1) - r_lo
    if r0 >= rank:
        return
    c0 = tl.program_id(1) * BLOCK_C
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_r < rank - r0)[:, None] & (offs_c < C - c0)[None, :]
    p_offs = offs_r[:, None] * stride_pr + offs_c[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for j in range(0, chunks):
        row = first + j * rank + r0
        acc += tl.load(part_ptr + row.to(tl.int64) * stride_pr + c0 + p_offs, mask=mask, other=0.0)
    acc = acc * tl.load(scalings_ptr + adapter)
    out_ptrs = (out_ptr + (r_lo + r0).to(tl.int64) * stride_or + c0.to(tl.int64) * stride_oc
                + (offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc))
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def outer_triton(l: torch.Tensor, x: torch.Tensor, plan: SegmentPlan, scalings: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
    """out[off_a + k, c] = s_a * sum over a's rows t of L[t, k] * x[t, c]; overwrites out [R, C]."""
    C = x.shape[1]
    if C == 0:
        return out
    # fp32 partial sums of split adapters; rows padded to 16 words so every launch compiles
    # the same variant (a 1-row stand-in when nothing is split: the kernel never touches it).
    part = torch.empty((max(plan.partial_rows, 1), 16 * triton.cdiv(C, 16)), device=x.device,
                       dtype=torch.float32)

    def grid(meta):
        return (plan.num_chunks * triton.cdiv(plan.max_rank, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_C"]))

    launch(
        _outer_kernel, grid,
        l, x, out, part,
        plan.chunk_adapters, plan.chunk_piece_ptr, plan.piece_bounds, plan.chunk_slots, plan.rank_offsets, scalings,
        C, plan.max_rank,
        l.stride(0), x.stride(0), x.stride(1), out.stride(0), out.stride(1), part.stride(0),
        # 16-bit dots only when the gradient is 16-bit too: fp32 parameters keep fp32 products.
        NATIVE_DOT=out.dtype == x.dtype and native_dot(x.dtype), PRECISION=dot_precision(out.dtype),
        ALIGNED=aligned16(l, x, part),
    )
    if plan.split_adapters:
        def reduce_grid(meta):
            return (len(plan.split_adapters) * triton.cdiv(plan.max_rank, meta["BLOCK_R"]),
                    triton.cdiv(C, meta["BLOCK_C"]))

        launch(
            _outer_reduce_kernel, reduce_grid,
            part, out, plan.split_info, plan.rank_offsets, scalings,
            C, plan.max_rank,
            part.stride(0), out.stride(0), out.stride(1),
        )
    return out


def outer_torch(l: torch.Tensor, x: torch.Tensor, plan: SegmentPlan, scalings: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`outer_triton` (float32 arithmetic, float64 for float64 inputs)."""
    # Outputs of the working dtype accumulate in place; others in a buffer rounded once at the end.
    work = work_dtype(x.dtype)
    acc = out if out.dtype == work else torch.empty(out.shape, device=out.device, dtype=work)
    acc.zero_()  # adapters used by no segment get exact zeros
    for start, end, a in plan.segments():
        acc[plan.rank_slice(a)] += (l[start:end, : plan.ranks[a]].t().to(work) @ x[start:end].to(work)) \
            * scalings[a].to(work)
    if acc is not out:
        out.copy_(acc)
    return out


# ----------------------------------------------------------------- dispatchers
# float64 always takes the twin (use_triton_for): the kernels accumulate in float32.
def shrink(x, w, plan):
    return (shrink_triton if use_triton_for(x) else shrink_torch)(x, w, plan)


def expand(h, w, plan, scalings, out=None, dtype=None):
    return (expand_triton if use_triton_for(w) else expand_torch)(h, w, plan, scalings, out, dtype)


def outer(l, x, plan, scalings, out):
    return (outer_triton if use_triton_for(x) else outer_torch)(l, x, plan, scalings, out)
