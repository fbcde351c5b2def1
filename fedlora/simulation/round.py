"""One federated round: the recipe ``fedlora simulate`` runs in-process and the Flower integration
runs over a Grid. Both call these functions, so the same settings give the same round:

1. :func:`sample` the round's clients (seeded by round);
2. :func:`start_factors` each at its own rank, with the run's alphas; the rule's
   ``client_base()`` (if any) is folded beside every client's base;
3. train locally (:func:`local_plan`, :func:`client_stream`; in one batched pass
   here, on its node under Flower) into a :func:`trained_update`, with FedProx's proximal
   term (``prox_mu``) and SCAFFOLD's correction (``scaffold``: the server's c goes down with
   the factors, :func:`control_shift_of` and :func:`control_step` run where the client trains,
   which keeps its own c_k and sends Delta c_k back);
4. ``strategy.aggregate`` the updates (and, with SCAFFOLD, ``strategy.update_controls`` with
   the accepted clients' Delta c_k) and write a :func:`round_record`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from fedlora.data import ClientDataset
from fedlora.federated.ranks import module_ranks
from fedlora.federated.rng import stable_seed
from fedlora.federated.update import ClientUpdate
from fedlora.strategies import AggregationResult, Strategy
from fedlora.strategies.base import merge_parts

from .config import SimConfig
from .corrections import (Controls, add, control_bytes, control_delta, control_shift, fit, load_controls,
                          save_controls)
from .personal import PersonalStore, keep_personal, with_personal, withhold
from .setup import lora_alpha
from .trainer import ExampleStream, FederatedModel, LocalPlan, train_clients

log = logging.getLogger("fedlora.simulate")

T = TypeVar("T")
UpdateHook = Callable[[ClientUpdate], ClientUpdate]


# ------------------------------------------------------------------ sampling
def num_sampled(cfg: SimConfig, available: int) -> int:
    """How many of ``available`` clients a round trains: a count, or a fraction when < 1 (at least 1)."""
    k = cfg.clients_per_round
    k = int(round(k * available)) if k < 1 else int(k)
    return max(1, min(k, available))


def sampling_note(cfg: SimConfig, available: int, unseen: int | None = None) -> str | None:
    """One line when clients_per_round asks for more clients than a round can have, saying what it trains."""
    k = cfg.clients_per_round
    if k < 1 or int(k) <= available:
        return None
    held = (f" ({unseen} more {'is' if unseen == 1 else 'are'} held out as unseen, for evaluation only)"
            if unseen else "")
    return (f"clients_per_round {k} is more than the {available} training clients{held}: "
            f"every round trains all {available}")


def sample(cfg: SimConfig, round_idx: int, population: Sequence[T]) -> list[T]:
    """The round's clients out of ``population`` (in its order), seeded by (seed, round)."""
    if not population:
        return []
    sampler = np.random.default_rng(stable_seed(cfg.seed, "sample", round_idx))
    picked = sampler.choice(len(population), size=num_sampled(cfg, len(population)), replace=False)
    return [population[i] for i in sorted(picked.tolist())]


# ------------------------------------------------------------ what is sent
def start_factors(cfg: SimConfig, strategy: Strategy, client_id: str, rank: int):
    """What a client of ``rank`` starts a round from: each module at its rank from cfg.rank_pattern,
    with the run's alphas (the same on one machine and on Flower)."""
    per_module = module_ranks(rank, strategy.module_shapes, cfg.rank_pattern)
    return strategy.distribute(rank, client_id=client_id, module_ranks=per_module,
                               alpha={n: lora_alpha(cfg, r) for n, r in per_module.items()})


def client_start(cfg: SimConfig, strategy: Strategy, client_id: str, rank: int, round_idx: int,
                 personal_store: PersonalStore | None):
    """What a client of ``rank`` trains from in round ``round_idx`` (from 0): :func:`start_factors` with its own
    ``strategy.personal`` factors from ``personal_store`` in place of the server's."""
    return with_personal(start_factors(cfg, strategy, client_id, rank), client_id, round_idx, strategy.personal,
                         personal_store, strategy.module_shapes)


def served_rank(factors) -> int:
    """A client's rank as served: its largest module rank (FedAvg's bucket mode may serve less than asked)."""
    return max(a.shape[0] for a, _, _ in factors.values())


def served_ranks(client_ids: Sequence[str], starts) -> dict[str, dict[str, int]]:
    """client id -> module -> the rank it was sent: what its upload must come back at."""
    return {cid: {name: a.shape[0] for name, (a, _, _) in start.items()} for cid, start in zip(client_ids, starts)}


def tensor_bytes(tensors) -> int:
    """Bytes of every tensor in an iterable (None entries, e.g. an absent dense part, count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def factor_bytes(factors, personal=()) -> int:
    """What a client receives: its starting A and B of every module, less the factors it keeps itself
    (``strategy.personal``: FedSA-LoRA's B never comes from the server)."""
    return tensor_bytes(t for a, b, _ in factors.values() for key, t in (("A", a), ("B", b)) if key not in personal)


def base_bytes(parts) -> int:
    """What a client receives of the rule's ``client_base()``: its dense parts and factors."""
    return tensor_bytes(t for part in (parts or {}).values() for t in part)


def upload_bytes(update: ClientUpdate, uploaded) -> int:
    """What a client uploads: the factors the rule takes back this round (``strategy.uploaded_at``); a frozen
    factor (FFA-LoRA's A, RoLoRA's of the round) is the server's own and not counted."""
    return tensor_bytes(t for a, b, _ in update.modules.values()
                        for key, t in (("A", a), ("B", b)) if key in uploaded)


# ------------------------------------------------------------- local training
def local_steps(cfg: SimConfig, num_examples: int) -> int:
    if cfg.local_epochs > 0:
        return max(1, math.ceil(cfg.local_epochs * num_examples / cfg.batch_size))
    return cfg.local_steps


def local_plan(cfg: SimConfig, clients, train_A: bool, train_B: bool = True, rule: Strategy | None = None,
               ranks: Sequence[int] = (), controls: list[Controls] | None = None) -> LocalPlan:
    """The local training of ``clients`` in a round: each its own steps, the run's optimizer and schedule,
    the factors the rule trains this round (``strategy.trainable_at``), the rule's local penalty
    (``rule.local_penalty``) for client k at ``ranks[k]``, FedProx's ``cfg.prox_mu`` and SCAFFOLD's
    ``controls`` (client k's c - c_k, :func:`control_shift_of`)."""
    if not (train_A or train_B):
        raise ValueError("a round must train A, B or both")
    penalty = None
    if rule is not None and ranks:
        def penalty(k, factors):
            return rule.local_penalty(factors, ranks[k])
    return LocalPlan(steps=[local_steps(cfg, c.num_examples) for c in clients], batch_size=cfg.batch_size,
                     lr=cfg.lr, lr_schedule=cfg.lr_schedule, optimizer=cfg.optimizer,
                     weight_decay=cfg.weight_decay, momentum=cfg.momentum, batched=cfg.mode == "batched",
                     train_A=train_A, train_B=train_B, penalty=penalty, prox_mu=cfg.prox_mu, controls=controls)


def client_stream(cfg: SimConfig, round_idx: int, client: ClientDataset) -> ExampleStream:
    """A client's data order in a round: seeded by (seed, round, client), wherever it trains."""
    return ExampleStream(client.train, stable_seed(cfg.seed, "data", round_idx, client.client_id))


def trained_update(cfg: SimConfig, fm: FederatedModel, k: int, client: ClientDataset, start, losses,
                   rule: Strategy | None = None, state: dict | None = None) -> ClientUpdate:
    """Client k's update after local training from ``start``, with its mean training loss, as the
    client uploads it: ``rule.prune_update`` may shrink it (HetLoRA's rank self-pruning), reading and
    updating the client's own ``state`` across rounds."""
    alpha_of = {name: f[2] for name, f in start.items()}
    update = ClientUpdate(client.client_id, client.num_examples, served_rank(start), fm.client_factors(k, alpha_of),
                          use_rslora=cfg.use_rslora,
                          metrics={"train_loss": float(np.mean(losses)) if losses else float("nan")})
    return update if rule is None else rule.prune_update(update, state if state is not None else {})


# ------------------------------------------------------------------ SCAFFOLD
def start_ranks(start) -> dict[str, int]:
    """module -> the rank a client's starting factors have."""
    return {name: a.shape[0] for name, (a, _, _) in start.items()}


def control_shift_of(sent: Controls, own: Controls | None, start) -> Controls:
    """c - c_k at the ranks of ``start``: what SCAFFOLD adds to the client's gradients this round."""
    return control_shift(sent, fit(own, start_ranks(start)))


def control_step(sent: Controls, own: Controls | None, start, trained, lr_sum: float) -> tuple[Controls, Controls]:
    """(Delta c_k, c_k^+) after local training from ``start`` to ``trained`` (option II)."""
    delta = control_delta(sent, start, trained, lr_sum)
    return delta, add(fit(own, start_ranks(start)), delta)


def outgoing_update(update: ClientUpdate, round_idx: int, personal, uploaded,
                    store: PersonalStore | None) -> ClientUpdate:
    """What a client sends after training: its ``personal`` factors stored (``store``) for its next
    round, and zeroed in the update unless the rule takes them back this round (``uploaded``)."""
    keep_personal(update, round_idx, personal, store)
    return withhold(update, [f for f in personal if f not in uploaded])


# ------------------------------------------------------------------ records
def round_record(round_idx: int, clients: Sequence[str], ranks: Sequence[int], trained_ranks: Sequence[int],
                 updates: Sequence[ClientUpdate], result: AggregationResult, rejected: Mapping[str, str],
                 bytes_up: int, bytes_down: int, bytes_down_global: int = 0) -> dict:
    """The metrics line of a round (metrics.jsonl), the same keys in simulate and on Flower.

    bytes_down counts the factors each client gets, bytes_down_global the rule's ``client_base()``
    parts sent along to every sampled client (FLoRA's accumulated update, FedEx-LoRA's residual).
    ``round_idx`` counts from 0 and seeds the round; the record's ``round`` counts from 1, as every
    output does (round 0 is the base model before training).

    train_loss is the mean of the accepted clients' training losses weighted by their examples.
    ``rejected`` holds the reasons found before aggregation; the rule's own rejections are added.
    """
    accepted = [u for u in updates if u.client_id in result.accepted]
    losses = [u.metrics.get("train_loss", math.nan) for u in accepted]
    weights = [u.num_examples for u in accepted]
    return {
        "round": round_idx + 1,
        "clients": list(clients),
        "ranks": list(ranks),
        "trained_ranks": list(trained_ranks),
        "accepted": result.accepted,
        "rejected": {**rejected, **result.rejected},
        "state_changed": result.changed,
        "train_loss": float(np.average(losses, weights=weights)) if accepted else float("nan"),
        # Each client's own mean training loss (a breakdown by rank reads it beside "ranks").
        "client_train_loss": {u.client_id: u.metrics.get("train_loss", math.nan) for u in updates},
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_down_global": bytes_down_global,
    }


def aggregate_round(cfg: SimConfig, strategy: Strategy, round_idx: int, updates: list[ClientUpdate],
                    served: Mapping[str, Mapping[str, int]], deltas: Mapping[str, Controls], num_clients: int,
                    rejected: dict[str, str]) -> AggregationResult:
    """``strategy.aggregate`` the updates; with SCAFFOLD, first drop a client whose Delta c_k is malformed
    (its reason into ``rejected``; ``updates`` is filtered in place) and then add the accepted clients'
    Delta c_k to the server's c."""
    factors = strategy.uploaded_at(round_idx)
    if cfg.scaffold:
        for cid in [u.client_id for u in updates]:
            reason = strategy.control_problem(deltas.get(cid), served.get(cid), factors) if cid in deltas else \
                "no control variate change (SCAFFOLD) in the upload"
            if reason is not None:
                rejected[cid] = f"control variate: {reason}"
        updates[:] = [u for u in updates if u.client_id not in rejected]
    result = strategy.aggregate(updates, served=served)
    if cfg.scaffold and result.changed:
        strategy.update_controls({cid: deltas[cid] for cid in result.accepted}, served, num_clients, factors)
    return result


# -------------------------------------------------------- the in-process round
def run_round(cfg: SimConfig, round_idx: int, fm: FederatedModel, strategy: Strategy,
              sampled: Sequence[ClientDataset], rank_of: Mapping[str, int], pad_id: int,
              update_hook: UpdateHook | None = None, progress: Callable[[int], None] | None = None,
              client_state: dict[str, dict] | None = None, control_store: PersonalStore | None = None,
              personal_store: PersonalStore | None = None) -> dict:
    """Train ``sampled`` clients of the round in one batched pass, aggregate, return the round record.

    client_state: each client's own memory across rounds (client id -> JSON-able dict), read and
    updated by the rule's client-side hooks; the caller keeps it (and checkpoints it).
    The record's ``self_pruned`` (when any) maps a client to the smaller rank it uploaded and trains at from now on.
    control_store: with ``cfg.scaffold``, where each client keeps its own c_k (per client and round, on
    disk), read and written here for every client that trains, as the client itself would; N is
    ``len(rank_of)``.
    personal_store: where clients keep the rule's personal factors across rounds (``strategy.personal``).
    """
    client_state = {} if client_state is None else client_state
    if cfg.scaffold and control_store is None:
        raise ValueError("scaffold: the clients need a control_store for their own c_k")
    ids = [c.client_id for c in sampled]
    own = {cid: load_controls(control_store, cid, round_idx) for cid in ids} if cfg.scaffold else {}
    ranks = [rank_of[c] for c in ids]
    starts = [client_start(cfg, strategy, cid, r, round_idx, personal_store) for cid, r in zip(ids, ranks)]
    fm.load_clients(starts)
    base = strategy.client_base()
    fm.set_deltas(merge_parts(base) if base else None)
    streams = [client_stream(cfg, round_idx, c) for c in sampled]
    trainable = strategy.trainable_at(round_idx)
    # SCAFFOLD: c on the factors the round's clients send back, at each client's ranks
    sent = [strategy.server_controls(start_ranks(s), strategy.uploaded_at(round_idx)) for s in starts] \
        if cfg.scaffold else None
    shifts = None if sent is None else [control_shift_of(c, own[cid], s)
                                        for c, cid, s in zip(sent, ids, starts)]
    plan = local_plan(cfg, sampled, train_A="A" in trainable, train_B="B" in trainable, rule=strategy,
                      ranks=[served_rank(f) for f in starts], controls=shifts)
    losses = train_clients(fm, sampled, streams, plan, pad_id, progress=progress)

    updates, failed, deltas = [], {}, {}
    bytes_up = 0
    bytes_down = sum(factor_bytes(s, strategy.personal) + control_bytes(None if sent is None else sent[k])
                     for k, s in enumerate(starts))
    uploaded = strategy.uploaded_at(round_idx)
    for k, client in enumerate(sampled):
        if sent is not None:  # the client's own SCAFFOLD step: it keeps c_k^+ and sends Delta c_k
            trained = fm.client_factors(k, {n: f[2] for n, f in starts[k].items()})
            deltas[client.client_id], kept = control_step(sent[k], own[client.client_id], starts[k], trained,
                                                          plan.lr_sum(k))
            save_controls(control_store, client.client_id, round_idx, kept)
        update = trained_update(cfg, fm, k, client, starts[k], losses[k], strategy,
                                client_state.setdefault(client.client_id, {}))
        update = outgoing_update(update, round_idx, strategy.personal, uploaded, personal_store)
        try:
            if update_hook is not None:
                update = update_hook(update)
        except Exception as exc:  # one client's crash must not stop the round
            failed[client.client_id] = f"client crashed: {type(exc).__name__}: {exc}"
            log.warning("round %d: %s", round_idx, failed[client.client_id])
            continue
        bytes_up += upload_bytes(update, uploaded) + control_bytes(deltas.get(client.client_id))
        updates.append(update)
    served = served_ranks(ids, starts)
    result = aggregate_round(cfg, strategy, round_idx, updates, served, deltas, len(rank_of), failed)
    record = round_record(round_idx, ids, ranks, [served_rank(f) for f in starts], updates, result, failed,
                          bytes_up, bytes_down, base_bytes(base) * len(sampled))
    trained_at = {c: served_rank(f) for c, f in zip(ids, starts)}
    pruned = {u.client_id: u.rank for u in updates if u.rank != trained_at[u.client_id]}
    if pruned:
        record["self_pruned"] = pruned
    return record
