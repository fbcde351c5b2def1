"""The breakdown of a benchmark's clients by rank (benchmark_analysis.rank_breakdown)."""
from __future__ import annotations

from types import SimpleNamespace

from fedlora.simulation.benchmark_analysis import rank_breakdown


def test_training_loss_is_grouped_by_the_rank_a_client_was_assigned_not_its_pruned_rank():
    # HetLoRA prunes client a from 32 to 7 after round 1: it stays a rank-32 client in the breakdown
    metrics = [
        {"clients": ["a", "b"], "ranks": [32, 4], "client_train_loss": {"a": 9.0, "b": 9.0}},
        {"clients": ["c"], "ranks": [8], "client_train_loss": {"c": 9.0}},
        {"clients": ["a", "b"], "ranks": [7, 4], "client_train_loss": {"a": 2.0, "b": 1.0}},
        {"clients": ["a", "c"], "ranks": [7, 8], "client_train_loss": {"a": 4.0, "c": float("nan")}},
    ]
    out = rank_breakdown([SimpleNamespace(rule="hetlora", metrics=metrics)])
    # second half of the rounds only (rounds 3 and 4); a non-finite loss is left out
    assert out == {"hetlora": {32: 3.0, 4: 1.0}}
