"""fedlora's Flower ServerApp: run a FedLoRAStrategy for ``cfg.rounds`` rounds and save the result.

Writes into ``cfg.output_dir`` (relative to the ServerApp's working directory):
``config.json``; ``metrics.jsonl`` and ``strategy.safetensors``, rewritten after
every round; ``progress.json``, the round under way and the nodes it waits for;
at the end ``nodes.json`` (which node held which client, and the nodes left out)
and ``adapter/`` (the global update as a PEFT adapter, as ``fedlora simulate``
exports it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora.federated.update import atomic_write
from fedlora.simulation.config import SimConfig
from fedlora.simulation.outputs import prepare_output_dir

from .config import FlowerSettings, load_run_config
from .strategy import FedLoRAStrategy, node_summary

log = logging.getLogger("fedlora.flower")


OUTPUT_OPTIONS = ("another output-dir, or overwrite=true to replace it "
                  "(flwr run APP --run-config \"output-dir='/abs/path' overwrite=true\")")


def follow_hint(run_id: int | None) -> str:
    """How to watch a run that ``flwr run`` (without ``--stream``) left running in the background."""
    run = str(run_id) if run_id is not None else "RUN_ID"
    return (f"follow this run with `flwr log {run} [SUPERLINK]` (it streams until the run ends), "
            f"see its status with `flwr ls [SUPERLINK] --run-id {run}`")


def run_server(grid: Grid, cfg: SimConfig, settings: FlowerSettings | None = None, *,
               run_id: int | None = None) -> FedLoRAStrategy:
    """Run the federated job over ``grid``; returns the finished strategy wrapper.

    run_id: the Flower run's id, for the first log line (how to follow the run).
    The output folder follows simulate's rule: a folder holding another run is
    refused unless ``overwrite``; ``resume`` is not available on Flower.
    """
    settings = settings or FlowerSettings()
    out = Path(cfg.output_dir).expanduser().resolve()
    log.info("fedlora on Flower: run %s, %s rounds of %s, writing to %s; %s", run_id if run_id is not None else "-",
             cfg.rounds, cfg.strategy, out, follow_hint(run_id))
    prepare_output_dir(dataclasses.replace(cfg, output_dir=str(out)), resumable=False, options=OUTPUT_OPTIONS)
    (out / "config.json").write_text(cfg.to_json())
    strategy = FedLoRAStrategy.from_config(cfg, settings, output_dir=out)
    strategy.start(grid, ArrayRecord(), num_rounds=cfg.rounds, timeout=settings.round_timeout_s)
    summary = node_summary(strategy)
    atomic_write(out / "nodes.json", json.dumps(summary, indent=2).encode())
    if summary["left_out"]:  # on the console too, not only in nodes.json
        log.warning("fedlora on Flower: %d node(s) left out of the run: %s", len(summary["left_out"]),
                    "; ".join(f"node {n}: {reason}" for n, reason in summary["left_out"].items()))
    strategy.export(out / "adapter")
    log.info("fedlora on Flower: done, %d rounds; metrics %s, adapter %s", len(strategy.history),
             out / "metrics.jsonl", out / "adapter")
    return strategy


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (Flower mirrors it into the run's log)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property above decides
        pass


@contextlib.contextmanager
def log_to_flower_stream():
    """While the ServerApp runs, fedlora's log lines (INFO and up) go to stdout, which Flower mirrors
    into the run's log (``flwr run --stream``, ``flwr log``); the logger is left as it was after."""
    logger = logging.getLogger("fedlora")
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-8s: fedlora: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def server_app(cfg: SimConfig | None = None, settings: FlowerSettings | None = None, *,
               base_dir: str | os.PathLike | None = None) -> ServerApp:
    """fedlora's ServerApp. cfg/settings None: read from the Flower run config (relative paths against base_dir)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        with log_to_flower_stream():
            if cfg is not None:
                run_server(grid, cfg, settings, run_id=context.run_id)
            else:
                run_server(grid, *load_run_config(context.run_config, base_dir), run_id=context.run_id)

    return app
