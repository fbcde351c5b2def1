"""Settings of a federated fine-tuning simulation: defaults, TOML files, overrides.

The defaults ARE the built-in experiment that ``fedlora simulate`` runs with no
arguments: SmolLM2-135M-Instruct on Shakespeare role clients, FlexLoRA,
heterogeneous ranks, sized to finish in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.federated.ranks import check_rank_pattern
from fedlora.strategies import registry

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

STRATEGIES = registry.names()
RANK_DISTRIBUTIONS = ("homogeneous", "uniform", "heavy_tail", "normal", "list")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


@dataclass
class SimConfig:
    # model
    model: str = "smollm2-135m-instruct"
    quantization: str = "none"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    device: str = "auto"
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    use_rslora: bool = False
    # data
    dataset: str = "shakespeare"  # "sharegpt", a ShareGPT-format .json file, or an instruction .jsonl file
    partition: str = "auto"  # auto (JSONL: field, ShareGPT: dirichlet) | field (JSONL) | dirichlet | iid
    client_field: str = "client"
    category_field: str = "category"
    dirichlet_alpha: float = 0.5
    min_lines: int = 64  # Shakespeare: a role needs this many lines to be a client
    unseen_fraction: float = 0.1
    heldout_fraction: float = 0.1
    seq_len: int = 64
    num_clients: int = 32  # training clients kept (0: all); ShareGPT: the clients made, unseen ones included
    # rounds
    rounds: int = 3
    clients_per_round: int | float = 4  # a count, or a fraction of num_clients when < 1
    local_steps: int = 4  # steps per client per round (ignored when local_epochs > 0)
    local_epochs: float = 0.0
    batch_size: int = 2  # sequences per client per step
    # optimizer (one per client, state kept only for the round, as each client would)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-4
    weight_decay: float = 0.0
    momentum: float = 0.0
    lr_schedule: str = "constant"  # constant | linear | cosine, over each client's own steps
    # ranks
    rank_distribution: str = "uniform"
    rank_levels: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    client_ranks: list[int] = field(default_factory=list)  # rank_distribution = "list"
    lora_alpha: float = 0.0  # 0: alpha = 2 * rank for every client (and module)
    # per-module ranks: module-name regex (whole name or dotted suffix) -> int rank or fraction of the client's rank
    rank_pattern: dict[str, int | float] = field(default_factory=dict)
    # strategy
    strategy: str = "flexlora"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    # evaluation
    eval_every: int = 1
    eval_base: bool = True  # evaluate the base model once before round 0 (base_eval.json: every curve's start)
    eval_max_examples: int = 32  # per split (held-out lines of training clients, unseen clients)
    eval_generate_examples: int = 16  # instruction data: greedy generations per split scored by Rouge-L (0: off)
    max_new_tokens: int = 64
    # run
    mode: str = "batched"  # batched | sequential
    seed: int = 0
    output_dir: str = "runs/default"
    resume: bool = False
    export_rank: int = 0  # rank of the saved PEFT adapter (0: the largest client rank)
    progress: bool = True

    def validate(self) -> SimConfig:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"config: {msg}")

        need(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        try:
            registry.check_options(self.strategy, self.strategy_options)
        except ValueError as exc:
            need(False, str(exc))
        need(self.rank_distribution in RANK_DISTRIBUTIONS,
             f"rank_distribution must be one of {RANK_DISTRIBUTIONS}, got {self.rank_distribution!r}")
        need(self.quantization in QUANTIZATIONS, f"quantization must be one of {QUANTIZATIONS}")
        need(self.partition in ("auto", "field", "dirichlet", "iid"),
             f"partition must be auto, field, dirichlet or iid, got {self.partition!r}")
        need(self.mode in ("batched", "sequential"), f"mode must be batched or sequential, got {self.mode!r}")
        need(self.optimizer in ("adamw", "sgd"), f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        need(self.lr_schedule in ("constant", "linear", "cosine"), f"unknown lr_schedule {self.lr_schedule!r}")
        need(self.rounds >= 1, "rounds must be >= 1")
        need(self.clients_per_round > 0, "clients_per_round must be > 0")
        need(self.local_steps >= 1 or self.local_epochs > 0, "local_steps must be >= 1 (or set local_epochs)")
        need(self.batch_size >= 1 and self.seq_len >= 2, "batch_size >= 1 and seq_len >= 2")
        need(self.lr > 0, "lr must be > 0")
        need(bool(self.target_modules), "target_modules is empty")
        need(all(r >= 1 for r in self.rank_levels) and self.rank_levels, "rank_levels must be ranks >= 1")
        if self.rank_distribution == "list":
            need(bool(self.client_ranks) and all(r >= 1 for r in self.client_ranks),
                 "rank_distribution='list' needs client_ranks, each >= 1")
        need(0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)")
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
            data = tomllib.loads(Path(path).read_text())
            values.update(data.get("simulate", data))
        for key, value in parse_overrides(overrides or [], {f.name: f for f in dataclasses.fields(cls)}).items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}  # --strategy_options.x adds to the file's options
            values[key] = value
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _coerce(text: str, current: Any, name: str, annotation: str = "") -> Any:
    """Parse an override the way its field is typed (lists as comma lists or JSON)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true/false, got {text!r}")
    if isinstance(current, (list, dict)):
        if text.startswith(("[", "{")):
            return json.loads(text)
        items = [t for t in text.split(",") if t]
        if "list[int]" in annotation:  # the annotation, not the default: an empty default says nothing
            try:
                return [int(t) for t in items]
            except ValueError as exc:
                raise ValueError(f"--{name} expects comma-separated integers, got {text!r}") from exc
        return items
    try:
        if isinstance(current, int) and "float" in annotation:  # a count or a fraction
            try:
                return int(text)
            except ValueError:
                return float(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError as exc:
        raise ValueError(f"--{name} expects a number, got {text!r}") from exc
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
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            out.setdefault(top, dict(getattr(defaults, top)))[sub] = parsed
        else:
            out[top] = _coerce(value, getattr(defaults, top), key, str(fields[top].type))
    return out
