"""``fedlora simulate``: a federated LoRA fine-tuning experiment on one machine.

Per round: sample clients (seeded by round), hand each its starting factors at
its own rank (``strategy.distribute``), train every sampled client in the same
batched forward/backward (or one after another with ``mode="sequential"``),
aggregate the updates (bad ones are rejected with a reason; the round goes on),
evaluate the global model, account the bytes each client sent and received,
and checkpoint atomically. Every random choice is seeded by (seed, round,
client), so ``resume`` ends exactly where an uninterrupted run would.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedlora.data import ClientDataset, FederatedData, load_instructions, load_shakespeare, read_jsonl
from fedlora.models import load_model
from fedlora.data.instructions import partition_by_field
from fedlora.federated.config import SimConfig
from fedlora.federated.generation import pick_examples, rouge_l
from fedlora.federated.ranks import assign_ranks, module_ranks
from fedlora.federated.rng import stable_seed
from fedlora.federated.trainer import ExampleStream, FederatedModel, LocalPlan, evaluate_loss, train_clients
from fedlora.federated.update import ClientUpdate, atomic_write
from fedlora.strategies import FedAvg, FFALoRA, FLoRA, FlexLoRA, HetLoRA, Strategy
from fedlora.strategies.base import merge_parts

log = logging.getLogger("fedlora.simulate")

_STRATEGIES = {"fedavg": FedAvg, "ffalora": FFALoRA, "hetlora": HetLoRA, "flexlora": FlexLoRA, "flora": FLoRA}
UpdateHook = Callable[[ClientUpdate], ClientUpdate]


@dataclass
class SimulationResult:
    output_dir: Path
    metrics: list[dict]
    strategy: Strategy
    adapter_dir: Path | None = None
    client_ranks: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------ set-up
def _device(cfg: SimConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(cfg: SimConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    except KeyError:
        raise ValueError(f"config: dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}") from None


def load_data(cfg: SimConfig, tokenizer) -> FederatedData:
    max_clients = cfg.num_clients or None
    if cfg.dataset == "shakespeare":
        return load_shakespeare(tokenizer, seq_len=cfg.seq_len, min_lines=cfg.min_lines,
                                unseen_fraction=cfg.unseen_fraction, heldout_fraction=cfg.heldout_fraction,
                                seed=cfg.seed, max_clients=max_clients)
    path = Path(cfg.dataset)
    if not path.is_file():
        raise ValueError(f"config: dataset must be 'shakespeare' or an instruction JSONL file; {path} does not exist")
    if cfg.partition == "field":
        num_parts = len(partition_by_field(read_jsonl(path), cfg.client_field))
    else:
        num_parts = max_clients or 0
    # FlexLoRA's "unseen clients" protocol: a seeded share of clients is never trained on.
    unseen = int(cfg.unseen_fraction * num_parts) if num_parts > 1 else 0
    data = load_instructions(path, tokenizer, partition=cfg.partition, client_field=cfg.client_field,
                             category_field=cfg.category_field, num_clients=max_clients, alpha=cfg.dirichlet_alpha,
                             heldout_fraction=cfg.heldout_fraction, unseen_clients=min(unseen, num_parts - 1),
                             max_len=cfg.seq_len, seed=cfg.seed)
    if max_clients and len(data.train_clients) > max_clients:
        data.train_clients = data.train_clients[:max_clients]
    return data


def make_strategy(cfg: SimConfig, module_shapes, ranks: list[int], device) -> Strategy:
    """The configured strategy, initialised at the global rank of every module.

    The global rank of a module is its largest client rank (FedAvg: the smallest,
    which bucket mode trains everyone at).
    """
    options = dict(cfg.strategy_options)
    strategy = _STRATEGIES[cfg.strategy](use_rslora=cfg.use_rslora, seed=cfg.seed, **options)
    per_client = [module_ranks(r, module_shapes, cfg.rank_pattern) for r in ranks]
    pick = min if cfg.strategy == "fedavg" else max
    if cfg.strategy == "fedavg":
        distinct = {tuple(sorted(m.items())) for m in per_client}
        if len(distinct) > 1 and options.get("heterogeneous", "refuse") != "bucket":
            raise ValueError(
                f"config: FedAvg averages A and B separately, so every client needs one rank per module, but the "
                f"ranks are {sorted(set(ranks))}; use rank_distribution='homogeneous' or "
                "--strategy_options.heterogeneous bucket (everyone trains at the smallest rank)"
            )
    global_modules = {name: pick(m[name] for m in per_client) for name in module_shapes}
    strategy.init_global(module_shapes, rank=pick(ranks), module_ranks=global_modules)
    return strategy


def _run_defining(config: dict) -> dict:
    """The settings a resumed run must share with its checkpoint (not how it is displayed or resumed)."""
    return {k: v for k, v in config.items() if k not in ("resume", "progress")}


def _alpha(cfg: SimConfig, rank: int) -> float:
    return float(cfg.lora_alpha) if cfg.lora_alpha > 0 else 2.0 * rank


def start_factors(cfg: SimConfig, strategy: Strategy, client_id: str, rank: int):
    """What a client of ``rank`` starts a round from: each module at its rank from cfg.rank_pattern,
    with the run's alphas (the same on one machine and on Flower)."""
    per_module = module_ranks(rank, strategy.module_shapes, cfg.rank_pattern)
    return strategy.distribute(rank, client_id=client_id, module_ranks=per_module,
                               alpha={n: _alpha(cfg, r) for n, r in per_module.items()})


def _num_sampled(cfg: SimConfig, available: int) -> int:
    k = cfg.clients_per_round
    k = int(round(k * available)) if k < 1 else int(k)
    return max(1, min(k, available))


def _local_steps(cfg: SimConfig, num_examples: int) -> int:
    if cfg.local_epochs > 0:
        return max(1, math.ceil(cfg.local_epochs * num_examples / cfg.batch_size))
    return cfg.local_steps


def _tensor_bytes(factors) -> int:
    return sum(t.numel() * t.element_size() for a, b, _ in factors.values() for t in (a, b))


# -------------------------------------------------------------- checkpoints
class Checkpoints:
    """``output_dir/checkpoints/round-NNNN/`` written in a temp dir then renamed, plus a ``latest`` pointer."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = root / "checkpoints", keep

    def save(self, round_idx: int, strategy: Strategy, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        final = self.root / f"round-{round_idx:04d}"
        try:
            strategy.save(tmp / "strategy.safetensors")
            (tmp / "state.json").write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:  # a failed save leaves no half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write(self.root / "latest", final.name.encode())
        for old in sorted(p for p in self.root.glob("round-*") if p != final)[: -self.keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, strategy: Strategy) -> dict | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        strategy.load(folder / "strategy.safetensors")
        return json.loads((folder / "state.json").read_text())


# ------------------------------------------------- what one machine or node loads
@dataclass
class RunSetup:
    """The model wrapped for training and the training clients with their ranks, as a run loads them."""

    fm: FederatedModel
    tokenizer: object
    pad_id: int
    data: FederatedData
    clients: list[ClientDataset]  # the training clients with examples, in data order
    ranks: list[int]  # assign_ranks' rank of each of them
    device: torch.device


def setup_run(cfg: SimConfig, data: FederatedData | None = None) -> RunSetup:
    """Load ``cfg``'s model and data and assign ranks: the same on one machine and on every Flower node."""
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, dtype=_dtype(cfg, device),
                                  quantization=None if cfg.quantization == "none" else cfg.quantization,
                                  device=device, seed=cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = data if data is not None else load_data(cfg, tokenizer)
    clients = [c for c in data.train_clients if c.num_examples > 0]
    if not clients:
        raise ValueError("the dataset produced no training client with examples")
    ranks = assign_ranks(len(clients), cfg.rank_distribution, cfg.rank_levels, cfg.seed, cfg.client_ranks)
    fm = FederatedModel(model, cfg.target_modules, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora)
    return RunSetup(fm, tokenizer, pad_id, data, clients, ranks, device)


# ------------------------------------------------- one round of local training
def local_plan(cfg: SimConfig, clients, train_A: bool) -> LocalPlan:
    """The local training of ``clients`` in a round: each its own steps, the run's optimizer and schedule."""
    return LocalPlan(steps=[_local_steps(cfg, c.num_examples) for c in clients], batch_size=cfg.batch_size,
                     lr=cfg.lr, lr_schedule=cfg.lr_schedule, optimizer=cfg.optimizer,
                     weight_decay=cfg.weight_decay, momentum=cfg.momentum, batched=cfg.mode == "batched",
                     train_A=train_A)


def client_stream(cfg: SimConfig, round_idx: int, client: ClientDataset) -> ExampleStream:
    """A client's data order in a round: seeded by (seed, round, client), wherever it trains."""
    return ExampleStream(client.train, stable_seed(cfg.seed, "data", round_idx, client.client_id))


def served_rank(factors) -> int:
    """A client's rank as served: its largest module rank (FedAvg's bucket mode may serve less than asked)."""
    return max(a.shape[0] for a, _, _ in factors.values())


def trained_update(cfg: SimConfig, fm: FederatedModel, k: int, client: ClientDataset, start, losses) -> ClientUpdate:
    """Client k's update after local training from ``start``, with its mean training loss."""
    alpha_of = {name: f[2] for name, f in start.items()}
    return ClientUpdate(client.client_id, client.num_examples, served_rank(start), fm.client_factors(k, alpha_of),
                        use_rslora=cfg.use_rslora,
                        metrics={"train_loss": float(np.mean(losses)) if losses else float("nan")})


def upload_bytes(update: ClientUpdate, trainable) -> int:
    """What a client uploads: the factors it trains (FFA-LoRA's A is frozen and re-derived from the seed)."""
    return sum(t.numel() * t.element_size() for a, b, _ in update.modules.values()
               for key, t in (("A", a), ("B", b)) if key in trainable)


# ---------------------------------------------------------------- the run
def simulate(cfg: SimConfig | dict | None = None, *, update_hook: UpdateHook | None = None,
             data: FederatedData | None = None, stop_after: int | None = None) -> SimulationResult:
    """Run the experiment ``cfg`` (defaults: the built-in SmolLM2 x Shakespeare FlexLoRA run).

    update_hook: called on every client update before aggregation (tests use it to
    corrupt or crash a client); an exception there drops only that client.
    data: pre-built federated data (skips loading ``cfg.dataset``).
    stop_after: stop after this many rounds of this call (to test resuming).
    """
    if cfg is None:
        cfg = SimConfig()
    elif isinstance(cfg, dict):
        cfg = SimConfig.from_dict(cfg)
    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = setup_run(cfg, data)
    fm, tokenizer, pad_id, data, clients, ranks = run.fm, run.tokenizer, run.pad_id, run.data, run.clients, run.ranks
    rank_of = {c.client_id: r for c, r in zip(clients, ranks)}
    strategy = make_strategy(cfg, fm.module_shapes, ranks, run.device)
    checkpoints = Checkpoints(out)
    metrics: list[dict] = []
    totals = {"bytes_up": 0, "bytes_down": 0}
    start_round = 0
    if cfg.resume:
        state = checkpoints.load(strategy)
        if state is not None:
            saved, now = _run_defining(state["config"]), _run_defining(cfg.to_dict())
            if saved != now:
                diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
                        if saved.get(k) != now.get(k)}
                raise ValueError(f"config: cannot resume {out}: settings differ from the checkpoint's "
                                 f"(name: (checkpoint, now)): {diff}")
            start_round, metrics, totals = state["next_round"], state["metrics"], state["totals"]
            log.info("resuming at round %d from %s", start_round, out)

    heldout = [ex for c in clients for ex in c.heldout][: cfg.eval_max_examples]
    unseen = [ex for c in data.unseen_clients for ex in c.train + c.heldout][: cfg.eval_max_examples]
    rouge_sets = {}
    if cfg.dataset != "shakespeare" and cfg.eval_generate_examples > 0:  # FlexLoRA's metric for instructions
        rouge_sets = {"heldout": pick_examples(clients, cfg.eval_generate_examples, unseen=False),
                      "unseen": pick_examples(data.unseen_clients, cfg.eval_generate_examples, unseen=True)}
    (out / "config.json").write_text(cfg.to_json())

    rounds = range(start_round, cfg.rounds)
    bar = _progress(rounds, cfg.progress, desc="rounds", unit="round")
    done_now = 0
    for round_idx in bar:
        t0 = time.perf_counter()
        sampler = np.random.default_rng(stable_seed(cfg.seed, "sample", round_idx))
        picked = sorted(sampler.choice(len(clients), size=_num_sampled(cfg, len(clients)), replace=False).tolist())
        torch.manual_seed(stable_seed(cfg.seed, "round", round_idx))  # dropout
        record = _run_round(cfg, round_idx, fm, strategy, [clients[i] for i in picked], rank_of, pad_id,
                            update_hook)
        totals["bytes_up"] += record["bytes_up"]
        totals["bytes_down"] += record["bytes_down"]
        if cfg.eval_every and ((round_idx + 1) % cfg.eval_every == 0 or round_idx + 1 == cfg.rounds):
            record.update(_evaluate(fm, strategy, heldout, unseen, pad_id, tokenizer, rouge_sets,
                                    cfg.max_new_tokens))
        record["wall_time_s"] = round(time.perf_counter() - t0, 3)
        record.update({f"total_{k}": v for k, v in totals.items()})
        metrics.append(record)
        # Rewritten whole each round, atomically: it always matches the latest checkpoint.
        atomic_write(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())
        checkpoints.save(round_idx, strategy, {"next_round": round_idx + 1, "metrics": metrics, "totals": totals,
                                               "config": cfg.to_dict()})
        _summary(record, cfg.progress)
        done_now += 1
        if stop_after is not None and done_now >= stop_after and round_idx + 1 < cfg.rounds:
            return SimulationResult(out, metrics, strategy, None, rank_of)

    _plot(metrics, out / "metrics.png")
    export_rank = cfg.export_rank or max(ranks)
    adapter_dir = export_peft_adapter(strategy, out / "adapter", export_rank, cfg)
    return SimulationResult(out, metrics, strategy, adapter_dir, rank_of)


def _run_round(cfg, round_idx, fm: FederatedModel, strategy: Strategy, sampled, rank_of, pad_id, update_hook):
    ids = [c.client_id for c in sampled]
    ranks = [rank_of[c] for c in ids]
    starts = [start_factors(cfg, strategy, cid, r) for cid, r in zip(ids, ranks)]
    fm.load_clients(starts)
    base = strategy.client_base()
    fm.set_deltas(merge_parts(base) if base else None)
    streams = [client_stream(cfg, round_idx, c) for c in sampled]
    plan = local_plan(cfg, sampled, train_A="A" in strategy.trainable)
    bar = _progress(None, cfg.progress, total=sum(plan.steps), desc=f"round {round_idx} local steps",
                    unit="client-step", leave=False)
    losses = train_clients(fm, sampled, streams, plan, pad_id, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()

    updates, failed = [], {}
    bytes_up = bytes_down = 0
    for k, client in enumerate(sampled):
        bytes_down += _tensor_bytes(starts[k])
        update = trained_update(cfg, fm, k, client, starts[k], losses[k])
        try:
            if update_hook is not None:
                update = update_hook(update)
        except Exception as exc:  # one client's crash must not stop the round
            failed[client.client_id] = f"client crashed: {type(exc).__name__}: {exc}"
            log.warning("round %d: %s", round_idx, failed[client.client_id])
            continue
        bytes_up += upload_bytes(update, strategy.trainable)
        updates.append(update)
    result = strategy.aggregate(updates)
    train_losses = [u.metrics["train_loss"] for u in updates if u.client_id in result.accepted]
    weights = [u.num_examples for u in updates if u.client_id in result.accepted]
    return {
        "round": round_idx,
        "clients": ids,
        "ranks": ranks,
        "trained_ranks": [served_rank(f) for f in starts],
        "accepted": result.accepted,
        "rejected": {**failed, **result.rejected},
        "state_changed": result.changed,
        "train_loss": float(np.average(train_losses, weights=weights)) if train_losses else float("nan"),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
    }


def _evaluate(fm: FederatedModel, strategy: Strategy, heldout, unseen, pad_id, tokenizer, rouge_sets,
              max_new_tokens) -> dict:
    """Loss, perplexity (and Rouge-L for instruction data) of the global model: base + global delta.

    The global deltas are reconstructed once and serve every metric.
    """
    fm.load_zero_adapter()
    fm.set_deltas(strategy.global_deltas())
    out = {}
    for name, examples in (("heldout", heldout), ("unseen", unseen)):
        if examples:
            loss = evaluate_loss(fm, examples, pad_id)
            out[f"eval_{name}_loss"] = loss
            out[f"eval_{name}_ppl"] = math.exp(min(loss, 50.0))
    for name, picked in rouge_sets.items():
        if picked:
            out[f"eval_{name}_rougeL"] = rouge_l(fm, tokenizer, picked, pad_id, max_new_tokens)
    fm.set_deltas(None)
    return out


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable if iterable is not None else None
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs) if iterable is not None else tqdm(**kwargs)


def _summary(record: dict, enabled: bool) -> None:
    parts = [f"round {record['round']}", f"train_loss {record['train_loss']:.4f}"]
    for key in ("eval_heldout_loss", "eval_heldout_ppl", "eval_unseen_loss", "eval_unseen_ppl",
                "eval_heldout_rougeL", "eval_unseen_rougeL"):
        if key in record:
            parts.append(f"{key.removeprefix('eval_')} {record[key]:.4f}")
    parts += [f"up {record['bytes_up'] / 1e6:.2f} MB", f"down {record['bytes_down'] / 1e6:.2f} MB",
              f"{record['wall_time_s']:.1f} s"]
    if record["rejected"]:
        parts.append(f"rejected {record['rejected']}")
    line = " | ".join(parts)
    if enabled:  # printed above the live progress bars
        from tqdm.auto import tqdm

        tqdm.write(line)
    else:
        print(line, flush=True)


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [m["round"] + 1 for m in metrics]
    for key, label in (("train_loss", "train (sampled clients)"), ("eval_heldout_loss", "held-out lines"),
                       ("eval_unseen_loss", "unseen clients")):
        points = [(r, m[key]) for r, m in zip(rounds, metrics) if key in m and math.isfinite(m[key])]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("next-token loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export_peft_adapter(strategy: Strategy, path: Path, rank: int, cfg: SimConfig) -> Path:
    """Save the global update as a PEFT LoRA adapter of ``rank`` (best rank-r approximation per module).

    With ``cfg.rank_pattern`` each module gets the rank the pattern gives a
    client of ``rank`` (PEFT's rank_pattern). lora_alpha = the module's rank, so
    PEFT's scaling is 1 and B A is the truncated update.
    Loadable with ``PeftModel.from_pretrained(base_model, path)``.
    """
    from peft import LoraConfig
    from safetensors.torch import save as st_save

    tensors = {}
    per_module = module_ranks(rank, strategy.module_shapes, cfg.rank_pattern)
    for name, delta in strategy.global_deltas().items():
        rank_m = per_module[name]
        k = min(rank_m, *delta.shape)
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        root = S[:k].sqrt()
        B = (U[:, :k] * root).float().contiguous()
        A = (root[:, None] * Vh[:k]).float().contiguous()
        if k < rank_m:  # keep every module at the declared rank
            A = torch.cat([A, A.new_zeros(rank_m - k, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], rank_m - k)], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=path.parent))
    # Exact module names as patterns; PEFT matches a pattern at the end of the name.
    pattern = {re.escape(n): r for n, r in per_module.items() if r != rank}
    LoraConfig(r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=dict(pattern),
               target_modules=list(cfg.target_modules), lora_dropout=0.0,
               use_rslora=False, task_type="CAUSAL_LM",
               base_model_name_or_path=str(cfg.model)).save_pretrained(str(tmp))
    (tmp / "adapter_model.safetensors").write_bytes(st_save(tensors, metadata={"format": "pt"}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
