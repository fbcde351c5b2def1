"""A run's output folder: a new run starts in an empty one, continues its own (``resume``) or
replaces an earlier run only when told (``overwrite``); two runs' files are never mixed.

Checked before the model loads, so a refusal costs nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import InputError, SimConfig

# Files a run writes first: a folder with one of them holds a run (simulate's or Flower's).
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def describe_run(folder: Path) -> str:
    """``a flexlora run (2 of 3 rounds done)``, from the folder's config.json and metrics.jsonl."""
    try:
        config = json.loads((folder / "config.json").read_text())
        lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").is_file() else []
        done = sum(1 for line in lines if "train_loss" in json.loads(line))  # training rounds, not the baseline
        return f"a {config['strategy']} run ({done} of {config['rounds']} rounds done)"
    except (OSError, ValueError, KeyError, TypeError):
        return "an earlier run"


def prepare_output_dir(cfg: SimConfig, *, resumable: bool = True,
                       options: str = "--resume true to continue it, --output_dir DIR to write elsewhere, "
                                      "or --overwrite true to replace it") -> Path:
    """Create ``cfg.output_dir`` or check that this run may write there; returns it.

    Refuses (InputError, one line) a new run into a folder that holds another
    run unless ``cfg.overwrite`` (then the folder is emptied first), and any run
    into a non-empty folder that holds no run (it is never emptied: it may be
    anything of the user's). ``resumable=False`` (Flower): ``resume`` is refused.
    options: how the refusal line tells the user to go on.
    """
    out = Path(cfg.output_dir)
    if cfg.resume and cfg.overwrite:
        raise InputError("config: resume and overwrite exclude each other (continue the run, or replace it)")
    if cfg.resume and not resumable:
        raise InputError("config: resume is not available here; start a new run in another output_dir")
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {out} is a file, not a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not holds_run(out):
        raise InputError(f"output_dir {out} is not empty and holds no fedlora run (no config.json, metrics.jsonl "
                         f"or checkpoints/); it is never cleared: choose another output_dir")
    if entries and not cfg.resume:
        if not cfg.overwrite:
            raise InputError(f"output_dir {out} already holds {describe_run(out)}; use {options}")
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
