"""Why rules differ: a breakdown of the clients by rank, and the spectrum of the global update.

Both read what ``simulate`` records in metrics.jsonl: ``client_train_loss`` beside
``ranks`` (every round), ``eval_heldout_by_rank`` (every evaluation) and ``spectrum`` (with
``log_spectrum = k``: the k largest singular values of the global update of the first,
middle and last layers' modules at every evaluation).

- rank breakdown: the mean training loss of the sampled clients of each rank over the
  second half of the rounds (the rank a client could afford; bucket trains them all at the
  smallest), averaged over seeds;
- held-out perplexity by client rank: the final evaluation's held-out tokens grouped by the
  rank their client was assigned (the same grouping for every rule), mean over seeds, and
  each rule minus bucket on the same seed; cells recorded before the breakdown existed show "–";
- effective rank (Roy & Vetterli, 2007) of a global update: exp(H(p)) with p_i = s_i / sum_j s_j
  over its logged singular values, averaged over the logged modules: how many directions the
  update really uses, e.g. whether rank-4 clients pull FlexLoRA's update toward rank 4.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def effective_rank(singular_values) -> float:
    s = np.asarray([v for v in singular_values if v > 0], dtype=float)
    if s.size == 0:
        return float("nan")
    p = s / s.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def spectrum_series(cell) -> list[tuple[int, float]]:
    """(rounds completed, effective rank averaged over the logged modules) at each evaluation with a spectrum."""
    out = []
    for m in cell.metrics:
        spectra = m.get("spectrum")
        if spectra:
            out.append((m["round"], float(np.mean([effective_rank(s) for s in spectra.values()]))))  # from 1
    return out


def final_spectrum(cell) -> np.ndarray | None:
    """s_i / s_1 of the last logged spectrum, averaged over its modules (all logged to the same k)."""
    logged = [m["spectrum"] for m in cell.metrics if m.get("spectrum")]
    if not logged:
        return None
    rows = []
    for s in logged[-1].values():
        s = np.asarray(s, dtype=float)
        if s.size and s[0] > 0:
            rows.append(s / s[0])
    if not rows:
        return None
    k = min(len(r) for r in rows)
    return np.mean([r[:k] for r in rows], axis=0)


def rank_breakdown(cells) -> dict[str, dict[int, float]]:
    """rule -> assigned rank -> mean training loss of its clients over the second half of the rounds (all seeds)."""
    out: dict[str, dict[int, list[float]]] = {}
    for c in cells:
        # a client's rank when first sampled: the rank it was assigned (HetLoRA's self-pruning lowers ``ranks``
        # in later rounds, and a pruned rank-32 client is still a rank-32 client)
        assigned: dict[str, int] = {}
        for m in c.metrics:
            for cid, rank in zip(m.get("clients", []), m.get("ranks", [])):
                assigned.setdefault(cid, int(rank))
        half = len(c.metrics) // 2
        for m in c.metrics[half:]:
            losses = m.get("client_train_loss") or {}
            for cid in m.get("clients", []):
                loss = losses.get(cid)
                if isinstance(loss, (int, float)) and math.isfinite(loss):
                    out.setdefault(c.rule, {}).setdefault(assigned[cid], []).append(float(loss))
    return {rule: {r: float(np.mean(v)) for r, v in sorted(by_rank.items())} for rule, by_rank in out.items()}


BY_RANK = "eval_heldout_by_rank"


def final_by_rank(cell) -> dict[int, float] | None:
    """rank -> held-out perplexity of that rank's clients at the cell's final evaluation, or None (the final
    evaluation has no breakdown: recorded before it existed, or a run whose ranks are not the column's)."""
    if cell.config.get("rank_distribution") != cell.dist:  # homogeneous-max: every client at the largest rank
        return None
    evaluated = [m for m in cell.metrics if "eval_heldout_loss" in m]
    groups = evaluated[-1].get(BY_RANK) if evaluated else None
    if not isinstance(groups, dict):
        return None
    return {int(r): float(g["ppl"]) for r, g in groups.items()}


def by_rank_tables(cells, ordered) -> str:
    """Held-out perplexity by client rank per rule (mean ± std over seeds) and each rule minus bucket on the
    same seed, one pair of tables per rank distribution; empty when no cell recorded the breakdown."""
    finals = {id(c): final_by_rank(c) for c in cells}
    if not any(finals.values()):
        return ""
    out = []
    for dist in ordered(c.dist for c in cells):
        members = [c for c in cells if c.dist == dist]
        ranks = sorted({r for c in members for r in (finals[id(c)] or {})})
        if not ranks:
            continue
        header = "| rule | " + " | ".join(f"rank {r}" for r in ranks) + " |\n|---|" + "---|" * len(ranks) + "\n"
        rows, paired = [], []
        rules = ordered(c.rule for c in members)
        for rule in rules:
            own = [c for c in members if c.rule == rule]
            entries = []
            for r in ranks:
                vals = [finals[id(c)][r] for c in own if finals[id(c)] and r in finals[id(c)]]
                entries.append(_mean_std(vals))
            rows.append(f"| {rule} | " + " | ".join(entries) + " |\n")
            if rule != "bucket" and "bucket" in rules:
                ref = {c.seed: finals[id(c)] for c in members if c.rule == "bucket" and finals[id(c)]}
                entries = []
                for r in ranks:
                    diffs = [finals[id(c)][r] - ref[c.seed][r] for c in own
                             if finals[id(c)] and r in finals[id(c)] and c.seed in ref and r in ref[c.seed]]
                    entries.append(_mean_std(diffs, signed=True)
                                   + (f" ({sum(d < 0 for d in diffs)}/{len(diffs)} better)" if diffs else ""))
                paired.append(f"| {rule} | " + " | ".join(entries) + " |\n")
        out.append(f"\n### Held-out perplexity by client rank, ranks: {dist} (final evaluation, mean ± std over "
                   "seeds; each client's examples under the rank the distribution assigned it)\n\n" + header
                   + "".join(rows))
        if paired:
            out.append(f"\n### Held-out perplexity by client rank, ranks: {dist}: each rule minus bucket on the "
                       "same seed\n\n" + header + "".join(paired))
    notes = []
    if any(c.config.get("rank_distribution") != c.dist for c in cells):
        notes.append("homogeneous-max trains every client at the largest rank, so its clients have no other rank "
                     "to be grouped by: its rows show –")
    if any(c.config.get("strategy") == "local" for c in cells):
        notes.append("local-only scores each client's held-out examples with that client's own adapter (the base "
                     "model for a client never sampled)")
    if any(not finals[id(c)] and c.config.get("rank_distribution") == c.dist for c in cells):
        notes.append("– also marks cells recorded before the breakdown existed")
    return "".join(out) + ("\n" + "; ".join(notes) + ".\n" if notes else "")


def _mean_std(vals: list[float], signed: bool = False) -> str:
    if not vals:
        return "–"
    text = f"{np.mean(vals):{'+' if signed else ''}.3f}"
    return text + (f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else "")


MODELS = {"global": "global model", "received": "what the client receives"}


def per_client_tables(cells, ordered) -> str:
    """``fedlora benchmark --per-client``'s scores (per_client.json): held-out perplexity by client rank of
    the base model, the global model and the model each client receives at its rank, mean over seeds,
    and what each rule's clients receive minus what bucket's receive on the same seed."""
    scored = [c for c in cells if c.per_client]
    if not scored:
        return ""
    budgets = sorted({c.per_client["max_examples"] for c in scored})
    out = []
    for dist in ordered(c.dist for c in scored):
        members = [c for c in scored if c.dist == dist]
        ranks = sorted({int(r) for c in members for m in ("base", *MODELS) for r in c.per_client.get(m, {})
                        .get("by_rank", {})})

        def ppl(c, model, r):
            group = c.per_client.get(model, {}).get("by_rank", {}).get(str(r))
            return None if group is None else group["ppl"]

        def row(label, values_at) -> str:
            return f"| {label} | " + " | ".join(_mean_std([v for v in values_at(r) if v is not None])
                                                for r in ranks) + " |\n"

        seeds = {c.seed: c for c in members}  # the base model is the same for every rule of a seed
        lines = [row("base model", lambda r: [ppl(c, "base", r) for c in seeds.values()])]
        for rule in ordered(c.rule for c in members):
            own = [c for c in members if c.rule == rule]
            for model, name in MODELS.items():
                if any(model in c.per_client for c in own):
                    lines.append(row(f"{rule}: {name}", lambda r: [ppl(c, model, r) for c in own]))
        header = "| model | " + " | ".join(f"rank {r}" for r in ranks) + " |\n|---|" + "---|" * len(ranks) + "\n"
        out.append(f"\n### Held-out perplexity by client rank after the last round, ranks: {dist} (fedlora benchmark "
                   "--per-client, mean ± std over seeds)\n\n" + header + "".join(lines))
        bucket = {c.seed: c for c in members if c.rule == "bucket"}
        paired = []
        for rule in [r for r in ordered(c.rule for c in members) if r != "bucket"]:
            entries = []
            for r in ranks:
                diffs = [ppl(c, "received", r) - ppl(bucket[c.seed], "received", r) for c in members
                         if c.rule == rule and c.seed in bucket and ppl(c, "received", r) is not None
                         and ppl(bucket[c.seed], "received", r) is not None]
                entries.append(_mean_std(diffs, signed=True)
                               + (f" ({sum(d < 0 for d in diffs)}/{len(diffs)} better)" if diffs else ""))
            paired.append(f"| {rule} | " + " | ".join(entries) + " |\n")
        if bucket and paired:
            out.append(f"\n### What the clients receive, ranks: {dist}: each rule minus bucket on the same seed\n\n"
                       + header.replace("| model |", "| rule |") + "".join(paired))
    return ("".join(out) + f"\nScored on up to {', '.join(map(str, budgets))} held-out examples of the training "
            "clients, each client's examples under the rank this column's distribution assigns it (homogeneous-max "
            "included: every client trained at the largest rank). What a client receives: the rule's starting "
            "factors at its rank for the next round (FlexLoRA: its rank-r truncation; bucket: the smallest rank; "
            "FedSA-LoRA and local-only: its own factors).\n")


def per_client_summary(cells, ordered) -> str:
    """The final model of every cell scored by ``--per-client`` on evaluation sets spread over the clients:
    held-out perplexity (the global model; local-only: each client's own adapter) and unseen perplexity
    (the global model; local-only: the base model), mean ± std over seeds and each rule minus bucket on
    the same seed."""
    scored = [c for c in cells if c.per_client and c.per_client.get("unseen")]
    if not scored:
        return ""

    def heldout(c):
        entry = c.per_client.get("global") or c.per_client.get("received")
        return entry["ppl"] if entry else None

    def unseen(c):
        entry = c.per_client["unseen"].get("global") or c.per_client["unseen"].get("base")
        return entry["ppl"] if entry else None

    dists = ordered(c.dist for c in scored)
    out = []
    for title, value in (("held-out", heldout), ("unseen", unseen)):
        lines = []
        for rule in ordered(c.rule for c in scored):
            entries = []
            for dist in dists:
                own = [c for c in scored if c.rule == rule and c.dist == dist and value(c) is not None]
                bucket = {c.seed: value(c) for c in scored if c.rule == "bucket" and c.dist == dist
                          and value(c) is not None}
                diffs = [value(c) - bucket[c.seed] for c in own if c.seed in bucket]
                text = _mean_std([value(c) for c in own])
                if rule != "bucket" and diffs:
                    text += f" ({_mean_std(diffs, signed=True)}; {sum(d < 0 for d in diffs)}/{len(diffs)} better)"
                entries.append(text)
            lines.append(f"| {rule} | " + " | ".join(entries) + " |\n")
        budgets = sorted({c.per_client["max_examples"] for c in scored})
        out.append(f"\n### {title.capitalize()} perplexity after the last round, scored by --per-client on up to "
                   f"{', '.join(map(str, budgets))} examples spread over the clients (mean ± std over seeds; "
                   "in brackets: minus bucket on the same seed)\n\n| rule | " + " | ".join(dists)
                   + " |\n|---|" + "---|" * len(dists) + "\n" + "".join(lines))
    return "".join(out)


def markdown_sections(cells, ordered) -> str:
    """The breakdown and spectrum tables (empty when nothing of it was recorded)."""
    parts = [per_client_summary(cells, ordered), by_rank_tables(cells, ordered), per_client_tables(cells, ordered)]
    breakdown = rank_breakdown(cells)
    if breakdown:
        ranks = sorted({r for by in breakdown.values() for r in by})
        parts.append("\n### Training loss of the sampled clients by their rank (second half of the rounds, "
                     "all seeds and distributions)\n\n| rule | " + " | ".join(f"rank {r}" for r in ranks)
                     + " |\n|---|" + "---|" * len(ranks) + "\n"
                     + "".join(f"| {rule} | " + " | ".join(f"{breakdown[rule][r]:.3f}" if r in breakdown[rule]
                                                          else "–" for r in ranks) + " |\n"
                               for rule in ordered(c.rule for c in cells) if rule in breakdown))
    series = [spectrum_series(c) for c in cells]
    if any(series):
        dists = ordered(c.dist for c in cells)
        rows = []
        for rule in ordered(c.rule for c in cells):
            entries = []
            for d in dists:
                vals = [s[-1][1] for c, s in zip(cells, series) if c.rule == rule and c.dist == d and s]
                entries.append(f"{np.mean(vals):.1f}" + (f" ± {np.std(vals, ddof=1):.1f}" if len(vals) > 1 else "")
                               if vals else "–")
            rows.append(f"| {rule} | " + " | ".join(entries) + " |")
        k = max(len(s) for c in cells for m in c.metrics if m.get("spectrum") for s in m["spectrum"].values())
        parts.append(f"\n### Effective rank of the final global update (of its top {k} singular values, "
                     "first / middle / last layer averaged)\n\n| rule | " + " | ".join(dists) + " |\n|---|"
                     + "---|" * len(dists) + "\n" + "\n".join(rows) + "\n")
    return "".join(parts)


def spectrum_plot(cells, ordered, path: Path) -> bool:
    """spectrum.png: s_i / s_1 of the final update and the effective rank over rounds, one line per rule."""
    if not any(final_spectrum(c) is not None for c in cells):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = ordered(c.dist for c in cells)
    rules = ordered(c.rule for c in cells)
    fig, axes = plt.subplots(len(dists), 2, figsize=(11, 3.6 * len(dists)), squeeze=False)
    for row, dist in enumerate(dists):
        for i, rule in enumerate(rules):
            members = [c for c in cells if c.rule == rule and c.dist == dist]
            finals = [f for f in (final_spectrum(c) for c in members) if f is not None]
            if finals:
                k = min(len(f) for f in finals)
                axes[row][0].plot(range(1, k + 1), np.mean([f[:k] for f in finals], axis=0), marker=".",
                                  color=f"C{i % 10}", label=rule)
            series = [s for s in (spectrum_series(c) for c in members) if s]
            if series:
                n = min(len(s) for s in series)
                x = [p[0] for p in series[0][:n]]
                axes[row][1].plot(x, np.mean([[p[1] for p in s[:n]] for s in series], axis=0), marker="o",
                                  color=f"C{i % 10}", label=rule)
        axes[row][0].set(title=f"ranks: {dist} - final global update", xlabel="singular value index",
                         ylabel="s_i / s_1 (mean over modules, seeds)")
        axes[row][1].set(title=f"ranks: {dist}", xlabel="rounds", ylabel="effective rank")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
