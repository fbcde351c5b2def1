"""Local-only training (the rule ``local``, the benchmark's ``local-only`` baseline): every client trains its
own adapter in the rounds that sample it, shares nothing, and is evaluated with its own adapter."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from fedlora.federated.rng import stable_seed
from fedlora.simulation import simulate
from fedlora.simulation.config import InputError, SimConfig
from fedlora.simulation.personal import PersonalStore, with_personal
from fedlora.simulation.round import client_stream, local_plan, start_factors
from fedlora.simulation.setup import setup_run
from fedlora.simulation.trainer import train_clients
from fedlora.strategies import registry

from .test_evaluation_by_rank import mean_over_ranks, recombination_tol
from .test_simulation import resume_cfg, synthetic_data, without_wall_time


def _cfg(out, **kw):
    # sequential: each client trains in a forward pass of its own, so training it "alone" below is bit for bit
    # the same computation (a batched pass shares padded batches with other clients: same math, other rounding)
    return {**resume_cfg(out, "local"), "mode": "sequential", "eval_max_examples": 8, **kw}


def _stored(out, clients):
    store = PersonalStore(out / "clients")
    return {c: store.load(c, 10**6) for c in clients}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return simulate(_cfg(tmp_path_factory.mktemp("local")), data=synthetic_data())


def test_each_client_trains_alone_from_its_own_factors(full_run):
    cfg = SimConfig.from_dict(_cfg(full_run.output_dir))
    run = setup_run(cfg, synthetic_data())  # the same base model (seeded) and clients, nothing trained
    sampled_in = {}
    for m in full_run.metrics:
        for cid in m["clients"]:
            sampled_in.setdefault(cid, []).append(m["round"] - 1)
    assert max(len(r) for r in sampled_in.values()) >= 2  # some client trains in two rounds
    stored = _stored(full_run.output_dir, list(run.rank_of))
    for client in run.clients:
        cid = client.client_id
        # its first start: the rule's init for it (A seeded by the client, B = 0), then only its own training
        factors = start_factors(cfg, full_run.strategy, cid, run.rank_of[cid])
        assert all(not b.any() for _, b, _ in factors.values())
        for round_idx in sampled_in.get(cid, []):
            run.fm.load_clients([factors])
            torch.manual_seed(stable_seed(cfg.seed, "round", round_idx))  # as simulate seeds the round
            train_clients(run.fm, [client], [client_stream(cfg, round_idx, client)],
                          local_plan(cfg, [client], train_A=True, train_B=True), run.pad_id)
            factors = run.fm.client_factors(0, {n: f[2] for n, f in factors.items()})
        if cid not in sampled_in:
            assert stored[cid] is None  # never trained: nothing stored, it is the base model
            continue
        for name, (a, b, _) in factors.items():
            assert torch.equal(stored[cid][name]["A"], a) and torch.equal(stored[cid][name]["B"], b), (cid, name)
            assert stored[cid][name]["A"].shape[0] == run.rank_of[cid]  # at its own (capacity) rank


def test_nothing_is_sent_and_nothing_exported(full_run):
    for m in full_run.metrics:
        assert m["bytes_up"] == m["bytes_down"] == m["bytes_down_global"] == 0
        assert m["total_bytes_up"] == m["total_bytes_down"] == 0 and m["accepted"] == m["clients"]
    assert full_run.adapter_dir is None and not (full_run.output_dir / "adapter").exists()
    assert not any(full_run.strategy.global_delta(n).any() for n in full_run.strategy.module_shapes)


def test_each_client_is_scored_with_its_own_adapter_unseen_ones_with_the_base_model(full_run):
    base = full_run.base_eval
    for m in full_run.metrics:
        # unseen clients have no adapter: the base model on the same examples, the same computation
        assert m["eval_unseen_loss"] == base["eval_unseen_loss"]
        groups = m["eval_heldout_by_rank"]
        assert {r: g["tokens"] for r, g in groups.items()} == \
            {r: g["tokens"] for r, g in base["eval_heldout_by_rank"].items()}  # the same held-out tokens
        assert mean_over_ranks(groups) == pytest.approx(m["eval_heldout_loss"], rel=recombination_tol(groups))
        assert "eval_personal_heldout_loss" not in m and "spectrum" not in m
    assert full_run.metrics[-1]["eval_heldout_loss"] < base["eval_heldout_loss"]  # the clients' own models learn


def test_a_client_without_stored_factors_starts_at_its_init(tmp_path):
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    store = PersonalStore(tmp_path)
    fresh = with_personal({"m": (a, b, 4.0)}, "c0", 0, ("A", "B"), store, {"m": (3, 5)})
    assert torch.equal(fresh["m"][0], a) and not fresh["m"][1].any() and fresh["m"][2] == 4.0
    store.save("c0", 0, {"m": {"A": a + 1, "B": b + 1}})
    own = with_personal({"m": (a, b, 4.0)}, "c0", 1, ("A", "B"), store, {"m": (3, 5)})
    assert torch.equal(own["m"][0], a + 1) and torch.equal(own["m"][1], b + 1)
    with pytest.raises(ValueError, match="stored A of m has shape \\(2, 5\\), but it trains that module at rank 3"):
        with_personal({"m": (torch.randn(3, 5), torch.randn(3, 3), 4.0)}, "c0", 1, ("A", "B"), store, {"m": (3, 5)})


def test_resume_ends_where_an_uninterrupted_run_ends(full_run, tmp_path):
    simulate(_cfg(tmp_path), data=synthetic_data(), stop_after=1)
    resumed = simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    assert without_wall_time(resumed.metrics) == without_wall_time(full_run.metrics)
    ids = list(full_run.client_ranks)
    mine, full = _stored(tmp_path, ids), _stored(full_run.output_dir, ids)
    for cid in ids:
        assert (mine[cid] is None) == (full[cid] is None), cid
        for name in full[cid] or {}:
            for factor in ("A", "B"):
                assert torch.equal(mine[cid][name][factor], full[cid][name][factor]), (cid, name, factor)


def test_flower_refuses_a_rule_without_federation():
    from fedlora.integrations.flower.strategy import FedLoRAStrategy

    assert not registry.lookup("local").has_global_model
    with pytest.raises(InputError, match="'local' shares nothing between clients.*fedlora simulate"):
        FedLoRAStrategy.from_config(SimConfig(strategy="local"))


def test_local_only_is_a_benchmark_baseline_with_its_own_rows(tmp_path):
    from fedlora.cli import main

    from .test_benchmark import one_round_grid

    toml = one_round_grid(tmp_path, '["local-only", "bucket"]')
    assert main(["benchmark", "--config", str(toml), "--no-progress"]) == 0
    out = tmp_path / "bench"
    assert json.loads((out / "cells" / "strategy-local-only" / "config.json").read_text())["strategy"] == "local"
    rows = {r["rule"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["local-only"]["bytes_up_total"] == rows["local-only"]["bytes_down_total"] == "0"
    assert float(rows["local-only"]["final_eval_heldout_ppl"]) > 0  # the same columns as the federated rules
    last = json.loads((out / "cells" / "strategy-local-only" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= last["eval_heldout_rougeL"] <= 1 and 0 <= last["eval_unseen_rougeL"] <= 1  # own adapters / base
    md = (out / "results.md").read_text()
    assert "| local-only | " in md.split("eval_unseen_loss after the last round")[1]
    assert "local-only (no federation)" in md and "unseen clients have no adapter" in md
    assert "| local-only | " in md.split("Held-out perplexity by client rank")[1]
