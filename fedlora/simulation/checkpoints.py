"""Checkpoints of a run: ``output_dir/checkpoints/round-NNNN/`` (NNNN: the round, from 1) written in a
temp dir, then renamed.

A ``latest`` pointer names the newest complete round; older rounds beyond
``keep`` are removed. Loading never loses or invents work:

* the newest intact round is resumed: a round folder whose files are missing,
  truncated or inconsistent (the strategy state against its own metadata, the
  round against its folder name) is reported by name and the one before it is
  tried; when none is intact the error names every file and why;
* a missing or damaged ``latest`` pointer does not hide the round folders;
* temporary folders and files of an interrupted save are removed on the next start.

A resumed run must share the settings that define it (:func:`run_defining`) and
its data's content (:func:`fingerprint`) with the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from fedlora.federated.strict import json_object, strict_int, strict_mapping
from fedlora.federated.update import atomic_write, temp_dir_beside
from fedlora.strategies import Strategy

from .config import InputError

log = logging.getLogger("fedlora.simulate")

_ROUND = re.compile(r"round-(\d{4,})")
# Settings that say how a run is shown, resumed, where it lives or how long it goes: not what it computes.
NOT_DEFINING = ("resume", "overwrite", "progress", "output_dir", "rounds")


def run_defining(config: dict) -> dict:
    """The settings a resumed run must share with its checkpoint (not how it is displayed or resumed,
    where its folder is, or how many rounds it runs: a finished run may be extended)."""
    return {k: v for k, v in config.items() if k not in NOT_DEFINING}


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a data file's content: a run's identity includes the data it trained on, not its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointError(InputError):
    """No checkpoint of a run can be resumed; the message names each file and why."""


class Checkpoints:
    """``output_dir/checkpoints/round-NNNN/`` written in a temp dir then renamed, plus a ``latest`` pointer."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = root / "checkpoints", keep

    def clean(self) -> list[Path]:
        """Remove what an interrupted save left (``.tmp-*`` folders, ``.latest.*.tmp`` files); returns them."""
        if not self.root.is_dir():
            return []
        leftovers = sorted(p for p in self.root.iterdir() if p.name.startswith((".tmp-", ".latest.")))
        for path in leftovers:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if leftovers:
            log.warning("removed %d leftover(s) of an interrupted checkpoint save: %s", len(leftovers),
                        ", ".join(p.name for p in leftovers))
        return leftovers

    def reset(self) -> None:
        """Remove every checkpoint (a run that starts afresh in this folder)."""
        for folder in self.rounds():
            shutil.rmtree(folder)
        (self.root / "latest").unlink(missing_ok=True)

    def save(self, round_number: int, strategy: Strategy, state: dict) -> None:
        """The state after round ``round_number`` (counted from 1, as everywhere a user sees rounds): the
        strategy and the JSON ``state``."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(self.root, ".tmp-")
        final = self.root / f"round-{round_number:04d}"
        try:
            strategy.save(tmp / "strategy.safetensors")
            atomic_write(tmp / "state.json", json.dumps(state).encode())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:  # a failed save leaves no half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write(self.root / "latest", final.name.encode())
        for old in sorted(p for p in self.rounds() if p != final)[: -self.keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)

    def rounds(self) -> list[Path]:
        """The round folders, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and _ROUND.fullmatch(p.name))

    def exists(self) -> bool:
        return bool(self.rounds()) or (self.root / "latest").exists()

    def load(self, strategy: Strategy) -> dict | None:
        """The state of the newest intact round (its strategy loaded into ``strategy``); None when the run
        has no checkpoint. CheckpointError when there are checkpoints but none is intact."""
        folders = self.rounds()
        pointer = self.root / "latest"
        named = _pointer_target(pointer)
        if named is not None and named not in [f.name for f in folders]:
            log.warning("%s names %s, which is not there; looking at the round folders", pointer, named)
        elif named is None and folders:
            log.warning("%s is missing or unreadable; resuming from the newest intact round folder", pointer)
        if not folders:
            if pointer.exists():
                raise CheckpointError(f"cannot resume: {pointer} exists but {self.root} has no round folder")
            return None
        problems = []
        for folder in reversed(folders):
            problem = _load_round(folder, strategy)
            if isinstance(problem, dict):
                if problems:
                    log.warning("skipped damaged checkpoint(s): %s; resuming from %s (after round %d)",
                                "; ".join(problems), folder, problem["next_round"])
                return problem
            problems.append(problem)
        raise CheckpointError("cannot resume: no intact checkpoint: " + "; ".join(problems))


def _pointer_target(pointer: Path) -> str | None:
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _ROUND.fullmatch(name) else None


def _load_round(folder: Path, strategy: Strategy) -> dict | str:
    """The round's state dict with ``strategy`` loaded, or why it cannot be resumed (naming the file)."""
    state_file, strategy_file = folder / "state.json", folder / "strategy.safetensors"
    try:
        state = json_object(state_file.read_bytes(), str(state_file))
        next_round = strict_int(state.get("next_round"), f"{state_file}: next_round", low=1)
        if next_round != int(_ROUND.fullmatch(folder.name).group(1)):  # round-NNNN holds the state after round NNNN
            raise ValueError(f"{state_file}: next_round {next_round} does not follow its folder {folder.name}")
        metrics = state.get("metrics")
        if not isinstance(metrics, list) or len(metrics) != next_round:
            raise ValueError(f"{state_file}: metrics must list {next_round} rounds")
        strict_mapping(state.get("totals"), f"{state_file}: totals")
        strict_mapping(state.get("config"), f"{state_file}: config")
    except OSError as exc:
        return f"{state_file}: {exc.strerror or exc}"
    except ValueError as exc:
        return str(exc)
    try:
        strategy.load(strategy_file)
    except OSError as exc:
        return f"{strategy_file}: {exc.strerror or exc}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{strategy_file}: {exc}"
    if strategy.round > next_round:  # a round that kept its state does not count in strategy.round
        return f"{strategy_file}: holds {strategy.round} aggregated rounds, more than the {next_round} of {state_file}"
    return state
