"""What a run shows and writes as it goes: progress bars, one summary line a round, metrics.jsonl, the plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

from fedlora.federated.update import atomic_write


def progress(iterable, enabled: bool, **kwargs):
    """A tqdm bar over ``iterable`` (or a manual one when it is None); the iterable itself when disabled."""
    if not enabled:
        return iterable if iterable is not None else None
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs) if iterable is not None else tqdm(**kwargs)


def note(line: str, progress_enabled: bool) -> None:
    """One console line about the run as a whole (above live progress bars when they are on)."""
    if progress_enabled:
        from tqdm.auto import tqdm

        tqdm.write(f"fedlora simulate: {line}")
    else:
        print(f"fedlora simulate: {line}", flush=True)


def write_metrics(path: Path, records: list[dict]) -> None:
    """metrics.jsonl, rewritten whole and atomically: it always matches the latest checkpoint."""
    atomic_write(path, "".join(json.dumps(m) + "\n" for m in records).encode())


EVAL_KEYS = ("eval_heldout_loss", "eval_heldout_ppl", "eval_unseen_loss", "eval_unseen_ppl",
             "eval_heldout_rougeL", "eval_unseen_rougeL")


def _eval_parts(record: dict) -> list[str]:
    return [f"{key.removeprefix('eval_')} {record[key]:.4f}" for key in EVAL_KEYS if key in record]


def summary(record: dict, enabled: bool) -> None:
    """One console line per round (printed above live progress bars when they are on)."""
    parts = [f"round {record['round']}", f"train_loss {record['train_loss']:.4f}", *_eval_parts(record)]
    parts += [f"up {record['bytes_up'] / 1e6:.2f} MB", f"down {record['bytes_down'] / 1e6:.2f} MB",
              f"{record['wall_time_s']:.1f} s"]
    if record["rejected"]:
        parts.append(f"rejected {record['rejected']}")
    _print(" | ".join(parts), enabled)


def summary_base(record: dict, enabled: bool) -> None:
    """The console line of the base model's evaluation before round 0."""
    _print(" | ".join(["base model", *_eval_parts(record), f"{record['wall_time_s']:.1f} s"]), enabled)


def _print(line: str, enabled: bool) -> None:
    if enabled:
        from tqdm.auto import tqdm

        tqdm.write(line)
    else:
        print(line, flush=True)


def plot(metrics: list[dict], path: Path, base: dict | None = None) -> None:
    """Training and evaluation loss against rounds completed (0: the base model, when evaluated), as a PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [m["round"] + 1 for m in metrics]
    for key, label in (("train_loss", "train (sampled clients)"), ("eval_heldout_loss", "held-out lines"),
                       ("eval_unseen_loss", "unseen clients")):
        points = [(r, m[key]) for r, m in zip([0] + rounds, [base or {}] + metrics)
                  if key in m and math.isfinite(m[key])]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("next-token loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
