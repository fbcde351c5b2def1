"""SegmentPlan: what the segmented kernels need to know about one batch layout.

A layout is (seg_lens, adapter_ids, ranks): the batch's rows are cut into
consecutive segments, segment j uses adapter adapter_ids[j], adapter a has rank
ranks[a]. The plan turns it into host tuples (for grids and the torch twins) and
one int32 device tensor of metadata (for the kernels), uploaded once. Nothing in
a plan depends on the data or on the adapters' scalings, so every layer with the
same ranks reuses one plan for its forward and backward: :func:`cached_plan`
keeps the recent ones, keyed by the layout and the device.

Split outer products. ``outer`` (dA, dB) sums over all rows of an adapter. Its
rows are cut into chunks of at most :func:`chunk_limit` rows (whole segments are
grouped, long ones split), one program row per chunk, so one adapter over a long
batch still fills the GPU. An adapter with one chunk is written directly; an
adapter with several writes fp32 partial sums to a workspace that a second
kernel adds up in chunk order: no atomics, the same bits on every run.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

# Rows per outer-product chunk: at least MIN_CHUNK_ROWS, else about 1/16 of the batch,
# times ceil(rank / 16). A chunk's partial sum is r * C fp32 words (written, then read)
# against its rows' 2 * rows * C bytes of 16-bit input: 2 r / rows of extra traffic each
# way, at most 2 * 16 / MIN_CHUNK_ROWS = 6% with the rank factor; a higher rank has more
# rank tiles per chunk, so it needs fewer chunks to fill the GPU. See bench/NOTES.md.
MIN_CHUNK_ROWS = 512
TARGET_CHUNKS = 16
PLAN_CACHE_SIZE = 64


def chunk_rows_for(num_rows: int) -> int:
    return max(MIN_CHUNK_ROWS, 16 * math.ceil(num_rows / TARGET_CHUNKS / 16))


def chunk_limit(chunk_rows: int, rank: int) -> int:
    """Most rows in one outer-product chunk of an adapter of ``rank``."""
    return chunk_rows * max(1, math.ceil(rank / 16))


def padded_width(max_rank: int) -> int:
    """Row width of the fp32 H / G buffers: max_rank rounded up to 16, so every
    row starts 64-byte aligned and the kernels compile one variant for all ranks."""
    return 16 * math.ceil(max_rank / 16)


@dataclass(frozen=True, eq=False)
class SegmentPlan:
    """One batch layout, on one device. Built by :func:`make_plan`."""

    seg_lens: tuple[int, ...]
    adapter_ids: tuple[int, ...]
    ranks: tuple[int, ...]
    chunk_rows: int
    num_chunks: int  # outer-product chunks (>= num_adapters: an unused adapter has one empty chunk)
    split_adapters: tuple[int, ...]  # adapters with >= 2 chunks, reduced from the workspace
    partial_rows: int  # rows of the fp32 workspace [partial_rows, C]
    # int32 device tensors (views of one upload; each starts 16-byte aligned)
    seg_starts: torch.Tensor  # [S+1] first row of each segment
    seg_adapters: torch.Tensor  # [S]
    rank_offsets: torch.Tensor  # [n+1]
    chunk_adapters: torch.Tensor  # [num_chunks]
    chunk_piece_ptr: torch.Tensor  # [num_chunks+1]: pieces of chunk c are piece_ptr[c]..piece_ptr[c+1]
    piece_bounds: torch.Tensor  # [2 * pieces]: row range (lo, hi) of each piece
    chunk_slots: torch.Tensor  # [num_chunks]: first workspace row of the chunk, -1 = write out directly
    split_info: torch.Tensor  # [3 * len(split_adapters)]: (adapter, first workspace row, chunks)

    @property
    def num_tokens(self) -> int:
        return sum(self.seg_lens)

    @property
    def num_segments(self) -> int:
        return len(self.seg_lens)

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

    @property
    def h_width(self) -> int:
        return padded_width(self.max_rank)

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


def _chunks(seg_lens, adapter_ids, ranks, chunk_rows: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """[(adapter, [(lo, hi), ...]), ...]: each adapter's rows cut into chunks of <= chunk_limit rows."""
    n = len(ranks)
    rows_of: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    start = 0
    for length, a in zip(seg_lens, adapter_ids):
        if length:
            rows_of[a].append((start, start + length))
        start += length
    chunks = []
    for a in range(n):
        limit = chunk_limit(chunk_rows, ranks[a])
        current, filled, mine = [], 0, 0
        for lo, hi in rows_of[a]:
            while lo < hi:
                take = min(hi - lo, limit - filled)
                current.append((lo, lo + take))
                filled += take
                lo += take
                if filled == limit:
                    chunks.append((a, current))
                    current, filled, mine = [], 0, mine + 1
        if current or mine == 0:  # an unused adapter keeps one empty chunk: its gradient rows get zeros
            chunks.append((a, current))
    return chunks


def _aligned(parts: list[list[int]]) -> tuple[list[int], list[int]]:
    """Concatenate int lists, each padded to a multiple of 4 int32 (16 bytes)."""
    flat, starts = [], []
    for p in parts:
        starts.append(len(flat))
        flat += p + [0] * (-len(p) % 4)
    return flat, starts


def make_plan(seg_lens, adapter_ids, ranks, device, chunk_rows: int | None = None) -> SegmentPlan:
    """Build a :class:`SegmentPlan`. Inputs are assumed validated by the caller."""
    seg_lens = tuple(int(v) for v in seg_lens)
    adapter_ids = tuple(int(v) for v in adapter_ids)
    ranks = tuple(int(v) for v in ranks)
    n = len(ranks)
    chunk_rows = chunk_rows or chunk_rows_for(sum(seg_lens))
    starts = [0]
    for length in seg_lens:
        starts.append(starts[-1] + length)
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)

    chunks = _chunks(seg_lens, adapter_ids, ranks, chunk_rows)
    per_adapter = [0] * n
    for a, _ in chunks:
        per_adapter[a] += 1
    split = tuple(a for a in range(n) if per_adapter[a] > 1)
    base, row = {}, 0
    for a in split:
        base[a] = row
        row += per_adapter[a] * ranks[a]
    seen = [0] * n
    chunk_adapters, piece_ptr, bounds, slots = [], [0], [], []
    for a, pieces in chunks:
        chunk_adapters.append(a)
        for lo, hi in pieces:
            bounds += [lo, hi]
        piece_ptr.append(piece_ptr[-1] + len(pieces))
        slots.append(base[a] + seen[a] * ranks[a] if a in base else -1)
        seen[a] += 1
    split_info = [v for a in split for v in (a, base[a], per_adapter[a])]

    parts = [starts, list(adapter_ids), offsets, chunk_adapters, piece_ptr, bounds, slots, split_info]
    flat, part_starts = _aligned(parts)
    # One host->device copy for all the int metadata.
    packed = torch.tensor(flat, dtype=torch.int32).to(device, non_blocking=True)
    views = [packed[s:s + len(p)] for s, p in zip(part_starts, parts)]
    return SegmentPlan(
        seg_lens=seg_lens, adapter_ids=adapter_ids, ranks=ranks, chunk_rows=chunk_rows,
        num_chunks=len(chunks), split_adapters=split, partial_rows=row,
        seg_starts=views[0], seg_adapters=views[1], rank_offsets=views[2], chunk_adapters=views[3],
        chunk_piece_ptr=views[4], piece_bounds=views[5], chunk_slots=views[6], split_info=views[7],
    )


class PlanCache:
    """The last ``size`` plans, keyed by (layout, device); counts the plans it builds."""

    def __init__(self, size: int = PLAN_CACHE_SIZE):
        self.size = size
        self.builds = 0
        self._plans: OrderedDict = OrderedDict()

    def get(self, seg_lens, adapter_ids, ranks, device) -> SegmentPlan:
        key = (tuple(seg_lens), tuple(adapter_ids), tuple(ranks), torch.device(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = make_plan(*key)
            self.builds += 1
            self._plans[key] = plan
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def clear(self) -> None:
        self._plans.clear()


def cached_plan(seg_lens, adapter_ids, ranks, device) -> SegmentPlan:
    """The plan of a layout from the process-wide :class:`PlanCache` (``PLANS``)."""
    return PLANS.get(seg_lens, adapter_ids, ranks, device)


PLANS = PlanCache()
