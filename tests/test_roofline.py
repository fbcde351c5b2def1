"""bench.roofline: every kernel has a cost model, and the model counts what the launchers issue."""
import torch

from bench import kernels as gate
from bench import roofline as R

H100 = R.HARDWARE[0]


def test_every_triton_kernel_has_a_cost_model():
    assert {name.split(":")[1] for name in gate.discover_names()} == set(R.MODELS)


def test_forward_is_one_shrink_and_one_expand_with_their_compulsory_bytes():
    T, d, ranks, seg_lens = 96, 64, [5, 16, 9], [40, 0, 56]
    seqs = R.segmented_case(T, len(ranks), d, torch.bfloat16, H100, ranks, seg_lens)
    fed = next(s for s in seqs["fwd"] if s.variant == "fedlora")
    assert [c.name for c in fed.launches] == ["shrink", "expand"]
    shrink, expand = fed.launches
    used_rank = 5 + 9  # adapter 1's segment is empty: its factors are never read
    h_bytes = (40 * 5 + 56 * 9) * 4  # H is fp32, only each row's own rank
    assert shrink.bytes == T * d * 2 + used_rank * d * 2 + h_bytes
    assert expand.bytes == h_bytes + used_rank * d * 2 + T * d * 2
    assert shrink.math == expand.math == "tc16"  # bf16 data on 16-bit tensor cores
    # Tiles include their padding: at least the exact 2 T r d multiply-adds.
    assert shrink.flops >= 2 * (40 * 5 + 56 * 9) * d


def test_backward_adds_two_shrink_expand_outer_launches_and_baselines_are_counted():
    T, d, ranks, seg_lens = 64, 32, [4, 12], [30, 34]
    seqs = R.segmented_case(T, len(ranks), d, torch.bfloat16, H100, ranks, seg_lens)
    fed = next(s for s in seqs["fwd_bwd"] if s.variant == "fedlora")
    assert sorted(c.name for c in fed.launches) == ["expand", "expand", "outer", "outer", "shrink", "shrink"]
    loop = next(s for s in seqs["fwd_bwd"] if s.variant == "peft_loop")
    # Two adapters: two GEMMs each way per segment, plus autograd's slice gradients for dx.
    assert sum(c.name == "mm" for c in loop.launches) >= 2 * 2 * 3
    assert any(c.name == "slice_backward" for c in loop.launches)
    for s in seqs["fwd_bwd"]:
        assert s.total(H100) > len(s.launches) * R.LAUNCH_S  # every launch costs more than its floor


def test_under_filled_launch_is_slower():
    full = R.Cost("k", 0.0, 1e9, "none", programs=H100.sms)
    quarter = R.Cost("k", 0.0, 1e9, "none", programs=H100.sms // 4)
    assert abs((quarter.time(H100) - R.LAUNCH_S) / (full.time(H100) - R.LAUNCH_S) - 4.0) < 1e-9
