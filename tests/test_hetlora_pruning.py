"""HetLoRA's rank self-pruning (Cho et al., EMNLP 2024, Sec. 3.2) run by the trainer and the round recipe:
the regulariser inside the batched step, the pruning rule after it, the pruned rank kept across rounds."""
from __future__ import annotations

import pytest
import torch

from fedlora.federated.update import ClientUpdate
from fedlora.simulation import simulate
from fedlora.strategies import HetLoRA, rank_self_pruning_penalty

from .test_simulation import TINY, assert_same_state, synthetic_data, without_wall_time


def _update(rank: int, use_rslora: bool = False) -> ClientUpdate:
    gen = torch.Generator().manual_seed(rank)
    modules = {n: (torch.randn(rank, 12, generator=gen), torch.randn(10, rank, generator=gen), 3.0 * rank)
               for n in ("m.q_proj", "m.v_proj")}
    return ClientUpdate("c0", 5, rank, modules, use_rslora=use_rslora)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_prune_update_keeps_the_leading_product_when_the_tail_norm_fell(use_rslora):
    rule = HetLoRA(prune_gamma=0.75)
    upd = _update(8, use_rslora)
    state = {"tail": float("inf")}  # any finite tail norm is smaller: the rule prunes
    pruned = rule.prune_update(upd, state)
    assert pruned.rank == 6 and state["tail"] is None  # floor(0.75 * 8); a new rank starts a new comparison
    for name, (a, b, _) in upd.modules.items():
        pa, pb, _ = pruned.modules[name]
        assert pa.shape == (6, 12) and pb.shape == (10, 6)
        # The kept product s B[:, :6] A[:6] is what the client had (alpha rescaled, scaling unchanged), in float64.
        want = upd.scaling(name) * (b[:, :6].double() @ a[:6].double())
        got = pruned.scaling(name) * (pb.double() @ pa.double())
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert rule.upload_rank_ok(8, 6) and rule.upload_rank_ok(8, 8) and not rule.upload_rank_ok(8, 5)


def test_prune_update_keeps_the_rank_when_the_tail_grew_or_pruning_is_off():
    state = {}
    assert HetLoRA().prune_update(_update(8), state).rank == 8  # first round: nothing to compare with
    assert state["tail"] > 0
    state["tail"] = 0.0  # the tail cannot fall below zero
    assert HetLoRA().prune_update(_update(8), state).rank == 8
    off = HetLoRA(self_prune=False)
    assert off.prune_update(_update(8), {"tail": float("inf")}).rank == 8
    assert off.local_penalty({}, 8) is None and not off.upload_rank_ok(8, 7)


def test_local_penalty_is_the_papers_regulariser():
    rule = HetLoRA(prune_gamma=0.5, prune_lambda=0.25)
    factors = {n: m[:2] for n, m in _update(8).modules.items()}
    assert torch.equal(rule.local_penalty(factors, 8), rank_self_pruning_penalty(factors, 8, 0.5, 0.25))
    assert rule.local_penalty(factors, 1) is None  # a rank-1 client has no tail to prune
    with pytest.raises(ValueError, match=r"prune_gamma must be in \(0, 1\)"):
        HetLoRA(prune_gamma=1.0)
    with pytest.raises(ValueError, match="self_prune must be true or false"):
        HetLoRA(self_prune="false")


def _run(tmp_path, name, **options):
    cfg = dict(model=TINY, rounds=4, clients_per_round=4, local_steps=3, batch_size=2, lr=2e-2, rank_levels=[4, 8],
               strategy="hetlora", progress=False, output_dir=str(tmp_path / name), eval_every=0,
               strategy_options={"prune_gamma": 0.5, "prune_lambda": 0.5, **options})
    return cfg


def test_simulate_prunes_ranks_and_trains_at_them_afterwards(tmp_path):
    res = simulate(_run(tmp_path, "on"), data=synthetic_data())
    pruned = [(m["round"], cid, r) for m in res.metrics for cid, r in m.get("self_pruned", {}).items()]
    assert pruned, "with a strong regulariser some client's tail norm falls and it prunes"
    for round_idx, cid, rank in pruned:
        later = [m for m in res.metrics if m["round"] > round_idx and cid in m["clients"]]
        for m in later[:1]:  # the next time it is sampled it is served (at most) its pruned rank
            assert m["trained_ranks"][m["clients"].index(cid)] <= rank
    off = simulate(_run(tmp_path, "off", self_prune=False), data=synthetic_data())
    assert not any("self_pruned" in m for m in off.metrics)
    on_delta, off_delta = res.strategy.global_deltas(), off.strategy.global_deltas()
    assert any(not torch.equal(on_delta[n], off_delta[n]) for n in on_delta)  # the regulariser is in the loss


def test_batched_pruning_run_equals_sequential_and_resumes(tmp_path):
    batched = simulate(_run(tmp_path, "batched"), data=synthetic_data())
    sequential = simulate(dict(_run(tmp_path, "sequential"), mode="sequential"), data=synthetic_data())
    assert any("self_pruned" in m for m in batched.metrics)
    for a, b in zip(batched.metrics, sequential.metrics):
        assert a.get("self_pruned") == b.get("self_pruned") and a["trained_ranks"] == b["trained_ranks"]
        # Padding clients to one batch length reorders sums: float rounding (~1e-7) amplified by a few AdamW steps.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    first = simulate(_run(tmp_path, "resumed"), data=synthetic_data(), stop_after=2)
    assert len(first.metrics) == 2
    resumed = simulate(dict(_run(tmp_path, "resumed"), resume=True), data=synthetic_data())
    assert_same_state(resumed.strategy, batched.strategy)  # client ranks and tail norms came back too
    assert without_wall_time(resumed.metrics) == without_wall_time(batched.metrics)
