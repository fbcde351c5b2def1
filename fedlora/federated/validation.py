"""Checks an update must pass before it counts in aggregation.

Each check returns a human-readable reason (str) when the update is bad and
None when it is fine, so a strategy can log the reason, drop the update and
aggregate the rest.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .update import ClientUpdate, product_norm


def update_norm(update: ClientUpdate) -> float:
    """sqrt(sum over modules of ||s B A||_F^2): the size of the update in weight space."""
    return math.sqrt(sum(product_norm(a, b, update.scaling(n)) ** 2 for n, (a, b, _) in update.modules.items()))


def validate_update(
    update: ClientUpdate,
    module_shapes: Mapping[str, tuple[int, int]],
    *,
    rank_check: Callable[[int, str], str | None] | None = None,
    max_norm: float | None = None,
) -> str | None:
    """Why ``update`` must be rejected, or None when it is valid.

    module_shapes: name -> (d_out, d_in) of the global model's adapted modules.
    rank_check: the strategy's rule for which rank a module may carry: (rank, module name) -> reason.
    max_norm: optional bound on :func:`update_norm`.
    """
    if not isinstance(update, ClientUpdate):
        return f"not a ClientUpdate but {type(update).__name__}"
    if not isinstance(update.client_id, str) or not update.client_id:
        return "client_id must be a non-empty string"
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) or update.num_examples <= 0:
        return f"num_examples must be a positive int, got {update.num_examples!r}"
    if isinstance(update.rank, bool) or not isinstance(update.rank, int) or update.rank < 1:
        return f"rank must be an int >= 1, got {update.rank!r}"

    names, expected = set(update.modules), set(module_shapes)
    if names != expected:
        parts = []
        if expected - names:
            parts.append(f"missing modules {sorted(expected - names)}")
        if names - expected:
            parts.append(f"unexpected modules {sorted(names - expected)}")
        return "; ".join(parts)

    for name in sorted(names):
        entry = update.modules[name]
        if not isinstance(entry, tuple) or len(entry) != 3:
            return f"{name}: expected an (A, B, alpha) triple"
        a, b, alpha = entry
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return f"{name}: A and B must be tensors"
        if not (a.is_floating_point() and b.is_floating_point()):
            return f"{name}: A and B must be floating point, got {a.dtype} and {b.dtype}"
        d_out, d_in = module_shapes[name]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or a.shape[1] != d_in or not 1 <= r <= update.rank:
            return (f"{name}: A has shape {tuple(a.shape)}, expected (r, {d_in}) with 1 <= r <= the client's "
                    f"rank {update.rank}")
        if tuple(b.shape) != (d_out, r):
            return f"{name}: B has shape {tuple(b.shape)}, expected ({d_out}, {r}) to match A's rank {r}"
        if rank_check is not None and (reason := rank_check(r, name)) is not None:
            return f"{name}: {reason}"
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            return f"{name}: alpha must be a finite number > 0, got {alpha!r}"
        if not torch.isfinite(a).all():
            return f"{name}: A has non-finite values (NaN or inf)"
        if not torch.isfinite(b).all():
            return f"{name}: B has non-finite values (NaN or inf)"

    if max_norm is not None:
        norm = update_norm(update)
        if not math.isfinite(norm) or norm > max_norm:
            return f"update norm {norm:.6g} exceeds the bound {max_norm:.6g}"
    return None
