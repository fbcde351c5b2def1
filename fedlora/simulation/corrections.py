"""Client-side drift corrections, applied inside the batched trainer: FedProx and SCAFFOLD.

Both act on a client's trainable LoRA factors theta_k (A_k and B_k, or B_k alone when A is
frozen, e.g. FFA-LoRA), with theta_k^0 the factors the server sent it this round:

* FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020):
  client k minimises  f_k(theta) + mu/2 ||theta - theta_k^0||^2  (``prox_mu`` = mu), i.e. its
  gradient gains  mu (theta - theta_k^0).
* SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning", ICML 2020) with control variates in the same factor space: the server's c and
  client k's own c_k (zero at first). Every local step uses  g - c_k + c  in place of g, and
  after its K local steps the client sets (option II)

      c_k^+ = c_k - c + (theta_k^0 - theta_k^K) / (sum_s eta_s)

  (eta_s the step's learning rate: K eta_l with a constant one), sends Delta c_k = c_k^+ - c_k
  and keeps c_k^+; the server adds  (1/N) sum_{k in S} Delta c_k  to c (N clients in the
  federation, S the round's accepted ones; :meth:`fedlora.strategies.Strategy.update_controls`).
  With AdamW the corrected gradient feeds Adam's moments, and option II's difference quotient
  is the average step direction rather than the average gradient; with SGD both are the paper's.

The corrections are added to the packed gradients of every bank at once (rows of A, columns
of B belong to one client each), so each client's term reaches only its own adapter in the one
batched step, exactly as if it trained alone (``mode = "sequential"``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.bank import AdapterBank
from fedlora.strategies.scaffold import Controls

from .personal import PersonalStore


class GradientCorrections:
    """The per-client gradient terms of one round, packed like the banks (adapter k = client k).

    banks: the layers' banks, in the order of ``names``; prox_mu: FedProx's mu (0: off);
    controls: per client, c - c_k of every module (None: no SCAFFOLD; a None factor: none on it).
    """

    def __init__(self, banks: Sequence[AdapterBank], names: Sequence[str], prox_mu: float = 0.0,
                 controls: Sequence[Controls] | None = None):
        self.banks, self.prox_mu = list(banks), float(prox_mu)
        # theta^0 of every client, packed: the proximal term's centre
        self.start = [(b.A.detach().clone(), b.B.detach().clone()) for b in self.banks] if self.prox_mu else None
        self.shift = None
        if controls is not None:
            self.shift = []
            for bank, name in zip(self.banks, names):
                packed = []
                for i, (param, axis) in enumerate(((bank.A, 0), (bank.B, 1))):
                    parts = [c[name][i] for c in controls]
                    packed.append(None if any(p is None for p in parts) else torch.cat(parts, dim=axis).to(param))
                self.shift.append(tuple(packed))

    def __bool__(self) -> bool:
        return bool(self.prox_mu) or self.shift is not None

    @torch.no_grad()
    def add_to_grads(self) -> None:
        """grad += mu (theta - theta^0) + (c - c_k), on every factor that has a gradient."""
        for i, bank in enumerate(self.banks):
            for j, param in enumerate((bank.A, bank.B)):
                if param.grad is None:
                    continue
                if self.prox_mu:
                    param.grad.add_(param.detach() - self.start[i][j], alpha=self.prox_mu)
                if self.shift is not None and self.shift[i][j] is not None:
                    param.grad.add_(self.shift[i][j])


def _per_factor(fn, *controls: Controls) -> Controls:
    """fn(x, y, ...) on every module's A and B (None where the first has none)."""
    first = controls[0]
    return {name: tuple(None if first[name][i] is None else fn(*(c[name][i] for c in controls)) for i in range(2))
            for name in first}


def control_shift(server: Controls, own: Controls | None) -> Controls:
    """c - c_k per module (c_k = 0 where a client has none yet: a new client, a factor not yet trained)."""
    return server if own is None else _per_factor(lambda c, o: c if o is None else c - o.to(c), server, own)


def control_delta(server: Controls, start: Mapping[str, tuple], trained: Mapping[str, tuple],
                  lr_sum: float) -> Controls:
    """Delta c_k = c_k^+ - c_k = -c + (theta^0 - theta^K) / sum_s eta_s (option II), per module.

    start, trained: module -> (A, B, ...) the client started from and ended with.
    """
    moved = {name: tuple(start[name][i] - trained[name][i].to(start[name][i]) for i in range(2)) for name in server}
    return _per_factor(lambda c, m: m.to(c) / lr_sum - c, server, moved)


def fit(controls: Controls | None, ranks: Mapping[str, int]) -> Controls | None:
    """A client's c_k at the ranks it is served now: cut (a client that pruned its rank) or zero-padded."""
    if controls is None:
        return None
    out = {}
    for name, (a, b) in controls.items():
        r = ranks[name]
        a = None if a is None else torch.cat([a[:r], a.new_zeros(max(0, r - a.shape[0]), a.shape[1])])
        b = None if b is None else torch.cat([b[:, :r], b.new_zeros(b.shape[0], max(0, r - b.shape[1]))], dim=1)
        out[name] = (a, b)
    return out


def add(first: Controls | None, second: Controls) -> Controls:
    """first + second per module (first None: second); a factor either lacks is the other's."""
    if first is None:
        return second
    return {name: tuple(f if s is None else s if f is None else f.to(s) + s for f, s in zip(first[name], pair))
            for name, pair in second.items()}


def control_bytes(controls: Controls | None) -> int:
    """What a control variate (or its change) costs on the wire."""
    if controls is None:
        return 0
    return sum(t.numel() * t.element_size() for pair in controls.values() for t in pair if t is not None)



def load_controls(store: PersonalStore, client_id: str, round_idx: int) -> Controls | None:
    """Client ``client_id``'s c_k as it starts round ``round_idx`` (None: it has none yet)."""
    stored = store.load(client_id, round_idx)
    return None if stored is None else {name: (f.get("A"), f.get("B")) for name, f in stored.items()}


def save_controls(store: PersonalStore, client_id: str, round_idx: int, controls: Controls) -> None:
    """Keep the client's c_k^+ after round ``round_idx`` (on disk, per client and round)."""
    store.save(client_id, round_idx, {name: {f: t for f, t in zip("AB", pair) if t is not None}
                                      for name, pair in controls.items()})
