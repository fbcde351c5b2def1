"""Strategy names -> classes, and ``strategy_options`` checked against the class before it is built.

A rule registers itself by name (its ``name`` attribute) here; ``fedlora simulate
--strategy NAME`` and the Flower integration build rules only through
:func:`create`, so an unknown name or option is a one-line error, never a raw
TypeError from a constructor.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from . import server_opt
from .base import Strategy
from .fedavg import FedAvg
from .fedexlora import FedExLoRA
from .fedsalora import FedSALoRA
from .fedsvd import FedSVD
from .ffalora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .local import LocalOnly
from .lorafair import LoRAFAIR
from .rolora import RoLoRA

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FFALoRA, HetLoRA, FlexLoRA, FLoRA,
                                                                   RoLoRA, FedExLoRA, FedSVD,
                                                                   LoRAFAIR, FedSALoRA, LocalOnly)}

# Settings every run passes itself (from SimConfig), so they are not strategy_options.
RUN_SETTINGS = ("use_rslora", "seed", "dtype", "device")


def names() -> tuple[str, ...]:
    return tuple(STRATEGIES)


def options_of(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options of strategy ``name`` (its own and the base class's), without the run's settings."""
    params: dict[str, inspect.Parameter] = {}
    for cls in reversed(lookup(name).__mro__):
        init = cls.__dict__.get("__init__")
        if init is None or cls is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in RUN_SETTINGS:
                params[p.name] = p
    return params


def lookup(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError naming an option that strategy ``name`` does not take, or a server optimizer
    (``server_opt`` and its settings) that is malformed or that the rule does not admit."""
    allowed = options_of(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"strategy_options {unknown} are not options of {name}; it takes: "
                         + (", ".join(f"{k} (default {p.default!r})" for k, p in allowed.items()) or "none"))
    kind = options.get("server_opt", "none")
    lookup(name).check_server_opt(kind)
    server_opt.check(kind, **{k: options[k] for k in server_opt.DEFAULTS if k in options})


def create(name: str, options: Mapping[str, Any] | None = None, **run_settings) -> Strategy:
    """The strategy ``name`` built with ``options`` (checked) and the run's settings (use_rslora, seed, ...)."""
    options = dict(options or {})
    check_options(name, options)
    try:
        return lookup(name)(**options, **run_settings)
    except TypeError as exc:  # e.g. an option of the wrong kind that the constructor could not take
        raise ValueError(f"strategy_options of {name}: {exc}") from None
