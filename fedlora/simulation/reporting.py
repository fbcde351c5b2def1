"""What a run shows and writes as it goes: progress bars, one line a round, metrics.jsonl, the plot.

Rounds are numbered from 1 everywhere a user sees them (console, metrics.jsonl,
checkpoint folders, the plot, the Flower log); round 0 is the base model before
any training (``base_eval.json``), every curve's first point.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from fedlora.federated.update import atomic_write


def bars_shown(enabled: bool) -> bool:
    """Whether progress bars show: asked for, and the output is a terminal (logs and pipes get lines only)."""
    return enabled and sys.stderr.isatty()


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar over ``iterable`` (a manual one when it is None, to ``update(n)``).

    Shown only when ``enabled`` and the output is a terminal (tqdm's ``disable=None``):
    logs and pipes get the per-round lines alone.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **kwargs)


def say(line: str) -> None:
    """One console line, printed above any live progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line)


def note(line: str) -> None:
    """One console line about the run as a whole (resumed, capped, ...), above any live progress bar."""
    say(f"fedlora simulate: {line}")


def write_metrics(path: Path, records: list[dict]) -> None:
    """metrics.jsonl, rewritten whole and atomically: it always matches the latest checkpoint."""
    atomic_write(path, "".join(json.dumps(m) + "\n" for m in records).encode())


EVAL_KEYS = ("eval_heldout_loss", "eval_heldout_ppl", "eval_unseen_loss", "eval_unseen_ppl",
             "eval_heldout_rougeL", "eval_unseen_rougeL")


def _eval_parts(record: dict) -> list[str]:
    # and the personalised models' loss, for rules whose clients keep factors of their own (FedSA-LoRA)
    keys = (*EVAL_KEYS, "eval_personal_heldout_loss")
    return [f"{key.removeprefix('eval_')} {record[key]:.4f}" for key in keys if key in record]


def summary(record: dict, rounds: int) -> None:
    """The console line of a round."""
    parts = [f"round {record['round']}/{rounds}", f"train_loss {record['train_loss']:.4f}", *_eval_parts(record),
             f"up {record['bytes_up'] / 1e6:.2f} MB", f"down {record['bytes_down'] / 1e6:.2f} MB",
             f"{record['wall_time_s']:.1f} s"]
    if record["rejected"]:
        parts.append(f"rejected {record['rejected']}")
    say(" | ".join(parts))


def summary_base(record: dict) -> None:
    """The console line of the base model's evaluation before round 1."""
    say(" | ".join(["round 0 (base model, before training)", *_eval_parts(record), f"{record['wall_time_s']:.1f} s"]))


def _series(metrics: list[dict], base: dict | None, key: str, transform=None) -> tuple[list[int], list[float]]:
    """(rounds, values) of ``key``: the base model at round 0 (when evaluated), then the rounds that have it."""
    records = ([dict(base, round=0)] if base else []) + metrics
    points = [(m["round"], m[key]) for m in records if key in m and math.isfinite(m[key])]
    if transform is not None:
        points = [(r, transform(v)) for r, v in points]
    return [r for r, _ in points], [v for _, v in points]


def plot(metrics: list[dict], path: Path, base: dict | None = None, title: str = "") -> None:
    """:func:`metrics_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(metrics, base, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metrics_figure(metrics: list[dict], base: dict | None = None, title: str = ""):
    """Loss, perplexity (and Rouge-L when measured) against the round.

    Round 0 is the base model (``base``, when evaluated); the training loss is
    the sampled clients' mean during each round. One panel per measure, integer
    round ticks; a run of one round still shows its two points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_rouge = any(k in m for m in [base or {}, *metrics] for k in ("eval_heldout_rougeL", "eval_unseen_rougeL"))
    panels = 3 if has_rouge else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2))
    styles = {"heldout": dict(color="tab:blue", marker="o"), "unseen": dict(color="tab:orange", marker="s")}
    labels = {"heldout": "held-out data, training clients", "unseen": "unseen clients"}
    loss_ax, ppl_ax = axes[0], axes[1]
    rounds, values = _series(metrics, None, "train_loss")
    if rounds:
        loss_ax.plot(rounds, values, color="tab:gray", marker="^", linestyle="--",
                     label="training (sampled clients, during the round)")
    for split in ("heldout", "unseen"):
        rounds, values = _series(metrics, base, f"eval_{split}_loss")
        if rounds:
            loss_ax.plot(rounds, values, label=labels[split], **styles[split])
        rounds, values = _series(metrics, base, f"eval_{split}_loss", lambda v: math.exp(min(v, 50.0)))
        if rounds:
            ppl_ax.plot(rounds, values, label=labels[split], **styles[split])
    rounds, values = _series(metrics, None, "eval_personal_heldout_loss")  # FedSA-LoRA's own models
    if rounds:
        loss_ax.plot(rounds, values, color="tab:green", marker="D", label="held-out data, personalised models")
    loss_ax.set_ylabel("next-token loss (nats)")
    ppl_ax.set_ylabel("perplexity")
    loss_ax.set_title("loss")
    ppl_ax.set_title("perplexity")
    if has_rouge:
        rouge_ax = axes[2]
        for split in ("heldout", "unseen"):
            rounds, values = _series(metrics, base, f"eval_{split}_rougeL")
            if rounds:
                rouge_ax.plot(rounds, values, label=labels[split], **styles[split])
        rouge_ax.set_ylabel("Rouge-L F (greedy generations)")
        rouge_ax.set_title("Rouge-L")
    last = max([m["round"] for m in metrics] + [1])
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlim(-0.3, last + 0.3)  # two points still stand apart from the frame
        ax.set_xlabel("round (0: base model)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
