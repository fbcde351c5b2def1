"""``fedlora benchmark``: a grid of ``simulate`` runs, one folder per cell, resumable cell by cell.

A grid file (TOML) has three tables:

    [simulate]   settings every cell shares (any SimConfig field)
    [grid]       field -> list of values; the cells are every combination, in the order written
    [benchmark]  output_dir, metric (the tables' and plots' metric), progress

``strategy`` values may also name a baseline, which stands for a plain setting
(``BASELINES``): ``bucket`` (FedAvg with every client at the federation's
smallest rank: the bucket effect), ``homogeneous-max`` (FedAvg with every
client at the largest rank: the upper bound when every client can afford it)
and ``local-only`` (no federation: the rule ``local``, each client trains its own
adapter at its own rank in the rounds that sample it; its held-out metrics score
each client's examples with its own adapter, its unseen metrics are the base
model's, as unseen clients have no adapter).

Cell ``<name>`` runs in ``<output_dir>/cells/<name>/`` with ``resume = true``:
a killed grid continues where it stopped, inside the cell it was running.
A finished cell writes ``cell.json`` (its grid values, its settings, wall time)
last, atomically; a rerun skips such cells unless their settings changed.
Cells whose settings resolve to the same run (``homogeneous-max`` does not
depend on the rank distribution) share the first one's folder and run once.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.federated.update import atomic_write

from .benchmark_report import CELL_FILE, DEFAULT_METRIC, FAILED_FILE, GRID_FILE, write_report
from .config import InputError, SimConfig, tomllib
from .run import BASE_EVAL_FILE, simulate

# Baselines as the settings they stand for (on top of the cell's other values).
BASELINES: dict[str, dict[str, Any]] = {
    "bucket": {"strategy": "fedavg", "strategy_options": {"heterogeneous": "bucket"}},
    "homogeneous-max": {"strategy": "fedavg", "rank_distribution": "homogeneous"},
    "local-only": {"strategy": "local"},
}
_SLUG = re.compile(r"[^A-Za-z0-9.+-]+")
# What the base model's evaluation depends on: the model, the data and its partition, the evaluation sets.
BASE_EVAL_KEYS = ("model", "quantization", "dtype", "device", "dataset", "partition", "client_field",
                  "category_field", "dirichlet_alpha", "min_lines", "unseen_fraction", "heldout_fraction", "seq_len",
                  "num_clients", "seed", "eval_max_examples", "eval_generate_examples", "max_new_tokens")
# What its breakdown by client rank (eval_heldout_by_rank) depends on besides: the clients' ranks.
RANK_KEYS = ("rank_distribution", "rank_levels", "client_ranks")


@dataclass
class Cell:
    """One entry of the grid: its grid values (``strategy`` as written, baseline names kept) and settings.

    ``run`` names the folder that holds its run: cells whose settings resolve to
    the same run (``homogeneous-max`` under every rank distribution) share one.
    """

    name: str
    values: dict[str, Any]
    config: SimConfig
    run: str = ""

    @property
    def rule(self) -> str:
        return str(self.values.get("strategy", self.config.strategy))


@dataclass
class Grid:
    base: dict[str, Any]
    axes: dict[str, list]
    output_dir: Path
    metric: str = DEFAULT_METRIC
    progress: bool = True

    @classmethod
    def load(cls, path: str | Path, output_dir: str | Path | None = None) -> Grid:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"grid file {path}: {exc}") from None
        return cls.from_dict(data, output_dir=output_dir, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, output_dir: str | Path | None = None, source: str = "grid") -> Grid:
        unknown = sorted(set(data) - {"simulate", "grid", "benchmark"})
        if unknown:
            raise ValueError(f"{source}: unknown table(s) {unknown}; a grid has [simulate], [grid], [benchmark]")
        base, axes, opts = (data.get(k, {}) for k in ("simulate", "grid", "benchmark"))
        for name, table in (("simulate", base), ("grid", axes), ("benchmark", opts)):
            if not isinstance(table, dict):
                raise ValueError(f"{source}: [{name}] must be a table")
        fields = {f.name for f in dataclasses.fields(SimConfig)}
        for key, values in axes.items():
            if key not in fields:
                raise ValueError(f"{source}: [grid] {key!r} is not a simulate setting; known: {sorted(fields)}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{source}: [grid] {key} must be a non-empty list of values")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"{source}: [grid] {key} lists a value twice")
        both = sorted(set(axes) & set(base))
        if both:
            raise ValueError(f"{source}: {both} set in both [simulate] and [grid]")
        for key in ("output_dir", "resume"):
            if key in base or key in axes:
                raise ValueError(f"{source}: {key!r} is the benchmark's to set (cells go to OUTPUT/cells/<name>)")
        bad = sorted(set(opts) - {"output_dir", "metric", "progress"})
        if bad:
            raise ValueError(f"{source}: unknown [benchmark] setting(s) {bad}; known: output_dir, metric, progress")
        out = Path(output_dir if output_dir is not None else opts.get("output_dir", "runs/benchmark"))
        metric = opts.get("metric", DEFAULT_METRIC)
        progress = opts.get("progress", base.get("progress", True))
        if not isinstance(metric, str) or not isinstance(progress, bool):
            raise ValueError(f"{source}: [benchmark] metric must be a string and progress true/false")
        grid = cls(dict(base), {k: list(v) for k, v in axes.items()}, out, metric, progress)
        grid.cells()  # every cell's settings are checked before anything runs
        return grid

    def cells(self) -> list[Cell]:
        keys = list(self.axes)
        cells, names, runs = [], {}, {}
        for combo in itertools.product(*(self.axes[k] for k in keys)):
            values = dict(zip(keys, combo))
            settings = {**self.base, **values}
            strategy = settings.get("strategy")
            if isinstance(strategy, str) and strategy in BASELINES:
                for key, value in BASELINES[strategy].items():
                    if isinstance(value, dict):
                        value = {**settings.get(key, {}), **value}
                    settings[key] = value
            name = cell_name(values)
            if name in names:
                raise ValueError(f"cells {names[name]} and {values} get the same folder name {name!r}")
            names[name] = values
            settings.update(resume=True, progress=settings.get("progress", self.progress))
            try:
                config = SimConfig.from_dict({**settings, "output_dir": "."})
            except (TypeError, ValueError) as exc:
                raise ValueError(f"cell {name}: {exc}") from None
            run = runs.setdefault(config.to_json(), name)
            config.output_dir = str(self.output_dir / "cells" / run)
            cells.append(Cell(name, values, config, run))
        return cells

    def runs(self) -> dict[str, list[Cell]]:
        """Run folder -> the cells it serves, in grid order."""
        out: dict[str, list[Cell]] = {}
        for cell in self.cells():
            out.setdefault(cell.run, []).append(cell)
        return out


def cell_name(values: dict[str, Any]) -> str:
    """A folder name from the cell's grid values: ``strategy-flora__seed-1``."""
    if not values:
        return "single"
    parts = []
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        parts.append(f"{key}-{_SLUG.sub('_', text).strip('_') or '_'}")
    return "__".join(parts)


def run_done(cells: list[Cell]) -> bool:
    """True when the run of ``cells`` finished with the settings it has now (changed settings are an error)."""
    config = cells[0].config
    path = Path(config.output_dir) / CELL_FILE
    if not path.is_file():
        return False
    saved = json.loads(path.read_text()).get("config", {})
    now = json.loads(config.to_json())
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"cell {cells[0].run} finished with other settings (they differ in {diff}); "
                         f"use a new output_dir or delete {path.parent}")
    return True


def add_labels(cells: list[Cell]) -> None:
    """Label a finished run with every cell of this grid it serves: a grid that adds a rank distribution
    reuses homogeneous-max's finished run, whose cell.json named only the cells of the grid that ran it.
    Labels of cells this grid does not list stay (another grid file may share the folder)."""
    path = Path(cells[0].config.output_dir) / CELL_FILE
    record = json.loads(path.read_text())
    known = {label["cell"] for label in record["labels"]}
    new = [{"cell": c.name, "values": c.values} for c in cells if c.name not in known]
    if new:
        record["labels"] += new
        atomic_write(path, json.dumps(record, indent=2).encode())


def reuse_base_eval(config: SimConfig) -> str | None:
    """Give the run of ``config`` the base evaluation another run of the grid already made, if one agrees.

    The base model's metrics depend only on ``BASE_EVAL_KEYS`` (the model, the data and
    its partition, the evaluation sets): the same model on the same examples gives the
    same numbers (greedy generation included), so the rules of one seed share one. The
    copy says where it came from (``shared_from``); it keeps the breakdown by client rank only
    when the clients' ranks (``RANK_KEYS``) agree too. Returns that run's folder name, or None.
    """
    target = Path(config.output_dir) / BASE_EVAL_FILE
    if not config.eval_base or target.is_file():
        return None
    want = json.loads(config.to_json())
    for folder in sorted(target.parent.parent.glob("*/")):
        source, settings = folder / BASE_EVAL_FILE, folder / "config.json"
        if folder == target.parent or not (source.is_file() and settings.is_file()):
            continue
        other = json.loads(settings.read_text())
        if all(other.get(key) == want[key] for key in BASE_EVAL_KEYS):
            record = {**json.loads(source.read_text()), "shared_from": folder.name}
            if any(other.get(key) != want[key] for key in RANK_KEYS):  # its clients were grouped by other ranks
                record.pop("eval_heldout_by_rank", None)
            target.parent.mkdir(parents=True, exist_ok=True)
            # config.json first, as simulate writes it: the folder then holds this (resumable) run.
            atomic_write(target.parent / "config.json", config.to_json().encode())
            atomic_write(target, json.dumps(record, indent=2).encode())
            return folder.name
    return None


def run_cells(cells: list[Cell]) -> dict:
    """Run (or continue) the run shared by ``cells``; write its cell.json last, atomically."""
    config = cells[0].config
    reuse_base_eval(config)
    start = time.perf_counter()
    result = simulate(config)
    record = {"name": cells[0].run, "labels": [{"cell": c.name, "values": c.values} for c in cells],
              "config": json.loads(config.to_json()),
              "elapsed_s": round(time.perf_counter() - start, 3),
              "round_time_s": round(sum(m.get("wall_time_s", 0.0) for m in result.metrics), 3)}
    atomic_write(Path(config.output_dir) / CELL_FILE, json.dumps(record, indent=2).encode())
    return record


def run_grid(grid: Grid, *, stop_after_runs: int | None = None) -> list[str]:
    """Run every unfinished cell in grid order, then write the report. Returns the runs done now.

    A cell whose settings cannot run (an InputError: e.g. a rule that needs one rank under
    mixed ranks) is listed with its reason in failed.json and the grid goes on; a rerun
    tries it again. ``stop_after_runs``: stop after that many runs (how tests kill a grid).
    """
    grid.output_dir.mkdir(parents=True, exist_ok=True)
    runs = grid.runs()
    atomic_write(grid.output_dir / GRID_FILE, json.dumps({
        "simulate": grid.base, "grid": grid.axes, "metric": grid.metric,
        "cells": [c.name for c in grid.cells()]}, indent=2).encode())
    todo = [name for name, cells in runs.items() if not run_done(cells)]
    for name, cells in runs.items():
        if name not in todo:
            add_labels(cells)
    done_now: list[str] = []
    failed: dict[str, str] = {}
    bar = _bar(len(runs), len(runs) - len(todo), grid.progress)
    for name in todo:
        if stop_after_runs is not None and len(done_now) + len(failed) >= stop_after_runs:
            break
        if bar is not None:
            bar.set_postfix_str(name)
        else:
            print(f"cell {len(runs) - len(todo) + len(done_now) + len(failed) + 1}/{len(runs)}: {name}", flush=True)
        try:
            run_cells(runs[name])
        except InputError as exc:
            failed[name] = str(exc)
            print(f"cell {name} cannot run: {exc}", file=sys.stderr, flush=True)
        else:
            done_now.append(name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    atomic_write(grid.output_dir / FAILED_FILE, json.dumps(failed, indent=2).encode())
    if len(done_now) + len(failed) == len(todo) and any(run_done(cells) for cells in runs.values()):
        write_report(grid.output_dir, metric=grid.metric)
    return done_now


def _bar(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="grid", unit="cell", position=0)
