"""SCAFFOLD's server side (Karimireddy et al., ICML 2020) for rules whose clients train a
truncation of global factors kept in one coordinate system across rounds.

The server control variate c lives where the global factors do: per module c_A [R, d_in] and
c_B [d_out, R] (R the module's global rank), on the factors the round's clients train and send
back (``uploaded_at``: both, FFA-LoRA's B, RoLoRA's one factor of the round; the others' c is
left as it is and not sent). A client served at rank r gets c_A[:r], c_B[:, :r]
(:meth:`ControlVariates.server_controls`), as it gets its factors, and sends back Delta c_k at
rank r; the server zero-pads each to R and sets

    c <- c + (1/N) sum_{k in S} pad(Delta c_k)         (N clients in the federation)

(:meth:`ControlVariates.update_controls`, for the round's accepted clients). c starts at zero and
is kept in the strategy's state (``scaffold.{module}.A|B``), so it is saved and loaded with it.
Rules whose clients start from a new basis every round (FlexLoRA's SVD, FLoRA's fresh LoRA) have
no such space: factor-space control variates of one round mean nothing in the next, so they do
not admit SCAFFOLD. The client side is :mod:`fedlora.simulation.corrections`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

CONTROLS_PREFIX = "scaffold."  # the state's keys: scaffold.{module}.A|B
# module -> (c_A [r, d_in], c_B [d_out, r]); None for a factor the round does not send back
Controls = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


class ControlVariates:
    """Mixin for a :class:`~fedlora.strategies.base.Strategy` with global factors of rank
    ``module_ranks[name]`` that clients train truncations of."""

    admits_scaffold = True

    def server_controls(self, module_ranks: Mapping[str, int], factors: Sequence[str]) -> Controls:
        """c at a client's served ranks (module -> rank) for ``factors`` (the round's ``uploaded_at``), copies."""
        self._refuse_with_dp()
        out = {}
        for name, r in module_ranks.items():
            c_A, c_B = self._controls(name)
            out[name] = (c_A[:r].clone() if "A" in factors else None, c_B[:, :r].clone() if "B" in factors else None)
        return out

    def update_controls(self, deltas: Mapping[str, Controls], served: Mapping[str, Mapping[str, int]],
                        num_clients: int, factors: Sequence[str]) -> dict[str, str]:
        """Add (1/num_clients) sum_k pad(Delta c_k) to c; returns client id -> why its Delta c_k was refused.

        deltas: client id -> its Delta c_k (the round's accepted clients); served: client id ->
        module -> the rank it was sent, which every Delta c_k must match; factors: the round's
        ``uploaded_at``, the factors each Delta c_k holds. Refused changes are left out.
        """
        self._refuse_with_dp()
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < len(deltas):
            raise ValueError(f"num_clients must be an int >= the {len(deltas)} clients of the round, got "
                             f"{num_clients!r}")
        refused, good = {}, []
        for cid, delta in deltas.items():
            reason = self.control_problem(delta, served.get(cid), factors)
            if reason is None:
                good.append(delta)
            else:
                refused[cid] = f"control variate: {reason}"
        if not good:
            return refused
        for name in self.module_shapes:
            for i, (key, c) in enumerate(zip("AB", self._controls(name))):
                if key not in factors:
                    continue
                total = torch.zeros_like(c)
                for delta in good:
                    d = delta[name][i]
                    r = d.shape[0] if key == "A" else d.shape[1]
                    if key == "A":
                        total[:r] += d.to(total)
                    else:
                        total[:, :r] += d.to(total)
                self._tensors[f"{CONTROLS_PREFIX}{name}.{key}"] = c + total / num_clients
        return refused

    def _refuse_with_dp(self) -> None:
        if self.dp is not None:
            raise ValueError("SCAFFOLD with client-level DP: Delta c_k = (theta_sent - theta) / sum eta - c carries "
                             "each client's update without the DP noise; use one or the other")

    def _controls(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_A, c_B) of ``name`` at the global rank; zeros before the first update."""
        d_out, d_in = self.module_shapes[name]
        R = self.module_ranks[name]
        kw = dict(dtype=self.dtype, device=self.device)
        c_A = self._tensors.get(f"{CONTROLS_PREFIX}{name}.A")
        c_B = self._tensors.get(f"{CONTROLS_PREFIX}{name}.B")
        return (torch.zeros(R, d_in, **kw) if c_A is None else c_A), (torch.zeros(d_out, R, **kw) if c_B is None
                                                                        else c_B)

    def _controls_problem(self) -> str | None:
        """Why the loaded state's c cannot be this one (a module it does not have, a shape), or None."""
        for key, t in self._tensors.items():
            if not key.startswith(CONTROLS_PREFIX):
                continue
            name, _, factor = key[len(CONTROLS_PREFIX):].rpartition(".")
            if name not in self.module_shapes or factor not in ("A", "B"):
                return f"{key}: not a control variate of this state's modules"
            d_out, d_in = self.module_shapes[name]
            R = self.module_ranks.get(name)
            want = (R, d_in) if factor == "A" else (d_out, R)
            if tuple(t.shape) != want:
                return f"{key} has shape {list(t.shape)}, expected {list(want)}"
        return None

    def control_problem(self, delta, served: Mapping[str, int] | None, factors: Sequence[str]) -> str | None:
        """Why a client's Delta c_k is unacceptable (names, shapes, the ranks it was ``served``, a change for
        exactly the round's ``factors``, dtype, finiteness), or None; the runtime then rejects its whole upload."""
        if served is None:
            return "the server sent this client no work this round"
        if not isinstance(delta, Mapping) or set(delta) != set(self.module_shapes):
            return f"expected the modules {sorted(self.module_shapes)}"
        for name, pair in delta.items():
            d_out, d_in = self.module_shapes[name]
            r = served.get(name)
            if not isinstance(pair, tuple) or len(pair) != 2:
                return f"{name}: expected (A, B)"
            want = {"A": (r, d_in), "B": (d_out, r)}
            for key, t in zip("AB", pair):
                if key not in factors:
                    if t is not None:
                        return f"{name}: this round's clients do not send {key} back; it has no control variate"
                    continue
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    return f"{name}.{key}: expected a floating-point tensor"
                if tuple(t.shape) != want[key]:
                    return f"{name}.{key} has shape {tuple(t.shape)}, expected {want[key]} (the rank it was sent)"
                if not torch.isfinite(t).all():
                    return f"{name}.{key} is not finite"
        return None
