"""Federated data model: client updates, their validation, privacy, and folding deltas into a model."""
from .privacy import DPConfig, privatize
from .update import ClientUpdate
from .validation import update_norm, validate_update

__all__ = ["ClientUpdate", "DPConfig", "privatize", "update_norm", "validate_update"]
