"""The shared skeleton of an aggregation rule.

Conventions every strategy follows:

* A client's contribution to module m is its product  s_k B_k A_k  with its own
  LoRA scaling s_k = alpha_k / r_k (alpha_k / sqrt(r_k) with rsLoRA). Strategies
  fold s_k into the products, so the global state is scale-free: its factors
  multiply to the global weight update with scaling 1.
* ``distribute(rank, alpha=a)`` returns factors (A, B, a) with
  lora_scaling(a, rank) * B @ A equal to the product the strategy intends that
  client to start from; B is divided by the client's scaling to make that so.
* Per-module ranks: a module may train at its own rank r_m (``distribute(...,
  module_ranks=...)``, ``init_global(..., module_ranks=...)`` for the global
  one); every rule above then holds per module with r_m in place of the rank.
* p_k = n_k / sum_j n_j over the round's accepted updates unless a strategy
  says otherwise.

A new rule subclasses :class:`Strategy` (an abstract base class), keeps its
tensors in ``self._tensors`` (saved and loaded for it), implements ``_init_state``,
``_aggregate`` and ``_distribute`` (abstract) and ``global_delta``, and overrides the hooks that
differ from the defaults: ``global_rank``/``check_client_ranks`` (how a federation's
ranks map to the global rank), ``client_base`` (a delta clients fold beside their
frozen base), ``trainable_at``/``uploaded_at`` (the factors clients train and send back
in a round: RoLoRA alternates), ``personal`` (factors each client keeps across rounds),
``has_global_model`` (False: no shared model, each client is evaluated with its own),
``_served_rank``/``_rank_check``/``_check_update``. Code outside
``fedlora.strategies`` talks to rules only through these public methods, never
through a type check on a concrete rule; :mod:`fedlora.strategies.registry` maps
names to classes.
"""
from __future__ import annotations

import abc
import copy
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from fedlora import ops
from fedlora.bank import AdapterBank, lora_scaling
from fedlora.federated.privacy import DPConfig, privatize
from fedlora.federated.rng import lora_init_A, stable_seed
from fedlora.federated.update import FORMAT_VERSION, ClientUpdate, atomic_write, read_blob
from fedlora.federated.strict import strict_bool, strict_float, strict_int, strict_mapping
from fedlora.federated.validation import norm_outliers, validate_update

from . import server_opt as server_opts
from .scaffold import CONTROLS_PREFIX, ControlVariates

log = logging.getLogger("fedlora.strategies")

_STATE_KEY = "fedlora.state"
# An honest round's updates differ in size by a few times (ranks, data); a poisoned one by orders of magnitude.
DEFAULT_MAX_NORM_RATIO = 10.0
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
# module -> (dense [d_out, d_in] or None, A [k, d_in], B [d_out, k]); the delta is dense + B @ A
BaseParts = dict[str, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]


@dataclass
class AggregationResult:
    """What one call of :meth:`Strategy.aggregate` did."""

    round: int  # index of the round just aggregated (the state's round before the call)
    accepted: list[str]
    rejected: dict[str, str]  # client id -> reason
    changed: bool  # False when too few updates were valid: the previous state is kept
    weights: dict[str, float] = field(default_factory=dict)  # client id -> p_k (data weights)


class Strategy(abc.ABC):
    """Base class: validation, weighting, privacy, state (de)serialisation.

    min_updates: a round with fewer valid updates keeps the previous state.
    max_update_norm: reject updates whose weight-space norm sqrt(sum_m ||s B A||^2) is larger.
    max_norm_ratio: reject updates whose norm (of the product, of A or of s B) is more than this
        many times the round's (lower) median; 0 or None turns the bound off
        (fedlora.federated.validation.norm_outliers).
    dp: client-level differential privacy (see fedlora.federated.privacy); None = off.
    server_opt: "none" | "avgm" | "adam" | "yogi" | "adagrad", a server optimizer on the rule's
        global update with ``server_lr``, ``server_momentum`` (avgm), ``beta1``, ``beta2``, ``tau``
        (adaptive); see :mod:`fedlora.strategies.server_opt` for the formulas and what the
        pseudo-gradient is for each ``server_opt_space``. A rule whose ``server_opt_space`` is None
        refuses any but "none".

    A round never ends the run: an update that fails validation is rejected with a
    reason, and a round whose aggregation raises an arithmetic or linear-algebra error
    or leaves a non-finite state keeps the previous state and rejects every update of
    the round with the reason.
    """

    name = "strategy"
    trainable: tuple[str, ...] = ("A", "B")  # which factors clients train (every round unless trainable_at says)
    personal: tuple[str, ...] = ()  # factors each client keeps to itself across rounds (FedSA-LoRA: B)
    # False when the rule builds no model shared by clients (local-only): each training client's held-out
    # examples are then scored with its own model, unseen clients with the base model; nothing is exported.
    has_global_model: bool = True
    # Where a server optimizer acts: "factors" (the global factors, _server_params), "delta" (the
    # global weight update as parts, _pseudo_gradient/_apply_step), or None (the rule admits none).
    server_opt_space: str | None = None
    # Whether clients train a truncation of global factors kept in one coordinate system across
    # rounds, where SCAFFOLD's control variates live (the ControlVariates mixin; strategies/scaffold.py).
    admits_scaffold: bool = False

    def __init__(self, *, min_updates: int = 1, max_update_norm: float | None = None,
                 max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO, dp: DPConfig | None = None,
                 server_opt: str = "none", server_lr: float = 1.0, server_momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, use_rslora: bool = False,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        strict_int(min_updates, "min_updates", low=1)
        if max_update_norm is not None:
            strict_float(max_update_norm, "max_update_norm", low=0.0, low_open=True)
        if max_norm_ratio is not None:
            strict_float(max_norm_ratio, "max_norm_ratio", low=0.0)
            if 0 < max_norm_ratio < 1:
                raise ValueError(f"max_norm_ratio must be 0 (off) or >= 1, got {max_norm_ratio}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the global state is kept in float32 or float64, got {dtype}")
        type(self).check_server_opt(server_opt)
        self.server_optimizer = server_opts.ServerOptimizer.create(
            server_opt, server_lr=server_lr, server_momentum=server_momentum, beta1=beta1, beta2=beta2, tau=tau)
        self.min_updates = min_updates
        self.max_update_norm = max_update_norm
        self.max_norm_ratio = max_norm_ratio or None
        self.dp = dp
        self.use_rslora = use_rslora
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.rank: int | None = None
        self.module_ranks: dict[str, int] = {}  # the global rank of each module (when there is one)
        self.alpha: float | None = None
        self.round = 0
        self._tensors: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ public
    def init_global(self, module_shapes: Mapping[str, tuple[int, int]], rank: int | None = None,
                    alpha: float | None = None, module_ranks: Mapping[str, int] | None = None) -> None:
        """Start a fresh global state.

        module_shapes: module name -> (d_out, d_in).
        rank: the strategy's global rank (see each strategy for what it means).
        alpha: the default alpha of distributed factors (None: alpha = the client's rank, scaling 1).
        module_ranks: the global rank of some modules when it differs from ``rank`` (per-module ranks).
        """
        shapes = {}
        for name, shape in module_shapes.items():
            d_out, d_in = (int(v) for v in shape)
            if d_out < 1 or d_in < 1:
                raise ValueError(f"module {name!r} has shape {shape}; expected (d_out, d_in) >= 1")
            shapes[str(name)] = (d_out, d_in)
        if not shapes:
            raise ValueError("module_shapes is empty")
        if rank is not None and (int(rank) != rank or rank < 1):
            raise ValueError(f"rank must be an int >= 1, got {rank}")
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {alpha}")
        if module_ranks and rank is None:
            raise ValueError("module_ranks needs rank= as well (the rank of the modules it does not name)")
        self.module_shapes = shapes
        self.module_ranks = {} if rank is None else _resolve_ranks(shapes, int(rank), module_ranks)
        self.rank = None if rank is None else int(rank)
        self.alpha = None if alpha is None else float(alpha)
        self.round = 0
        self._tensors = {}
        self._init_state()

    def distribute(self, rank: int, client_id: str | None = None, alpha: float | Mapping[str, float] | None = None,
                   module_ranks: Mapping[str, int] | None = None) -> Factors:
        """The starting factors of a client that can train at ``rank``: name -> (A [r, d_in], B [d_out, r], alpha).

        r is ``rank``, or ``module_ranks[name]`` for the modules that mapping names,
        except where a strategy serves another (FedAvg's bucket mode).
        alpha: one for every module, a mapping name -> alpha, or None (each module's default).
        """
        self._require_init()
        ranks = _resolve_ranks(self.module_shapes, rank, module_ranks)
        served = {name: self._served_rank(r, name) for name, r in ranks.items()}
        alphas = {}
        for name, r in served.items():
            a = alpha.get(name) if isinstance(alpha, Mapping) else alpha
            a = self._default_alpha(r) if a is None else float(a)
            if not (math.isfinite(a) and a > 0):
                raise ValueError(f"alpha of {name!r} must be finite and > 0, got {a}")
            alphas[name] = a
        factors = self._distribute(served, alphas, client_id)
        return {name: (a, b, alphas[name]) for name, (a, b) in factors.items()}

    def aggregate(self, updates: Iterable[ClientUpdate],
                  served: Mapping[str, Mapping[str, int]] | None = None) -> AggregationResult:
        """Validate ``updates``, aggregate the valid ones into the global state.

        served: client id -> module name -> the rank the server sent that client this
            round; when given, an update from a client not in it, or whose module ranks
            differ from what it was sent, is rejected.
        """
        self._require_init()
        accepted: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        for upd in updates:
            cid = str(getattr(upd, "client_id", f"<{type(upd).__name__}>"))
            if any(u.client_id == cid for u in accepted):
                reason = "duplicate client id in this round"
            elif served is not None and cid not in served:
                reason = "the server sent this client no work this round"
            else:
                reason = self._validate(upd, None if served is None else served[cid])
            if reason is None:
                accepted.append(upd)
            else:
                rejected[cid] = reason
        if self.max_norm_ratio is not None and accepted:
            outliers = norm_outliers(accepted, self.max_norm_ratio)
            rejected.update(outliers)
            accepted = [u for u in accepted if u.client_id not in outliers]
        for cid, reason in rejected.items():
            log.warning("%s round %d: rejected update from %s: %s", self.name, self.round, cid, reason)
        round_idx = self.round
        ids = [u.client_id for u in accepted]
        if len(accepted) < self.min_updates:
            log.warning("%s round %d: %d valid update(s) < min_updates=%d; keeping the previous state",
                        self.name, round_idx, len(accepted), self.min_updates)
            return AggregationResult(round_idx, ids, rejected, changed=False)
        if self.dp is not None:
            accepted = [self._privatize(u) for u in accepted]
        accepted = [self._to_state(u) for u in accepted]
        data_weights = self._data_weights(accepted)
        failure = self._guarded_aggregate(accepted, data_weights)
        if failure is not None:
            log.warning("%s round %d: %s; keeping the previous state", self.name, round_idx, failure)
            rejected.update(dict.fromkeys(ids, f"round not aggregated: {failure}"))
            return AggregationResult(round_idx, [], rejected, changed=False)
        self.round += 1
        return AggregationResult(round_idx, ids, rejected, changed=True,
                                 weights={u.client_id: float(w) for u, w in zip(accepted, data_weights)})

    def _validate(self, update: ClientUpdate, served: Mapping[str, int] | None) -> str | None:
        """Why ``update`` is rejected, or None; whatever the update holds, a reason and never an exception."""
        try:
            if served:  # a rank the rule lets a client prune to (upload_rank_ok) counts as sent
                top = max(served.values())
                rank = update.rank if isinstance(update, ClientUpdate) else None
                if type(rank) is int and rank != top and self.upload_rank_ok(top, rank):
                    served = {name: min(r, rank) for name, r in served.items()}
            return (validate_update(update, self.module_shapes, rank_check=self._rank_check,
                                    max_norm=self.max_update_norm, served=served)
                    or self._check_update(update))
        except Exception as exc:  # noqa: BLE001 (a malformed object is that client's rejection, not the run's end)
            return f"invalid update: {type(exc).__name__}: {_first_line(exc)}"

    def _guarded_aggregate(self, updates: Sequence[ClientUpdate], weights: torch.Tensor) -> str | None:
        """Run ``_aggregate``; on an arithmetic failure or a non-finite state restore the state and say why.

        ``_aggregate`` replaces entries of ``self._tensors`` rather than writing into
        them, so a shallow copy of the dict is the previous state.
        """
        before, extra = dict(self._tensors), self._extra_meta()
        try:
            self._aggregate_round(updates, weights)
            bad = next((k for k, t in self._tensors.items() if not torch.isfinite(t).all()), None)
            failure = None if bad is None else f"aggregation made {bad} non-finite"
        except (ArithmeticError, RuntimeError, ValueError) as exc:  # LinAlgError is a RuntimeError
            failure = f"aggregation failed: {type(exc).__name__}: {_first_line(exc)}"
        if failure is not None:
            self._tensors = before
            self._load_extra_meta(extra)
        return failure

    def _aggregate_round(self, updates: Sequence[ClientUpdate], weights: torch.Tensor) -> None:
        """The rule's aggregate, or with a server optimizer x_{t-1} + its step on x~_t - x_{t-1}."""
        opt = self.server_optimizer
        if opt is None:
            self._aggregate(updates, weights)
        elif self.server_opt_space == "factors":
            before = {key: self._tensors[key] for key in self._server_params()}
            self._aggregate(updates, weights)
            steps = opt.step({key: self._tensors[key] - x for key, x in before.items()}, self._tensors)
            for key, x in before.items():
                self._tensors[key] = x + steps[key]
        else:
            self._apply_step(opt.delta_step(self._pseudo_gradient(updates, weights), self._tensors,
                                            self.module_shapes), updates)

    @classmethod
    def check_server_opt(cls, server_opt: str) -> None:
        """Raise ValueError when this rule does not admit server optimizer ``server_opt``."""
        server_opts.check(server_opt)
        if server_opt != "none" and cls.server_opt_space is None:
            admit = ", ".join(cls_.name for cls_ in _rules_admitting()) or "none"
            raise ValueError(f"{cls.name} does not admit a server optimizer (server_opt={server_opt!r}): its "
                             f"round has no pseudo-gradient x~_t - x_(t-1) it could step along; rules that "
                             f"do: {admit}")

    def global_delta(self, name: str) -> torch.Tensor:
        """The global model's effective weight update of module ``name``, dense [d_out, d_in] (scaling folded in).

        Every rule that is evaluated or exported defines it (all of fedlora's do)."""
        raise NotImplementedError(f"{type(self).__name__} does not define global_delta")

    def global_deltas(self) -> dict[str, torch.Tensor]:
        """global_delta of every module: what evaluation and the PEFT export apply to the base model."""
        self._require_init()
        return {name: self.global_delta(name) for name in self.module_shapes}

    def client_base(self, client_id: str | None = None) -> BaseParts | None:
        """The delta a client folds beside its frozen base before training, or None (most rules).

        Per module (dense [d_out, d_in] or None, A [k, d_in], B [d_out, k]) with the
        delta = dense + B @ A: low-rank factors while they hold fewer numbers than a
        dense matrix, dense beyond (FLoRA's accumulated stacks; FedEx-LoRA's residual).
        :func:`merge_parts` turns it into dense deltas. Clients add it to their model
        output in full precision beside the base (never re-quantized into a 4-bit
        weight) and train their LoRA factors on top.
        """
        return None

    # ------------------------------------------------------- client-side hooks
    def local_penalty(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                      rank: int) -> torch.Tensor | None:
        """A differentiable term a client of ``rank`` adds to its training loss, or None (most rules).

        factors: module -> (A [r, d_in], B [d_out, r]), the client's live parameters.
        """
        return None

    def prune_update(self, update: ClientUpdate, state: dict) -> ClientUpdate:
        """The update a client actually uploads after local training (default: as trained).

        ``state`` is the client's own JSON-able memory across rounds (the runtime keeps
        it per client and checkpoints it); a rule may read and update it in place.
        A pruned update may have a smaller rank than served (:meth:`upload_rank_ok`).
        """
        return update

    def upload_rank_ok(self, served: int, uploaded: int) -> bool:
        """Whether a client served at rank ``served`` may upload rank ``uploaded`` (default: only equal)."""
        return uploaded == served

    # --------------------------------------------- what clients train and send
    def trainable_at(self, round_idx: int) -> tuple[str, ...]:
        """The factors clients train in round ``round_idx`` ("A", "B" or both): ``trainable`` unless a
        rule alternates (RoLoRA). The runtime freezes the others, DP noises only what is sent."""
        return self.trainable

    def uploaded_at(self, round_idx: int) -> tuple[str, ...]:
        """The factors a client sends back in round ``round_idx``: what it trains, less its personal
        factors. Byte accounting counts these; a personal factor not listed here never leaves the client
        (the runtime zeroes it in the update)."""
        return tuple(f for f in self.trainable_at(round_idx) if f not in self.personal)

    # ------------------------------------------------- the federation's ranks
    def global_rank(self, ranks: Sequence[int]) -> int:
        """The global rank of a module whose clients train at ``ranks``: their largest by default."""
        return max(ranks)

    def check_client_ranks(self, module_ranks: Sequence[Mapping[str, int]]) -> None:
        """Raise ValueError (with what to do instead) when this rule cannot serve clients of these
        per-module ranks, one mapping per client. Every rank mix is fine by default."""

    # ----------------------------------------------------------- state on disk
    def state_dict(self) -> dict:
        """{"meta": JSON-able dict, "tensors": name -> tensor}; tensors are copies."""
        self._require_init()
        meta = {
            "version": FORMAT_VERSION, "strategy": self.name, "round": self.round, "rank": self.rank,
            "module_ranks": self.module_ranks,
            "alpha": self.alpha, "seed": self.seed, "use_rslora": self.use_rslora,
            "dtype": str(self.dtype).removeprefix("torch."),
            "module_shapes": {n: list(s) for n, s in self.module_shapes.items()},
            "extra": self._extra_meta(),
            "server_opt": self._server_opt_meta(),
        }
        return {"meta": meta, "tensors": {k: v.detach().clone() for k, v in self._tensors.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Load a :meth:`state_dict`, parsed strictly; ValueError (nothing changed) when its metadata is
        malformed or its tensors disagree with it (unknown or missing tensors, shapes, dtype, non-finite)."""
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("strategy") != self.name:
            raise ValueError(f"state was saved by strategy {meta.get('strategy')!r}, this is {self.name!r}")
        if meta.get("version") != FORMAT_VERSION or isinstance(meta.get("version"), bool):
            raise ValueError(f"state has format version {meta.get('version')!r}, expected {FORMAT_VERSION}")
        missing = sorted({"module_shapes", "round", "rank", "alpha", "seed", "use_rslora", "dtype"} - set(meta))
        if missing:
            raise ValueError(f"state metadata lacks {missing}")
        shapes = strict_mapping(meta["module_shapes"], "state module_shapes")
        if not shapes or not all(isinstance(v, list) and len(v) == 2 for v in shapes.values()):
            raise ValueError("state module_shapes must map module names to [d_out, d_in]")
        new = copy.copy(self)
        new.module_shapes = {n: tuple(strict_int(d, f"state module_shapes[{n!r}]", low=1) for d in v)
                             for n, v in shapes.items()}
        new.round = strict_int(meta["round"], "state round", low=0)
        new.rank = None if meta["rank"] is None else strict_int(meta["rank"], "state rank", low=1)
        ranks = strict_mapping(meta.get("module_ranks") or {}, "state module_ranks")
        new.module_ranks = {n: strict_int(r, f"state module_ranks[{n!r}]", low=1) for n, r in ranks.items()}
        if new.rank is not None and not new.module_ranks:
            new.module_ranks = dict.fromkeys(new.module_shapes, new.rank)
        if set(new.module_ranks) - set(new.module_shapes):
            raise ValueError(f"state module_ranks names unknown modules {sorted(set(new.module_ranks) - set(shapes))}")
        new.alpha = None if meta["alpha"] is None else strict_float(meta["alpha"], "state alpha", low=0.0,
                                                                    low_open=True)
        new.seed = strict_int(meta["seed"], "state seed")
        new.use_rslora = strict_bool(meta["use_rslora"], "state use_rslora")
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"state has dtype {meta.get('dtype')!r}; expected float32 or float64")
        new.dtype = dtype
        saved_opt = meta.get("server_opt") or {"server_opt": "none"}  # the state's optimizer, as its seed
        if not isinstance(saved_opt, dict):
            raise ValueError(f"state has server_opt {saved_opt!r}; expected a mapping of its settings")
        saved_opt = dict(saved_opt)
        type(self).check_server_opt(saved_opt.get("server_opt"))
        new.server_optimizer = server_opts.ServerOptimizer.create(saved_opt.pop("server_opt"), **saved_opt)
        new._tensors = {k: v.to(self.device) for k, v in tensors.items()}
        new._load_extra_meta(meta.get("extra", {}))
        problem = new._state_problem()
        if problem is not None:
            raise ValueError(f"state disagrees with its metadata: {problem}")
        self.__dict__.update(new.__dict__)

    def _state_problem(self) -> str | None:
        """Why the loaded tensors cannot be this state (see :meth:`_state_layout`), or None."""
        bad = next((k for k, t in self._tensors.items() if t.dtype != self.dtype), None)
        if bad is not None:
            return f"{bad} is {self._tensors[bad].dtype}, the state's dtype is {self.dtype}"
        bad = next((k for k, t in self._tensors.items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            return f"{bad} holds non-finite values"
        expected = set()
        for name, (d_out, d_in) in self.module_shapes.items():
            layout = self._state_layout(name)
            if layout is None:
                return None  # a rule without a declared layout: dtype and finiteness only
            symbols = {"d_out": d_out, "d_in": d_in}
            for part, alternatives in layout.items():
                key = f"{name}.{part}"
                expected.add(key)
                if key not in self._tensors:
                    return f"{key} is missing"
                shape = tuple(self._tensors[key].shape)
                if not any(_fits(shape, alt, symbols) for alt in alternatives):
                    return f"{key} has shape {list(shape)}; module {name} is {d_out} x {d_in}"
        # parts a subclass adds beyond its parent's layout are its own; a module the state does not have is not
        extra = sorted(k for k in set(self._tensors) - expected
                       if not k.startswith((server_opts.PREFIX, CONTROLS_PREFIX))
                       and k.rpartition(".")[0] not in self.module_shapes)
        if extra:
            return f"tensors of modules the state does not have: {extra[:5]}"
        opt = self.server_optimizer
        return (server_opts.moments_problem(self._tensors, opt and opt.kind, self.server_opt_space, self.module_shapes)
                or (self._controls_problem() if self.admits_scaffold else None))

    def _state_layout(self, name: str) -> dict[str, list[tuple]] | None:
        """Part -> allowed shapes of module ``name``'s state tensors ``{name}.{part}``: each shape a tuple of
        ints, "d_out"/"d_in" (the module's sides) or other names (one size, the same wherever the name
        recurs in the module). None: the rule declares none (only dtype and finiteness are checked)."""
        return None

    def to_bytes(self) -> bytes:
        state = self.state_dict()
        tensors = {k: v.cpu().contiguous() for k, v in state["tensors"].items()}
        return st_save(tensors, metadata={_STATE_KEY: json.dumps(state["meta"])})

    def load_bytes(self, data: bytes) -> None:
        meta, tensors = read_blob(data, _STATE_KEY)
        self.load_state_dict({"meta": meta, "tensors": tensors})

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, self.to_bytes())

    def load(self, path: str | os.PathLike) -> None:
        self.load_bytes(Path(path).read_bytes())

    # --------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def _init_state(self) -> None:
        """Fill ``self._tensors`` with the fresh global state (after init_global set shapes and ranks)."""

    @abc.abstractmethod
    def _aggregate(self, updates: Sequence[ClientUpdate], weights: torch.Tensor) -> None:
        """Fold valid, state-dtype updates into ``self._tensors``; weights are p_k (sum 1, float64)."""

    @abc.abstractmethod
    def _distribute(self, ranks: Mapping[str, int], alphas: Mapping[str, float],
                    client_id: str | None) -> dict[str, tuple]:
        """name -> (A [ranks[name], d_in], B) for every module, B already divided by the module's scaling."""

    def _served_rank(self, rank: int, name: str) -> int:
        """The rank module ``name`` of a client asking for ``rank`` actually trains at (raise if none)."""
        return rank

    def _server_params(self) -> list[str]:
        """server_opt_space "factors": the keys of ``self._tensors`` this round's aggregate moves (the
        parameters x of the server optimizer), asked before ``_aggregate``."""
        raise NotImplementedError(f"{type(self).__name__} has server_opt_space 'factors' but no _server_params")

    def _pseudo_gradient(self, updates: Sequence[ClientUpdate], weights: torch.Tensor) -> dict:
        """server_opt_space "delta": x~_t - x_{t-1} in weight space, module -> parts (dense or None, A, B)."""
        raise NotImplementedError(f"{type(self).__name__} has server_opt_space 'delta' but no _pseudo_gradient")

    def _apply_step(self, steps: Mapping[str, tuple], updates: Sequence[ClientUpdate]) -> None:
        """server_opt_space "delta": make the global x_{t-1} + step (module -> parts), as the rule keeps it."""
        raise NotImplementedError(f"{type(self).__name__} has server_opt_space 'delta' but no _apply_step")

    def _rank_check(self, rank: int, name: str) -> str | None:
        """Why an update's module ``name`` of rank ``rank`` is unacceptable, or None."""
        return None

    def _check_update(self, update: ClientUpdate) -> str | None:
        return None

    def _extra_meta(self) -> dict:
        return {}

    def _server_opt_meta(self) -> dict | None:
        return None if self.server_optimizer is None else self.server_optimizer.settings()

    def _load_extra_meta(self, extra: Mapping) -> None:
        pass

    # ---------------------------------------------------------------- helpers
    def _require_init(self) -> None:
        if not self.module_shapes:
            raise RuntimeError(f"{self.name}: call init_global(...) or load(...) first")

    def _default_alpha(self, rank: int) -> float:
        return float(rank) if self.alpha is None else self.alpha

    def _scaling(self, alpha: float, rank: int) -> float:
        return lora_scaling(alpha, rank, self.use_rslora)

    def _data_weights(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
        return n / n.sum()

    def _to_state(self, u: ClientUpdate) -> ClientUpdate:
        mods = {n: (a.to(self.device, self.dtype), b.to(self.device, self.dtype), float(al))
                for n, (a, b, al) in u.modules.items()}
        return ClientUpdate(u.client_id, u.num_examples, u.rank, mods, u.use_rslora, dict(u.metrics))

    def _privatize(self, u: ClientUpdate) -> ClientUpdate:
        # The public reference is what this strategy handed the client this round.
        start = self.distribute(u.rank, u.client_id, alpha={n: m[2] for n, m in u.modules.items()},
                                module_ranks=u.module_ranks())
        reference = {n: f[:2] for n, f in start.items()}
        return privatize(u, reference, self.dp, round_idx=self.round, trainable=self.uploaded_at(self.round))

    def _fresh_A(self, name: str, rank: int, *tag) -> torch.Tensor:
        """Seeded PEFT-style lora_A for ``name``; the same for every party given the same tag."""
        d_in = self.module_shapes[name][1]
        return lora_init_A(rank, d_in, stable_seed(self.seed, self.name, name, *tag), self.dtype, self.device)

    def _zeros_B(self, name: str, rank: int) -> torch.Tensor:
        return torch.zeros(self.module_shapes[name][0], rank, dtype=self.dtype, device=self.device)

    def _groups(self) -> dict[tuple[int, int], list[str]]:
        """Module names grouped by shape, so batched ops can take a whole group per call."""
        groups: dict[tuple[int, int], list[str]] = {}
        for name, shape in self.module_shapes.items():
            groups.setdefault(shape, []).append(name)
        return groups


class TruncatedFactors(ControlVariates, Strategy):
    """Global factors (A_g [R, d_in], B_g [d_out, R]) per module with product B_g A_g
    (scale-free); a rank-r client starts from A_g[:r] and B_g[:, :r]. R is
    ``init_global(rank=R)`` (per module: ``module_ranks``); A_g starts seeded, B_g
    at zero (PEFT's init). A server optimizer acts on the factors the clients send back
    this round (``uploaded_at``; RoLoRA's one factor): x = (A_g, B_g), the pseudo-gradient
    the change the rule's average makes to them. SCAFFOLD's control variates live on the
    same factors (those of ``uploaded_at``: a RoLoRA round moves one factor's c only)."""

    server_opt_space = "factors"

    def _init_state(self) -> None:
        if self.rank is None:
            raise ValueError(f"{type(self).__name__}.init_global needs rank= (the global rank R)")
        for name, rank in self.module_ranks.items():
            self._tensors[f"{name}.A"] = self._fresh_A(name, rank, "init")
            self._tensors[f"{name}.B"] = self._zeros_B(name, rank)

    def global_delta(self, name: str) -> torch.Tensor:
        self._require_init()
        return self._tensors[f"{name}.B"] @ self._tensors[f"{name}.A"]

    def _state_layout(self, name: str):
        rank = self.module_ranks[name]
        return {"A": [(rank, "d_in")], "B": [("d_out", rank)]}

    def _rank_check(self, rank: int, name: str) -> str | None:
        limit = self.module_ranks[name]
        return None if rank <= limit else f"rank {rank} exceeds the global rank {limit}"

    def _served_rank(self, rank: int, name: str) -> int:
        limit = self.module_ranks[name]
        if rank > limit:
            raise ValueError(f"{type(self).__name__}'s global rank of {name} is {limit}; a client cannot train it "
                             f"at rank {rank}")
        return rank

    def _server_params(self) -> list[str]:
        return [f"{name}.{factor}" for name in self.module_shapes for factor in self.uploaded_at(self.round)]

    def _frozen_reason(self, update: ClientUpdate, factor: str, what: str) -> str | None:
        """Why ``update`` is rejected when its ``factor`` ("A" or "B") is not the one this rule sent the
        client (rules that freeze it: FFA-LoRA, FedSVD, RoLoRA), 16-bit rounding allowed; else None.
        ``what`` names the factor sent in the reason."""
        for name, (a, b, _) in update.modules.items():
            r = a.shape[0]
            if factor == "A":
                changed = frozen_changed(a, self._tensors[f"{name}.A"][:r])
            else:
                changed = frozen_changed(b, self._tensors[f"{name}.B"][:, :r] / update.scaling(name))
            if changed:
                return f"{name}: {factor} differs from {what}"
        return None

    def _distribute(self, ranks, alphas, client_id):
        out = {}
        for n, r in ranks.items():
            s = self._scaling(alphas[n], r)
            out[n] = (self._tensors[f"{n}.A"][:r].clone(), self._tensors[f"{n}.B"][:, :r] / s)
        return out


def mixed_client_ranks(module_ranks: Sequence[Mapping[str, int]]) -> list[int] | None:
    """The clients' distinct ranks when they do not all train every module at one rank, else None
    (for the rules that need one rank per module: FedAvg, FedEx-LoRA)."""
    if len({tuple(sorted(m.items())) for m in module_ranks}) > 1:
        return sorted({max(m.values()) for m in module_ranks})
    return None


# A factor a client keeps frozen comes back through its model's dtype (bf16 on a GPU): bf16 keeps 8
# significant bits, so rounding to nearest moves a value by at most 2^-8 of its magnitude.
FROZEN_RTOL = 2.0 ** -8


def frozen_changed(sent: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a factor a client was to keep frozen moved by more than 16-bit rounding of its value."""
    if sent.shape != expected.shape:
        return True
    # compared in at least fp32: its rounding (2^-24 relative) is far below the 2^-8 allowed
    dtype = torch.promote_types(torch.promote_types(sent.dtype, expected.dtype), torch.float32)
    sent, expected = sent.to(dtype), expected.to(device=sent.device, dtype=dtype)
    return bool(((sent - expected).abs() > FROZEN_RTOL * expected.abs()).any())


def padded_factor_average(updates: Sequence[ClientUpdate], name: str, weights: Sequence[float], rank: int,
                          *, with_A: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(sum_k w_k pad(A_k), sum_k w_k s_k pad(B_k)) for module ``name``, padded with zeros to ``rank``.

    Zero-padding A_k [r_k, d_in] to [rank, d_in] and B_k to [d_out, rank] and then
    summing is the same as adding each client into the leading r_k rows/columns.
    """
    a0, b0, _ = updates[0].modules[name]
    A = torch.zeros(rank, a0.shape[1], dtype=a0.dtype, device=a0.device) if with_A else None
    B = torch.zeros(b0.shape[0], rank, dtype=b0.dtype, device=b0.device)
    for u, w in zip(updates, weights):
        a, b, _ = u.modules[name]
        r = a.shape[0]
        if with_A:
            A[:r].add_(a, alpha=float(w))
        B[:, :r].add_(b, alpha=float(w) * u.scaling(name))
    return A, B


def _rules_admitting(cls: type = Strategy) -> list[type]:
    """Named rules (subclasses of ``cls`` at any depth) whose server_opt_space is set."""
    out = []
    for sub in cls.__subclasses__():
        if sub.server_opt_space is not None and sub.name != Strategy.name:
            out.append(sub)
        out += [r for r in _rules_admitting(sub) if r not in out]
    return out


def _fits(shape: tuple, spec: tuple, symbols: dict) -> bool:
    """Whether ``shape`` matches ``spec`` (see Strategy._state_layout); binds names seen first into ``symbols``."""
    if len(shape) != len(spec):
        return False
    bound = dict(symbols)
    for size, want in zip(shape, spec):
        if isinstance(want, str):
            want = bound.setdefault(want, size)
        if size != want:
            return False
    symbols.update(bound)
    return True


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_ranks(module_shapes: Mapping[str, tuple[int, int]], rank: int,
                   module_ranks: Mapping[str, int] | None) -> dict[str, int]:
    """name -> rank for every module: ``module_ranks[name]`` where given, else ``rank``."""
    def checked(r, what):
        if isinstance(r, bool) or int(r) != r or r < 1:
            raise ValueError(f"{what} must be an int >= 1, got {r!r}")
        return int(r)

    rank = checked(rank, "rank")
    module_ranks = dict(module_ranks or {})
    unknown = sorted(set(module_ranks) - set(module_shapes))
    if unknown:
        raise ValueError(f"module_ranks names modules this model does not adapt: {unknown}")
    return {name: checked(module_ranks.get(name, rank), f"rank of {name}") for name in module_shapes}


def stack_products(stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """B A of each module's non-empty stack (A [R, d_in], B [d_out, R]), one lora_delta launch per shape."""
    groups: dict[tuple, list[str]] = {}
    for name, (A, B) in stacks.items():
        if A.shape[0] > 0:
            groups.setdefault((B.shape[0], A.shape[1], A.dtype), []).append(name)
    out = {}
    for group in groups.values():
        # one adapter of rank R and scaling 1 per module: B already carries the weights and scalings
        banks = [AdapterBank(stacks[n][0], stacks[n][1], [stacks[n][0].shape[0]], 1.0) for n in group]
        out.update(zip(group, ops.lora_delta(banks)))
    return out


def merge_parts(parts: Mapping[str, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """dense + B A of every module of a :meth:`Strategy.client_base`, dense [d_out, d_in]."""
    products = stack_products({n: (A, B) for n, (_, A, B) in parts.items()})
    out = {}
    for name, (dense, A, B) in parts.items():
        delta = dense.clone() if dense is not None else B.new_zeros(B.shape[0], A.shape[1])
        if name in products:
            delta += products[name].to(delta.dtype)
        out[name] = delta
    return out
