"""Federated data model: client updates, their validation, privacy, and folding deltas into a model."""
from .fold import DeltaLinear, fold_deltas
from .privacy import DPConfig, privatize
from .update import ClientUpdate
from .validation import update_norm, validate_update

__all__ = ["ClientUpdate", "DPConfig", "DeltaLinear", "fold_deltas", "privatize", "update_norm", "validate_update"]
