"""SimConfig: overrides, TOML files, validation; rank distributions; FedAvg's rank rule."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from fedlora.cli import main
from fedlora.simulation.config import SimConfig
from fedlora.federated.ranks import assign_ranks
from fedlora.simulation.setup import make_strategy

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8)}


def test_overrides_are_typed_like_their_fields():
    cfg = SimConfig.load(None, [
        "--rank_levels", "2,4,8", "--client_ranks=[3, 5]", "--rank_distribution", "list",
        "--target_modules", "q_proj,k_proj,v_proj", "--progress", "false", "--use_rslora=true",
        "--rounds", "7", "--lr", "1e-3", "--local-epochs", "0.5", "--clients_per_round", "0.25",
        "--strategy_options.max_rank", "8", "--strategy_options.svd_method", "factored",
        "--strategy_options.min_updates=2",
    ])
    assert cfg.rank_levels == [2, 4, 8] and cfg.client_ranks == [3, 5]
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.progress is False and cfg.use_rslora is True
    assert cfg.rounds == 7 and cfg.lr == 1e-3 and cfg.local_epochs == 0.5
    assert cfg.clients_per_round == 0.25
    assert SimConfig.load(None, ["--clients_per_round", "6"]).clients_per_round == 6
    assert cfg.strategy_options == {"max_rank": 8, "svd_method": "factored", "min_updates": 2}
    # a rank_pattern key is a regex: its hyphens are not option-name hyphens
    cfg = SimConfig.load(None, ["--rank-pattern.[a-z]-proj", "0.5", "--strategy-options.max-rank", "4"])
    assert cfg.rank_pattern == {"[a-z]-proj": 0.5} and cfg.strategy_options == {"max_rank": 4}


def test_client_ranks_comma_list_are_ints():
    # The default [] carries no element type: the field's annotation decides.
    assert SimConfig.load(None, ["--rank_distribution", "list", "--client_ranks", "2,4"]).client_ranks == [2, 4]


@pytest.mark.parametrize("args,match", [
    (["--no_such_key", "1"], "unknown setting --no_such_key"),
    (["--strategy_optionz.max_rank", "3"], "unknown setting"),
    (["--rounds", "three"], "--rounds must be an integer, got 'three'"),
    (["--progress", "maybe"], "--progress must be true, false, 1 or 0, got 'maybe'"),
    (["--rank_levels", "4,x"], "--rank_levels must be an integer, got 'x'"),
    (["--rounds"], "--rounds needs a value"),
    (["rounds", "3"], "expected --key value"),
    (["--strategy", "fedsgd"], "strategy must be one of"),
    (["--rank_distribution", "zipf"], "rank_distribution must be one of"),
    (["--mode", "parallel"], "mode must be one of batched, sequential; got 'parallel'"),
    (["--rank_distribution", "list"], "client_ranks"),
    (["--lr", "0"], "lr must be > 0"),
    (["--lora_dropout", "1"], "lora_dropout"),
])
def test_bad_overrides_raise_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        SimConfig.load(None, args)


def test_toml_flat_and_table(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('rounds = 5\nstrategy = "flora"\nrank_levels = [2, 4]\n')
    cfg = SimConfig.load(flat)
    assert (cfg.rounds, cfg.strategy, cfg.rank_levels) == (5, "flora", [2, 4])

    table = tmp_path / "table.toml"
    table.write_text('[simulate]\nrounds = 2\nlr = 0.01\n[simulate.strategy_options]\nsvd_method = "factored"\n')
    cfg = SimConfig.load(table, ["--rounds", "9", "--strategy_options.max_rank", "4"])
    assert cfg.rounds == 9 and cfg.lr == 0.01  # overrides win over the file
    assert cfg.strategy_options == {"svd_method": "factored", "max_rank": 4}  # and add to its options

    bad = tmp_path / "bad.toml"
    bad.write_text("[simulate]\nround = 2\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['round'\]"):
        SimConfig.load(bad)


def test_cli_reports_config_errors(capsys, tmp_path):
    assert main(["simulate", "--rounds", "0", "--output_dir", str(tmp_path)]) == 2
    assert "rounds must be >= 1" in capsys.readouterr().err
    assert main(["simulate", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_config_json_round_trip():
    cfg = SimConfig.load(None, ["--strategy_options.max_rank", "8", "--rank_levels", "2,4"])
    assert SimConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_fedavg_refuses_heterogeneous_ranks_with_a_hint():
    cfg = SimConfig(strategy="fedavg")
    with pytest.raises(ValueError, match="heterogeneous bucket"):
        make_strategy(cfg, SHAPES, [2, 4, 2], "cpu")
    assert make_strategy(cfg, SHAPES, [4, 4], "cpu").rank == 4
    bucket = make_strategy(SimConfig(strategy="fedavg", strategy_options={"heterogeneous": "bucket"}),
                           SHAPES, [2, 4, 8], "cpu")
    assert bucket.rank == 2 and next(iter(bucket.distribute(8).values()))[0].shape[0] == 2
    assert make_strategy(SimConfig(strategy="hetlora"), SHAPES, [2, 4, 8], "cpu").rank == 8


# ------------------------------------------------------------------ ranks
LEVELS = [4, 8, 16, 32]


def counts(ranks):
    c = Counter(ranks)
    return [c[r] for r in LEVELS]


def test_rank_distribution_counts():
    assert counts(assign_ranks(10, "homogeneous", LEVELS)) == [0, 0, 0, 10]
    assert counts(assign_ranks(12, "uniform", LEVELS)) == [3, 3, 3, 3]
    uneven = counts(assign_ranks(10, "uniform", LEVELS))
    assert sum(uneven) == 10 and max(uneven) - min(uneven) == 1
    # heavy tail: shares 8:4:2:1 over 15 -> most clients small
    assert counts(assign_ranks(30, "heavy_tail", LEVELS)) == [16, 8, 4, 2]
    # normal over 4 levels (center 1.5, width 1): the middle levels hold most clients
    assert counts(assign_ranks(100, "normal", LEVELS)) == [13, 37, 37, 13]
    assert assign_ranks(3, "list", LEVELS, explicit=[5, 1, 2, 9]) == [5, 1, 2]
    with pytest.raises(ValueError, match="client_ranks has 2 ranks for 3 clients"):
        assign_ranks(3, "list", LEVELS, explicit=[5, 1])
    with pytest.raises(ValueError, match="unknown rank distribution"):
        assign_ranks(3, "zipf", LEVELS)


def test_rank_assignment_is_a_seeded_shuffle():
    a, b = assign_ranks(40, "uniform", LEVELS, seed=1), assign_ranks(40, "uniform", LEVELS, seed=1)
    c = assign_ranks(40, "uniform", LEVELS, seed=2)
    assert a == b and a != c and sorted(a) == sorted(c)
    assert assign_ranks(8, "uniform", [16, 4, 8, 32], seed=1) == assign_ranks(8, "uniform", LEVELS, seed=1)
