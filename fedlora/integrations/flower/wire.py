"""What fedlora's ServerApp and ClientApp send each other in Flower messages.

Three exchanges, each one Flower ``Message`` with a ``RecordDict``:

* profile (``query``): the server asks, a node answers with who it is
  (``fedlora.profile`` ConfigRecord: client id and index, rank, number of
  examples, module shapes as JSON).
* train (``train``): the server sends the factors for the node's own rank
  (``fedlora.start`` ArrayRecord: ``{module}.lora_A`` [r, d_in],
  ``{module}.lora_B`` [d_out, r], except a factor the node keeps itself (FedSA-LoRA's B);
  for strategies whose clients train on top of a global delta (FLoRA's update,
  FedEx-LoRA's residual) also its parts: ``{module}.global_A`` [R, d_in] and
  ``{module}.global_B`` [d_out, R], the stacked factors, and ``{module}.global_dense``
  [d_out, d_in] once a module's stack has been folded into a dense matrix) and the round
  (``fedlora.round`` ConfigRecord: round index, client id, per-module alphas as JSON,
  whether A and B train, the factors the node keeps itself (``personal``) and those the
  server takes back (``upload``), as JSON lists).
* SCAFFOLD (``scaffold = true``): the train message also holds the server's control variate at
  the node's rank and the reply the client's change Delta c_k, each a ``fedlora.scaffold``
  ArrayRecord (``{module}.control_A`` [r, d_in], ``{module}.control_B`` [d_out, r], for the
  factors the round's clients send back); the node keeps its own c_k in its context (the same
  record in ``context.state``).
* reply: the node's :class:`~fedlora.federated.update.ClientUpdate` as its
  safetensors blob, one ``Array`` of stype ``fedlora.update`` in the
  ``fedlora.update`` ArrayRecord (Flower chunks big arrays for transport), and a
  ``metrics`` MetricRecord with ``num-examples``.

Arrays travel as Flower's own numpy serialization (``allow_pickle=False``) or
safetensors; nothing is unpickled. Decoders raise ValueError with a reason, and
:func:`guarded` turns any other exception one node's data causes into a reason too.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.federated.strict import MAX_COUNT, json_object, strict_int, strict_str
from fedlora.federated.update import ClientUpdate
from fedlora.strategies.scaffold import Controls

PROFILE, START, ROUND, UPDATE = "fedlora.profile", "fedlora.start", "fedlora.round", "fedlora.update"
CONTROLS = "fedlora.scaffold"  # SCAFFOLD: c down, Delta c_k up, c_k in a node's context
_CONTROL = (".control_A", ".control_B")
METRICS = "metrics"
UPDATE_STYPE = "fedlora.update"  # an Array whose data is a ClientUpdate safetensors blob
_A, _B = ".lora_A", ".lora_B"
_GLOBAL = (".global_dense", ".global_A", ".global_B")  # FLoRA's global_parts: (dense or None, A_stack, B_stack)
# Bounds on a profile, before the server allocates anything for it: the largest LLM layers are
# a few 10^4 wide (Llama-3 405B's MLP: 53248); no adapted model has anywhere near 2**16 modules.
MAX_DIM = 2**20
MAX_MODULES = 2**16
T = TypeVar("T")


@dataclass
class NodeProfile:
    """Who a node is: the training client it holds and the rank it trains at."""

    node_id: int
    client_id: str
    client_index: int  # the node's partition-id: its position among the data's training clients
    num_clients: int  # training clients in the node's data
    num_partitions: int  # the node's num-partitions (0 when its node_config has none)
    rank: int
    num_examples: int
    module_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class TrainInstruction:
    """A decoded train message: one client's starting point for one round."""

    round: int
    client_id: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    global_parts: dict[str, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] | None  # FLoRA.global_parts
    train_A: bool
    train_B: bool = True
    controls: Controls | None = None  # SCAFFOLD: the server's c at this node's ranks
    personal: tuple[str, ...] = ()  # factors the node keeps itself across rounds (not sent: B is None)
    upload: tuple[str, ...] = ("A", "B")  # factors the server takes back (a personal one not here is zeroed)


# ------------------------------------------------------------------ profile
def encode_profile(profile: NodeProfile) -> RecordDict:
    return RecordDict({PROFILE: ConfigRecord({
        "client-id": profile.client_id, "client-index": profile.client_index, "num-clients": profile.num_clients,
        "num-partitions": profile.num_partitions, "rank": profile.rank, "num-examples": profile.num_examples,
        "module-shapes": json.dumps({n: list(s) for n, s in profile.module_shapes.items()}),
    })})


def decode_profile(message: Message) -> NodeProfile:
    """A node's profile, parsed strictly (no conversion of any field); ValueError naming the field.

    Bounds what a profile can make the server allocate: at most :data:`MAX_MODULES`
    modules, each side at most :data:`MAX_DIM`, a rank at most the largest module's smaller side.
    """
    record = _record(message, PROFILE, ConfigRecord)
    missing = sorted({"client-id", "client-index", "num-clients", "num-partitions", "rank", "num-examples",
                      "module-shapes"} - set(record))
    if missing:
        raise ValueError(f"malformed profile: no {missing}")
    shapes = json_object(record["module-shapes"], "profile module-shapes")
    if not 1 <= len(shapes) <= MAX_MODULES:
        raise ValueError(f"profile module-shapes names {len(shapes)} modules; expected 1..{MAX_MODULES}")
    module_shapes = {}
    for name, shape in shapes.items():
        if not isinstance(shape, list) or len(shape) != 2:
            raise ValueError(f"profile module-shapes[{name!r}] is {shape!r}; expected [d_out, d_in]")
        module_shapes[name] = tuple(strict_int(d, f"profile module-shapes[{name!r}]", low=1, high=MAX_DIM)
                                    for d in shape)
    widest = max(min(s) for s in module_shapes.values())
    return NodeProfile(
        node_id=int(message.metadata.src_node_id),
        client_id=strict_str(record["client-id"], "profile client-id"),
        client_index=strict_int(record["client-index"], "profile client-index", low=0),
        num_clients=strict_int(record["num-clients"], "profile num-clients", low=1),
        num_partitions=strict_int(record["num-partitions"], "profile num-partitions", low=0),
        rank=strict_int(record["rank"], "profile rank", low=1, high=widest),
        num_examples=strict_int(record["num-examples"], "profile num-examples", low=1, high=MAX_COUNT),
        module_shapes=module_shapes,
    )


# -------------------------------------------------------------------- train
def start_arrays(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], personal=()) -> dict[str, Array]:
    """The starting factors as Arrays, without the ones the node keeps itself (``personal``)."""
    out = {}
    for name, (a, b, _) in factors.items():
        for suffix, key, tensor in ((_A, "A", a), (_B, "B", b)):
            if key not in personal:
                out[name + suffix] = Array(tensor.detach().cpu().contiguous())
    return out


def global_arrays(parts: Mapping[str, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]) -> dict[str, Array]:
    """FLoRA's global parts as Arrays, built once per round and shared by every node's message."""
    out = {}
    for name, part in parts.items():
        for suffix, tensor in zip(_GLOBAL, part):
            if tensor is not None:
                out[name + suffix] = Array(tensor.detach().cpu().contiguous())
    return out


def encode_train(round_idx: int, server_round: int, client_id: str,
                 factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                 deltas: Mapping[str, Array] | None, train_A: bool, *, train_B: bool = True,
                 controls: Controls | None = None, personal=(), upload=("A", "B")) -> RecordDict:
    """personal: factors the node keeps itself (not sent); upload: the factors the rule takes back."""
    arrays = ArrayRecord({**start_arrays(factors, personal), **(deltas or {})})
    content = RecordDict({START: arrays, ROUND: ConfigRecord({
        "round": round_idx, "server-round": server_round, "client-id": client_id, "train-A": bool(train_A),
        "train-B": bool(train_B), "personal": json.dumps(list(personal)), "upload": json.dumps(list(upload)),
        "alphas": json.dumps({n: float(f[2]) for n, f in factors.items()}),
    })})
    if controls is not None:
        content[CONTROLS] = controls_record(controls)
    return content


def decode_train(content: RecordDict) -> TrainInstruction:
    cfg = _get(content, ROUND, ConfigRecord)
    arrays = _get(content, START, ArrayRecord)
    try:
        alphas = json.loads(cfg["alphas"])
        personal, upload = _factor_list(cfg, "personal"), _factor_list(cfg, "upload")
        if "A" in personal:
            raise ValueError("A cannot be personal (it is the shared factor)")
        factors = {n: (_tensor(arrays[n + _A]), None if "B" in personal else _tensor(arrays[n + _B]), float(alpha))
                   for n, alpha in alphas.items()}
        parts = {}
        for key in arrays:
            if key.endswith(_GLOBAL[1]):
                name = key[: -len(_GLOBAL[1])]
                dense = arrays.get(name + _GLOBAL[0])
                parts[name] = (None if dense is None else _tensor(dense), _tensor(arrays[key]),
                               _tensor(arrays[name + _GLOBAL[2]]))
        return TrainInstruction(int(cfg["round"]), str(cfg["client-id"]), factors, parts or None,
                                _flag(cfg, "train-A"), _flag(cfg, "train-B"), decode_controls(content),
                                personal, upload)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed train message: {type(exc).__name__}: {exc}") from None


# -------------------------------------------------------------------- reply
def encode_reply(update: ClientUpdate, controls: Controls | None = None) -> RecordDict:
    """The node's update and (SCAFFOLD) its Delta c_k."""
    blob = update.to_bytes()
    array = Array(dtype="uint8", shape=(len(blob),), stype=UPDATE_STYPE, data=blob)
    metrics = {"num-examples": int(update.num_examples)}
    metrics.update({k.replace("_", "-"): float(v) for k, v in update.metrics.items()})
    content = RecordDict({UPDATE: ArrayRecord({"update": array}), METRICS: MetricRecord(metrics)})
    if controls is not None:
        content[CONTROLS] = controls_record(controls)
    return content


def decode_reply(content: RecordDict, limits: Mapping[str, tuple[int, int, int]] | None = None) -> ClientUpdate:
    """The ClientUpdate a node sent; ValueError naming what is wrong with the reply.

    limits: module -> (d_out, d_in, the rank sent): factors of other shapes or a larger rank are
    refused from the blob's table, before any tensor is read (:meth:`ClientUpdate.from_bytes`).
    """
    arrays = _get(content, UPDATE, ArrayRecord)
    if "update" not in arrays:
        raise ValueError(f"the {UPDATE!r} record has no 'update' array (it has {sorted(arrays)})")
    array = arrays["update"]
    if array.stype != UPDATE_STYPE:
        raise ValueError(f"the update array has stype {array.stype!r}, expected {UPDATE_STYPE!r}")
    update = ClientUpdate.from_bytes(array.data, limits)
    metrics = content.metric_records.get(METRICS)
    if metrics is not None and "num-examples" in metrics:
        reported = strict_int(metrics["num-examples"], "metrics num-examples")
        if reported != update.num_examples:
            raise ValueError(f"num-examples {reported} in the metrics differs from the update's {update.num_examples}")
    return update


def controls_record(controls: Controls) -> ArrayRecord:
    """Control variates (or their changes) as an ArrayRecord: ``{module}.control_A|B``."""
    out = {}
    for name, pair in controls.items():
        for suffix, tensor in zip(_CONTROL, pair):
            if tensor is not None:
                out[name + suffix] = Array(tensor.detach().cpu().contiguous())
    return ArrayRecord(out)


def decode_controls(content: RecordDict, limits: Mapping[str, tuple[int, int, int]] | None = None
                    ) -> Controls | None:
    """The control variates of a message's ``fedlora.scaffold`` record, or None when it has none.

    Strict about the form (an ArrayRecord of ``{module}.control_A|B`` floating-point arrays); the receiver
    checks modules, factors, shapes and values against what it sent (``control_problem``).
    limits: module -> (d_out, d_in, the rank sent): an array of another shape or a larger rank is
    refused from its declared shape, before it is deserialized.
    """
    if CONTROLS not in content:
        return None
    record = _get(content, CONTROLS, ArrayRecord)
    found: dict[str, list] = {}
    for key, array in record.items():
        suffix = next((s for s in _CONTROL if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{CONTROLS}: unexpected array {_short(key, 80)!r}; expected MODULE{_CONTROL[0]} "
                             f"or MODULE{_CONTROL[1]}")
        if limits is not None:
            _check_control_shape(key[: -len(suffix)], suffix, array, limits)
        tensor = _tensor(array)
        if not tensor.is_floating_point():
            raise ValueError(f"{CONTROLS}: {_short(key, 80)} has dtype {tensor.dtype}; expected floating point")
        found.setdefault(key[: -len(suffix)], [None, None])[_CONTROL.index(suffix)] = tensor
    return {name: (a, b) for name, (a, b) in found.items()}


def _check_control_shape(name: str, suffix: str, array: Array, limits: Mapping[str, tuple[int, int, int]]) -> None:
    if name not in limits:
        raise ValueError(f"{CONTROLS}: module {_short(name, 80)!r} is not one the run adapts")
    d_out, d_in, max_rank = limits[name]
    shape = list(array.shape) if isinstance(array, Array) else None
    rank = None if shape is None or len(shape) != 2 else shape[0 if suffix == _CONTROL[0] else 1]
    fits = rank is not None and shape == ([rank, d_in] if suffix == _CONTROL[0] else [d_out, rank])
    if not fits or not 1 <= rank <= max_rank:
        want = f"[r, {d_in}]" if suffix == _CONTROL[0] else f"[{d_out}, r]"
        raise ValueError(f"{CONTROLS}: {_short(name, 80)}{suffix} has shape {shape}; expected {want} with "
                         f"1 <= r <= {max_rank}, the rank sent")


def guarded(decode: Callable[..., T], *args) -> tuple[T | None, str | None]:
    """(decode(*args), None), or (None, a short reason) for ANY exception decoding raises.

    The one boundary around what a node's data can make the server do: a bug or an
    unforeseen input in a decoder or a check costs that node its round, never the run.
    """
    try:
        return decode(*args), None
    except ValueError as exc:
        return None, _short(str(exc))
    except Exception as exc:  # noqa: BLE001 (the point: no node may end the run)
        return None, _short(f"{type(exc).__name__}: {exc}")


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data in a message: what dominates its size on the wire."""
    return sum(len(a.data) for record in content.array_records.values() for a in record.values())


# ------------------------------------------------------------------ helpers
def _flag(record: ConfigRecord, key: str) -> bool:
    value = record[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be a bool, got {type(value).__name__}")
    return value


def _factor_list(record: ConfigRecord, key: str) -> tuple[str, ...]:
    value = json.loads(record[key])
    if not isinstance(value, list) or not set(value) <= {"A", "B"} or len(set(value)) != len(value):
        raise ValueError(f"{key} must be a JSON list of distinct factors 'A' and 'B', got {record[key]!r}")
    return tuple(value)


def _tensor(array: Array) -> torch.Tensor:
    if not isinstance(array, Array):
        raise TypeError(f"expected an Array, got {type(array).__name__}")
    return torch.from_numpy(np.ascontiguousarray(array.numpy()))


def _get(content: RecordDict, key: str, kind: type):
    if key not in content:
        raise ValueError(f"the message has no {key!r} record (it has {sorted(content)})")
    record = content[key]
    if not isinstance(record, kind):
        raise ValueError(f"{key!r} is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def error_reason(message: Message, limit: int = 400) -> str:
    """The gist of an error reply: its reason without terminal colours, cut to its last ``limit`` characters.

    A ClientApp's exception arrives as a whole (Ray) traceback; the message is at its end.
    """
    reason = re.sub(r"\x1b\[[0-9;]*m", "", str(message.error.reason)).strip()
    return reason if len(reason) <= limit else "..." + reason[-limit:]


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _record(message: Message, key: str, kind: type):
    if message.has_error():
        raise ValueError(f"node error: {error_reason(message)}")
    return _get(message.content, key, kind)
