"""A federation whose clients exist only as record indices until they are sampled.

FlexLoRA's setting has 1,600+ clients and a round samples a handful. Holding
every client's tokenized examples costs memory and set-up time in the number of
clients that exist; here a client is a slice of an index array (CSR layout:
``indptr`` into ``records``), and its examples are read and tokenized when a
round asks for them, one by one (``LazyExamples``). What stays in memory for the
whole run is two integer arrays the size of the data set and the client ids.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .clients import ClientDataset, Example, spread_budget


@dataclass(frozen=True)
class ClientIndex:
    """Clients as record-index lists: client j owns ``records[indptr[j]:indptr[j + 1]]``."""

    ids: Sequence[str]
    indptr: np.ndarray
    records: np.ndarray

    def __post_init__(self):
        if self.indptr.ndim != 1 or len(self.indptr) != len(self.ids) + 1 or self.indptr[0] != 0:
            raise ValueError(f"indptr must have len(ids) + 1 = {len(self.ids) + 1} entries starting at 0")
        if np.any(np.diff(self.indptr) < 0) or self.indptr[-1] != len(self.records):
            raise ValueError("indptr must be non-decreasing and end at len(records)")

    @classmethod
    def from_lists(cls, ids: Sequence[str], parts: Sequence[Sequence[int]]) -> ClientIndex:
        if len(ids) != len(parts):
            raise ValueError(f"{len(ids)} ids for {len(parts)} record lists")
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        indptr = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(sizes, out=indptr[1:])
        records = np.fromiter((r for p in parts for r in p), dtype=np.int64, count=int(indptr[-1]))
        return cls(list(ids), indptr, records)

    def __len__(self) -> int:
        return len(self.ids)

    def size(self, j: int) -> int:
        return int(self.indptr[j + 1] - self.indptr[j])

    def records_of(self, j: int) -> np.ndarray:
        return self.records[self.indptr[j]:self.indptr[j + 1]]


class LazyExamples(Sequence):
    """A client's examples, each read and encoded on first access (then kept while the client object lives)."""

    def __init__(self, records: np.ndarray, load: Callable[[int], Example]):
        self._records, self._load, self._cache = records, load, {}

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # bounds check and negative indices, as a list
        if i not in self._cache:
            self._cache[i] = self._load(int(self._records[i]))
        return self._cache[i]

    def __eq__(self, other):
        return list(self) == list(other) if isinstance(other, (list, LazyExamples)) else NotImplemented


@dataclass
class LazyFederation:
    """Training clients (train and held-out records) and unseen clients (all held out), loaded on demand.

    ``load(record)`` reads and encodes one record: the only place data is touched.
    ``heldout`` has the same clients in the same order as ``train``.
    """

    train: ClientIndex
    heldout: ClientIndex
    unseen: ClientIndex
    load: Callable[[int], Example]
    metadata: dict[str, Any] = field(default_factory=dict)
    _eval_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if list(self.train.ids) != list(self.heldout.ids):
            raise ValueError("train and heldout must index the same clients in the same order")

    @property
    def num_train_clients(self) -> int:
        return len(self.train)

    @property
    def train_client_ids(self) -> Sequence[str]:
        return self.train.ids

    def train_client(self, j: int) -> ClientDataset:
        """Training client j as a ClientDataset whose examples are encoded when first used."""
        return ClientDataset(self.train.ids[j], LazyExamples(self.train.records_of(j), self.load),
                             LazyExamples(self.heldout.records_of(j), self.load),
                             {"records": self.train.size(j) + self.heldout.size(j)})

    def eval_sets(self, split: str, budget: int) -> list[tuple[float, list[Example]]]:
        """Up to ``budget`` evaluation examples spread over the clients (:func:`spread_budget`):
        (client size, examples) pairs in data order.

        ``split``: "heldout" (held-out records of training clients) or "unseen"
        (every record of the unseen clients). Encoded once and kept: the same
        examples score every round.
        """
        if split not in ("heldout", "unseen"):
            raise ValueError(f"split must be 'heldout' or 'unseen', got {split!r}")
        key = (split, budget)
        if key not in self._eval_cache:
            index = self.heldout if split == "heldout" else self.unseen
            counts = spread_budget([index.size(j) for j in range(len(index))], budget)
            self._eval_cache[key] = [
                (float(index.size(j) + (self.train.size(j) if split == "heldout" else 0)),
                 [self.load(int(r)) for r in index.records_of(j)[:n]])
                for j, n in enumerate(counts) if n]
        return self._eval_cache[key]
