"""Settings of a federated fine-tuning simulation: defaults, TOML files, overrides.

The defaults ARE the built-in experiment that ``fedlora simulate`` runs with no
arguments: SmolLM2-135M-Instruct on Shakespeare role clients, FlexLoRA,
heterogeneous ranks, sized to finish in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.federated.ranks import check_rank_pattern
from fedlora.federated.strict import json_value, strict_bool, strict_float, strict_int, strict_str
from fedlora.strategies import registry

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

STRATEGIES = tuple(registry.names())
RANK_DISTRIBUTIONS = ("homogeneous", "uniform", "heavy_tail", "normal", "list")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARTITIONS = ("auto", "field", "dirichlet", "iid")
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


def setting(default, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
            choices: tuple | None = None, nonempty: bool = False):
    """A SimConfig field with the rule its value must satisfy (checked by :meth:`SimConfig.validate`).

    The kind of value comes from the field's annotation (bool, int, float, str, int | float,
    list[int], list[str], dict): exactly that type, never converted (an int is a float's
    value; a bool is no int). low/high bound numbers and each item of a list[int];
    choices lists the strings allowed; nonempty: a list or string that must not be empty.
    """
    rule = dict(low=low, high=high, low_open=low_open, high_open=high_open, choices=choices, nonempty=nonempty)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass
class SimConfig:
    # model
    # a name, a model folder or .gguf file, or the fields of a tiny random Llama's config (tests)
    model: str | dict[str, Any] = setting("smollm2-135m-instruct", nonempty=True)
    quantization: str = setting("none", choices=QUANTIZATIONS)
    dtype: str = setting("auto", choices=DTYPES)  # auto: bfloat16 on CUDA, float32 on the CPU
    device: str = setting("auto", nonempty=True)
    target_modules: list[str] = setting(["q_proj", "v_proj"], nonempty=True)
    lora_dropout: float = setting(0.0, low=0.0, high=1.0, high_open=True)
    use_rslora: bool = setting(False)
    # data
    # "shakespeare", "sharegpt", a ShareGPT-format .json file, or an instruction .jsonl file
    dataset: str = setting("shakespeare", nonempty=True)
    # auto (JSONL: field, ShareGPT: dirichlet) | field (JSONL) | dirichlet | iid
    partition: str = setting("auto", choices=PARTITIONS)
    client_field: str = setting("client", nonempty=True)
    category_field: str = setting("category", nonempty=True)
    dirichlet_alpha: float = setting(0.5, low=0.0, low_open=True)
    min_lines: int = setting(64, low=1)  # Shakespeare: a role needs this many lines to be a client
    unseen_fraction: float = setting(0.1, low=0.0, high=1.0, high_open=True)
    heldout_fraction: float = setting(0.1, low=0.0, high=1.0, high_open=True)
    seq_len: int = setting(64, low=2)
    # training clients kept (0: all); ShareGPT: the clients made, unseen ones included
    num_clients: int = setting(32, low=0)
    # rounds
    rounds: int = setting(3, low=1)
    # a count (an int >= 1), or a fraction of the clients (a float in (0, 1))
    clients_per_round: int | float = setting(4, low=0.0, high=1.0, low_open=True, high_open=True)
    local_steps: int = setting(4, low=0)  # steps per client per round (ignored when local_epochs > 0)
    local_epochs: float = setting(0.0, low=0.0)
    batch_size: int = setting(2, low=1)  # sequences per client per step
    # optimizer (one per client, state kept only for the round, as each client would)
    optimizer: str = setting("adamw", choices=("adamw", "sgd"))
    lr: float = setting(3e-4, low=0.0, low_open=True)
    weight_decay: float = setting(0.0, low=0.0)
    momentum: float = setting(0.0, low=0.0, high=1.0, high_open=True)
    lr_schedule: str = setting("constant", choices=("constant", "linear", "cosine"))  # over each client's steps
    # client-side drift corrections, in the batched step (fedlora/simulation/corrections.py)
    prox_mu: float = setting(0.0, low=0.0)  # FedProx: + mu/2 ||theta - theta_sent||^2 on each client's factors
    scaffold: bool = setting(False)  # SCAFFOLD's control variates on the trained factors (rules that admit it)
    # ranks
    rank_distribution: str = setting("uniform", choices=RANK_DISTRIBUTIONS)
    rank_levels: list[int] = setting([4, 8, 16, 32], low=1, nonempty=True)
    client_ranks: list[int] = setting([], low=1)  # rank_distribution = "list"
    lora_alpha: float = setting(0.0, low=0.0)  # 0: alpha = 2 * rank for every client (and module)
    # per-module ranks: module-name regex (whole name or dotted suffix) -> int rank or fraction of the client's rank
    rank_pattern: dict[str, int | float] = setting({})
    # strategy
    strategy: str = setting("flexlora", choices=STRATEGIES)
    strategy_options: dict[str, Any] = setting({})
    # evaluation
    eval_every: int = setting(1, low=0)
    # top singular values of the global update of the first, middle and last layers, at each evaluation (0: off)
    log_spectrum: int = setting(0, low=0)
    # evaluate the base model once before round 0 (base_eval.json: every curve's start)
    eval_base: bool = setting(True)
    eval_max_examples: int = setting(32, low=0)  # per split (held-out lines of training clients, unseen clients)
    # instruction data: greedy generations per split scored by Rouge-L (0: off)
    eval_generate_examples: int = setting(16, low=0)
    max_new_tokens: int = setting(64, low=1)
    # Rouge-L (greedy generation, the costly metric) every this many rounds at an evaluation; 0: only after
    # the last round (and for the base model)
    eval_generate_every: int = setting(1, low=0)
    # run
    mode: str = setting("batched", choices=("batched", "sequential"))
    seed: int = setting(0, low=0)
    output_dir: str = setting("runs/default", nonempty=True)
    resume: bool = setting(False)
    export_rank: int = setting(0, low=0)  # rank of the saved PEFT adapter (0: the largest client rank)
    progress: bool = setting(True)

    def validate(self) -> SimConfig:
        """Every setting of its own type and in range (see :func:`setting`); ValueError naming the
        setting, the value and what is allowed. Nothing is converted, except an int given for a float."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_setting(f.name, str(f.type), f.metadata["rule"], getattr(self, f.name)))

        def need(cond, msg):
            if not cond:
                raise ValueError(f"config: {msg}")

        try:
            registry.check_options(self.strategy, self.strategy_options)
        except ValueError as exc:
            need(False, str(exc))
        need(self.local_steps >= 1 or self.local_epochs > 0, "local_steps must be >= 1 (or set local_epochs)")
        if self.scaffold:
            admit = [n for n in STRATEGIES if registry.lookup(n).admits_scaffold]
            need(registry.lookup(self.strategy).admits_scaffold,
                 f"scaffold needs a rule whose clients train truncations of fixed global factors ({', '.join(admit)}); "
                 f"{self.strategy}'s clients start from a new basis every round, where last round's control "
                 "variates mean nothing")
        if self.rank_distribution == "list":
            need(bool(self.client_ranks), "rank_distribution='list' needs client_ranks, each >= 1")
        try:
            check_rank_pattern(self.rank_pattern)
        except ValueError as exc:
            need(False, str(exc))
        return self

    # ------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SimConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"config: unknown setting(s) {unknown}; known: {sorted(names)}")
        return cls(**values).validate()

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> SimConfig:
        """Defaults, then the TOML file (flat keys or a [simulate] table), then ``--key value`` overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise ValueError(f"config: {path}: {exc}") from None
            table = data.get("simulate", data)
            if not isinstance(table, dict):
                raise ValueError(f"config: {path}: [simulate] must be a table")
            values.update(table)
        for key, value in parse_overrides(overrides or [], {f.name: f for f in dataclasses.fields(cls)}).items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}  # --strategy_options.x adds to the file's options
            values[key] = value
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def check_setting(name: str, annotation: str, rule: dict, value: Any) -> Any:
    """``value`` if it is what setting ``name`` (typed ``annotation``) allows under ``rule``; an int
    for a float comes back as that float. ValueError "config: NAME must be ..., got VALUE" otherwise."""
    what = f"config: {name}"
    bounds = {k: rule[k] for k in ("low", "high", "low_open", "high_open")}
    if annotation == "bool":
        return strict_bool(value, what)
    if annotation == "int":
        return strict_int(value, what, low=rule["low"], high=rule["high"])
    if annotation == "float":
        return strict_float(value, what, **bounds)
    if annotation == "int | float":  # a count, or a fraction
        if isinstance(value, int) and not isinstance(value, bool):
            return strict_int(value, what + " (a count)", low=1)
        return strict_float(value, what + " (a fraction)", **bounds)
    if annotation == "str":
        value = strict_str(value, what, nonempty=rule["nonempty"])
        if rule["choices"] is not None and value not in rule["choices"]:
            raise ValueError(f"{what} must be one of {', '.join(rule['choices'])}; got {value!r}")
        return value
    if annotation.startswith("list["):
        if not isinstance(value, list):
            raise ValueError(f"{what} must be a list, got {type(value).__name__} {value!r}"[:200])
        if rule["nonempty"] and not value:
            raise ValueError(f"{what} must not be empty")
        item = "int" if annotation == "list[int]" else "str"
        return [check_setting(f"{name}[{i}]", item, dict(rule, nonempty=True), v) for i, v in enumerate(value)]
    if annotation == "str | dict[str, Any]":
        return check_setting(name, "dict[str, Any]" if isinstance(value, dict) else "str", rule, value)
    if annotation.startswith("dict["):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{what} must be a table of names to values, got {type(value).__name__}")
        return value
    raise TypeError(f"setting {name} has an annotation check_setting does not know: {annotation}")


_INT = re.compile(r"[+-]?[0-9]+")


def _parse_text(text: str, name: str, annotation: str) -> Any:
    """An override's text as the value its field is typed (lists as comma lists or JSON), converting only
    text that spells that type: true/false/1/0 for a bool, digits for an int, a number for a float."""
    if annotation == "bool":
        if text not in _BOOLEANS:
            raise ValueError(f"config: --{name} must be true, false, 1 or 0, got {text!r}")
        return _BOOLEANS[text]
    if annotation.startswith(("list[", "dict[")):
        if text.startswith(("[", "{")):
            return json_value(text, f"config: --{name}")
        item = "int" if annotation == "list[int]" else "str"
        return [_parse_text(t, name, item) for t in text.split(",") if t]
    if annotation == "int" or (annotation == "int | float" and _INT.fullmatch(text)):
        if not _INT.fullmatch(text):
            raise ValueError(f"config: --{name} must be an integer, got {text!r}")
        return int(text)
    if annotation in ("float", "int | float"):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"config: --{name} must be a number, got {text!r}") from None
    return text


def parse_overrides(args: list[str], fields: dict[str, dataclasses.Field]) -> dict[str, Any]:
    """``["--rounds", "5", "--strategy=flora", "--strategy_options.max_rank", "8"]`` -> dict."""
    defaults = SimConfig()
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"--{key} needs a value")
            value, i = args[i + 1], i + 1
        i += 1
        top, _, sub = key.partition(".")
        top = top.replace("-", "_")  # --local-steps == --local_steps
        if top == "strategy_options":  # keyword names; a rank_pattern key is a regex and stays as typed
            sub = sub.replace("-", "_")
        if top not in fields:
            raise ValueError(f"unknown setting --{key}; known: {sorted(fields)}")
        if sub:  # --strategy_options.max_rank 8: a JSON value when it parses, else a string
            try:
                parsed = json_value(value, f"config: --{key}")
            except ValueError:
                parsed = value
            out.setdefault(top, dict(getattr(defaults, top)))[sub] = parsed
        else:
            out[top] = _parse_text(value, key, str(fields[top].type))
    return out
