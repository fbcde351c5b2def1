"""``fedlora benchmark --per-client DIR``: the held-out loss by client rank of every finished run of a
benchmark, after the fact, from its final checkpoint.

For runs that finished before simulate recorded ``eval_heldout_by_rank``, or to score more
examples than the run did (``max_examples``; default: the run's ``eval_max_examples``).
Each run is restored through simulate's resume path (:func:`fedlora.simulation.run.restore`:
the same settings, data content and strategy state checks) and its training clients'
held-out examples, spread over the clients as the run's evaluation takes them, are scored under

- ``base``: the base model;
- ``global``: the base model plus the rule's global update (rules that have one);
- ``received``: each client's model as it would start the next round: the rule's starting
  factors at the client's rank (FlexLoRA: its rank-r truncation of the global update; bucket:
  the smallest rank; FedSA-LoRA and local-only: its own stored factors) beside the rule's
  ``client_base()``: what the client would actually use.

The unseen clients' examples (the same budget, spread the same way) are scored under ``base``
and ``global`` (``unseen`` in per_client.json; a rule without a global model, local-only, has
only the base model for them). The base model's scores depend only on the data, the partition
and the budget, so one invocation scores them once per such setting and reuses them.

Each is grouped by the rank the cell's rank distribution assigns each client: for a run that
serves several cells (``homogeneous-max``, which trains every client at the largest rank under
every distribution) the same scores are grouped once per cell, by that cell's distribution.
Writes ``per_client.json`` into the run's folder (a rerun with the same budget skips it); the
report (``results.md``) then shows the table.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from fedlora.federated.ranks import assign_ranks
from fedlora.federated.update import atomic_write

from .benchmark import BASE_EVAL_KEYS
from .benchmark_report import CELL_FILE, PER_CLIENT_FILE
from .config import InputError, SimConfig
from .evaluation import by_rank, example_losses, group_owners, heldout_groups, loss_entry, own_model_losses
from .personal import PersonalStore
from .round import client_start
from .run import restore, run_identity
from .setup import make_strategy, setup_run


def evaluate_run(folder: Path, max_examples: int | None = None, base_cache: dict | None = None) -> dict | None:
    """Score the finished run in ``folder`` (see the module docstring) and write its per_client.json; returns
    what it wrote, or None when the file is there already for this budget and checkpoint. ``base_cache``:
    the base model's scores of earlier runs of this invocation, by data setting and budget."""
    record = json.loads((folder / CELL_FILE).read_text())
    # the folder as it is now (a benchmark may have moved since it ran), quietly
    cfg = SimConfig.from_dict({**record["config"], "output_dir": str(folder), "progress": False})
    budget = max_examples or cfg.eval_max_examples
    path = folder / PER_CLIENT_FILE
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("max_examples") == budget and "unseen" in done \
                and set(done.get("cells", {})) == {c["cell"] for c in record["labels"]}:
            return None
    run = setup_run(cfg)
    strategy = make_strategy(cfg, run.fm.module_shapes, run.ranks, run.device)
    state = restore(cfg, folder, strategy, run_identity(cfg))
    if state is None:
        raise InputError(f"{folder}: no checkpoint to evaluate")
    rounds = state["next_round"]
    rank_of = {**run.rank_of, **state.get("client_ranks", {})}  # the rank each trains at now (HetLoRA prunes)
    groups = heldout_groups(run.clients, budget)
    examples = [ex for client, n in groups for ex in client.heldout[:n]]
    unseen = [ex for _, exs in run.data.eval_sets("unseen", budget) for ex in exs]
    fm = run.fm
    scores, unseen_scores = {}, {}
    cache = base_cache if base_cache is not None else {}
    base_key = json.dumps([getattr(cfg, k) for k in BASE_EVAL_KEYS] + [budget])
    fm.load_zero_adapter()
    if base_key not in cache:
        cache[base_key] = (example_losses(fm, examples, run.pad_id), example_losses(fm, unseen, run.pad_id))
    scores["base"], unseen_scores["base"] = cache[base_key]
    if strategy.has_global_model:
        fm.set_deltas(strategy.global_deltas())
        scores["global"] = example_losses(fm, examples, run.pad_id)
        unseen_scores["global"] = example_losses(fm, unseen, run.pad_id)
        fm.set_deltas(None)
    store = PersonalStore(folder / "clients") if strategy.personal else None
    scores["received"] = own_model_losses(
        fm, strategy, groups, lambda c: client_start(cfg, strategy, c.client_id, rank_of[c.client_id], rounds, store),
        run.pad_id)
    cells = {}
    for label in record["labels"]:
        dist = label["values"].get("rank_distribution", cfg.rank_distribution)
        ranks = dict(zip(run.client_ids, assign_ranks(len(run.clients), dist, cfg.rank_levels, cfg.seed,
                                                      cfg.client_ranks)))
        owners = group_owners(groups, ranks)
        cells[label["cell"]] = {"rank_distribution": dist, **{
            model: {**loss_entry(math.fsum(sums), sum(tokens)), "by_rank": by_rank(sums, tokens, owners)}
            for model, (sums, tokens) in scores.items()}}
    out = {"max_examples": budget, "examples": len(examples), "tokens": sum(scores["base"][1]), "rounds": rounds,
           "unseen": {"examples": len(unseen), "tokens": sum(unseen_scores["base"][1]),
                      **{model: loss_entry(math.fsum(sums), sum(tokens)) for model, (sums, tokens) in unseen_scores.items()}},
           "cells": cells}
    atomic_write(path, json.dumps(out, indent=2).encode())
    return out


def evaluate_benchmark(root: str | Path, max_examples: int | None = None) -> list[str]:
    """:func:`evaluate_run` for every finished run under ``root/cells``; returns the runs scored now."""
    root = Path(root)
    runs = sorted(p.parent for p in (root / "cells").glob(f"*/{CELL_FILE}"))
    if not runs:
        raise InputError(f"{root}: no finished cell (cells/*/{CELL_FILE})")
    done = []
    base_cache: dict = {}
    for k, folder in enumerate(runs, start=1):
        wrote = evaluate_run(folder, max_examples, base_cache)
        print(f"per-client {k}/{len(runs)}: {folder.name}: "
              + ("scored" if wrote else "per_client.json is there already for this budget"), flush=True)
        if wrote:
            done.append(folder.name)
    return done
