"""Held-out evaluation grouped by the rank each training client was assigned (eval_heldout_by_rank)."""
from __future__ import annotations

import math

import pytest

from fedlora.data import IGNORE_INDEX
from fedlora.simulation import simulate
from fedlora.simulation.evaluation import by_rank, heldout_owners

from .test_simulation import resume_cfg, synthetic_clients, synthetic_data


def label_tokens(example) -> int:
    return int((example["labels"][1:] != IGNORE_INDEX).sum())


def mean_over_ranks(groups: dict) -> float:
    return sum(g["tokens"] * g["loss"] for g in groups.values()) / sum(g["tokens"] for g in groups.values())


def recombination_tol(groups: dict) -> float:
    """Relative bound on |mean_over_ranks - overall| when both come from the same float64 example sums
    (each correctly rounded by math.fsum): loss_r = S_r / T_r and T_r * loss_r round once each, the sum
    over R ranks R - 1 times and the division once; every term is positive (no cancellation), so
    the relative error is at most (R + 2) float64 unit roundoffs (2^-53), doubled for slack."""
    return 2 * (len(groups) + 2) * 2.0 ** -53


def test_by_rank_groups_example_sums_by_their_clients_rank():
    sums = [3.0, 1.0, 4.0, 1.5, 9.0]
    tokens = [2, 1, 4, 3, 6]
    owners = [("a", 4), ("a", 4), ("b", 2), ("c", 4), ("b", 2)]
    out = by_rank(sums, tokens, owners)
    assert list(out) == ["2", "4"]
    assert out["2"] == {"loss": 13.0 / 10, "ppl": math.exp(13.0 / 10), "clients": 1, "tokens": 10}
    assert out["4"] == {"loss": 5.5 / 6, "ppl": math.exp(5.5 / 6), "clients": 2, "tokens": 6}
    with pytest.raises(ValueError, match="2 example owners for 5 scored examples"):
        by_rank(sums, tokens, owners[:2])


def test_owners_follow_the_evaluation_budget_spread_over_clients():
    clients = synthetic_clients(3, heldout=2)
    rank_of = {"c0": 2, "c1": 4, "c2": 2}
    assert heldout_owners(clients, 3, rank_of) == [("c0", 2), ("c1", 4), ("c2", 2)]  # one from each in turn
    assert heldout_owners(clients, 4, rank_of) == [("c0", 2), ("c0", 2), ("c1", 4), ("c2", 2)]
    assert heldout_owners(clients, 100, rank_of)[-1] == ("c2", 2) and len(heldout_owners(clients, 100, rank_of)) == 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return simulate({**resume_cfg(tmp_path_factory.mktemp("byrank"), "flexlora"), "rounds": 2, "eval_max_examples": 7},
                    data=synthetic_data())


def test_every_evaluation_breaks_the_held_out_loss_down_by_client_rank(run):
    data = synthetic_data()
    # eval_max_examples = 7 of 4 clients x 2 held-out examples: c0..c2 whole, c3 one example
    scored = [(c.client_id, ex) for c in data.train_clients for ex in c.heldout][:7]
    want_tokens: dict[str, int] = {}
    want_clients: dict[str, set] = {}
    for cid, ex in scored:
        rank = str(run.client_ranks[cid])
        want_tokens[rank] = want_tokens.get(rank, 0) + label_tokens(ex)
        want_clients.setdefault(rank, set()).add(cid)
    assert len(want_tokens) == 2  # both rank levels are among the scored clients
    for record in [run.base_eval, *run.metrics]:
        groups = record["eval_heldout_by_rank"]
        assert {r: g["tokens"] for r, g in groups.items()} == want_tokens  # exactly the tokens eval_heldout scores
        assert {r: g["clients"] for r, g in groups.items()} == {r: len(c) for r, c in want_clients.items()}
        assert mean_over_ranks(groups) == pytest.approx(record["eval_heldout_loss"], rel=recombination_tol(groups))
        for g in groups.values():
            assert g["ppl"] == math.exp(g["loss"])
    # the rounds move the groups (a breakdown of the trained model, not the base one copied)
    assert run.metrics[-1]["eval_heldout_by_rank"] != run.base_eval["eval_heldout_by_rank"]
