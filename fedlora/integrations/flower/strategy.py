"""A Flower Strategy (Message API, flwr >= 1.41) that runs any fedlora strategy.

Flower's stock strategies average arrays of one shape; federated LoRA with
heterogeneous ranks needs each node to get factors of its own rank and the
server to aggregate factors of different shapes. :class:`FedLoRAStrategy` does
what ``fedlora simulate`` does per round, over a Flower Grid:

1. learn who the nodes are (a ``query`` message: client id, rank, module
   shapes), once per node, and build the fedlora strategy from that; a node whose
   module shapes are not the model's (derived on the server from the model's config,
   :func:`~fedlora.simulation.setup.model_module_shapes`) is left out with a reason;
2. sample nodes as simulate samples clients (seeded by round; the same clients
   when every client has a node);
3. send each node ``strategy.distribute(...)`` at the node's rank (with SCAFFOLD also
   the server's control variate c at that rank; the node keeps its own c_k in its
   Flower context and sends back Delta c_k);
4. decode every reply (a ClientUpdate safetensors blob), reject malformed ones
   with a reason, note nodes that failed or never answered, and aggregate the
   rest with ``strategy.aggregate`` (which validates each update; SCAFFOLD's
   accepted Delta c_k then go into c);
5. record the round (accepted, rejected with reasons, missing nodes, bytes up and
   down) and, with an ``output_dir``, write ``metrics.jsonl`` and the strategy
   state after every round (and ``progress.json``, the nodes a round waits for,
   when it starts).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedlora.federated.update import atomic_write
from fedlora.simulation import reporting
from fedlora.simulation.config import InputError, SimConfig
from fedlora.simulation.export import export_peft_adapter
from fedlora.simulation.corrections import control_bytes
from fedlora.simulation.round import (aggregate_round, base_bytes, factor_bytes, round_record, sample,
                                      sampling_note, served_rank, served_ranks, start_factors, start_ranks,
                                      upload_bytes)
from fedlora.simulation.setup import make_strategy, model_module_shapes
from fedlora.strategies import Strategy, registry

from .config import FlowerSettings
from .grid import DepartureAwareGrid
from .wire import (
    NodeProfile,
    decode_profile,
    decode_controls,
    decode_reply,
    global_arrays,
    encode_train,
    error_reason,
    guarded,
    payload_bytes,
)

log = logging.getLogger("fedlora.flower")

NO_PROFILE = "no profile reply"  # the reason of a node that has not answered its profile query in time
StrategyFactory = Callable[[dict[str, tuple[int, int]], list[int]], Strategy]
STATE_STYPE = "fedlora.strategy"  # an Array whose data is Strategy.to_bytes()


class FedLoRAStrategy(FlowerStrategy):
    """Wraps a fedlora :class:`~fedlora.strategies.Strategy` as a Flower strategy.

    strategy: an initialised fedlora strategy, or a factory
        ``(module_shapes, ranks) -> Strategy`` called once the nodes' profiles are
        known (ranks: one per node, in client order).
    cfg: the run's settings (seed, clients_per_round, alphas, rank_pattern;
        the local-training ones are the nodes').
    output_dir: where metrics.jsonl and strategy.safetensors are rewritten
        after every round (None: keep them in memory only).
    module_shapes: name -> (d_out, d_in) of the model's adapted layers, what every profile must
        name (None: a given strategy's, else the first usable profile's).
    """

    def __init__(self, strategy: Strategy | StrategyFactory, cfg: SimConfig | None = None,
                 settings: FlowerSettings | None = None, *, output_dir: str | Path | None = None,
                 module_shapes: Mapping[str, tuple[int, int]] | None = None):
        self.cfg = cfg if cfg is not None else SimConfig()
        self.settings = settings if settings is not None else FlowerSettings()
        if isinstance(strategy, Strategy):
            self.strategy, self._factory = strategy, None
        elif callable(strategy):
            self.strategy, self._factory = None, strategy
        else:
            raise TypeError(f"strategy must be a fedlora Strategy or a factory, got {type(strategy).__name__}")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.model_shapes = None if module_shapes is None else dict(module_shapes)
        self.profiles: dict[int, NodeProfile] = {}  # node id -> profile
        self.node_errors: dict[int, str] = {}  # nodes left out of the run, with the reason
        self._asked: dict[int, tuple[str, float]] = {}  # node id -> (profile query id, when sent): not answered yet
        self.history: list[dict] = []  # one record per round, as simulate's metrics.jsonl
        self.totals = {"bytes_up": 0, "bytes_down": 0, "bytes_down_global": 0}
        self._sent: dict[int, tuple[NodeProfile, int]] = {}  # this round: node id -> (profile, served rank)
        self._train_messages: list[Message] = []
        self._served: dict[str, dict[str, int]] = {}  # this round: client id -> module -> rank sent
        self._round: dict = {}
        self._connected: set[int] = set()  # profiled nodes connected at the last round's start
        self._noted_sampling = False

    @classmethod
    def from_config(cls, cfg: SimConfig, settings: FlowerSettings | None = None, *,
                    output_dir: str | Path | None = None) -> FedLoRAStrategy:
        """The strategy ``cfg`` names, built as ``fedlora simulate`` builds it once the nodes' ranks are known.

        The model's adapted shapes come from its config (no weights); when that cannot be had here (a
        model only the nodes hold, a GGUF file not converted on this machine), the first usable
        profile defines them, as a log line says.
        """
        if not registry.lookup(cfg.strategy).has_global_model:
            raise InputError(f"config: strategy {cfg.strategy!r} shares nothing between clients, so there is no "
                             "federation to run on Flower; run it with fedlora simulate")
        try:
            model_shapes = model_module_shapes(cfg)
            why = "its config is not at hand without converting the GGUF file first"
        except Exception as exc:  # noqa: BLE001 (any failure: fall back, the nodes load the model themselves)
            model_shapes, why = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        if model_shapes is None:
            log.warning("cannot derive the adapted module shapes of model %s on the server (%s); the first usable "
                        "node profile defines them", cfg.model, why)
        else:
            log.info("module shapes from model %s: %d adapted layers; a profile must name exactly these",
                     cfg.model, len(model_shapes))
        return cls(lambda shapes, ranks: make_strategy(cfg, shapes, ranks, "cpu"), cfg, settings,
                   output_dir=output_dir, module_shapes=model_shapes)

    # ------------------------------------------------------------- Flower API
    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args, **kwargs):
        """Flower's round loop, over a Grid that stops waiting for nodes that left (see DepartureAwareGrid)."""
        return super().start(DepartureAwareGrid(grid), initial_arrays, *args, **kwargs)

    def summary(self) -> None:
        name = self.strategy.name if self.strategy is not None else self.cfg.strategy
        log.info("fedlora %s: %s clients per round, seed %d, round timeout %.0f s", name,
                 self.cfg.clients_per_round, self.cfg.seed, self.settings.round_timeout_s)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        started = time.perf_counter()
        self._report_departures(server_round, set(grid.get_node_ids()))  # before a returning node takes over
        self._discover(grid)
        round_idx = server_round - 1  # rounds are numbered from 1 (Flower's and fedlora's); seeds use the index
        connected = set(grid.get_node_ids())
        population = sorted((p for n, p in self.profiles.items() if n in connected), key=lambda p: p.client_index)
        self._connected = {p.node_id for p in population}
        if not self._noted_sampling:
            self._noted_sampling = True
            note = sampling_note(self.cfg, len(population))
            if note is not None:
                log.warning("%s (nodes connected now)", note)
        picked = self.sample(round_idx, population)
        strategy = self.strategy
        # Rules whose clients train on top of a base delta (FLoRA) send it along as its parts (low-rank
        # factors while they are smaller than a dense matrix), built once per round and shared by all.
        parts = strategy.client_base() or {}
        deltas = global_arrays(parts) if parts else None
        delta_bytes = base_bytes(parts)
        trainable = strategy.trainable_at(round_idx)
        messages, self._sent, self._served, not_started = [], {}, {}, {}
        bytes_down = payload_down = 0
        for profile in picked:
            try:
                factors = start_factors(self.cfg, strategy, profile.client_id, profile.rank)
            except ValueError as exc:  # e.g. a rank the strategy cannot serve
                not_started[profile.client_id] = f"not started: {exc}"
                continue
            # SCAFFOLD: the server's c at the node's ranks goes with the factors (the node keeps its own c_k)
            controls = (strategy.server_controls(start_ranks(factors), strategy.uploaded_at(round_idx))
                        if self.cfg.scaffold else None)
            content = encode_train(round_idx, server_round, profile.client_id, factors, deltas,
                                   "A" in trainable, train_B="B" in trainable, controls=controls,
                                   personal=strategy.personal, upload=strategy.uploaded_at(round_idx))
            messages.append(Message(content, dst_node_id=profile.node_id, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
            # FedAvg's bucket mode may serve less than asked; the client's rank is its largest module rank.
            self._sent[profile.node_id] = (profile, served_rank(factors))
            self._served.update(served_ranks([profile.client_id], [factors]))
            bytes_down += factor_bytes(factors, strategy.personal) + control_bytes(controls)
            payload_down += payload_bytes(content)
        self._round = {"round": round_idx, "server_round": server_round, "started": started,
                       "not_started": not_started, "bytes_down": bytes_down,
                       "bytes_down_global": delta_bytes * len(messages), "payload_bytes_down": payload_down,
                       "available": [p.client_id for p in population]}
        log.info("round %d: %d of %d nodes sampled", server_round, len(picked), len(population))
        if self.output_dir is not None:  # what the round waits for, while it waits (a round can take hours)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output_dir / "progress.json", json.dumps({
                "round": server_round, "waiting_for": {p.client_id: node for node, (p, _) in self._sent.items()},
                "not_started": not_started, "rounds_done": len(self.history)}).encode())
        self._train_messages = messages  # Flower sets their ids when it pushes them
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        info = self._round
        by_node: dict[int, Message] = {}
        # A reply names the message it answers; the SuperLink's own error replies (a node that stopped
        # sending heartbeats) come from the SuperLink, not the node, so the id is what finds the node.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self._train_messages
                   if m.metadata.message_id}
        for msg in replies:
            node_id = node_of.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
            if node_id in self._sent:
                by_node[node_id] = msg
            else:
                log.warning("round %d: ignoring a reply from node %d, which was not sent work", server_round, node_id)
        updates, rejected, missing, control_deltas = [], dict(info["not_started"]), {}, {}
        bytes_up = payload_up = 0
        for node_id, (profile, _) in sorted(self._sent.items(), key=lambda kv: kv[1][0].client_index):
            cid, msg = profile.client_id, by_node.get(node_id)
            if msg is None:
                missing[cid] = f"node {node_id}: no reply (node lost, crashed, or slower than the round timeout)"
            elif msg.has_error():
                missing[cid] = f"node {node_id} failed: {error_reason(msg)}"
            else:
                payload_up += payload_bytes(msg.content)
                # the model's shapes at the ranks sent bound what is read, before any tensor is
                limits = {n: (*self.strategy.module_shapes[n], r) for n, r in self._served[cid].items()}
                update, reason = guarded(decode_reply, msg.content, limits)
                if reason is not None:
                    rejected[cid] = f"malformed reply from node {node_id}: {reason}"
                    continue
                if update.client_id != cid:
                    rejected[cid] = f"node {node_id} holds client {cid!r} but sent an update of {update.client_id!r}"
                    continue
                if self.cfg.scaffold:  # Delta c_k beside the update; its form and shapes are checked below
                    delta, reason = guarded(decode_controls, msg.content, limits)
                    if reason is not None:
                        rejected[cid] = f"malformed reply from node {node_id}: {reason}"
                        continue
                    if delta is not None:
                        control_deltas[cid] = delta
                bytes_up += (upload_bytes(update, self.strategy.uploaded_at(info["round"]))
                             + control_bytes(control_deltas.get(cid)))
                updates.append(update)
        for cid, reason in missing.items():
            log.warning("round %d: client %s missing: %s", server_round, cid, reason)
        # validates each update (against the ranks each node was sent; with SCAFFOLD its Delta c_k too);
        # bad ones come back with a reason
        num_clients = max(p.num_clients for p, _ in self._sent.values()) if self._sent else 1
        result = aggregate_round(self.cfg, self.strategy, info["round"], updates, self._served, control_deltas,
                                 num_clients, rejected)
        self._follow_pruned_ranks(updates)
        sent = sorted(self._sent.values(), key=lambda v: v[0].client_index)
        self.totals["bytes_up"] += bytes_up
        self.totals["bytes_down"] += info["bytes_down"]
        self.totals["bytes_down_global"] += info["bytes_down_global"]
        record = round_record(info["round"], [p.client_id for p, _ in sent], [p.rank for p, _ in sent],
                              [served for _, served in sent], updates, result, rejected, bytes_up,
                              info["bytes_down"], info["bytes_down_global"])
        rejected, train_loss = record["rejected"], record["train_loss"]
        pruned = {u.client_id: u.rank for u in updates if u.rank != self._served_of(u.client_id)}
        if pruned:
            record["self_pruned"] = pruned
        record.update({
            "available": info["available"],  # clients whose node was connected (simulate samples from them)
            "nodes": {p.client_id: p.node_id for p, _ in sent},
            "missing": missing,
            "payload_bytes_up": payload_up,
            "payload_bytes_down": info["payload_bytes_down"],
            "wall_time_s": round(time.perf_counter() - info["started"], 3),
            **{f"total_{k}": v for k, v in self.totals.items()},
        })
        self.history.append(record)
        self._write_round()
        metrics = {"accepted": len(result.accepted), "rejected": len(rejected), "missing": len(missing),
                   "bytes-up": bytes_up, "bytes-down": info["bytes_down"]}
        if math.isfinite(train_loss):
            metrics["train-loss"] = train_loss
        arrays = None
        if result.changed:
            blob = self.strategy.to_bytes()
            arrays = ArrayRecord({"state": Array(dtype="uint8", shape=(len(blob),), stype=STATE_STYPE, data=blob)})
        return arrays, MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # no federated evaluation round (yet): the exported adapter is evaluated offline

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # --------------------------------------------------------------- helpers
    def sample(self, round_idx: int, population: list[NodeProfile]) -> list[NodeProfile]:
        """``fedlora simulate``'s sampling over the available nodes (in client order), seeded by round."""
        return sample(self.cfg, round_idx, population)

    def _served_of(self, client_id: str) -> int:
        return next(served for p, served in self._sent.values() if p.client_id == client_id)

    def _follow_pruned_ranks(self, updates) -> None:
        """A node that uploaded a smaller rank than served (HetLoRA's self-pruning) trains at it from now on."""
        by_client = {p.client_id: node for node, (p, _) in self._sent.items()}
        for u in updates:
            node = by_client[u.client_id]
            profile, served = self._sent[node]
            if u.rank != served and node in self.profiles:
                self.profiles[node] = dataclasses.replace(profile, rank=u.rank)

    def _report_departures(self, server_round: int, connected: set[int]) -> None:
        """Log each profiled node that was connected at the last round's start and is gone now."""
        for node_id in sorted(self._connected - connected):
            profile = self.profiles.get(node_id)
            client = f" (client {profile.client_id})" if profile is not None else ""
            log.warning("round %d: node %d%s left the federation; its client is not sampled until a node "
                        "holding it connects again", server_round, node_id, client)

    def _discover(self, grid: Grid) -> None:
        """Ask nodes not seen before for their profile and take in the answers that have come.

        Queries are pushed once and their replies pulled whenever they come, so a node
        whose ClientApp starts slowly joins the first round after its answer arrives. Before
        round 1 this waits for the nodes expected: until each has answered or been left out,
        for at most ``node_wait_s`` for nodes to connect and ``node_start_timeout_s`` for a
        connected node to answer. Later rounds never wait here.
        """
        first = self.strategy is None or not self.profiles
        connect_deadline = time.monotonic() + (self.settings.node_wait_s if first else 0.0)
        while True:
            connected = set(grid.get_node_ids())
            self._ask(grid, [n for n in sorted(connected) if n not in self.profiles and n not in self._asked
                             and n not in self.node_errors])
            self._collect(grid, connected)
            now = time.monotonic()
            starting = [n for n, (_, sent) in self._asked.items()
                        if n not in self.node_errors and now - sent < self.settings.node_start_timeout_s]
            for node_id, (_, sent) in self._asked.items():
                if node_id not in starting and node_id not in self.node_errors:
                    self._leave_out(node_id, NO_PROFILE, f"no profile reply within {self.settings.node_start_timeout_s:g} "
                                    "s; it joins the first round after it answers")
            expected = self.settings.min_nodes or max([p.num_partitions for p in self.profiles.values()] + [1])
            # Nodes left out count as arrived: waiting longer would not bring them back.
            if not first or len(self.profiles) + len(self.node_errors) >= expected or (
                    now >= connect_deadline and not starting):
                break
            time.sleep(0.2)  # the Grid has no blocking receive; Flower's own send_and_receive polls too
        if not self.profiles:
            raise RuntimeError(f"no node answered with a usable profile within {self.settings.node_wait_s} s; "
                               f"left out: {self.node_errors}")
        if self.strategy is None:
            ordered = sorted(self.profiles.values(), key=lambda p: p.client_index)
            self.strategy = self._factory(dict(self.model_shapes or ordered[0].module_shapes),
                                          [p.rank for p in ordered])
            log.info("fedlora %s built for %d nodes, ranks %s", self.strategy.name, len(ordered),
                     [p.rank for p in ordered])

    def _ask(self, grid: Grid, node_ids: list[int]) -> None:
        if not node_ids:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        now = time.monotonic()
        for node_id, message_id in zip(node_ids, grid.push_messages(messages)):
            self._asked[node_id] = (message_id, now)

    def _collect(self, grid: Grid, connected: set[int]) -> None:
        """Take in the profile replies that have arrived (each node's data behind one guard)."""
        if not self._asked:
            return
        node_of = {message_id: node_id for node_id, (message_id, _) in self._asked.items()}
        for reply in grid.pull_messages(list(node_of)):
            node_id = node_of.get(reply.metadata.reply_to_message_id)
            if node_id is None:
                continue
            del self._asked[node_id]
            profile, reason = guarded(decode_profile, reply)
            if profile is not None:
                # A restarted SuperNode comes back under a new id: it takes its client over from the old one.
                for old in [n for n, p in self.profiles.items() if p.client_id == profile.client_id]:
                    if old not in connected:
                        del self.profiles[old]
                reason = self._profile_problem(profile)
            if reason is None:
                if self.node_errors.pop(node_id, None) is not None:
                    log.warning("node %d answered its profile query late; it joins from the next round", node_id)
                self.profiles[node_id] = profile
            else:
                self.node_errors.pop(node_id, None)
                self._leave_out(node_id, reason, reason)

    def _leave_out(self, node_id: int, reason: str, console: str) -> None:
        """Record why a node is out of the run and say so on the console (not only in nodes.json)."""
        self.node_errors[node_id] = reason
        log.warning("node %d left out: %s", node_id, console)

    def _profile_problem(self, profile: NodeProfile) -> str | None:
        shapes = self.strategy.module_shapes if self.strategy is not None else self.model_shapes or next(
            (p.module_shapes for p in self.profiles.values()), profile.module_shapes)
        if profile.module_shapes != shapes:
            return _shapes_differ(profile.module_shapes, shapes)
        for other in self.profiles.values():
            if other.client_id == profile.client_id:
                return f"client {profile.client_id!r} is already held by node {other.node_id}"
        if profile.rank < 1:
            return f"rank {profile.rank} < 1"
        return None

    def _write_round(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        reporting.write_metrics(self.output_dir / "metrics.jsonl", self.history)
        self.strategy.save(self.output_dir / "strategy.safetensors")

    def export(self, path: str | Path, cfg: SimConfig | None = None) -> Path:
        """The global update as a PEFT adapter at cfg.export_rank (0: the largest node rank), as simulate exports it."""
        cfg = cfg or self.cfg
        rank = cfg.export_rank or max(p.rank for p in self.profiles.values())
        return export_peft_adapter(self.strategy, Path(path), rank, cfg)


def _shapes_differ(theirs: Mapping[str, tuple[int, int]], ours: Mapping[str, tuple[int, int]]) -> str:
    """Why a profile's adapted modules are not the run's, short (a profile may name 2**16 modules)."""
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    other = sorted(n for n in set(ours) & set(theirs) if tuple(theirs[n]) != tuple(ours[n]))
    parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + (
        [f"{len(extra)} unexpected (e.g. {extra[0][:120]})"] if extra else []) + (
        [f"{len(other)} of other shapes (e.g. {other[0]}: {list(theirs[other[0]])}, the run's "
         f"{list(ours[other[0]])})"] if other else [])
    return f"its model's adapted modules differ from the run's {len(ours)}: " + "; ".join(parts)


def node_summary(strategy: FedLoRAStrategy) -> Mapping[str, object]:
    """Which node held which client at which rank, and the nodes left out (for the run's summary file)."""
    return {
        "nodes": {str(n): {"client_id": p.client_id, "client_index": p.client_index, "rank": p.rank,
                           "num_examples": p.num_examples} for n, p in sorted(strategy.profiles.items())},
        "left_out": {str(n): reason for n, reason in sorted(strategy.node_errors.items())},
    }
