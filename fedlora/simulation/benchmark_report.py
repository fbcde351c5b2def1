"""Tables and plots of a benchmark grid, rebuilt from its finished cells alone.

Reads ``<dir>/cells/*/cell.json`` (written last by a finished cell), the cell's
``metrics.jsonl`` and its ``base_eval.json`` (the base model before round 1),
and writes ``results.csv`` (one row a cell), ``results.md`` (rules x rank
distributions, mean +- std over seeds, the best in each column in bold),
``curves.png`` (the metric's change from the base model of the same seed against
rounds and against bytes sent, one line per rule, a band of +-1 std over seeds), ``bars.png`` (the final metric of every
cell, grouped by rule and rank distribution) and, when the cells logged them,
the rank breakdown and spectrum of ``benchmark_analysis`` (``spectrum.png``).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedlora.federated.update import atomic_write

from .benchmark_analysis import markdown_sections, spectrum_plot
from .reporting import EVAL_KEYS as METRICS
from .run import BASE_EVAL_FILE

CELL_FILE = "cell.json"  # written last by a finished run of the grid
GRID_FILE = "grid.json"  # the grid's settings and its cells in order
FAILED_FILE = "failed.json"  # run -> why its settings could not run, from the grid's last pass
PER_CLIENT_FILE = "per_client.json"  # fedlora benchmark --per-client: a run's held-out loss by client rank
DEFAULT_METRIC = "eval_heldout_ppl"
REPORT_FILES = {"csv": "results.csv", "md": "results.md", "curves": "curves.png", "bars": "bars.png",
                "spectrum": "spectrum.png"}  # the last only when the cells logged spectra (log_spectrum)
# Grid keys the tables lay out; every other grid key splits the report into one table per value.
LAYOUT_KEYS = ("strategy", "rank_distribution", "seed")


@dataclass
class CellResult:
    """A cell of the grid with the results of its run (a run shared by cells appears once per cell)."""

    name: str
    run: str
    values: dict
    config: dict
    metrics: list[dict]
    base: dict = field(default_factory=dict)
    round_time_s: float = float("nan")
    per_client: dict | None = None  # this cell's entry of its run's per_client.json, with max_examples, or None

    @property
    def rule(self) -> str:
        return str(self.values.get("strategy", self.config["strategy"]))

    @property
    def dist(self) -> str:
        """The rank distribution as the grid names it (homogeneous-max runs homogeneous under every one)."""
        return str(self.values.get("rank_distribution", self.config["rank_distribution"]))

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def group(self) -> tuple:
        """The values of the grid keys other than rule, distribution and seed (dataset, model, ...)."""
        return tuple((k, json.dumps(v)) for k, v in sorted(self.values.items()) if k not in LAYOUT_KEYS)

    def series(self, metric: str) -> list[tuple[int, float, float]]:
        """(rounds completed, MB sent up so far, metric): the base model first, then each evaluated round."""
        out = [(0, 0.0, self.base[metric])] if _finite(self.base.get(metric)) else []
        for m in self.metrics:
            if _finite(m.get(metric)):
                out.append((m["round"], m["total_bytes_up"] / 1e6, m[metric]))  # rounds count from 1
        return out

    def final(self, metric: str) -> float:
        points = self.series(metric)
        return points[-1][2] if points and points[-1][0] > 0 else float("nan")

    def best(self, metric: str) -> float:
        values = [v for r, _, v in self.series(metric) if r > 0]
        if not values:
            return float("nan")
        return max(values) if higher_is_better(metric) else min(values)


def higher_is_better(metric: str) -> bool:
    return metric.endswith("rougeL")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path}: {exc}") from None


def load_cells(output_dir: str | Path) -> list[CellResult]:
    """Every finished cell under ``output_dir/cells``, in grid order (as grid.json lists them) else by name."""
    root = Path(output_dir)
    if not (root / "cells").is_dir():
        raise ValueError(f"{root} has no cells/ folder: not a benchmark output directory")
    cells = []
    for cell_file in sorted((root / "cells").glob(f"*/{CELL_FILE}")):
        record = _read_json(cell_file, "cell record")
        folder = cell_file.parent
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        base = _read_json(folder / BASE_EVAL_FILE, "base evaluation") if (folder / BASE_EVAL_FILE).is_file() \
            else {}
        scored = _read_json(folder / PER_CLIENT_FILE, "per-client record") if (folder / PER_CLIENT_FILE).is_file() \
            else {}
        for label in record["labels"]:
            mine = scored.get("cells", {}).get(label["cell"])
            cells.append(CellResult(label["cell"], record["name"], label["values"], record["config"], metrics, base,
                                    record.get("round_time_s", float("nan")),
                                    None if mine is None else {**mine, "max_examples": scored.get("max_examples"),
                                                                 "unseen": scored.get("unseen", {})}))
    order = _grid_order(root)
    if order:
        rank = {name: i for i, name in enumerate(order)}
        cells.sort(key=lambda c: rank.get(c.name, len(rank)))
    return cells


def _grid_order(root: Path) -> list[str]:
    if not (root / GRID_FILE).is_file():
        return []
    return list(_read_json(root / GRID_FILE, "grid record").get("cells", []))


def _ordered(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    return float(np.mean(vals)), std, len(vals)


# ---------------------------------------------------------------- tables

CSV_FIELDS = ["cell", "run", "rule", "strategy", "rank_distribution", "seed", "rounds", "clients_per_round",
              *(f"{kind}_{m}" for m in METRICS for kind in ("base", "final", "best")),
              "bytes_up_total", "bytes_down_total", "bytes_up_per_round", "wall_time_s"]


def csv_rows(cells: list[CellResult]) -> tuple[list[str], list[dict]]:
    extra = sorted({k for c in cells for k in c.values} - set(LAYOUT_KEYS))
    rows = []
    for c in cells:
        last = c.metrics[-1] if c.metrics else {}
        row = {"cell": c.name, "run": c.run, "rule": c.rule, "strategy": c.config["strategy"],
               "rank_distribution": c.dist,
               "seed": c.seed, "rounds": len(c.metrics), "clients_per_round": c.config["clients_per_round"],
               "bytes_up_total": last.get("total_bytes_up", ""), "bytes_down_total": last.get("total_bytes_down", ""),
               "bytes_up_per_round": round(last["total_bytes_up"] / len(c.metrics)) if c.metrics else "",
               "wall_time_s": c.round_time_s}
        for m in METRICS:
            row[f"base_{m}"] = c.base.get(m, "")
            row[f"final_{m}"] = c.final(m) if _finite(c.final(m)) else ""
            row[f"best_{m}"] = c.best(m) if _finite(c.best(m)) else ""
        for k in extra:
            row[k] = json.dumps(c.values[k]) if not isinstance(c.values.get(k), str) else c.values[k]
        rows.append(row)
    return CSV_FIELDS[:4] + extra + CSV_FIELDS[4:], rows


def _fmt(mean: float, std: float, n: int, digits: int, seeds: int) -> str:
    """``mean ± std``; ``(n of seeds)`` when some seeds of the cell have not finished."""
    if n == 0:
        return "–"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    return text + (f" ({n} of {seeds} seeds)" if n < seeds else "")


def metric_table(cells: list[CellResult], metric: str, value=None, digits: int = 3) -> list[str]:
    """Markdown rows: rules x rank distributions, mean ± std over seeds; the best mean of a column in bold."""
    value = value or (lambda c: c.final(metric))
    rules = _ordered(c.rule for c in cells)
    dists = _ordered(c.dist for c in cells)
    stats = {(r, d): mean_std([value(c) for c in cells if c.rule == r and c.dist == d]) for r in rules for d in dists}
    seeds = len({c.seed for c in cells})
    best = {}
    for d in dists:
        means = [stats[(r, d)][0] for r in rules if _finite(stats[(r, d)][0])]
        if means:
            best[d] = max(means) if higher_is_better(metric) else min(means)
    lines = ["| rule | " + " | ".join(dists) + " |", "|---|" + "---|" * len(dists)]
    for r in rules:
        row = []
        for d in dists:
            mean, std, n = stats[(r, d)]
            text = _fmt(mean, std, n, digits, seeds)
            row.append(f"**{text}**" if n and d in best and mean == best[d] and len(rules) > 1 else text)
        lines.append(f"| {r} | " + " | ".join(row) + " |")
    return lines


def paired_table(cells: list[CellResult], metric: str, reference: str, digits: int = 3) -> list[str]:
    """Markdown rows: each rule minus ``reference`` on the same seed and distribution, mean ± std over seeds.

    Seeds differ in their data partition and evaluation sets as well as in training; a
    difference on the same seed cancels what the rules share, so it is the sharper comparison.
    """
    rules = [r for r in _ordered(c.rule for c in cells) if r != reference]
    dists = _ordered(c.dist for c in cells)
    final = {(c.rule, c.dist, c.seed): c.final(metric) for c in cells}
    better = max if higher_is_better(metric) else min
    lines = ["| rule | " + " | ".join(dists) + " |", "|---|" + "---|" * len(dists)]
    for r in rules:
        row = []
        for d in dists:
            diffs = [final[(r, d, s)] - final[(reference, d, s)] for (rr, dd, s) in final
                     if rr == r and dd == d and (reference, d, s) in final]
            diffs = [x for x in diffs if _finite(x)]
            if not diffs:
                row.append("–")
                continue
            mean, std, n = mean_std(diffs)
            wins = sum(better(x, 0.0) == x and x != 0.0 for x in diffs)
            row.append(f"{mean:+.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "") + f" ({wins}/{n} better)")
        lines.append(f"| {r} | " + " | ".join(row) + " |")
    return lines


def _counterpart(metric: str) -> str | None:
    for a, b in (("heldout", "unseen"), ("unseen", "heldout")):
        if f"_{a}_" in metric:
            return metric.replace(f"_{a}_", f"_{b}_")
    return None


def markdown(cells: list[CellResult], metric: str) -> str:
    out = io.StringIO()
    groups = _ordered(c.group() for c in cells)
    seeds = sorted({c.seed for c in cells})
    out.write(f"# Benchmark results\n\n{len(cells)} finished cells; seeds {seeds}. "
              f"Each entry: mean ± std over seeds of the value after the last round; "
              f"bold: the best mean of its column ({'higher' if higher_is_better(metric) else 'lower'} is better).\n")
    for group in groups:
        members = [c for c in cells if c.group() == group]
        if group != ():
            out.write("\n## " + ", ".join(f"{k} = {json.loads(v)}" for k, v in group) + "\n")
        shown = [m for m in (metric, _counterpart(metric)) if m and any(c.series(m) for c in members)]
        for m in shown:
            out.write(f"\n### {m} after the last round\n\n" + "\n".join(metric_table(members, m)) + "\n")
            bases = sorted({round(c.base[m], 6) for c in members if _finite(c.base.get(m))})
            if bases:
                out.write(f"\nBase model before training: {', '.join(f'{b:.3f}' for b in bases)} "
                          f"(one value per seed's evaluation set).\n")
        local = _ordered(c.rule for c in members if c.config["strategy"] == "local")
        if local:
            out.write(f"\n{', '.join(local)} (no federation): its held-out metrics score each training client's "
                      "examples with the client's own adapter (the base model for a client no round sampled); "
                      "unseen clients have no adapter, so its unseen metrics are the base model's.\n")
        rules = _ordered(c.rule for c in members)
        reference = "bucket" if "bucket" in rules else rules[0]
        if len(rules) > 1 and any(c.series(metric) for c in members):
            out.write(f"\n### {metric}: each rule minus {reference} on the same seed\n\n"
                      + "\n".join(paired_table(members, metric, reference)) + "\n")
        out.write(markdown_sections(members, _ordered))
        out.write("\n### MB sent up per round (all sampled clients)\n\n")
        out.write("\n".join(metric_table(
            members, "bytes_up", lambda c: c.metrics[-1]["total_bytes_up"] / len(c.metrics) / 1e6 if c.metrics
            else float("nan"), digits=3)).replace("**", "") + "\n")
    return out.getvalue()


# ---------------------------------------------------------------- plots

def _curves(cells: list[CellResult], metric: str, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _ordered((c.group(), c.dist) for c in cells)
    rules = _ordered(c.rule for c in cells)
    colors = {r: f"C{i % 10}" for i, r in enumerate(rules)}
    relative = all(c.series(metric) and c.series(metric)[0][0] == 0 for c in cells)  # every cell has its base
    ylabel = f"{metric} - the base model's (same seed)" if relative else metric
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for row, (group, dist) in enumerate(panels):
        for rule in rules:
            members = [c for c in cells if c.group() == group and c.dist == dist and c.rule == rule]
            series = [c.series(metric) for c in members]
            series = [s for s in series if s]
            if not series:
                continue
            length = min(len(s) for s in series)  # cells of one rule share their rounds; unfinished ones are cut
            arr = np.array([[p for p in s[:length]] for s in series], dtype=float)  # [seeds, points, 3]
            y, x_bytes = arr[:, :, 2], arr[:, :, 1].mean(0)
            if relative:  # a seed's own base model as its zero: seeds differ in their evaluation sets
                y = y - y[:, :1]
            mean = y.mean(0)
            std = y.std(0, ddof=1) if len(series) > 1 else np.zeros_like(mean)
            for col, x in ((0, arr[0, :, 0]), (1, x_bytes)):
                ax = axes[row][col]
                ax.plot(x, mean, marker="o", ms=3, color=colors[rule], label=f"{rule} ({len(series)} seeds)")
                ax.fill_between(x, mean - std, mean + std, color=colors[rule], alpha=0.15, linewidth=0)
        title = ", ".join([f"{k}={json.loads(v)}" for k, v in group] + [f"ranks: {dist}"])
        for col, xlabel in ((0, "rounds (0 = base model)"), (1, "MB sent up by clients (cumulative)")):
            ax = axes[row][col]
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel, fontsize=8 if relative else None)
            ax.grid(alpha=0.3)
        axes[row][0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(cells: list[CellResult], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _ordered((c.group(), c.dist) for c in cells)
    rules = _ordered(c.rule for c in cells)
    width = 0.8 / max(len(rules), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) * max(len(rules), 1) * width + 3), 4))
    for i, rule in enumerate(rules):
        for j, key in enumerate(keys):
            vals = [c.final(metric) for c in cells if (c.group(), c.dist) == key and c.rule == rule]
            vals = [v for v in vals if _finite(v)]
            if not vals:
                continue
            x = j + (i - (len(rules) - 1) / 2) * width
            ax.bar(x, np.mean(vals), width * 0.9, color=f"C{i % 10}", alpha=0.7, label=rule if j == 0 else None)
            ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([", ".join([f"{json.loads(v)}" for _, v in g] + [d]) for g, d in keys], fontsize=8)
    ax.set_ylabel(f"{metric} after the last round")
    ax.set_title("final metric per cell (bars: mean over seeds, dots: seeds)", fontsize=9)
    finite = [c.final(metric) for c in cells if _finite(c.final(metric))]
    if finite:  # perplexities of rules sit close together: zoom on them instead of starting at 0
        lo, hi = min(finite), max(finite)
        pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
        ax.set_ylim(lo - pad, hi + pad)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(output_dir: str | Path, metric: str | None = None) -> dict[str, Path]:
    """Write results.csv, results.md, curves.png and bars.png into ``output_dir`` from its finished cells."""
    root = Path(output_dir)
    if metric is None:
        metric = _read_json(root / GRID_FILE, "grid record").get("metric", DEFAULT_METRIC) \
            if (root / GRID_FILE).is_file() else DEFAULT_METRIC
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    cells = load_cells(root)
    if not cells:
        raise ValueError(f"{root}: no finished cell (cells/*/{CELL_FILE})")
    fields, rows = csv_rows(cells)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = {key: root / name for key, name in REPORT_FILES.items()}
    atomic_write(paths["csv"], buf.getvalue().encode())
    text = markdown(cells, metric)
    failed = _read_json(root / FAILED_FILE, "failure record") if (root / FAILED_FILE).is_file() else {}
    if failed:
        text += "\n## Cells that could not run\n\n" + "".join(f"- `{name}`: {why}\n" for name, why in failed.items())
    atomic_write(paths["md"], text.encode())
    _curves(cells, metric, paths["curves"])
    _bars(cells, metric, paths["bars"])
    if not spectrum_plot(cells, _ordered, paths["spectrum"]):
        del paths["spectrum"]
    return paths
