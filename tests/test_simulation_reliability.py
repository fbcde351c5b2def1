"""`fedlora simulate` under bad clients: an upload at a rank it was not sent, a finite but enormous
update, a product that overflows float32: each is rejected with a reason, the state stays finite and
equals a run without that client's update (tiny random Llama)."""
from __future__ import annotations

import math

import pytest
import torch

from fedlora.federated import ClientUpdate
from fedlora.simulation import simulate

from .fl_helpers import random_update
from .test_simulation import TINY, read_metrics, synthetic_data


def _run(tmp_path, hook, strategy="flexlora", **kw):
    cfg = dict(model=TINY, rounds=2, clients_per_round=4, local_steps=2, lr=1e-2, rank_levels=[2, 4],
               strategy=strategy, eval_every=0, output_dir=str(tmp_path), progress=False, **kw)
    return simulate(cfg, data=synthetic_data(), update_hook=hook)


def _spoil(client, edit):
    def hook(update):
        return edit(update) if update.client_id == client else update
    return hook


def _higher_rank(update):
    shapes = {n: (b.shape[0], a.shape[1]) for n, (a, b, _) in update.modules.items()}
    return random_update(update.client_id, 2 * update.rank, shapes, n=update.num_examples)


def _times(factor_a, factor_b):
    def edit(update):
        mods = {n: (a * factor_a, b * factor_b, al) for n, (a, b, al) in update.modules.items()}
        return ClientUpdate(update.client_id, update.num_examples, update.rank, mods, update.use_rslora,
                            update.metrics)
    return edit


def _dropped(client):
    """The reference: the same run where ``client``'s update never arrives."""
    def hook(update):
        if update.client_id == client:
            raise RuntimeError("dropped for the reference run")
        return update
    return hook


@pytest.mark.parametrize("strategy, edit, reason", [
    ("flexlora", _higher_rank, "the server sent this client"),
    ("flora", _higher_rank, "the server sent this client"),
    ("hetlora", _times(1.0, 1e6), "the round's median"),
    ("fedavg", _times(1e20, 1e20), "could overflow float32"),
    ("flora", _times(1e20, 1e20), "could overflow float32"),
])
def test_a_bad_client_is_rejected_and_the_state_equals_the_run_without_it(strategy, edit, reason, tmp_path):
    extra = {"strategy_options": {"heterogeneous": "bucket"}} if strategy == "fedavg" else {}
    res = _run(tmp_path / "bad", _spoil("c1", edit), strategy, **extra)
    ref = _run(tmp_path / "ref", _dropped("c1"), strategy, **extra)
    for got, want in zip(read_metrics(tmp_path / "bad"), read_metrics(tmp_path / "ref"), strict=True):
        assert reason in got["rejected"]["c1"] and got["state_changed"]
        assert got["accepted"] == want["accepted"] == ["c0", "c2", "c3"]
        assert got["train_loss"] == want["train_loss"] and math.isfinite(got["train_loss"])
    deltas, ref_deltas = res.strategy.global_deltas(), ref.strategy.global_deltas()
    for name in deltas:
        assert torch.isfinite(deltas[name]).all() and torch.equal(deltas[name], ref_deltas[name])
