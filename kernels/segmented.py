"""Segmented multi-rank LoRA GEMMs over a packed adapter bank.

A packed bank holds n adapters; adapter a owns rows rank_offsets[a]:rank_offsets[a+1]
of A_packed [R, d_in] and the same columns of B_packed [d_out, R]. A batch
X [T, K] is cut into S consecutive segments (seg_starts [S+1]); segment j uses
adapter adapter_ids[j] with scaling scalings[a].

Three primitives cover the forward and the whole backward. W is a rank-major
strided view [R, C] (A itself, or B.t()); r_a, off_a are adapter a's rank/offset:

  shrink  H[t, :r_a]        = X[t, :] @ W[off_a:off_a+r_a, :]^T           x A^T   and  dY B
  expand  Y[t, :]         (+)= s_a * H[t, :r_a] @ W[off_a:off_a+r_a, :]     H B^T   and  G A
  outer   O[off_a+k, c]      = s_a * sum_{t in segments of a} L[t, k] X[t, c]   dA  and  dB^T

H and L are fp32 [T, max_rank]; columns past a row's own rank are zero and are
never read. Every tile works on its own adapter's rank only, rounded up to the
tile's rank block: no padding to the largest rank in the batch.

Each launcher has a torch twin with the same signature (``*_torch``); the public
functions pick one through :mod:`fedlora.kernels.dispatch`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import dot_precision, interpreting, native_16bit_dot, use_triton_for, work_dtype


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class SegmentPlan:
    """Everything the kernels need to know about one (batch layout, bank) pair.

    Host lists drive the torch twins and the launch grids; device tensors are
    what the Triton kernels read. Built once per forward and reused by backward.
    """

    seg_lens: tuple[int, ...]
    adapter_ids: tuple[int, ...]
    ranks: tuple[int, ...]
    scalings: torch.Tensor  # fp32 [n], on the data's device
    seg_starts: torch.Tensor  # int32 [S+1]
    seg_adapters: torch.Tensor  # int32 [S]
    rank_offsets: torch.Tensor  # int32 [n+1]
    adapter_seg_ptr: torch.Tensor  # int32 [n+1]: segments of adapter a are
    adapter_segs: torch.Tensor  # int32 [S]     adapter_segs[ptr[a]:ptr[a+1]]

    @property
    def num_tokens(self) -> int:
        return sum(self.seg_lens)

    @property
    def num_adapters(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    @property
    def max_seg_len(self) -> int:
        return max(self.seg_lens, default=0)

    def rank_slice(self, adapter: int) -> slice:
        start = sum(self.ranks[:adapter])
        return slice(start, start + self.ranks[adapter])

    def segments(self):
        """Yield (row_start, row_end, adapter) for every non-empty segment."""
        start = 0
        for length, adapter in zip(self.seg_lens, self.adapter_ids):
            if length:
                yield start, start + length, adapter
            start += length


def make_plan(seg_lens, adapter_ids, ranks, scalings: torch.Tensor, device) -> SegmentPlan:
    """Build a :class:`SegmentPlan`. Inputs are assumed validated by the caller."""
    seg_lens = tuple(int(v) for v in seg_lens)
    adapter_ids = tuple(int(v) for v in adapter_ids)
    ranks = tuple(int(v) for v in ranks)
    n = len(ranks)
    starts = [0]
    for length in seg_lens:
        starts.append(starts[-1] + length)
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    by_adapter: list[list[int]] = [[] for _ in range(n)]
    for j, a in enumerate(adapter_ids):
        if seg_lens[j]:
            by_adapter[a].append(j)
    ptr = [0]
    for segs in by_adapter:
        ptr.append(ptr[-1] + len(segs))
    flat = [j for segs in by_adapter for j in segs]
    # One host->device copy for all the int metadata.
    packed = torch.tensor(starts + list(adapter_ids) + offsets + ptr + flat, dtype=torch.int32)
    packed = packed.to(device, non_blocking=True)
    sizes = [len(starts), len(adapter_ids), len(offsets), len(ptr), len(flat)]
    parts = torch.split(packed, sizes)
    return SegmentPlan(
        seg_lens=seg_lens,
        adapter_ids=adapter_ids,
        ranks=ranks,
        scalings=scalings.detach().to(device=device, dtype=torch.float32),
        seg_starts=parts[0],
        seg_adapters=parts[1],
        rank_offsets=parts[2],
        adapter_seg_ptr=parts[3],
        adapter_segs=parts[4],
    )


# ------------------------------------------------------------------ autotune set
def _configs(gpu: list[dict], interp: dict, warps: int = 4, stages: int = 3):
    """GPU configs for autotuning; a single config under the interpreter."""
    if interpreting():
        return [triton.Config(interp, num_warps=4, num_stages=1)]
    return [triton.Config(c, num_warps=c.pop("num_warps", warps), num_stages=c.pop("num_stages", stages)) for c in gpu]


# ------------------------------------------------------------------------ shrink
@triton.autotune(
    configs=_configs(
        [
            {"BLOCK_M": 64, "BLOCK_R": 16, "BLOCK_K": 128},
            {"BLOCK_M": 64, "BLOCK_R": 32, "BLOCK_K": 128},
            {"BLOCK_M": 128, "BLOCK_R": 32, "BLOCK_K": 64},
            {"BLOCK_M": 64, "BLOCK_R": 64, "BLOCK_K": 64},
            {"BLOCK_M": 128, "BLOCK_R": 64, "BLOCK_K": 64, "num_warps": 8},
            {"BLOCK_M": 32, "BLOCK_R": 16, "BLOCK_K": 256, "num_stages": 4},
        ],
        {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 32},
    ),
    key=["K", "max_rank", "NATIVE_DOT"],
)
@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, h_ptr,
    seg_starts_ptr, seg_adapters_ptr, rank_offsets_ptr,
    K, max_rank, max_seg_len,
    stride_xt, stride_xk, stride_wr, stride_wk, stride_ht, stride_hr,
    NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m_tiles = tl.cdiv(max_seg_len, BLOCK_M)
    pid = tl.program_id(0)
    seg = pid // m_tiles
    row0 = tl.load(seg_starts_ptr + seg) + (pid % m_tiles) * BLOCK_M
    seg_end = tl.load(seg_starts_ptr + seg + 1)
    adapter = tl.load(seg_adapters_ptr + seg)
    r_lo = tl.load(rank_offsets_ptr + adapter)
    rank = tl.load(rank_offsets_ptr + adapter + 1) - r_lo
    r0 = tl.program_id(1) * BLOCK_R
    if (row0 >= seg_end) | (r0 >= rank):
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rcols = r0 + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < seg_end
    r_mask = rcols < rank
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xt + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (r_lo + rcols)[None, :].to(tl.int64) * stride_wr + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(xt, wt, acc)
        else:
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_ht + rcols[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=row_mask[:, None] & r_mask[None, :])


def shrink_triton(x: torch.Tensor, w: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """H [T, max_rank] fp32 with H[t, :r_a] = x[t] @ w[off_a:off_a+r_a].T."""
    T, K = x.shape
    h = torch.zeros((T, plan.max_rank), device=x.device, dtype=torch.float32)
    if T == 0:
        return h
    S = len(plan.seg_lens)

    def grid(meta):
        return (S * triton.cdiv(plan.max_seg_len, meta["BLOCK_M"]), triton.cdiv(plan.max_rank, meta["BLOCK_R"]))

    _shrink_kernel[grid](
        x, w, h,
        plan.seg_starts, plan.seg_adapters, plan.rank_offsets,
        K, plan.max_rank, plan.max_seg_len,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), h.stride(0), h.stride(1),
        NATIVE_DOT=native_16bit_dot(x.dtype, w.dtype), PRECISION=dot_precision(x.dtype),
    )
    return h


def shrink_torch(x: torch.Tensor, w: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Torch twin of :func:`shrink_triton`; H in float32, or float64 for float64 inputs."""
    work = work_dtype(x.dtype)
    h = torch.zeros((x.shape[0], plan.max_rank), device=x.device, dtype=work)
    for start, end, a in plan.segments():
        rs = plan.rank_slice(a)
        h[start:end, : plan.ranks[a]] = x[start:end].to(work) @ w[rs].to(work).t()
    return h


# ------------------------------------------------------------------------ expand
@triton.autotune(
    configs=_configs(
        [
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32},
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8},
            {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 16, "num_warps": 8},
            {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16},
        ],
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16},
    ),
    key=["N", "max_rank", "ACCUMULATE"],
    restore_value=["out_ptr"],
)
@triton.jit
def _expand_kernel(
    h_ptr, w_ptr, out_ptr,
    seg_starts_ptr, seg_adapters_ptr, rank_offsets_ptr, scalings_ptr,
    N, max_rank, max_seg_len,
    stride_ht, stride_hr, stride_wr, stride_wn, stride_ot, stride_on,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < seg_end
    col_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The rank loop stops at this adapter's own rank (rounded up to BLOCK_K).
    for k0 in range(0, rank, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < rank
        ht = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_ht + ks[None, :] * stride_hr,
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        wt = tl.load(
            w_ptr + (r_lo + ks)[:, None].to(tl.int64) * stride_wr + cols[None, :] * stride_wn,
            mask=k_mask[:, None] & col_mask[None, :], other=0.0,
        )
        acc = tl.dot(ht, wt.to(tl.float32), acc, input_precision=PRECISION)
    acc = acc * scale
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_ot + cols[None, :] * stride_on
    mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _expand_out(h, w, out, dtype):
    if out is None:
        return torch.empty((h.shape[0], w.shape[1]), device=h.device, dtype=dtype), False
    return out, True


def expand_triton(h: torch.Tensor, w: torch.Tensor, plan: SegmentPlan, out: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[t] (+)= s_a * H[t, :r_a] @ w[off_a:off_a+r_a] for every row t.

    With ``out`` given the result is accumulated into it in place (one rounding);
    otherwise a new [T, C] tensor of ``dtype`` (default w.dtype) is returned.
    """
    out, accumulate = _expand_out(h, w, out, dtype or w.dtype)
    T, N = out.shape
    if T == 0 or N == 0:
        return out
    S = len(plan.seg_lens)

    def grid(meta):
        return (S * triton.cdiv(plan.max_seg_len, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    _expand_kernel[grid](
        h, w, out,
        plan.seg_starts, plan.seg_adapters, plan.rank_offsets, plan.scalings,
        N, plan.max_rank, plan.max_seg_len,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, PRECISION=dot_precision(w.dtype),
    )
    return out


def expand_torch(h: torch.Tensor, w: torch.Tensor, plan: SegmentPlan, out: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch twin of :func:`expand_triton` (float32 arithmetic, float64 for float64 inputs)."""
    out, accumulate = _expand_out(h, w, out, dtype or w.dtype)
    work = work_dtype(h.dtype if h.dtype == torch.float64 else w.dtype)
    # Every row belongs to exactly one segment, so a fresh output needs no zero fill.
    scalings = plan.scalings.tolist()
    for start, end, a in plan.segments():
        rs = plan.rank_slice(a)
        h_seg, w_seg = h[start:end, : plan.ranks[a]].to(work), w[rs].to(work)
        if out.dtype == work:  # in place; beta=0 ignores the uninitialised rows
            out[start:end].addmm_(h_seg, w_seg, beta=1.0 if accumulate else 0.0, alpha=scalings[a])
            continue
        delta = scalings[a] * (h_seg @ w_seg)
        if accumulate:
            delta += out[start:end].to(work)
        out[start:end] = delta.to(out.dtype)
    return out


# ------------------------------------------------------------------------- outer
@triton.autotune(
    configs=_configs(
        [
            {"BLOCK_R": 16, "BLOCK_C": 128, "BLOCK_T": 64},
            {"BLOCK_R": 32, "BLOCK_C": 128, "BLOCK_T": 64},
            {"BLOCK_R": 64, "BLOCK_C": 128, "BLOCK_T": 32},
            {"BLOCK_R": 32, "BLOCK_C": 64, "BLOCK_T": 128},
            {"BLOCK_R": 64, "BLOCK_C": 256, "BLOCK_T": 32, "num_warps": 8},
        ],
        {"BLOCK_R": 16, "BLOCK_C": 32, "BLOCK_T": 16},
    ),
    key=["C", "max_rank"],
)
@triton.jit
def _outer_kernel(
    l_ptr, x_ptr, out_ptr,
    seg_starts_ptr, adapter_seg_ptr, adapter_segs_ptr, rank_offsets_ptr, scalings_ptr,
    C, max_rank,
    stride_lt, stride_lr, stride_xt, stride_xc, stride_or, stride_oc,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    adapter = tl.program_id(0)
    r_lo = tl.load(rank_offsets_ptr + adapter)
    rank = tl.load(rank_offsets_ptr + adapter + 1) - r_lo
    r0 = tl.program_id(1) * BLOCK_R
    if r0 >= rank:
        return
    rks = r0 + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    r_mask = rks < rank
    c_mask = cols < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    p_lo = tl.load(adapter_seg_ptr + adapter)
    p_hi = tl.load(adapter_seg_ptr + adapter + 1)
    # Sum over every segment that uses this adapter, in one program: no atomics,
    # and adapters used by no segment get exact zeros.
    for p in range(p_lo, p_hi):
        seg = tl.load(adapter_segs_ptr + p)
        t_lo = tl.load(seg_starts_ptr + seg)
        t_hi = tl.load(seg_starts_ptr + seg + 1)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            ts = t0 + offs_t
            t_mask = ts < t_hi
            lt = tl.load(
                l_ptr + ts[None, :].to(tl.int64) * stride_lt + rks[:, None] * stride_lr,
                mask=r_mask[:, None] & t_mask[None, :], other=0.0,
            )
            xt = tl.load(
                x_ptr + ts[:, None].to(tl.int64) * stride_xt + cols[None, :] * stride_xc,
                mask=t_mask[:, None] & c_mask[None, :], other=0.0,
            )
            acc = tl.dot(lt, xt.to(tl.float32), acc, input_precision=PRECISION)
    acc = acc * tl.load(scalings_ptr + adapter)
    out_ptrs = out_ptr + (r_lo + rks)[:, None].to(tl.int64) * stride_or + cols[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])


def outer_triton(l: torch.Tensor, x: torch.Tensor, plan: SegmentPlan, out: torch.Tensor) -> torch.Tensor:
    """out[off_a + k, c] = s_a * sum over a's rows t of L[t, k] * x[t, c]; overwrites out [R, C]."""
    C = x.shape[1]
    if C == 0:
        return out

    def grid(meta):
        return (plan.num_adapters, triton.cdiv(plan.max_rank, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_C"]))

    _outer_kernel[grid](
        l, x, out,
        plan.seg_starts, plan.adapter_seg_ptr, plan.adapter_segs, plan.rank_offsets, plan.scalings,
        C, plan.max_rank,
        l.stride(0), l.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        PRECISION=dot_precision(x.dtype),
    )
    return out


def outer_torch(l: torch.Tensor, x: torch.Tensor, plan: SegmentPlan, out: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`outer_triton` (float32 arithmetic, float64 for float64 inputs)."""
    # Outputs of the working dtype accumulate in place; others in a buffer rounded once at the end.
    work = work_dtype(x.dtype)
    acc = out if out.dtype == work else torch.empty(out.shape, device=out.device, dtype=work)
    acc.zero_()  # adapters used by no segment get exact zeros
    scalings = plan.scalings.tolist()
    for start, end, a in plan.segments():
        rs = plan.rank_slice(a)
        acc[rs].addmm_(l[start:end, : plan.ranks[a]].t().to(work), x[start:end].to(work), alpha=scalings[a])
    if acc is not out:
        out.copy_(acc)
    return out


# ----------------------------------------------------------------- dispatchers
def shrink(x, w, plan):
    return (shrink_triton if use_triton_for(x) else shrink_torch)(x, w, plan)


def expand(h, w, plan, out=None, dtype=None):
    return (expand_triton if use_triton_for(w) else expand_torch)(h, w, plan, out, dtype)


def outer(l, x, plan, out):
    return (outer_triton if use_triton_for(x) else outer_torch)(l, x, plan, out)
