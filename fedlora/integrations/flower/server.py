"""fedlora's Flower ServerApp: run a FedLoRAStrategy for ``cfg.rounds`` rounds and save the result.

Writes into ``cfg.output_dir`` (relative to the ServerApp's working directory):
``config.json``; ``metrics.jsonl`` and ``strategy.safetensors``, rewritten after
every round; ``progress.json``, the round under way and the nodes it waits for;
at the end ``nodes.json`` (which node held which client, and the nodes left out)
and ``adapter/`` (the global update as a PEFT adapter, as ``fedlora simulate``
exports it).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora.simulation.config import SimConfig
from fedlora.federated.update import atomic_write

from .config import FlowerSettings, load_run_config
from .strategy import FedLoRAStrategy, node_summary

log = logging.getLogger("fedlora.flower")


def run_server(grid: Grid, cfg: SimConfig, settings: FlowerSettings | None = None) -> FedLoRAStrategy:
    """Run the federated job over ``grid``; returns the finished strategy wrapper."""
    settings = settings or FlowerSettings()
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log.info("fedlora on Flower: writing to %s", out)
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


def server_app(cfg: SimConfig | None = None, settings: FlowerSettings | None = None, *,
               base_dir: str | os.PathLike | None = None) -> ServerApp:
    """fedlora's ServerApp. cfg/settings None: read from the Flower run config (relative paths against base_dir)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:
            run_server(grid, cfg, settings)
        else:
            run_server(grid, *load_run_config(context.run_config, base_dir))

    return app
