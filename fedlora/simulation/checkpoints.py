"""Checkpoints of a run: ``output_dir/checkpoints/round-NNNN/`` written in a temp dir, then renamed.

A ``latest`` pointer names the newest complete round; older rounds beyond
``keep`` are removed. A resumed run must share the settings that define it
(:func:`run_defining`) with the checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from fedlora.federated.update import atomic_write
from fedlora.strategies import Strategy


def run_defining(config: dict) -> dict:
    """The settings a resumed run must share with its checkpoint (not how it is displayed or resumed)."""
    return {k: v for k, v in config.items() if k not in ("resume", "progress")}


class Checkpoints:
    """``output_dir/checkpoints/round-NNNN/`` written in a temp dir then renamed, plus a ``latest`` pointer."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = root / "checkpoints", keep

    def save(self, round_idx: int, strategy: Strategy, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        final = self.root / f"round-{round_idx:04d}"
        try:
            strategy.save(tmp / "strategy.safetensors")
            (tmp / "state.json").write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:  # a failed save leaves no half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write(self.root / "latest", final.name.encode())
        for old in sorted(p for p in self.root.glob("round-*") if p != final)[: -self.keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, strategy: Strategy) -> dict | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        strategy.load(folder / "strategy.safetensors")
        return json.loads((folder / "state.json").read_text())
