"""A Flower run's configuration: fedlora's SimConfig plus a few Flower-only settings.

A Flower app's ``[tool.flwr.app.config]`` (and ``flwr run --run-config``) hold
flat key/value pairs. Keys name ``SimConfig`` fields, with ``-`` or ``_``
(``local-steps`` = ``local_steps``); lists are comma-separated strings
(``rank-levels = "4,8,16"``), strategy options are ``strategy-options.NAME``,
and ``config`` may name a TOML file of settings, read first, as
``fedlora simulate --config``. The keys of :class:`FlowerSettings` are the
Flower-only settings.

Flower, Ray and the Flower runtime reach for the network unless told not to
(telemetry, update checks, ``uv sync`` of app dependencies, Ray servers on
every interface); :func:`quiet_flower_env` turns all of that off.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedlora.federated.strict import strict_float, strict_int
from fedlora.simulation.config import SimConfig

# Set before flwr/ray are imported (flwr reads some of them at import time) and
# inherited by every process the Flower runtime starts.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray on one machine: its node address is 127.0.0.1 and every Ray server binds there, not on all
    # interfaces (the name is Ray's; "0" turns its multi-machine mode off on Linux too).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def quiet_flower_env(environ: dict | None = None) -> dict:
    """Turn off Flower's telemetry and update checks, runtime ``uv sync``, Ray's usage stats and its
    multi-machine mode (Ray then binds to 127.0.0.1 only).

    Only fills variables that are unset (``environ`` defaults to ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    for key, value in QUIET_ENV.items():
        environ.setdefault(key, value)
    return environ


@dataclass
class FlowerSettings:
    """Settings of a Flower run that ``fedlora simulate`` does not have."""

    min_nodes: int = 0  # nodes to wait for before round 1; 0: the num-partitions the nodes report
    node_wait_s: float = 60.0  # how long to wait for them to connect (then go on with those that came)
    # how long a connected node may take to answer its first message (its profile): a SuperNode starts
    # its ClientApp then (imports, model and data). A later answer joins the next round.
    node_start_timeout_s: float = 300.0
    round_timeout_s: float = 3600.0  # replies later than this count the node as missing for the round

    def validate(self) -> FlowerSettings:
        """Each setting of its own type (no conversion) and in range; ValueError naming it."""
        strict_int(self.min_nodes, "config: min-nodes", low=0)
        self.node_wait_s = strict_float(self.node_wait_s, "config: node-wait-s", low=0.0)
        self.node_start_timeout_s = strict_float(self.node_start_timeout_s, "config: node-start-timeout-s",
                                                 low=0.0, low_open=True)
        self.round_timeout_s = strict_float(self.round_timeout_s, "config: round-timeout-s", low=0.0, low_open=True)
        return self


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_run_config(run_config: Mapping[str, object], base_dir: str | os.PathLike | None = None
                    ) -> tuple[SimConfig, FlowerSettings]:
    """(SimConfig, FlowerSettings) from a Flower run config.

    base_dir: where a relative ``dataset`` or ``config`` path is found (the app's
    folder; the Flower runtime runs apps from elsewhere). ``output_dir`` stays as
    given: relative to the ServerApp's working directory.
    """
    flower_fields = {f.name: f for f in dataclasses.fields(FlowerSettings)}
    settings, overrides, config_file = {}, [], None
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in flower_fields:
            settings[name] = value  # FlowerSettings.validate checks its type, converting nothing
        elif name == "config":
            config_file = _resolve(value, base_dir) if value else None
        else:
            overrides += [f"--{name}", _text(value)]
    cfg = SimConfig.load(config_file, overrides)
    if base_dir is not None and cfg.dataset != "shakespeare":
        cfg.dataset = str(_resolve(cfg.dataset, base_dir))
    return cfg, FlowerSettings(**settings).validate()


def _resolve(path, base_dir) -> Path:
    path = Path(str(path)).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path
