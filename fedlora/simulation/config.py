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
from fedlora.federated.strict import json_value, range_text, strict_bool, strict_float, strict_int, strict_str
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


class InputError(ValueError):
    """A setting, file, data set, model or checkpoint the user gave cannot be used.

    ``fedlora simulate`` prints it as one line and exits 2; any other exception
    is a bug and keeps its traceback.
    """


# Sections of the help and of the TOML reference, in this order.
GROUPS = ("model", "data", "rounds", "optimizer", "ranks", "strategy", "evaluation", "run")


def setting(default, doc: str, *, group: str, low=None, high=None, low_open: bool = False, high_open: bool = False,
            choices: tuple | None = None, nonempty: bool = False):
    """A SimConfig field with the rule its value must satisfy (checked by :meth:`SimConfig.validate`)
    and its reference (``fedlora simulate --help``, ``--print-config``), kept together so they cannot drift.

    doc: what the setting does, one line; group: its section (one of GROUPS).
    The kind of value comes from the field's annotation (bool, int, float, str, int | float,
    list[int], list[str], dict): exactly that type, never converted (an int is a float's
    value; a bool is no int). low/high bound numbers and each item of a list[int];
    choices lists the strings allowed; nonempty: a list or string that must not be empty.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown settings group {group!r}")
    rule = dict(low=low, high=high, low_open=low_open, high_open=high_open, choices=choices, nonempty=nonempty)
    metadata = {"rule": rule, "doc": doc, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SimConfig:
    # model
    model: str | dict[str, Any] = setting(
        "smollm2-135m-instruct", "base model: smollm2-135m-instruct (shipped offline), tiny-random-llama, a local "
        "Hugging Face model folder or a .gguf file",
        group="model", nonempty=True)
    quantization: str = setting("none", "load the frozen base in 4 or 8 bits (bitsandbytes)", group="model",
                                choices=QUANTIZATIONS)
    dtype: str = setting("auto", "dtype of the base weights (auto: bfloat16 on CUDA, float32 on the CPU)",
                         group="model", choices=DTYPES)
    device: str = setting("auto", "torch device: auto (CUDA when available), cpu, cuda or cuda:N", group="model",
                          nonempty=True)
    target_modules: list[str] = setting(["q_proj", "v_proj"], "linear layers that get LoRA adapters, by the last "
                                        "part of their name", group="model", nonempty=True)
    lora_dropout: float = setting(0.0, "dropout on the LoRA input during local training", group="model",
                                  low=0.0, high=1.0, high_open=True)
    use_rslora: bool = setting(False, "rank-stabilised scaling alpha / sqrt(r) instead of alpha / r", group="model")
    # data
    dataset: str = setting("shakespeare", "shakespeare (role clients) or sharegpt (conversations), both shipped "
                           "offline; or a ShareGPT-format .json file or an instruction .jsonl file (see README)",
                           group="data", nonempty=True)
    partition: str = setting("auto", "clients of a file: by client_field, Dirichlet over category_field, or iid "
                             "(auto: field for JSONL, dirichlet for ShareGPT)", group="data", choices=PARTITIONS)
    client_field: str = setting("client", "JSONL field that names a record's client (partition field)",
                                group="data", nonempty=True)
    category_field: str = setting("category", "JSONL field the Dirichlet partition skews over", group="data",
                                  nonempty=True)
    dirichlet_alpha: float = setting(0.5, "Dirichlet concentration: small = few categories per client",
                                     group="data", low=0.0, low_open=True)
    min_lines: int = setting(64, "Shakespeare: lines a role needs to be a client", group="data", low=1)
    unseen_fraction: float = setting(0.1, "share of clients never trained on, evaluated as unseen", group="data",
                                     low=0.0, high=1.0, high_open=True)
    heldout_fraction: float = setting(0.1, "share of each training client's data held out for evaluation",
                                      group="data", low=0.0, high=1.0, high_open=True)
    seq_len: int = setting(64, "tokens per training sequence (longer examples are cut)", group="data", low=2)
    num_clients: int = setting(32, "clients kept (0: all); Shakespeare and ShareGPT count the unseen ones among "
                               "them, JSONL only the training ones", group="data", low=0)
    # rounds
    rounds: int = setting(3, "federated rounds", group="rounds", low=1)
    clients_per_round: int | float = setting(4, "clients trained per round: a count (an int >= 1), or a fraction "
                                             "of the training clients (a float in (0, 1))", group="rounds",
                                             low=0.0, high=1.0, low_open=True, high_open=True)
    local_steps: int = setting(4, "optimizer steps per client per round (unused when local_epochs > 0)",
                               group="rounds", low=0)
    local_epochs: float = setting(0.0, "passes over each client's data per round instead of local_steps",
                                  group="rounds", low=0.0)
    batch_size: int = setting(2, "sequences per client per step", group="rounds", low=1)
    # optimizer (one per client, state kept only for the round, as each client would)
    optimizer: str = setting("adamw", "each client's optimizer (its state lives for one round)", group="optimizer",
                             choices=("adamw", "sgd"))
    lr: float = setting(3e-4, "learning rate", group="optimizer", low=0.0, low_open=True)
    weight_decay: float = setting(0.0, "decoupled weight decay", group="optimizer", low=0.0)
    momentum: float = setting(0.0, "SGD momentum", group="optimizer", low=0.0, high=1.0, high_open=True)
    lr_schedule: str = setting("constant", "learning-rate schedule over each client's own steps", group="optimizer",
                               choices=("constant", "linear", "cosine"))
    # client-side drift corrections, in the batched step (fedlora/simulation/corrections.py)
    prox_mu: float = setting(0.0, "FedProx: + mu/2 ||theta - theta_sent||^2 on each client's factors (0: off)",
                             group="optimizer", low=0.0)
    scaffold: bool = setting(False, "SCAFFOLD's control variates on the trained factors (rules that admit it)",
                             group="optimizer")
    # ranks
    rank_distribution: str = setting("uniform", "how client ranks are drawn from rank_levels (list: client_ranks "
                                     "as given)", group="ranks", choices=RANK_DISTRIBUTIONS)
    rank_levels: list[int] = setting([4, 8, 16, 32], "the ranks clients can have", group="ranks", low=1,
                                     nonempty=True)
    client_ranks: list[int] = setting([], "each training client's rank, in data order (rank_distribution list)",
                                      group="ranks", low=1)
    lora_alpha: float = setting(0.0, "LoRA alpha of every client (0: 2 x the client's rank)", group="ranks",
                                low=0.0)
    rank_pattern: dict[str, int | float] = setting(
        {}, "per-module ranks: module-name regex (whole name or dotted suffix) -> int rank or fraction in (0, 1] "
        "of the client's rank", group="ranks")
    # strategy
    strategy: str = setting("flexlora", "the aggregation rule", group="strategy", choices=STRATEGIES)
    strategy_options: dict[str, Any] = setting({}, "the rule's own options, e.g. --strategy_options.heterogeneous "
                                               "bucket for fedavg", group="strategy")
    # evaluation
    eval_every: int = setting(1, "evaluate the global model every N rounds and after the last (0: never)",
                              group="evaluation", low=0)
    log_spectrum: int = setting(0, "top singular values of the global update of the first, middle and last "
                                "layers, at each evaluation (0: off)", group="evaluation", low=0)
    eval_base: bool = setting(True, "evaluate the base model once before round 1: round 0 of every curve "
                              "(base_eval.json)", group="evaluation")
    eval_max_examples: int = setting(32, "examples per split (held-out data of training clients, unseen clients; "
                                     "spread over the clients, one from each in turn) "
                                     "for loss and perplexity", group="evaluation", low=0)
    eval_generate_examples: int = setting(16, "instruction data: greedy generations per split scored by Rouge-L "
                                          "(0: off)", group="evaluation", low=0)
    max_new_tokens: int = setting(64, "longest generation for Rouge-L", group="evaluation", low=1)
    eval_generate_every: int = setting(1, "Rouge-L (greedy generation, the costly metric) every N rounds at an "
                                       "evaluation (0: only after the last round and for the base model)",
                                       group="evaluation", low=0)
    # run
    mode: str = setting("batched", "train a round's clients in one batched pass, or one after another",
                        group="run", choices=("batched", "sequential"))
    seed: int = setting(0, "seed of every random choice (ranks, sampling, data order, dropout)", group="run", low=0)
    output_dir: str = setting("runs/default", "folder for metrics, plot, checkpoints and the adapter", group="run",
                              nonempty=True)
    resume: bool = setting(False, "continue the run in output_dir from its last checkpoint (or extend a finished "
                           "one to more rounds)", group="run")
    overwrite: bool = setting(False, "replace the earlier run in output_dir (its files are removed first)",
                              group="run")
    export_rank: int = setting(0, "rank of the exported PEFT adapter (0: the largest client rank)", group="run",
                               low=0)
    progress: bool = setting(True, "progress bars (shown only on a terminal)", group="run")

    def validate(self) -> SimConfig:
        """Every setting of its own type and in range (see :func:`setting`); ValueError naming the
        setting, the value and what is allowed. Nothing is converted, except an int given for a float."""
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, check_setting(f.name, str(f.type), f.metadata["rule"], getattr(self, f.name)))
            except ValueError as exc:
                raise InputError(str(exc)) from None

        def need(cond, msg):
            if not cond:
                raise InputError(f"config: {msg}")

        try:  # builds the rule (cheap: constructors only check and store), so a bad option value fails here too
            registry.create(self.strategy, self.strategy_options, use_rslora=self.use_rslora, seed=self.seed)
        except ValueError as exc:
            message = str(exc)
            need(False, message if message.startswith("strategy_options") else
                 f"strategy_options of {self.strategy}: {message}")
        need(self.local_steps >= 1 or self.local_epochs > 0, "local_steps must be >= 1 (or set local_epochs)")
        if self.scaffold:
            admit = [n for n in STRATEGIES if registry.lookup(n).admits_scaffold]
            need(registry.lookup(self.strategy).admits_scaffold,
                 f"scaffold needs a rule whose clients train truncations of fixed global factors ({', '.join(admit)}); "
                 f"{self.strategy}'s clients start from a new basis every round, where last round's control "
                 "variates mean nothing")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other (continue the run, "
                                                   "or replace it)")
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
            raise InputError(f"config: unknown setting(s) {unknown}; known: {sorted(names)}")
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

    def to_toml(self) -> str:
        """These settings as a commented TOML file that ``--config`` reads back (every field, by group)."""
        lines = ["# fedlora simulate settings: fedlora simulate --config FILE [--key value ...]",
                 "# Every key is optional (a missing key keeps its default); `fedlora simulate --help` says the same.",
                 "[simulate]"]
        for group, fields in settings_by_group():
            lines += ["", f"# ---- {group}"]
            for f in fields:
                allowed = allowed_values(f)
                lines.append(f"# {f.metadata['doc']}" + (f" ({allowed})" if allowed else ""))
                lines.append(f"{f.name} = {toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the settings reference
def settings_by_group() -> list[tuple[str, list[dataclasses.Field]]]:
    """SimConfig's fields under their group, in GROUPS order (the help and the TOML reference)."""
    fields = dataclasses.fields(SimConfig)
    return [(g, [f for f in fields if f.metadata["group"] == g]) for g in GROUPS]


def allowed_values(f: dataclasses.Field) -> str:
    """What a field accepts beyond its type, in the words its validation error uses ("" when anything)."""
    rule, kind = f.metadata["rule"], str(f.type)
    if rule["choices"] is not None:
        return "one of " + ", ".join(rule["choices"])
    if kind == "int | float":  # a count, or a fraction: check_setting's two cases
        return f"a count >= 1, or a fraction {bounds_of(rule)}"
    if rule["low"] is None and rule["high"] is None:
        return "not empty" if rule["nonempty"] and kind.startswith("list") else ""
    bounds = bounds_of(rule)
    return f"each {bounds}" if kind.startswith("list") else bounds


def bounds_of(rule: dict) -> str:
    return range_text(rule["low"], rule["high"], rule["low_open"], rule["high_open"])


def type_name(f: dataclasses.Field) -> str:
    """A field's type as a user types it on the command line."""
    kind = str(f.type)
    if kind == "bool":
        return "true|false"
    if kind.startswith("list["):
        return kind[5:-1] + ",..."
    return kind.split(" | ")[0] if kind.startswith("str |") else kind.replace(" | ", "|")


def toml_value(value) -> str:
    """A TOML literal of a settings value (str, bool, int, float, list, dict: inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are TOML's basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


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
