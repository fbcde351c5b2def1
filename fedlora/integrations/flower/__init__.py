"""fedlora's strategies and clients on Flower (flwr 1.41, Message API).

* :class:`FedLoRAStrategy`: a Flower ``Strategy`` that runs any fedlora strategy
  (FedAvg, FFA-LoRA, HetLoRA, FlexLoRA, FLoRA) with heterogeneous client ranks.
* :func:`client_app` / :func:`server_app`: the ClientApp and ServerApp of a
  Flower app that reproduces ``fedlora simulate`` (see ``examples/flower``).

Needs the ``flower`` extra: ``pip install 'fedlora[flower]'``. Importing this
package turns off Flower's telemetry and update checks and Ray's usage stats
for this process and the ones it starts (:func:`quiet_flower_env`).
"""
from .config import QUIET_ENV, FlowerSettings, load_run_config, quiet_flower_env

quiet_flower_env()  # before flwr is imported: it reads some of these at import time

from .client import client_app, local_data, train_client  # noqa: E402
from fedlora.simulation.round import start_factors  # noqa: E402

from .server import run_server, server_app  # noqa: E402
from .strategy import FedLoRAStrategy  # noqa: E402
from .wire import NodeProfile, TrainInstruction  # noqa: E402

__all__ = ["QUIET_ENV", "FedLoRAStrategy", "FlowerSettings", "NodeProfile", "TrainInstruction", "client_app",
           "load_run_config", "local_data", "quiet_flower_env", "run_server", "server_app", "start_factors",
           "train_client"]
