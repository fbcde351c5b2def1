"""Markdown tables and a speedup chart from a pytest-benchmark JSON file.

    python -m bench.report RESULTS.json [--out-md FILE] [--out-png FILE]
                           [--baseline-variant NAME] [--floor-variant NAME] [--stat median]

Generic over benchmark groups: a benchmark's variant is extra_info["variant"]
(else its parametrization id, else its test name). In each group

    baseline  --baseline-variant NAME when the group has it, else the benchmark
              whose extra_info["role"] is "baseline"; no baseline, no speedups
    floor     --floor-variant NAME, else extra_info["role"] == "floor" (optional)

    speedup   = baseline time / variant time     (> 1: faster than the baseline)
    x floor   = variant time / floor time        (fraction of the floor's time)

Times are the chosen pytest-benchmark statistic (median by default). Without
--out-md the markdown goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

STATS = ("median", "min", "mean")


@dataclass
class Row:
    variant: str
    role: str
    time: float  # seconds, the chosen statistic
    min: float  # shown beside it: on a busy machine the minimum is the steadier figure
    iqr: float
    rounds: int
    speedup: float | None = None
    of_floor: float | None = None


@dataclass
class Group:
    name: str
    rows: list[Row] = field(default_factory=list)
    baseline: str | None = None
    floor: str | None = None


def variant_of(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    return str(extra.get("variant") or bench.get("param") or bench["name"])


def _pick(group: Group, requested: str | None, role: str) -> str | None:
    """The variant that plays ``role``: the requested name if present, else by extra_info role."""
    names = [r.variant for r in group.rows]
    if requested is not None and requested in names:
        return requested
    tagged = [r.variant for r in group.rows if r.role == role]
    if len(set(tagged)) > 1:
        raise ValueError(f"group {group.name!r} has several {role} variants: {tagged}; pick one with --{role}-variant")
    return tagged[0] if tagged else None


def summarize(data: dict, baseline_variant: str | None = None, floor_variant: str | None = None,
              stat: str = "median") -> list[Group]:
    """Groups in order of first appearance, rows in order of appearance, ratios filled in."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    groups: dict[str, Group] = {}
    for bench in data.get("benchmarks", []):
        name = bench.get("group") or "(no group)"
        stats = bench["stats"]
        extra = bench.get("extra_info") or {}
        group = groups.setdefault(name, Group(name))
        row = Row(variant_of(bench), str(extra.get("role", "")), float(stats[stat]), float(stats["min"]),
                  float(stats.get("iqr", math.nan)), int(stats.get("rounds", 0)))
        if any(r.variant == row.variant for r in group.rows):
            raise ValueError(f"group {name!r} has two benchmarks named variant {row.variant!r}")
        group.rows.append(row)
    for group in groups.values():
        group.baseline = _pick(group, baseline_variant, "baseline")
        group.floor = _pick(group, floor_variant, "floor")
        times = {r.variant: r.time for r in group.rows}
        for r in group.rows:
            if group.baseline is not None:
                r.speedup = times[group.baseline] / r.time
            if group.floor is not None:
                r.of_floor = r.time / times[group.floor]
    return list(groups.values())


# -------------------------------------------------------------------- markdown
def _sig3(value: float) -> str:
    # three significant digits, trailing zeros kept so a column reads evenly
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:#.3g}"


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{_sig3(seconds / scale)} {unit}"
    return f"{_sig3(seconds / 1e-9)} ns"


def _ratio(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else _sig3(value) + suffix


def _provenance(data: dict, source: str) -> list[str]:
    bench_info = data.get("fedlora_bench") or data.get("machine_info", {}).get("fedlora_bench") or {}
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    lines = [f"- source: `{source}`"]
    if bench_info.get("command"):
        lines.append(f"- command: `{bench_info['command']}`")
    device = bench_info.get("device_name") or machine.get("cpu", {}).get("brand_raw") or machine.get("machine")
    if device:
        threads = bench_info.get("torch_num_threads")
        extra = f", {threads} torch threads" if threads and bench_info.get("device") == "cpu" else ""
        lines.append(f"- device: {device} ({bench_info.get('device', 'unknown')}{extra})")
    versions = [f"{k} {bench_info[k]}" for k in ("torch", "triton", "fedlora", "cuda") if bench_info.get(k)]
    if versions:
        lines.append(f"- versions: {', '.join(versions)}")
    if commit.get("id"):
        dirty = " (dirty)" if commit.get("dirty") else ""
        lines.append(f"- commit: {commit['id'][:12]}{dirty}")
    if data.get("datetime"):
        lines.append(f"- run: {data['datetime']}")
    return lines


def to_markdown(groups: list[Group], data: dict, source: str, stat: str = "median") -> str:
    out = ["# Benchmark report", "", *_provenance(data, source), "",
           f"Times are the {stat} per call. speedup = baseline time / variant time; "
           "x floor = variant time / floor time.", ""]
    for g in groups:
        out += [f"## {g.name}", ""]
        roles = [f"baseline `{g.baseline}`" if g.baseline else "no baseline"]
        if g.floor:
            roles.append(f"floor `{g.floor}`")
        out += [", ".join(roles), ""]
        out.append(f"| variant | role | {stat} | min | IQR | rounds | speedup | x floor |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in g.rows:
            iqr = "-" if math.isnan(r.iqr) else fmt_time(r.iqr)
            out.append(
                f"| {r.variant} | {r.role or '-'} | {fmt_time(r.time)} | {fmt_time(r.min)} | {iqr} | {r.rounds} "
                f"| {_ratio(r.speedup, 'x')} | {_ratio(r.of_floor)} |"
            )
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------- chart
def plot_speedups(groups: list[Group], path: str | Path) -> None:
    """Horizontal grouped bars: one block per group, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    groups = [g for g in groups if g.baseline is not None]
    if not groups:
        raise ValueError("no group has a baseline, so there are no speedups to plot")
    variants = list(dict.fromkeys(r.variant for g in groups for r in g.rows))
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    bar = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.25 * len(groups) * len(variants) + 0.3 * len(groups)))
    values, labelled = [], set()
    for gi, g in enumerate(groups):
        for vi, v in enumerate(variants):
            row = next((r for r in g.rows if r.variant == v), None)
            if row is None:
                continue
            y = gi + (vi - (len(variants) - 1) / 2) * bar
            ax.barh(y, row.speedup, height=bar, color=colors[v], label=None if v in labelled else v)
            labelled.add(v)
            ax.text(row.speedup, y, " " + _ratio(row.speedup, "x"), va="center", fontsize=7)
            values.append(row.speedup)
    if max(values) / min(values) > 30:
        ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(groups)), [g.name for g in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup vs the group's baseline (baseline time / variant time)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out-md", help="write the markdown here (default: stdout)")
    parser.add_argument("--out-png", help="write a bar chart of the speedups here")
    parser.add_argument("--baseline-variant", help="variant every group's speedups are relative to")
    parser.add_argument("--floor-variant", help="variant every group's 'x floor' column is relative to")
    parser.add_argument("--stat", choices=STATS, default="median")
    args = parser.parse_args(argv)

    data = json.loads(Path(args.results).read_text())
    groups = summarize(data, args.baseline_variant, args.floor_variant, args.stat)
    markdown = to_markdown(groups, data, args.results, args.stat)
    if args.out_md:
        Path(args.out_md).write_text(markdown + "\n")
    else:
        sys.stdout.write(markdown + "\n")
    if args.out_png:
        plot_speedups(groups, args.out_png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
