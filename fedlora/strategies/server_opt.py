"""Server optimizers on a rule's global update: FedAvgM (Hsu et al., "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019) and FedAdam,
FedYogi, FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2),
as OpenFedLLM (Ye et al., KDD 2024) runs them on LoRA.

x_{t-1} is the global state before round t and x~_t what the rule alone would make of it
this round (its aggregate). The server treats

    Delta_t = x~_t - x_{t-1}                                      (the pseudo-gradient)

as a gradient step and replaces x~_t by

    avgm     m_t = mu m_{t-1} + Delta_t                            x_t = x_{t-1} + eta m_t
    adam     m_t = b1 m_{t-1} + (1 - b1) Delta_t,  v_t = b2 v_{t-1} + (1 - b2) Delta_t^2
    yogi     m_t as adam,  v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
    adagrad  m_t as adam,  v_t = v_{t-1} + Delta_t^2
             (adam, yogi, adagrad)                                 x_t = x_{t-1} + eta m_t / (sqrt(v_t) + tau)

elementwise, with m_{-1} = 0 and v_{-1} = tau^2 (Algorithm 2 asks v_{-1} >= tau^2; OpenFedLLM
starts at tau^2) and no bias correction (Algorithm 2 has none). eta = ``server_lr``,
mu = ``server_momentum``, b1, b2 = ``beta1``, ``beta2``. avgm with mu = 0 and eta = 1 is the
rule alone; with mu = 0 it is FedAvg with a server learning rate.

Where x lives is the rule's ``server_opt_space``:

* ``"factors"`` (FedAvg, FFA-LoRA, HetLoRA): x is the global factors the round trained
  (``Strategy._server_params``: A_g and B_g, FFA-LoRA's B_g only), Delta_t = (A~_t - A_g,
  B~_t - B_g), and the moments are tensors of the factors' shapes.
* ``"delta"`` (FlexLoRA, FLoRA): x is the global weight update dW in weight space (scale-free,
  d_out x d_in), held as *parts* dense + B A (:data:`Parts`, a stack of low-rank factors while
  that holds fewer numbers than a dense matrix). FLoRA: Delta_t = sum_k p_k s_k B_k A_k, the
  round's stacked product (clients start from zero LoRA on top of the accumulated update, so the
  aggregate is the change). FlexLoRA: Delta_t = sum_k p_k s_k B_k A_k - U S V^T, the new weighted
  sum minus the kept top-K, and x_t is the top-K SVD of U S V^T + the step (the rule's own
  truncation). avgm is linear, so m_t = [mu m_{t-1} | Delta_t] stays stacked factors (dense once
  the stack outgrows a dense matrix). adam, yogi and adagrad square Delta_t elementwise, which
  no low-rank form keeps: their m and v are dense d_out x d_in per module on the server and the
  step is dense (FLoRA's accumulated update then turns dense; FlexLoRA's SVD runs on a dense
  matrix each round).

The moments live in the strategy's ``_tensors`` (``server_opt.m.*``, ``server_opt.v.*``), so they
are saved, loaded and restored on a failed round with the rest of its state; every update
replaces entries and never writes into a tensor in place.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

KINDS = ("none", "avgm", "adam", "yogi", "adagrad")
SPACES = ("factors", "delta")
PREFIX = "server_opt."
# (dense [d_out, d_in] or None, A [k, d_in], B [d_out, k]): the matrix dense + B @ A
Parts = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]
# The settings each optimizer reads; others must stay at their defaults (a set value would be ignored).
_USES = {"none": (), "avgm": ("server_lr", "server_momentum"),
         "adam": ("server_lr", "beta1", "beta2", "tau"), "yogi": ("server_lr", "beta1", "beta2", "tau"),
         "adagrad": ("server_lr", "beta1", "tau")}
DEFAULTS = {"server_lr": 1.0, "server_momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


class ServerOptimizer:
    """One of :data:`KINDS` (not "none") with its settings; see the module docstring for the formulas."""

    def __init__(self, kind: str, server_lr: float, server_momentum: float, beta1: float, beta2: float,
                 tau: float):
        self.kind, self.lr, self.momentum = kind, server_lr, server_momentum
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    @classmethod
    def create(cls, kind: str = "none", **settings) -> ServerOptimizer | None:
        """The optimizer ``kind`` names (None for "none"), its settings checked (ValueError naming one)."""
        check(kind, **settings)
        return None if kind == "none" else cls(kind, **{**DEFAULTS, **settings})

    def settings(self) -> dict:
        """What a saved state records (a state is loaded only by an optimizer with the same settings)."""
        return {"server_opt": self.kind, **{k: getattr(self, a) for k, a in (
            ("server_lr", "lr"), ("server_momentum", "momentum"), ("beta1", "beta1"), ("beta2", "beta2"),
            ("tau", "tau"))}}

    # -------------------------------------------------------------- factor space
    def step(self, grads: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The steps x_t - x_{t-1} for pseudo-gradients ``grads`` (key -> tensor), elementwise.

        Reads and replaces the moments of each key in ``state`` (``server_opt.m.KEY``, ``server_opt.v.KEY``).
        """
        steps = {}
        for key, g in grads.items():
            m_key, v_key = f"{PREFIX}m.{key}", f"{PREFIX}v.{key}"
            m = state.get(m_key)
            m = torch.zeros_like(g) if m is None else m
            if self.kind == "avgm":
                m = m * self.momentum + g
                steps[key] = m * self.lr
            else:
                v = state.get(v_key)
                v = torch.full_like(g, self.tau**2) if v is None else v
                m = m * self.beta1 + g * (1 - self.beta1)
                g2 = g * g
                if self.kind == "adam":
                    v = v * self.beta2 + g2 * (1 - self.beta2)
                elif self.kind == "yogi":
                    v = v - torch.sign(v - g2) * g2 * (1 - self.beta2)
                else:  # adagrad
                    v = v + g2
                state[v_key] = v
                steps[key] = m * self.lr / (v.sqrt() + self.tau)
            state[m_key] = m
        return steps

    # -------------------------------------------------------------- weight space
    def delta_step(self, grads: Mapping[str, Parts], state: dict[str, torch.Tensor],
                   module_shapes: Mapping[str, tuple[int, int]]) -> dict[str, Parts]:
        """The steps (as parts) for weight-space pseudo-gradients ``grads`` (module -> parts).

        avgm keeps m as parts in ``state`` (``server_opt.m.NAME.dense|A|B``); the adaptive ones
        keep dense m and v and return a dense step.
        """
        if self.kind != "avgm":
            dense = {name: to_dense(parts, module_shapes[name]) for name, parts in grads.items()}
            return {name: (s, s.new_zeros(0, s.shape[1]), s.new_zeros(s.shape[0], 0))
                    for name, s in self.step(dense, state).items()}
        steps = {}
        for name, grad in grads.items():
            keys = [f"{PREFIX}m.{name}.{part}" for part in ("dense", "A", "B")]
            if keys[1] in state:
                dense, A, B = (state[k] for k in keys)
                m = combine((dense if dense.dim() == 2 else None, A, B), grad, self.momentum)
            else:
                m = grad
            m = compact(m, module_shapes[name])
            dense, A, B = m
            state[keys[0]] = dense if dense is not None else A.new_zeros(0)
            state[keys[1]], state[keys[2]] = A, B
            steps[name] = scale(m, self.lr)
        return steps


def check(kind: str = "none", **settings) -> None:
    """Raise ValueError naming the first bad server-optimizer setting (or one ``kind`` would ignore)."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"server_opt must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown server optimizer settings {unknown}; known: {sorted(DEFAULTS)}")
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        if key not in _USES[kind] and value != DEFAULTS[key]:
            uses = ", ".join(_USES[kind]) or "no settings"
            raise ValueError(f"{key}={value!r} has no effect with server_opt={kind!r} (it uses {uses})")
    values = {**DEFAULTS, **settings}
    if not values["server_lr"] > 0:
        raise ValueError(f"server_lr must be > 0, got {values['server_lr']}")
    if not 0 <= values["server_momentum"] < 1:
        raise ValueError(f"server_momentum must be in [0, 1), got {values['server_momentum']}")
    for key in ("beta1", "beta2"):
        if not 0 <= values[key] < 1:
            raise ValueError(f"{key} must be in [0, 1), got {values[key]}")
    if not values["tau"] > 0:
        raise ValueError(f"tau must be > 0, got {values['tau']}")


# ------------------------------------------------------------------ parts algebra
def scale(parts: Parts, c: float) -> Parts:
    """c * (dense + B A), the scalar folded into dense and B."""
    dense, A, B = parts
    return (None if dense is None else dense * c, A, B * c)


def combine(first: Parts, second: Parts, c_first: float = 1.0) -> Parts:
    """c_first * first + second: the stacks side by side, the dense parts summed."""
    d1, A1, B1 = scale(first, c_first)
    d2, A2, B2 = second
    dense = d2 if d1 is None else (d1 if d2 is None else d1 + d2)
    return dense, torch.cat([A1, A2], dim=0), torch.cat([B1, B2], dim=1)


def compact(parts: Parts, shape: tuple[int, int]) -> Parts:
    """The same matrix, its stack added into the dense part once it holds more numbers than a dense one."""
    dense, A, B = parts
    d_out, d_in = shape
    if A.shape[0] * (d_out + d_in) <= d_out * d_in:
        return parts
    return to_dense(parts, shape), A[:0], B[:, :0]


def to_dense(parts: Parts, shape: tuple[int, int]) -> torch.Tensor:
    """dense + B A as one [d_out, d_in] matrix."""
    dense, A, B = parts
    product = B @ A if A.shape[0] else B.new_zeros(shape)
    return product if dense is None else dense + product


def moments_problem(tensors: Mapping[str, torch.Tensor], kind: str | None, space: str | None,
                    module_shapes: Mapping[str, tuple[int, int]]) -> str | None:
    """Why the moments in a loaded state (``server_opt.*`` keys of ``tensors``) cannot be those of optimizer
    ``kind`` (None: none) in ``space``, or None: each belongs to a parameter or module of the state and has
    its shape (factors: the parameter's; delta: d_out x d_in, or avgm's stacked parts)."""
    keys = sorted(k for k in tensors if k.startswith(PREFIX))
    if keys and kind is None:
        return f"{keys[0]}: server optimizer moments, but the state has no server optimizer"
    stacks: dict[str, dict[str, tuple]] = {}
    for key in keys:
        moment, _, rest = key[len(PREFIX):].partition(".")
        shape = tuple(tensors[key].shape)
        if moment not in ("m", "v") or (moment == "v" and kind == "avgm"):
            return f"{key}: not a moment of server_opt={kind!r}"
        if space == "factors":
            if rest not in tensors or rest.startswith(PREFIX):
                return f"{key}: no parameter {rest!r} in the state"
            if shape != tuple(tensors[rest].shape):
                return f"{key} has shape {list(shape)}, its parameter {list(tensors[rest].shape)}"
        elif kind == "avgm":  # stacked parts: NAME.dense | NAME.A | NAME.B
            name, _, part = rest.rpartition(".")
            if name not in module_shapes or part not in ("dense", "A", "B"):
                return f"{key}: not a part of a module of the state"
            stacks.setdefault(name, {})[part] = shape
        elif rest not in module_shapes or shape != tuple(module_shapes[rest]):
            return f"{key}: expected a dense moment of a module of the state ({list(module_shapes.get(rest, ()))})"
    for name, parts in stacks.items():
        d_out, d_in = module_shapes[name]
        dense, A, B = parts.get("dense"), parts.get("A"), parts.get("B")
        if (dense not in ((0,), (d_out, d_in)) or A is None or B is None or len(A) != 2 or len(B) != 2
                or A[1] != d_in or B[0] != d_out or A[0] != B[1]):
            return f"{PREFIX}m.{name}: parts {parts} do not make a {d_out} x {d_in} matrix"
    return None
