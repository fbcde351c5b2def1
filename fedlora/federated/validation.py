"""Checks an update must pass before it counts in aggregation.

Each check returns a human-readable reason (str) when the update is bad and
None when it is fine, so a strategy can log the reason, drop the update and
aggregate the rest.

Two bounds keep a finite but enormous update from poisoning the global state:

* a hard one (:func:`validate_update`): every factor's norm ||A||_F, ||s B||_F is at
  most :data:`FACTOR_NORM_LIMIT`, so every product of an A with a B the rules form
  (a client's own, or FedAvg's cross terms B_j A_k) and every partial sum of one
  stays below float32's largest value by a factor of 2**17: |sum_k B_ik A_kj| <=
  ||B_i,:|| ||A_:,j|| <= ||B||_F ||A||_F (Cauchy-Schwarz), and the weights of a round
  sum to 1;
* a robust, relative one (:func:`norm_outliers`): an update whose norm (of its
  product, of its A or of its s B) is more than ``ratio`` times the round's median
  is rejected. The lower median of n updates is the ceil(n/2)-th smallest, so one
  huge update among two or more cannot raise it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from .update import ClientUpdate, product_norm


# 2**55: a product of two such factors is at most 2**110, 2**17 times below float32's largest value
# (just under 2**128): room for sums over clients (weights sum to 1) and over FLoRA's rounds.
FACTOR_NORM_LIMIT = 2.0**55
SIZES = ("product", "A", "s*B")  # what update_sizes measures, in its order


def update_norm(update: ClientUpdate) -> float:
    """sqrt(sum over modules of ||s B A||_F^2): the size of the update in weight space."""
    return math.sqrt(sum(product_norm(a, b, update.scaling(n)) ** 2 for n, (a, b, _) in update.modules.items()))


def update_sizes(update: ClientUpdate) -> tuple[float, float, float]:
    """(||update||, sqrt(sum_m ||A_m||_F^2), sqrt(sum_m ||s_m B_m||_F^2)) in float64: the :data:`SIZES`."""
    sq_a = sum(_norm64(a) ** 2 for a, _, _ in update.modules.values())
    sq_b = sum((abs(update.scaling(n)) * _norm64(b)) ** 2 for n, (_, b, _) in update.modules.items())
    return update_norm(update), math.sqrt(sq_a), math.sqrt(sq_b)


def norm_outliers(updates: Sequence[ClientUpdate], ratio: float) -> dict[str, str]:
    """client id -> reason for every update with a size (:data:`SIZES`) above ``ratio`` x the round's
    lower median of that size. A median of 0 (every update empty) bounds nothing."""
    sizes = {u.client_id: update_sizes(u) for u in updates}
    out: dict[str, str] = {}
    for i, what in enumerate(SIZES):
        values = sorted(v[i] for v in sizes.values())
        median = values[(len(values) - 1) // 2]
        if not median > 0:
            continue
        for cid, v in sizes.items():
            if cid not in out and not v[i] <= ratio * median:
                out[cid] = (f"{what} norm {v[i]:.3g} is {v[i] / median:.3g}x the round's median {median:.3g}, "
                            f"above the bound of {ratio:g}x (strategy option max_norm_ratio)")
    return out


def validate_update(
    update: ClientUpdate,
    module_shapes: Mapping[str, tuple[int, int]],
    *,
    rank_check: Callable[[int, str], str | None] | None = None,
    max_norm: float | None = None,
    served: Mapping[str, int] | None = None,
) -> str | None:
    """Why ``update`` must be rejected, or None when it is valid.

    module_shapes: name -> (d_out, d_in) of the global model's adapted modules.
    rank_check: the strategy's rule for which rank a module may carry: (rank, module name) -> reason.
    max_norm: optional bound on :func:`update_norm`.
    served: module name -> the rank the server sent this client this round; each module must
        come back at it, and the update's rank must be the largest of them.
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
        if served is not None and r != served.get(name):
            return f"{name}: rank {r} differs from the rank {served.get(name)} the server sent this client"
        if rank_check is not None and (reason := rank_check(r, name)) is not None:
            return f"{name}: {reason}"
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            return f"{name}: alpha must be a finite number > 0, got {alpha!r}"
        if not torch.isfinite(a).all():
            return f"{name}: A has non-finite values (NaN or inf)"
        if not torch.isfinite(b).all():
            return f"{name}: B has non-finite values (NaN or inf)"
        for factor, norm in (("A", _norm64(a)), ("s*B", abs(update.scaling(name)) * _norm64(b))):
            if not norm <= FACTOR_NORM_LIMIT:
                return (f"{name}: {factor} has norm {norm:.3g}, beyond {FACTOR_NORM_LIMIT:.3g} (its products "
                        "could overflow float32)")
    if served and update.rank != max(served.values()):
        return f"rank {update.rank} differs from the rank {max(served.values())} the server sent this client"

    if max_norm is not None:
        norm = update_norm(update)
        if not math.isfinite(norm) or norm > max_norm:
            return f"update norm {norm:.6g} exceeds the bound {max_norm:.6g}"
    return None


def _norm64(t: torch.Tensor) -> float:
    """||t||_F in float64 (inf when even float64 overflows)."""
    return torch.linalg.vector_norm(t.detach().double()).item()
