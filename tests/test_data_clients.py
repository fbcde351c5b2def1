"""The shared client structure: chunking, held-out splits, batching."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from fedlora.data import IGNORE_INDEX, ClientDataset, collate, collate_clients, lm_examples, make_example
from fedlora.data.clients import split_indices, spread_budget


def test_lm_examples_chunks():
    exs = lm_examples(list(range(10)), seq_len=4)
    assert [ex["input_ids"].tolist() for ex in exs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [ex["input_ids"].tolist() for ex in lm_examples(list(range(9)), seq_len=4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="seq_len"):
        lm_examples([1, 2], seq_len=1)


def test_split_indices():
    keep, held = split_indices(10, 0.3, np.random.default_rng(0))
    assert len(held) == 3 and sorted(keep + held) == list(range(10)) and keep == sorted(keep)
    assert split_indices(10, 0.3, np.random.default_rng(0)) == (keep, held)
    assert split_indices(3, 0.01, np.random.default_rng(0))[1] != []  # every client gets one
    assert split_indices(1, 0.5, np.random.default_rng(0)) == ([0], [])  # but never its only item
    with pytest.raises(ValueError, match="fraction"):
        split_indices(5, 1.0, np.random.default_rng(0))


def test_collate_and_client_segments():
    a, b = make_example([5, 6, 7]), make_example([8], labels=[IGNORE_INDEX])
    batch = collate([a, b], pad_token_id=0, pad_to=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [-100, -100, -100, -100]]
    with pytest.raises(ValueError, match="pad_to"):
        collate([a], 0, pad_to=2)
    with pytest.raises(ValueError, match="at least one"):
        collate([], 0)
    with pytest.raises(ValueError, match="labels length"):
        make_example([1, 2], labels=[1])
    out = collate_clients([[a], [], [b, a]], pad_token_id=0)
    assert out["seg_lens"].tolist() == [1, 0, 2] and out["input_ids"].shape == (3, 3)
    client = ClientDataset("c", train=[a, b], heldout=[a])
    assert client.num_examples == 2 and client.num_train_tokens == 4
    assert torch.equal(out["input_ids"][2], batch["input_ids"][0, :3])


def test_eager_and_lazy_federations_pick_the_same_evaluation_sets():
    """FederatedData and LazyFederation answer the run's questions alike (sizes, eval sets, client access)."""
    from fedlora.data import ClientIndex, FederatedData, LazyFederation

    examples = [make_example([i, i + 1, i + 2]) for i in range(20)]
    train_parts, held_parts, unseen_parts = [[0, 1, 2], [3], [4, 5]], [[6, 7], [], [8]], [[9, 10, 11], [12]]
    ids, unseen_ids = ["a", "b", "c"], ["u", "v"]

    def pick(rs):
        return [examples[r] for r in rs]

    eager = FederatedData([ClientDataset(i, pick(t), pick(h)) for i, t, h in zip(ids, train_parts, held_parts)],
                          [ClientDataset(i, [], pick(u)) for i, u in zip(unseen_ids, unseen_parts)])
    loads = []
    lazy = LazyFederation(ClientIndex.from_lists(ids, train_parts), ClientIndex.from_lists(ids, held_parts),
                          ClientIndex.from_lists(unseen_ids, unseen_parts), lambda r: loads.append(r) or examples[r])
    assert eager.num_train_clients == lazy.num_train_clients == 3
    for split, budget in (("heldout", 2), ("heldout", 10), ("unseen", 4)):
        assert eager.eval_sets(split, budget) == lazy.eval_sets(split, budget)
    # spread over the clients, not the first client's two: a and c give one each (b has none held out)
    assert eager.eval_sets("heldout", 2) == [(5.0, pick([6])), (3.0, pick([8]))]
    assert lazy.eval_sets("unseen", 3) == [(3.0, pick([9, 10])), (1.0, pick([12]))]
    assert lazy.eval_sets("unseen", 4) == [(3.0, pick([9, 10, 11])), (1.0, pick([12]))]
    loads.clear()
    c = lazy.train_client(2)
    assert loads == [] and c.client_id == "c" and c.num_examples == 2
    assert list(c.train) == pick([4, 5]) and c.heldout[-1] is examples[8] and loads == [4, 5, 8]
    with pytest.raises(IndexError):
        c.train[2]
    with pytest.raises(ValueError, match="same clients"):
        LazyFederation(ClientIndex.from_lists(ids, train_parts), ClientIndex.from_lists(ids[:2], held_parts[:2]),
                       ClientIndex.from_lists([], []), examples.__getitem__)


@given(st.lists(st.integers(0, 6), max_size=12), st.integers(-2, 60))
@settings(max_examples=200, deadline=None)
def test_spread_budget_is_round_robin(sizes, budget):
    """One example from every client in turn: the budget (or every example) is used, no client gives
    more than it has, and counts differ by at most one among clients that still had examples left,
    the extra one going to the earlier clients."""
    counts = spread_budget(sizes, budget)
    assert len(counts) == len(sizes) and sum(counts) == min(max(budget, 0), sum(sizes))
    assert all(0 <= c <= n for c, n in zip(counts, sizes))
    for i, (ci, ni) in enumerate(zip(counts, sizes)):
        if ci < ni:  # client i was not exhausted: nobody got more than one above it, only earlier ones one
            assert all(cj <= ci + (1 if j < i else 0) for j, cj in enumerate(counts))
