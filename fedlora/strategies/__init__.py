"""Aggregation rules for federated LoRA (see base.py for the shared conventions, registry.py for names)."""
from . import registry
from .base import AggregationResult, Strategy
from .fedavg import FedAvg
from .fedexlora import FedExLoRA
from .fedsalora import FedSALoRA
from .fedsvd import FedSVD
from .ffalora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA, rank_self_pruning_penalty, self_pruned_rank, tail_norm
from .local import LocalOnly
from .lorafair import LoRAFAIR
from .rolora import RoLoRA

__all__ = ["AggregationResult", "FLoRA", "FFALoRA", "FedAvg", "FedExLoRA", "FedSALoRA", "FedSVD", "FlexLoRA",
           "HetLoRA", "LoRAFAIR", "LocalOnly", "RoLoRA", "Strategy",
           "rank_self_pruning_penalty", "registry", "self_pruned_rank", "tail_norm"]
