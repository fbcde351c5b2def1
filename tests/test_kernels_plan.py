"""Segment plans: built once per layout for a whole model, and the split outer products they drive."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fedlora
from fedlora.kernels import plan as P
from fedlora.kernels import segmented as K
from fedlora.kernels.dispatch import capture_launches

from .conftest import DEVICE, REL_TOL, rel_err
from .test_segmented import check_against_reference, random_bank


# ---------------------------------------------------------------- the plan itself
def _rows_by_adapter(seg_lens, adapter_ids, n):
    rows, start = [[] for _ in range(n)], 0
    for length, a in zip(seg_lens, adapter_ids):
        rows[a] += range(start, start + length)
        start += length
    return rows


@pytest.mark.parametrize("chunk_rows", [1, 3, 8, 512])
def test_chunks_cover_each_adapters_rows_once(chunk_rows):
    seg_lens, adapter_ids, ranks = [5, 0, 9, 2, 7, 40], [1, 2, 1, 0, 1, 4], [3, 4, 2, 6, 33]
    plan = P.make_plan(seg_lens, adapter_ids, ranks, "cpu", chunk_rows=chunk_rows)
    adapters = plan.chunk_adapters.tolist()
    ptr, bounds, slots = plan.chunk_piece_ptr.tolist(), plan.piece_bounds.tolist(), plan.chunk_slots.tolist()
    got = [[] for _ in ranks]
    for c, a in enumerate(adapters):
        rows = [t for p in range(ptr[c], ptr[c + 1]) for t in range(bounds[2 * p], bounds[2 * p + 1])]
        # rank 33 has 3 rank tiles per chunk, so its chunks may be 3x longer
        assert len(rows) <= chunk_rows * (3 if ranks[a] == 33 else 1)
        got[a] += rows
    assert got == _rows_by_adapter(seg_lens, adapter_ids, len(ranks))
    # Adapter 2's only segment is empty and adapter 3 has none: one empty chunk each (zeros out).
    assert adapters.count(2) == 1 and adapters.count(3) == 1
    # Split adapters own disjoint workspace rows, chunk after chunk; the rest write directly.
    split = {a: (first, chunks) for a, first, chunks in zip(*[iter(plan.split_info.tolist())] * 3)}
    assert set(split) == set(plan.split_adapters) == {a for a in range(5) if adapters.count(a) > 1}
    for c, a in enumerate(adapters):
        if a in split:
            first, chunks = split[a]
            assert first <= slots[c] < first + chunks * ranks[a] and (slots[c] - first) % ranks[a] == 0
        else:
            assert slots[c] == -1
    assert plan.partial_rows == sum(chunks * ranks[a] for a, (_, chunks) in split.items())


def test_metadata_parts_start_16_byte_aligned():
    # Every kernel argument then specialises alike, whatever the layout (one compiled variant).
    plan = P.make_plan([3, 1, 4], [0, 1, 0], [5, 7], "cpu", chunk_rows=2)
    base = plan.seg_starts.untyped_storage().data_ptr()
    for t in (plan.seg_starts, plan.seg_adapters, plan.rank_offsets, plan.chunk_adapters, plan.chunk_piece_ptr,
              plan.piece_bounds, plan.chunk_slots, plan.split_info):
        assert (t.data_ptr() - base) % 16 == 0


def test_chunk_rows_grow_with_the_batch():
    assert P.chunk_rows_for(100) == P.MIN_CHUNK_ROWS
    assert P.chunk_rows_for(1 << 20) >= (1 << 20) // P.TARGET_CHUNKS
    assert P.chunk_rows_for(1 << 20) % 16 == 0


# ------------------------------------------------------------- one plan per layout
class _Model(nn.Module):
    """Three adapted layers: two share their ranks (one plan), the third has its own."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q = fedlora.MultiLoRALinear(nn.Linear(12, 12), ranks=[2, 5], generator=g)
        self.v = fedlora.MultiLoRALinear(nn.Linear(12, 12), ranks=[2, 5], generator=g)
        self.o = fedlora.MultiLoRALinear(nn.Linear(12, 8), ranks=[3, 1], generator=g)
        for layer in (self.q, self.v, self.o):
            nn.init.normal_(layer.bank.B)  # PEFT starts B at zero; nonzero gradients everywhere

    def forward(self, x):
        return self.o(torch.tanh(self.q(x) + self.v(x)))


def _step(model, x, layout):
    with fedlora.segments(model, *layout):
        model(x).square().sum().backward()


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_one_plan_per_layout_and_ranks_for_a_whole_model_step(monkeypatch, backend_name):
    monkeypatch.setenv("FEDLORA_BACKEND", backend_name)
    model = _Model()
    x = torch.randn(5, 3, 12)  # 5 sequences of 3 tokens
    P.PLANS.clear()
    before = P.PLANS.builds
    _step(model, x, ([2, 3], [1, 0]))
    # Three layers x (forward + backward) = 6 uses; 2 distinct rank lists -> 2 plans.
    assert P.PLANS.builds - before == 2
    _step(model, x, ([2, 3], [1, 0]))
    assert P.PLANS.builds - before == 2  # the next step with the same layout builds nothing
    _step(model, x, ([4, 1], [0, 1]))
    assert P.PLANS.builds - before == 4  # a new layout: one plan per rank list again


def test_plan_cache_is_bounded():
    cache = P.PlanCache(size=2)
    for n in range(1, 5):
        cache.get([n], [0], [3], "cpu")
    assert cache.builds == 4 and len(cache._plans) == 2
    cache.get([4], [0], [3], "cpu")
    assert cache.builds == 4


# ------------------------------------------------------------ split outer products
def _outer_reference(l, x, seg_lens, adapter_ids, ranks, scalings):
    out = torch.zeros(sum(ranks), x.shape[1], dtype=torch.float64)
    offsets = [sum(ranks[:a]) for a in range(len(ranks))]
    start = 0
    for length, a in zip(seg_lens, adapter_ids):
        rows = slice(start, start + length)
        out[offsets[a]:offsets[a] + ranks[a]] += scalings[a] * (l[rows, : ranks[a]].double().t() @ x[rows].double())
        start += length
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_outer_matches_float64_on_both_backends(monkeypatch, backend, dtype):
    gen = torch.Generator().manual_seed(3)
    # Adapter 0: one long segment (split in 4); adapter 1 (rank 17: chunks of 8 rows): two segments
    # grouped into 2 chunks; adapter 2: one short segment (direct); adapter 3: unused (zeros).
    seg_lens, adapter_ids, ranks = [13, 6, 3, 4, 0], [0, 1, 2, 1, 3], [5, 17, 2, 4]
    T, C = sum(seg_lens), 21
    plan = P.make_plan(seg_lens, adapter_ids, ranks, DEVICE, chunk_rows=4)
    assert set(plan.split_adapters) == {0, 1}
    scalings = (0.5 + torch.rand(len(ranks), generator=gen)).to(DEVICE)
    l = torch.randn(T, plan.h_width, generator=gen).to(DEVICE)
    x = torch.randn(T, C, generator=gen).to(DEVICE, dtype)
    out = K.outer(l, x, plan, scalings, torch.full((sum(ranks), C), float("nan"), device=DEVICE, dtype=dtype))
    ref = _outer_reference(l.cpu(), x.cpu(), seg_lens, adapter_ids, ranks, scalings.cpu().tolist())
    # bf16: L is rounded to bf16 in the dot on a GPU and the output is bf16: 8-bit mantissas.
    assert rel_err(out, ref) < REL_TOL[dtype]
    assert torch.count_nonzero(out[sum(ranks[:3]):]) == 0
    again = K.outer(l, x, plan, scalings, torch.empty_like(out))
    assert torch.equal(out, again)  # a fixed reduction order: the same bits every run


def test_long_single_adapter_batch_splits_and_matches_float64(monkeypatch, backend):
    # One adapter over the whole batch, as on a client with a single LoRA: the outer product is
    # cut into chunks (few rows here so the interpreter stays quick) and reduced in order.
    monkeypatch.setattr(P, "MIN_CHUNK_ROWS", 8)
    P.PLANS.clear()
    gen = torch.Generator().manual_seed(9)
    bank = random_bank([6], 20, 14, torch.float32, gen)
    assert P.make_plan([40], [0], [6], "cpu").split_adapters == (0,)
    check_against_reference(bank, [40], [0], torch.float32, gen)
    P.PLANS.clear()


def test_capture_records_launches_without_running(monkeypatch):
    monkeypatch.delenv("FEDLORA_BACKEND", raising=False)
    plan = P.make_plan([3, 2], [0, 1], [2, 4], "cpu")
    x = torch.randn(5, 7)
    w = torch.randn(6, 7)
    with capture_launches() as launches:
        h = K.shrink(x, w, plan)  # CPU tensors, but capturing takes the Triton path
    assert [type(launch.kernel).__name__ for launch in launches] == ["Autotuner"]
    assert launches[0].args[0] is x and launches[0].args[2] is h
    assert callable(launches[0].grid)


# ------------------------------------------------------------- no host reads of data
class _HostReads(TorchDispatchMode):
    """Every read of a tensor's value back to the host (``.item()``, ``bool(t)``...) in the block."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append((args[0].dtype, args[0].device))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["torch twins", "Triton launches (captured)"])
def test_forward_and_backward_never_read_device_values_back(monkeypatch, path):
    # On a GPU a host read of a CUDA tensor waits for the device. Only the batch layout is
    # read on the host, and it lives in CPU int64 tensors the ops build themselves.
    monkeypatch.setenv("FEDLORA_BACKEND", "torch")
    model, x = _Model(), torch.randn(5, 3, 12, requires_grad=True)
    tolist_of = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_of.append((t.dtype, t.device)) or real_tolist(t))
    with fedlora.segments(model, [2, 3], [1, 0]), _HostReads() as reads:
        if path == "torch twins":
            model(x).sum().backward()
        else:
            with capture_launches() as launches:
                model(x).sum().backward()
            assert len(launches) >= 3 * (2 + 4)  # 3 layers: shrink, expand; shrink, expand, 2 outer
    assert reads.reads == []
    assert tolist_of and set(tolist_of) == {(torch.int64, torch.device("cpu"))}
