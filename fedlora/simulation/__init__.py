"""The runtime of a federated experiment on one machine (``fedlora simulate``), and the round
recipe the Flower integration shares.

config       SimConfig: defaults, TOML files, --key value overrides
setup        device, dtype, model, data, client ranks, the strategy (make_strategy)
round        THE round recipe: sampling, start factors, local plan, trained update, bytes, round record
trainer      batched local training of many clients (FederatedModel, train_clients)
optim        one optimizer state per client inside one batched step
evaluation   loss / perplexity / Rouge-L of the global model
checkpoints  atomic per-round checkpoints and resume
reporting    console lines, progress bars, metrics.jsonl, the plot
export       the global update as a PEFT adapter
run          simulate(): the run loop
"""
from .config import SimConfig
from .run import SimulationResult, simulate

__all__ = ["SimConfig", "SimulationResult", "simulate"]
