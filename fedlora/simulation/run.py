"""``fedlora simulate``: a federated LoRA fine-tuning experiment on one machine.

Per round: sample clients (seeded by round), hand each its starting factors at
its own rank (``strategy.distribute``), train every sampled client in the same
batched forward/backward (or one after another with ``mode="sequential"``),
aggregate the updates (bad ones are rejected with a reason; the round goes on),
evaluate the global model, account the bytes each client sent and received,
and checkpoint atomically. Every random choice is seeded by (seed, round,
client), so ``resume`` ends exactly where an uninterrupted run would.
The round itself is :func:`fedlora.simulation.round.run_round`, the recipe the
Flower integration shares.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedlora.federated.rng import stable_seed
from fedlora.federated.update import atomic_write
from fedlora.strategies import Strategy

from . import reporting
from .checkpoints import Checkpoints, fingerprint, run_defining
from .config import SimConfig
from .corrections import Controls, controls_from_bytes, controls_to_bytes
from .evaluation import evaluate_global, evaluate_model
from .export import export_peft_adapter
from .round import UpdateHook, run_round, sample
from .setup import Federation, make_strategy, setup_run

log = logging.getLogger("fedlora.simulate")
BASE_EVAL_FILE = "base_eval.json"
CONTROLS_FILE = "client_controls.safetensors"  # SCAFFOLD's c_k of every client, in each checkpoint


@dataclass
class SimulationResult:
    output_dir: Path
    metrics: list[dict]
    strategy: Strategy
    adapter_dir: Path | None = None
    client_ranks: dict[str, int] = field(default_factory=dict)
    base_eval: dict = field(default_factory=dict)  # the base model's metrics before round 0 (eval_base)
    setup_s: float = float("nan")  # seconds from the call to the first round of this call
    num_train_clients: int = 0


def data_fingerprint(cfg: SimConfig, data: Federation | None) -> dict | None:
    """The content of the run's data file, as part of its identity (None: data built in code or given)."""
    if data is not None or not Path(cfg.dataset).is_file():
        return None
    return {"file": str(cfg.dataset), "sha256": fingerprint(cfg.dataset)}


def check_same_run(state: dict, identity: dict, cfg: SimConfig, out: Path) -> None:
    """ValueError unless the checkpoint's run is this one: its defining settings and data content."""
    saved, now = run_defining(state["config"]), run_defining(identity["config"])
    if saved != now:
        diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        raise ValueError(f"config: cannot resume {out}: settings differ from the checkpoint's "
                         f"(name: (checkpoint, now)): {diff}")
    was, data = state.get("data"), identity["data"]
    if was != data and (was is not None or data is not None):
        raise ValueError(f"config: cannot resume {out}: the data file {cfg.dataset} is not the content the run "
                         f"trained on (sha256 {(was or {}).get('sha256', 'none')[:12]}..., now "
                         f"{(data or {}).get('sha256', 'none')[:12]}...)")
    if state["next_round"] > cfg.rounds:
        raise ValueError(f"config: cannot resume {out}: its checkpoint is at round {state['next_round']}, past "
                         f"rounds = {cfg.rounds}")


def simulate(cfg: SimConfig | dict | None = None, *, update_hook: UpdateHook | None = None,
             data: Federation | None = None, stop_after: int | None = None) -> SimulationResult:
    """Run the experiment ``cfg`` (defaults: the built-in SmolLM2 x Shakespeare FlexLoRA run).

    update_hook: called on every client update before aggregation (tests use it to
    corrupt or crash a client); an exception there drops only that client.
    data: pre-built federated data (skips loading ``cfg.dataset``).
    stop_after: stop after this many rounds of this call (to test resuming).
    """
    started = time.perf_counter()
    if cfg is None:
        cfg = SimConfig()
    elif isinstance(cfg, dict):
        cfg = SimConfig.from_dict(cfg)
    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"config": cfg.to_dict(), "data": data_fingerprint(cfg, data)}  # of the file as it is read
    run = setup_run(cfg, data)
    fm, tokenizer, pad_id, data, clients, ranks = run.fm, run.tokenizer, run.pad_id, run.data, run.clients, run.ranks
    rank_of = run.rank_of
    strategy = make_strategy(cfg, fm.module_shapes, ranks, run.device)
    checkpoints = Checkpoints(out)
    checkpoints.clean()
    metrics: list[dict] = []
    totals = {"bytes_up": 0, "bytes_down": 0, "bytes_down_global": 0}
    client_state: dict[str, dict] = {}  # each client's own memory across rounds (the rule's client-side hooks)
    client_controls: dict[str, Controls] = {}  # SCAFFOLD: each client's own control variate c_k
    start_round = 0
    if cfg.resume:
        state = checkpoints.load(strategy, files=[CONTROLS_FILE] if cfg.scaffold else [])
        if state is None:
            reporting.note(f"nothing to resume in {out} (no checkpoint): starting at round 0", cfg.progress)
        else:
            check_same_run(state, identity, cfg, out)
            start_round, metrics, totals = state["next_round"], state["metrics"], {**totals, **state["totals"]}
            client_state = state.get("client_state", {})
            if cfg.scaffold:
                client_controls = controls_from_bytes(state["files"][CONTROLS_FILE])
            rank_of.update(state.get("client_ranks", {}))
            if start_round >= cfg.rounds:
                reporting.note(f"nothing to resume: {out} has finished its {start_round} rounds (give --rounds N "
                               "with N larger to extend it)", cfg.progress)
            else:
                log.info("resuming at round %d from %s", start_round, out)
    else:  # an earlier run's rounds and base evaluation must not mix with this run's
        if checkpoints.exists():
            log.warning("%s held checkpoints of an earlier run, removed: starting afresh (--resume true would "
                        "have continued it)", out)
            checkpoints.reset()
        (out / BASE_EVAL_FILE).unlink(missing_ok=True)

    heldout, unseen = ([ex for _, exs in data.eval_sets(split, cfg.eval_max_examples) for ex in exs]
                       for split in ("heldout", "unseen"))
    rouge_sets = {}
    if cfg.dataset != "shakespeare" and cfg.eval_generate_examples > 0:  # FlexLoRA's metric for instructions
        rouge_sets = {split: data.eval_sets(split, cfg.eval_generate_examples) for split in ("heldout", "unseen")}
    (out / "config.json").write_text(cfg.to_json())
    base_eval = _base_evaluation(cfg, out, fm, heldout, unseen, pad_id, tokenizer, rouge_sets)
    setup_s = time.perf_counter() - started

    def result(adapter_dir=None) -> SimulationResult:
        return SimulationResult(out, metrics, strategy, adapter_dir, rank_of, base_eval, setup_s, len(clients))

    rounds = range(min(start_round, cfg.rounds), cfg.rounds)
    bar = reporting.progress(rounds, cfg.progress, desc="rounds", unit="round")
    done_now = 0
    for round_idx in bar:
        t0 = time.perf_counter()
        sampled = sample(cfg, round_idx, clients)
        torch.manual_seed(stable_seed(cfg.seed, "round", round_idx))  # dropout
        steps_bar = reporting.progress(None, cfg.progress, desc=f"round {round_idx} local steps",
                                       unit="client-step", leave=False)
        record = run_round(cfg, round_idx, fm, strategy, sampled, rank_of, pad_id, update_hook,
                           progress=steps_bar.update if steps_bar is not None else None, client_state=client_state,
                           client_controls=client_controls)
        rank_of.update(record.get("self_pruned", {}))  # a client that pruned its rank trains at it from now on
        if steps_bar is not None:
            steps_bar.close()
        for key in totals:
            totals[key] += record[key]
        if cfg.eval_every and ((round_idx + 1) % cfg.eval_every == 0 or round_idx + 1 == cfg.rounds):
            last = round_idx + 1 == cfg.rounds
            generate = last or (cfg.eval_generate_every and (round_idx + 1) % cfg.eval_generate_every == 0)
            record.update(evaluate_global(fm, strategy, heldout, unseen, pad_id, tokenizer,
                                          rouge_sets if generate else {},
                                          cfg.max_new_tokens, cfg.log_spectrum))
        record["wall_time_s"] = round(time.perf_counter() - t0, 3)
        record.update({f"total_{k}": v for k, v in totals.items()})
        metrics.append(record)
        reporting.write_metrics(out / "metrics.jsonl", metrics)
        checkpoints.save(round_idx, strategy, {"next_round": round_idx + 1, "metrics": metrics, "totals": totals,
                                               **identity, "client_state": client_state,
                                               "client_ranks": rank_of},
                         {CONTROLS_FILE: controls_to_bytes(client_controls)} if cfg.scaffold else None)
        reporting.summary(record, cfg.progress)
        done_now += 1
        if stop_after is not None and done_now >= stop_after and round_idx + 1 < cfg.rounds:
            return result()

    reporting.plot(metrics, out / "metrics.png", base_eval)
    export_rank = cfg.export_rank or max(ranks)
    return result(export_peft_adapter(strategy, out / "adapter", export_rank, cfg))


def _base_evaluation(cfg: SimConfig, out: Path, fm, heldout, unseen, pad_id, tokenizer, rouge_sets) -> dict:
    """The base model's metrics before any round (every curve's first point), computed once per run folder."""
    path = out / BASE_EVAL_FILE
    if not cfg.eval_base:
        return {}
    if path.is_file():  # a resumed run evaluated it already (same settings: checked against the checkpoint)
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    record = evaluate_model(fm, None, heldout, unseen, pad_id, tokenizer, rouge_sets, cfg.max_new_tokens)
    record["wall_time_s"] = round(time.perf_counter() - t0, 3)
    atomic_write(path, json.dumps(record, indent=2).encode())
    reporting.summary_base(record, cfg.progress)
    return record
