"""A Flower ClientApp that trains one fedlora client per node with fedlora's local trainer.

A node holds the ``partition-id``-th training client of the run's data (Flower's
``node_config`` convention; the data is loaded exactly as ``fedlora simulate``
loads it) and trains at the rank ``assign_ranks`` gives that client, or at
``node_config['rank']``. Its local training repeats simulate's for that client:
the same starting factors, data order (seed (seed, "data", round, client)),
torch seed per round, local steps, optimizer and schedule. With no dropout
(``lora_dropout = 0``) every node's update equals simulate's for its client to
fp32 rounding, so the global result does too.

The model, tokenizer and data are loaded once per process and configuration and
reused across messages (the simulation engine keeps its workers; a SuperNode
starts a process per message).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedlora.data import ClientDataset
from fedlora.federated.rng import stable_seed
from fedlora.federated.update import ClientUpdate
from fedlora.simulation.config import SimConfig
from fedlora.simulation.personal import PersonalStore, with_personal
from fedlora.simulation.round import (client_stream, control_shift_of, control_step, local_plan, outgoing_update,
                                      served_rank, trained_update)
from fedlora.simulation.setup import RunSetup, setup_run
from fedlora.simulation.trainer import train_clients
from fedlora.strategies import registry
from fedlora.strategies.base import merge_parts

from .config import load_run_config
from .wire import (CONTROLS, NodeProfile, TrainInstruction, controls_record, decode_controls, decode_train,
                   encode_profile, encode_reply)

# Called before a node trains (tests use it to make a node fail mid-round).
TrainHook = Callable[[Context, TrainInstruction], None]
CLIENT_STATE_KEY = "fedlora.client_state"


_LOADED: dict[str, RunSetup] = {}


def local_data(cfg: SimConfig) -> RunSetup:
    """Model, data and ranks as ``fedlora simulate`` sets them up (``setup_run``), cached per configuration."""
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "progress", "resume")},
                     sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()  # one configuration at a time: a node serves one run
        _LOADED[key] = setup_run(cfg)
    return _LOADED[key]


def node_client(context: Context, data: RunSetup) -> tuple[int, ClientDataset, int]:
    """(partition-id, the client this node holds, its rank) from the node's config."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError("node_config has no partition-id: start the SuperNode with "
                         "--node-config 'partition-id=K num-partitions=N'")
    index = int(node_config["partition-id"])
    if not 0 <= index < len(data.clients):
        raise ValueError(f"partition-id {index} is out of range: the data has {len(data.clients)} training clients")
    rank = int(node_config["rank"]) if "rank" in node_config else data.ranks[index]
    return index, data.clients[index], rank


def train_client(cfg: SimConfig, data: RunSetup, client: ClientDataset, task: TrainInstruction,
                 state: dict | None = None, controls: dict | None = None,
                 store: PersonalStore | None = None) -> ClientUpdate:
    """One round of local training of ``client`` from the factors the server sent; the update it sends.

    state: the client's own memory across rounds (the rule's client-side hooks, e.g. HetLoRA's
    previous tail norm), read and updated in place; the ClientApp keeps it in the node's context.
    controls: SCAFFOLD's memory when the server sent its c (``task.controls``): ``{"own": c_k or
    None}`` is read, and ``"own"`` (c_k^+) and ``"delta"`` (Delta c_k, for the reply) are set.
    store: where the node keeps the factors it does not share (``task.personal``), as simulate does.
    """
    fm = data.fm
    factors = with_personal(task.factors, client.client_id, task.round, task.personal, store, fm.module_shapes)
    rule = registry.create(cfg.strategy, cfg.strategy_options, use_rslora=cfg.use_rslora, seed=cfg.seed)
    fm.load_clients([factors])
    fm.set_deltas(merge_parts(task.global_parts) if task.global_parts else None)
    controls = {} if controls is None else controls
    shift = None if task.controls is None else [control_shift_of(task.controls, controls.get("own"), factors)]
    plan = local_plan(cfg, [client], train_A=task.train_A, train_B=task.train_B, rule=rule,
                      ranks=[served_rank(factors)], controls=shift)
    stream = client_stream(cfg, task.round, client)
    torch.manual_seed(stable_seed(cfg.seed, "round", task.round))  # dropout, as simulate seeds each round
    losses = train_clients(fm, [client], [stream], plan, data.pad_id)[0]
    fm.set_deltas(None)
    if task.controls is not None:
        trained = fm.client_factors(0, {n: f[2] for n, f in factors.items()})
        controls["delta"], controls["own"] = control_step(task.controls, controls.get("own"), factors, trained,
                                                          plan.lr_sum(0))
    update = trained_update(cfg, fm, 0, client, factors, losses, rule, state)
    return outgoing_update(update, task.round, task.personal, task.upload, store)


def personal_store(cfg: SimConfig, context: Context) -> PersonalStore:
    """Where this node keeps its client's personal factors: ``run-<Flower run id>`` under node_config
    ``personal-dir``, else under ``output_dir/clients`` (relative to the node's working directory);
    one folder per run, so a new run never starts from an earlier run's factors."""
    folder = context.node_config.get("personal-dir", str(Path(cfg.output_dir) / "clients"))
    if not isinstance(folder, str) or not folder:
        raise ValueError(f"node_config personal-dir must be a folder path, got {folder!r}")
    return PersonalStore(Path(folder).expanduser() / f"run-{int(context.run_id)}")


def client_app(cfg: SimConfig | None = None, *, base_dir: str | os.PathLike | None = None,
               before_train: TrainHook | None = None) -> ClientApp:
    """fedlora's ClientApp.

    cfg: the run's settings; None reads them from the Flower run config
        (:func:`~fedlora.integrations.flower.config.load_run_config`, relative
        paths against ``base_dir``). ``node_config['dataset']`` replaces the
        dataset path on a node (the same data kept elsewhere on that machine).
    """
    app = ClientApp()

    def settings(context: Context) -> SimConfig:
        run_cfg = cfg if cfg is not None else load_run_config(context.run_config, base_dir)[0]
        if "dataset" in context.node_config:
            run_cfg = dataclasses.replace(run_cfg, dataset=str(context.node_config["dataset"]))
        return run_cfg

    @app.query()
    def profile(message: Message, context: Context) -> Message:
        data = local_data(settings(context))
        index, client, rank = node_client(context, data)
        return Message(encode_profile(NodeProfile(
            node_id=context.node_id, client_id=client.client_id, client_index=index, num_clients=len(data.clients),
            num_partitions=int(context.node_config.get("num-partitions", 0)), rank=rank,
            num_examples=client.num_examples, module_shapes=data.fm.module_shapes)), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        run_cfg = settings(context)
        data = local_data(run_cfg)
        _, client, _ = node_client(context, data)
        task = decode_train(message.content)
        if task.client_id != client.client_id:
            raise ValueError(f"the server sent work for client {task.client_id!r}; this node holds "
                             f"{client.client_id!r}")
        if before_train is not None:
            before_train(context, task)
        # The client's memory across rounds lives in the node's context (Flower keeps it for the run).
        memory = context.state.config_records.get(CLIENT_STATE_KEY)
        state = json.loads(memory["json"]) if memory is not None else {}
        # SCAFFOLD: the node keeps its own c_k there too and sends only Delta c_k
        controls = {"own": decode_controls(context.state)}
        store = personal_store(run_cfg, context) if task.personal else None
        update = train_client(run_cfg, data, client, task, state, controls, store)
        context.state.config_records[CLIENT_STATE_KEY] = ConfigRecord({"json": json.dumps(state)})
        if "own" in controls and controls["own"] is not None:
            context.state[CONTROLS] = controls_record(controls["own"])
        return Message(encode_reply(update, controls.get("delta")), reply_to=message)

    return app
