"""What a run loads before its first round: device, dtype, model, data, client ranks and the strategy.

The same on one machine (``fedlora simulate``) and on every Flower node, so that
both see the same clients in the same order with the same ranks.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedlora.data import (ClientDataset, FederatedData, LazyFederation, load_instructions, load_shakespeare,
                          load_sharegpt, read_jsonl)
from fedlora.data.instructions import partition_by_field
from fedlora.data.shakespeare import texts_dir
from fedlora.data.sharegpt import sharegpt_path
from fedlora.federated.ranks import assign_ranks, module_ranks
from fedlora.models import load_model
from fedlora.models.loading import linear_layer_shapes
from fedlora.strategies import Strategy, registry

from .config import InputError, SimConfig
from .reporting import bars_shown
from .trainer import FederatedModel, target_layers

Federation = FederatedData | LazyFederation  # what a run trains on: num_train_clients, train_client(i), eval_sets


def device_of(cfg: SimConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise InputError(f"config: device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"config: device {cfg.device!r}, but this torch build sees no CUDA device")
    return device


def dtype_of(cfg: SimConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def lora_alpha(cfg: SimConfig, rank: int) -> float:
    """The LoRA alpha of a module trained at ``rank``: cfg.lora_alpha, or 2 * rank when that is 0."""
    return float(cfg.lora_alpha) if cfg.lora_alpha > 0 else 2.0 * rank


def check_inputs(cfg: SimConfig, check_data: bool = True) -> None:
    """What can be checked before the model loads, as one-line :class:`InputError` s: the device exists;
    the model exists offline and has every target module (read from its config, no weights); the data
    set is there (an instruction JSONL file parses: every line, the client or category field); no
    client rank exceeds a target layer's smaller side."""
    device_of(cfg)
    try:
        adapted = model_module_shapes(cfg)
    except ValueError as exc:
        raise InputError(f"model {model_label(cfg.model)}: {exc}") from exc
    if check_data:
        check_dataset(cfg)
    if adapted is not None:  # None: a GGUF file not converted yet; checked once it has loaded
        check_layer_ranks(cfg, adapted, cfg.client_ranks if cfg.rank_distribution == "list" else cfg.rank_levels)


def model_module_shapes(cfg: SimConfig) -> dict[str, tuple[int, int]] | None:
    """name -> (d_out, d_in) of the layers ``cfg``'s run adapts, from the model's config alone (no weight
    is read); what a Flower server holds a node's profile to. None when the config is not at hand without
    converting a GGUF file first; ValueError for a model that cannot load or lacks a target module."""
    shapes = linear_layer_shapes(cfg.model)
    if shapes is None:
        return None
    return {name: shapes[name] for name in target_layers(list(shapes), cfg.target_modules)}


def check_dataset(cfg: SimConfig) -> None:
    """The data set exists; an instruction JSONL file parses whole (ShareGPT files are parsed as they load)."""
    try:
        if cfg.dataset == "shakespeare":
            texts_dir()
        elif cfg.dataset == "sharegpt":
            sharegpt_path()
        elif not Path(cfg.dataset).is_file():
            raise ValueError(f"{cfg.dataset!r} is not 'shakespeare', 'sharegpt', nor an existing ShareGPT .json "
                             f"or instruction .jsonl file")
        elif Path(cfg.dataset).suffix.lower() != ".json":
            records = read_jsonl(cfg.dataset)
            partition = "field" if cfg.partition == "auto" else cfg.partition
            if partition == "field":
                partition_by_field(records, cfg.client_field)
            elif partition == "dirichlet":
                partition_by_field(records, cfg.category_field)
    except ValueError as exc:
        raise InputError(f"dataset: {exc}") from exc


def model_label(spec) -> str:
    """A model spec as one short phrase (a tiny random Llama may be given as a dict of its config)."""
    return repr(spec) if isinstance(spec, (str, Path)) else "tiny random Llama (config table)"


def load_data(cfg: SimConfig, tokenizer) -> Federation:
    """The configured data set as a federation: Shakespeare roles, ShareGPT conversations or instruction JSONL.

    ShareGPT clients are loaded lazily (a conversation is tokenized when a round
    uses it); the others are small enough to tokenize up front.
    """
    max_clients = cfg.num_clients or None
    if cfg.dataset == "shakespeare":
        return load_shakespeare(tokenizer, seq_len=cfg.seq_len, min_lines=cfg.min_lines,
                                unseen_fraction=cfg.unseen_fraction, heldout_fraction=cfg.heldout_fraction,
                                seed=cfg.seed, max_clients=max_clients)
    path = None if cfg.dataset == "sharegpt" else Path(cfg.dataset)
    if path is None or path.suffix.lower() == ".json":
        if not max_clients:
            raise ValueError("config: ShareGPT data needs num_clients >= 1 (it has no natural client key)")
        return load_sharegpt(tokenizer, path, num_clients=max_clients,
                             partition="dirichlet" if cfg.partition == "auto" else cfg.partition,
                             alpha=cfg.dirichlet_alpha, unseen_fraction=cfg.unseen_fraction,
                             heldout_fraction=cfg.heldout_fraction, max_len=cfg.seq_len, seed=cfg.seed)
    partition = "field" if cfg.partition == "auto" else cfg.partition
    if partition == "field":
        num_parts = len(partition_by_field(read_jsonl(path), cfg.client_field))
    else:
        num_parts = max_clients or 0
    # FlexLoRA's "unseen clients" protocol: a seeded share of clients is never trained on.
    unseen = int(cfg.unseen_fraction * num_parts) if num_parts > 1 else 0
    data = load_instructions(path, tokenizer, partition=partition, client_field=cfg.client_field,
                             category_field=cfg.category_field, num_clients=max_clients, alpha=cfg.dirichlet_alpha,
                             heldout_fraction=cfg.heldout_fraction, unseen_clients=min(unseen, num_parts - 1),
                             max_len=cfg.seq_len, seed=cfg.seed)
    if max_clients and len(data.train_clients) > max_clients:
        data.train_clients = data.train_clients[:max_clients]
    return data


def make_strategy(cfg: SimConfig, module_shapes, ranks: list[int], device=None) -> Strategy:
    """The configured strategy, initialised at the global rank of every module.

    The rule itself says which rank mixes it serves (``check_client_ranks``) and
    what a module's global rank is given its clients' ranks (``global_rank``:
    the largest by default; FedAvg the smallest, which bucket mode trains everyone at).
    """
    strategy = registry.create(cfg.strategy, cfg.strategy_options, use_rslora=cfg.use_rslora, seed=cfg.seed)
    per_client = [module_ranks(r, module_shapes, cfg.rank_pattern) for r in ranks]
    try:
        strategy.check_client_ranks(per_client)
    except ValueError as exc:
        raise InputError(f"config: {exc}") from None
    global_modules = {name: strategy.global_rank([m[name] for m in per_client]) for name in module_shapes}
    strategy.init_global(module_shapes, rank=strategy.global_rank(ranks), module_ranks=global_modules)
    return strategy


class TrainingClients(Sequence):
    """The training clients of a federation as a sequence; a lazy federation builds client i when it is indexed."""

    def __init__(self, data: Federation):
        self.data = data

    def __len__(self) -> int:
        return self.data.num_train_clients

    def __getitem__(self, i: int) -> ClientDataset:
        return self.data.train_client(range(len(self))[i])


def check_layer_ranks(cfg: SimConfig, module_shapes, ranks: list[int]) -> None:
    """InputError naming the layer when a client's (or the export's) rank of a module exceeds the module's
    smaller side: no update of that layer has that rank, so the setting is a mistake."""
    setting = "client_ranks" if cfg.rank_distribution == "list" else "rank_levels"
    asked = [(r, setting) for r in sorted(set(ranks))] + ([(cfg.export_rank, "export_rank")] if cfg.export_rank else [])
    for rank, source in asked:
        for name, r in module_ranks(rank, module_shapes, cfg.rank_pattern).items():
            d_out, d_in = module_shapes[name]
            if r > min(d_out, d_in):
                via = f" (rank_pattern gives {r})" if r != rank else ""
                raise InputError(f"config: {source} has rank {rank}{via}, larger than layer {name}'s smaller side "
                                 f"{min(d_out, d_in)} ({d_out} x {d_in}); allowed: 1..{min(d_out, d_in)}")


@dataclass
class RunSetup:
    """The model wrapped for training and the training clients with their ranks, as a run loads them."""

    fm: FederatedModel
    tokenizer: object
    pad_id: int
    data: Federation
    clients: Sequence[ClientDataset]  # the training clients with examples, in data order (built when indexed)
    ranks: list[int]  # assign_ranks' rank of each of them
    device: torch.device
    client_ids: list[str] = field(default_factory=list)  # of ``clients``, without building them

    @property
    def rank_of(self) -> dict[str, int]:
        return dict(zip(self.client_ids, self.ranks))


def setup_run(cfg: SimConfig, data: Federation | None = None) -> RunSetup:
    """Load ``cfg``'s model and data and assign ranks: the same on one machine and on every Flower node.

    Nothing here costs time or memory per client beyond an id and a rank: a
    client's examples are built when a round samples it (lazy federations).
    Problems with the model, data or settings raise :class:`InputError`, before
    the model loads where they can be seen without it.
    """
    check_inputs(cfg, check_data=data is None)
    if not bars_shown(cfg.progress):  # transformers' own bars (loading weights) follow the run's setting
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device = device_of(cfg)
    torch.manual_seed(cfg.seed)
    try:
        model, tokenizer = load_model(cfg.model, dtype=dtype_of(cfg, device),
                                      quantization=None if cfg.quantization == "none" else cfg.quantization,
                                      device=device, seed=cfg.seed)
    except (ValueError, ImportError) as exc:  # an unreadable GGUF file, bitsandbytes missing
        raise InputError(f"model {model_label(cfg.model)}: {exc}") from exc
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data is None:
        try:
            data = load_data(cfg, tokenizer)
        except ValueError as exc:
            raise InputError(f"dataset: {exc}") from exc
    if isinstance(data, FederatedData):  # tokenized up front: drop clients left without a training example
        data = FederatedData([c for c in data.train_clients if c.num_examples > 0], data.unseen_clients)
    clients = TrainingClients(data)
    if not len(clients):
        raise InputError(f"dataset: {cfg.dataset!r} gives no training client with examples")
    try:
        ranks = assign_ranks(len(clients), cfg.rank_distribution, cfg.rank_levels, cfg.seed, cfg.client_ranks)
        fm = FederatedModel(model, cfg.target_modules, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora)
    except ValueError as exc:  # client_ranks of the wrong length, target modules of an unconverted GGUF model
        raise InputError(f"config: {exc}") from exc
    check_layer_ranks(cfg, fm.module_shapes, ranks)
    return RunSetup(fm, tokenizer, pad_id, data, clients, ranks, device, list(data.train_client_ids))
