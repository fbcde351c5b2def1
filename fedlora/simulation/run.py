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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedlora.data import BUILTIN_SOURCES, FederatedData
from fedlora.federated.rng import stable_seed
from fedlora.federated.update import atomic_write
from fedlora.strategies import Strategy

from . import reporting
from .checkpoints import Checkpoints, fingerprint, run_defining
from .config import InputError, SimConfig
from .evaluation import (evaluate_global, evaluate_model, evaluate_personal, evaluation_size, heldout_groups,
                         heldout_owners, personal_rouge_l)
from .export import export_peft_adapter
from .outputs import prepare_output_dir
from .personal import PersonalStore
from .round import UpdateHook, client_start, local_steps, num_sampled, run_round, sample, sampling_note
from .setup import Federation, make_strategy, model_label, setup_run

BASE_EVAL_FILE = "base_eval.json"  # the base model's metrics: round 0 of every curve


@dataclass
class SimulationResult:
    output_dir: Path
    metrics: list[dict]  # metrics.jsonl: rounds 1..N (round 0, the base model, is base_eval)
    strategy: Strategy
    adapter_dir: Path | None = None
    client_ranks: dict[str, int] = field(default_factory=dict)
    base_eval: dict = field(default_factory=dict)  # the base model's metrics before round 1 (eval_base): round 0
    setup_s: float = float("nan")  # seconds from the call to the first round of this call
    num_train_clients: int = 0


def data_fingerprint(cfg: SimConfig, data: Federation | None) -> dict | None:
    """The content of the run's data, part of its identity (None: data built in code or given): the sha256
    of its data file, or of every file a built-in data set (``BUILTIN_SOURCES``) is read from, by file
    name; where the package is installed is kept for messages, not compared."""
    if data is not None or not isinstance(cfg.dataset, str):
        return None
    if cfg.dataset in BUILTIN_SOURCES:
        files = BUILTIN_SOURCES[cfg.dataset]()
        return {"builtin": cfg.dataset, "sha256": {name: fingerprint(path) for name, path in sorted(files.items())},
                "where": str(next(iter(files.values())).parent) if files else ""}
    if not Path(cfg.dataset).is_file():
        return None
    return {"file": str(cfg.dataset), "sha256": fingerprint(cfg.dataset)}


def data_change(was: dict | None, now: dict | None, cfg: SimConfig) -> str | None:
    """Why the data a checkpoint's run trained on (``was``) is not the data read now, or None."""
    def content(record):
        return {k: v for k, v in record.items() if k != "where"} if isinstance(record, dict) else record

    if content(was) == content(now):
        return None
    if now is not None and "builtin" in now:
        name = f"the built-in dataset {now['builtin']!r} ({now['where']})"
        if not isinstance(was, dict) or not isinstance(was.get("sha256"), dict):
            return (f"the checkpoint holds no fingerprint of {name} (it predates fingerprinting built-in data), so "
                    "it cannot be checked to be the content the run trained on; start afresh (without --resume)")
        old, new = was["sha256"], now["sha256"]
        diff = {"changed": sorted(n for n in set(old) & set(new) if old[n] != new[n]),
                "added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new))}
        return (f"{name} is not the content the run trained on (its package changed): "
                + "; ".join(f"{what} {_few(names)}" for what, names in diff.items() if names))
    return (f"the data file {cfg.dataset} is not the content the run trained on (sha256 "
            f"{(was or {}).get('sha256', 'none')[:12]}..., now {(now or {}).get('sha256', 'none')[:12]}...)")


def _few(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_same_run(state: dict, identity: dict, cfg: SimConfig, out: Path) -> None:
    """InputError unless the checkpoint's run is this one: its defining settings and data content."""
    saved, now = run_defining(state["config"]), run_defining(identity["config"])
    if saved != now:
        diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        raise InputError(f"config: cannot resume {out}: settings differ from the checkpoint's "
                         f"(name: (checkpoint, now)): {diff}")
    problem = data_change(state.get("data"), identity["data"], cfg)
    if problem is not None:
        raise InputError(f"config: cannot resume {out}: {problem}")
    if state["next_round"] > cfg.rounds:
        raise InputError(f"config: cannot resume {out}: its checkpoint is at round {state['next_round']}, past "
                         f"rounds = {cfg.rounds}")


def run_identity(cfg: SimConfig, data: Federation | None = None) -> dict:
    """What a checkpoint must have been written by: the run's settings and its data's content."""
    return {"config": cfg.to_dict(), "data": data_fingerprint(cfg, data)}


def restore(cfg: SimConfig, out: Path, strategy: Strategy, identity: dict) -> dict | None:
    """The state after the newest intact checkpoint of the run in ``out``, its strategy loaded into ``strategy``
    and checked to be this run (``identity``, :func:`check_same_run`); None when it has no checkpoint. What
    ``resume`` continues from, and what ``fedlora benchmark --per-client`` evaluates."""
    state = Checkpoints(out).load(strategy)
    if state is not None:
        check_same_run(state, identity, cfg, out)
    return state


def run_title(cfg: SimConfig, num_clients: int, ranks: list[int]) -> str:
    """What the plot says was run: rule, model, data, clients and ranks."""
    model = Path(cfg.model).name if isinstance(cfg.model, str) else model_label(cfg.model)
    data = "Shakespeare roles" if cfg.dataset == "shakespeare" else Path(cfg.dataset).name
    per_round = num_sampled(cfg, num_clients)
    levels = "/".join(str(r) for r in sorted(set(ranks)))
    return f"{cfg.strategy} · {model} · {data}: {num_clients} clients, {per_round} a round, ranks {levels}"


def simulate(cfg: SimConfig | dict | None = None, *, update_hook: UpdateHook | None = None,
             data: Federation | None = None, stop_after: int | None = None) -> SimulationResult:
    """Run the experiment ``cfg`` (defaults: the built-in SmolLM2 x Shakespeare FlexLoRA run).

    update_hook: called on every client update before aggregation (tests use it to
    corrupt or crash a client); an exception there drops only that client.
    data: pre-built federated data (skips loading ``cfg.dataset``).
    stop_after: stop after this many rounds of this call (to test resuming).
    Problems with the settings, files or model raise :class:`InputError`, before
    the model loads where they can be seen without it.
    """
    started = time.perf_counter()
    if cfg is None:
        cfg = SimConfig()
    elif isinstance(cfg, dict):
        cfg = SimConfig.from_dict(cfg)
    cfg.validate()
    out = prepare_output_dir(cfg)  # refuses a folder holding another run before anything loads
    identity = run_identity(cfg, data)  # of the file as it is read
    run = setup_run(cfg, data)
    fm, tokenizer, pad_id, data, clients, ranks = run.fm, run.tokenizer, run.pad_id, run.data, run.clients, run.ranks
    rank_of = run.rank_of
    capacity = run.rank_of  # each client's rank as the distribution assigned it (not a rank it pruned to since)
    strategy = make_strategy(cfg, fm.module_shapes, ranks, run.device)
    checkpoints = Checkpoints(out)
    checkpoints.clean()
    metrics: list[dict] = []
    totals = {"bytes_up": 0, "bytes_down": 0, "bytes_down_global": 0}
    client_state: dict[str, dict] = {}  # each client's own memory across rounds (the rule's client-side hooks)
    # SCAFFOLD: each client's own control variate c_k, on disk per client and round (as personal factors)
    control_store = PersonalStore(out / "controls") if cfg.scaffold else None
    # the factors each client keeps to itself across rounds (strategy.personal: FedSA-LoRA's B), on disk
    personal_store = PersonalStore(out / "clients") if strategy.personal else None
    start_round = 0
    if cfg.resume:
        state = restore(cfg, out, strategy, identity)
        if state is None:
            reporting.note(f"nothing to resume in {out} (no checkpoint): starting at round 1")
        else:
            start_round, metrics, totals = state["next_round"], state["metrics"], {**totals, **state["totals"]}
            client_state = state.get("client_state", {})
            rank_of.update(state.get("client_ranks", {}))
            if start_round >= cfg.rounds:
                reporting.note(f"nothing to resume: {out} has finished its {start_round} rounds (give --rounds N "
                               "with N larger to extend it)")
            else:
                reporting.note(f"resuming {out} at round {start_round + 1} of {cfg.rounds} "
                               f"(rounds 1-{start_round} restored from its checkpoint)")
    note = sampling_note(cfg, len(clients), num_unseen(data))
    if note is not None:
        reporting.note(note)

    heldout, unseen = ([ex for _, exs in data.eval_sets(split, cfg.eval_max_examples) for ex in exs]
                       for split in ("heldout", "unseen"))
    owners = heldout_owners(clients, cfg.eval_max_examples, capacity)  # who each held-out example belongs to
    if len(owners) != len(heldout):  # a data source whose evaluation set is not its clients' held-out examples
        reporting.note(f"the held-out set has {len(heldout)} examples, its clients' held-out examples {len(owners)}: "
                       "no breakdown by client rank (eval_heldout_by_rank)")
        owners = None
    rouge_sets = {}
    if cfg.dataset != "shakespeare" and cfg.eval_generate_examples > 0:  # FlexLoRA's metric for instructions
        rouge_sets = {split: data.eval_sets(split, cfg.eval_generate_examples) for split in ("heldout", "unseen")}
    (out / "config.json").write_text(cfg.to_json())

    def evaluate(desc: str, global_of: Strategy | None = None, generate: bool = True, splits=("heldout", "unseen")
                 ) -> dict:
        """The base model (``global_of`` None) or base + the rule's global update, under a progress bar, on
        ``splits``."""
        sets = {k: v for k, v in rouge_sets.items() if k in splits} if generate else {}
        held = heldout if "heldout" in splits else []
        bar = reporting.progress(None, cfg.progress, total=evaluation_size(held, unseen, sets), desc=desc,
                                 unit="example", leave=False)
        try:
            if global_of is None:
                return evaluate_model(fm, None, held, unseen, pad_id, tokenizer, sets, cfg.max_new_tokens,
                                      progress=bar.update, heldout_ranks=owners)
            return evaluate_global(fm, global_of, heldout, unseen, pad_id, tokenizer, sets, cfg.max_new_tokens,
                                   cfg.log_spectrum, progress=bar.update, heldout_ranks=owners)
        finally:
            bar.close()

    base_eval = _base_evaluation(cfg, out, evaluate)
    setup_s = time.perf_counter() - started

    def result(adapter_dir=None) -> SimulationResult:
        return SimulationResult(out, metrics, strategy, adapter_dir, rank_of, base_eval, setup_s, len(clients))

    first = min(start_round, cfg.rounds)
    bar = reporting.progress(range(first, cfg.rounds), cfg.progress, desc="rounds", unit="round",
                             initial=first, total=cfg.rounds)
    done_now = 0
    for round_idx in bar:  # round_idx (from 0) seeds the round; users see round_idx + 1
        number = round_idx + 1
        t0 = time.perf_counter()
        sampled = sample(cfg, round_idx, clients)
        torch.manual_seed(stable_seed(cfg.seed, "round", round_idx))  # dropout
        steps_bar = reporting.progress(None, cfg.progress, desc=f"round {number}: local training",
                                       unit="client-step", leave=False,
                                       total=sum(local_steps(cfg, c.num_examples) for c in sampled))
        try:
            record = run_round(cfg, round_idx, fm, strategy, sampled, rank_of, pad_id, update_hook,
                               progress=steps_bar.update, client_state=client_state, control_store=control_store,
                               personal_store=personal_store)
        finally:
            steps_bar.close()
        rank_of.update(record.get("self_pruned", {}))  # a client that pruned its rank trains at it from now on
        for key in totals:
            totals[key] += record[key]
        if cfg.eval_every and (number % cfg.eval_every == 0 or number == cfg.rounds):
            generate = number == cfg.rounds or bool(cfg.eval_generate_every and number % cfg.eval_generate_every == 0)
            def factors_of(client, next_round=round_idx + 1):  # a client's own model, as it starts the next round
                return client_start(cfg, strategy, client.client_id, rank_of[client.client_id], next_round,
                                    personal_store)
            if strategy.has_global_model:
                record.update(evaluate(f"round {number}: evaluation", strategy, generate))
                if strategy.personal:  # and each client's personalised model
                    record.update(evaluate_personal(fm, strategy, clients, factors_of, pad_id, cfg.eval_max_examples,
                                                    capacity))
            else:  # no shared model: unseen clients (no adapter of their own) on the base model, the others on theirs
                record.update(evaluate(f"round {number}: evaluation", None, generate, splits=("unseen",)))
                record.update(evaluate_personal(fm, strategy, clients, factors_of, pad_id, cfg.eval_max_examples,
                                                capacity, key="eval_heldout"))
                clients_of = heldout_groups(clients, cfg.eval_generate_examples)  # whose examples rouge_sets holds
                if generate and rouge_sets.get("heldout") and \
                        [len(e) for _, e in rouge_sets["heldout"]] == [n for _, n in clients_of]:
                    groups = [(size, examples, client) for (size, examples), (client, _) in
                              zip(rouge_sets["heldout"], clients_of)]
                    record["eval_heldout_rougeL"] = personal_rouge_l(fm, strategy, groups, factors_of, tokenizer,
                                                                     pad_id, cfg.max_new_tokens)
        record["wall_time_s"] = round(time.perf_counter() - t0, 3)
        record.update({f"total_{k}": v for k, v in totals.items()})
        metrics.append(record)
        reporting.write_metrics(out / "metrics.jsonl", metrics)
        checkpoints.save(number, strategy, {"next_round": number, "metrics": metrics, "totals": totals,
                                            **identity, "client_state": client_state, "client_ranks": rank_of})
        reporting.summary(record, cfg.rounds)
        done_now += 1
        if stop_after is not None and done_now >= stop_after and number < cfg.rounds:
            bar.close()
            return result()

    reporting.plot(metrics, out / "metrics.png", base_eval, run_title(cfg, len(clients), ranks))
    if not strategy.has_global_model:  # each client's adapter stays its own (out/clients), nothing to export
        return result()
    export_rank = cfg.export_rank or max(ranks)
    return result(export_peft_adapter(strategy, out / "adapter", export_rank, cfg, tokenizer=tokenizer))


def _base_evaluation(cfg: SimConfig, out: Path, evaluate) -> dict:
    """The base model's metrics before round 1 (round 0 of every curve), computed once per run folder."""
    path = out / BASE_EVAL_FILE
    if not cfg.eval_base:
        return {}
    if path.is_file():  # a resumed run evaluated it already (same settings: checked against the checkpoint)
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    record = evaluate("round 0 (base model): evaluation")
    record["wall_time_s"] = round(time.perf_counter() - t0, 3)
    atomic_write(path, json.dumps(record, indent=2).encode())
    reporting.summary_base(record)
    return record


def num_unseen(data: Federation) -> int:
    """How many clients the federation holds out as unseen (evaluation only)."""
    return len(data.unseen_clients) if isinstance(data, FederatedData) else len(data.unseen)
