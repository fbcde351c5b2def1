"""The shared client structure: chunking, held-out splits, batching."""
import numpy as np
import pytest
import torch

from fedlora.data import IGNORE_INDEX, ClientDataset, collate, collate_clients, lm_examples, make_example
from fedlora.data.clients import split_indices


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
