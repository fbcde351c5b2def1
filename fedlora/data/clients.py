"""The per-client data structure shared by every data source, and batching.

An example is a dict of three equally long 1-D int64 tensors: ``input_ids``,
``attention_mask`` and ``labels`` (-100 where no loss is taken). Labels are not
shifted: Hugging Face causal LMs shift them inside ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # what torch's cross-entropy and HF models skip

Example = dict[str, torch.Tensor]


def spread_budget(sizes: Sequence[int], budget: int) -> list[int]:
    """How many examples each client gives an evaluation of ``budget`` examples: one from every client in
    turn (round-robin, in data order) until the budget or the clients run out.

    An evaluation set drawn client by client from the front would score the first one or two clients
    only; spread like this it covers as many clients as the budget allows, each about equally.
    """
    counts = [0] * len(sizes)
    left = max(int(budget), 0)
    while left > 0:
        active = [j for j, n in enumerate(sizes) if counts[j] < n]
        if not active:
            break
        if left < len(active):  # the last partial turn: the first clients in data order
            for j in active[:left]:
                counts[j] += 1
            break
        # whole turns at once: as many as the budget and the smallest remaining client allow
        turns = min(min(sizes[j] - counts[j] for j in active), left // len(active))
        for j in active:
            counts[j] += turns
        left -= turns * len(active)
    return counts


@dataclass
class ClientDataset:
    """One federated client: its training examples and its held-out examples.

    ``num_examples`` (training examples) is the weight aggregation uses.
    Unseen clients (never trained on) keep all their data in ``heldout``.
    """

    client_id: str
    train: Sequence[Example]  # a list, or data.federation.LazyExamples (encoded when first read)
    heldout: Sequence[Example] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return len(self.train)

    @property
    def num_train_tokens(self) -> int:
        return sum(int(ex["attention_mask"].sum()) for ex in self.train)


@dataclass
class FederatedData:
    """Training clients plus clients held out entirely (to measure generalization)."""

    train_clients: list[ClientDataset]
    unseen_clients: list[ClientDataset] = field(default_factory=list)

    def client(self, client_id: str) -> ClientDataset:
        for c in self.train_clients + self.unseen_clients:
            if c.client_id == client_id:
                return c
        raise KeyError(client_id)

    # The federation interface a run uses (shared with data.federation.LazyFederation).
    @property
    def num_train_clients(self) -> int:
        return len(self.train_clients)

    @property
    def train_client_ids(self) -> list[str]:
        return [c.client_id for c in self.train_clients]

    def train_client(self, j: int) -> ClientDataset:
        return self.train_clients[j]

    def eval_sets(self, split: str, budget: int) -> list[tuple[float, list[Example]]]:
        """Up to ``budget`` evaluation examples spread over the clients (:func:`spread_budget`):
        (client size, examples) pairs in data order.

        "heldout": the held-out examples of training clients; "unseen": every
        example of the unseen clients.
        """
        if split not in ("heldout", "unseen"):
            raise ValueError(f"split must be 'heldout' or 'unseen', got {split!r}")
        clients = self.train_clients if split == "heldout" else self.unseen_clients
        pools = [list(c.heldout) if split == "heldout" else list(c.train) + list(c.heldout) for c in clients]
        counts = spread_budget([len(p) for p in pools], budget)
        return [(float(len(c.train) + len(c.heldout)), pool[:n])
                for c, pool, n in zip(clients, pools, counts) if n]


def make_example(input_ids: Sequence[int], labels: Sequence[int] | None = None) -> Example:
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    lab = ids.clone() if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
    if lab.shape != ids.shape:
        raise ValueError(f"labels length {lab.numel()} != input_ids length {ids.numel()}")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}


def lm_examples(token_ids: Sequence[int], seq_len: int, min_len: int = 2) -> list[Example]:
    """Cut one token stream into non-overlapping next-token examples of ``seq_len``.

    The tail shorter than ``seq_len`` is kept (collate pads it) unless it has fewer
    than ``min_len`` tokens: one token gives no next-token target.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    out = []
    for start in range(0, len(token_ids), seq_len):
        chunk = token_ids[start:start + seq_len]
        if len(chunk) >= min_len:
            out.append(make_example(chunk))
    return out


def split_indices(n: int, fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Seeded split of range(n) into (kept, held_out), both in original order.

    At least one item is held out when ``fraction > 0`` and n >= 2, so every
    training client can be evaluated; order is kept so text stays in sequence.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = max(k, 1)
    k = min(k, n - 1) if n >= 1 else 0
    held = set(rng.choice(n, size=k, replace=False).tolist()) if k else set()
    return [i for i in range(n) if i not in held], sorted(held)


def collate(examples: Sequence[Example], pad_token_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples into [B, L] tensors (padding: mask 0, label -100)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(int(ex["input_ids"].numel()) for ex in examples)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({length})")
        length = pad_to
    batch = len(examples)
    input_ids = torch.full((batch, length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = ex["input_ids"].numel()
        input_ids[row, :n] = ex["input_ids"]
        attention_mask[row, :n] = ex["attention_mask"]
        labels[row, :n] = ex["labels"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_clients(per_client: Sequence[Sequence[Example]], pad_token_id: int,
                    pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """One batch for many clients: client j's examples are rows seg_start_j.. of the batch.

    Returns collate()'s tensors plus ``seg_lens`` [num_clients] (rows per client,
    zeros allowed), the layout the segmented multi-adapter forward consumes.
    """
    flat = [ex for exs in per_client for ex in exs]
    out = collate(flat, pad_token_id, pad_to)
    out["seg_lens"] = torch.tensor([len(exs) for exs in per_client], dtype=torch.long)
    return out
