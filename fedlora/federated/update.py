"""A client's update: its trained LoRA factors per module, and their safetensors form.

Wire format: one safetensors blob. Tensors are named ``{module}.lora_A`` [r, d_in]
and ``{module}.lora_B`` [d_out, r] (peft's names); the safetensors metadata
holds one JSON header under ``fedlora.update`` with the client id, number of
examples, rank, rsLoRA flag and the alpha of each module. A module's rank is
the row count of its A, so modules may carry different ranks (per-module ranks). Loading parses that
header with ``json`` and the tensors with safetensors: nothing is unpickled.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedlora.bank import lora_scaling

from .strict import MAX_COUNT, json_object, strict_bool, strict_float, strict_int, strict_mapping, strict_str

FORMAT_VERSION = 1
_HEADER_KEY = "fedlora.update"
_A, _B = ".lora_A", ".lora_B"


@dataclass
class ClientUpdate:
    """What one client sends back after a round of local training.

    ``modules`` maps a module name to ``(A [r_m, d_in], B [d_out, r_m], alpha)``;
    the module's contribution to the weight is ``scaling(name) * B @ A``.
    ``rank`` is the client's rank: every module trains at it unless the run
    gives modules their own (smaller or equal) ranks r_m, as PEFT's rank_pattern.
    """

    client_id: str
    num_examples: int
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    use_rslora: bool = False
    metrics: dict[str, float] = field(default_factory=dict)

    def module_rank(self, name: str) -> int:
        """The rank module ``name`` trained at: the rows of its A."""
        return int(self.modules[name][0].shape[0])

    def module_ranks(self) -> dict[str, int]:
        return {name: self.module_rank(name) for name in self.modules}

    def scaling(self, name: str) -> float:
        """The LoRA scaling of ``name``: alpha / r_m (alpha / sqrt(r_m) with rsLoRA), r_m its own rank."""
        return lora_scaling(float(self.modules[name][2]), self.module_rank(name), self.use_rslora)

    # ------------------------------------------------------------ serialization
    def to_bytes(self) -> bytes:
        tensors, alphas = {}, {}
        for name, (a, b, alpha) in self.modules.items():
            tensors[name + _A] = a.detach().cpu().contiguous()
            tensors[name + _B] = b.detach().cpu().contiguous()
            alphas[name] = float(alpha)
        header = {
            "version": FORMAT_VERSION,
            "client_id": str(self.client_id),
            "num_examples": int(self.num_examples),
            "rank": int(self.rank),
            "use_rslora": bool(self.use_rslora),
            "alphas": alphas,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
        }
        return st_save(tensors, metadata={_HEADER_KEY: json.dumps(header)})

    @classmethod
    def from_bytes(cls, data: bytes, limits: Mapping[str, tuple[int, int, int]] | None = None) -> ClientUpdate:
        """Parse a blob made by :meth:`to_bytes`; ValueError on anything malformed.

        Nothing is converted: a header field of the wrong type (``num_examples`` 3.7, "12" or true,
        ``use_rslora`` "false", a numeric client id) is an error, as is a tensor of a dtype other
        than float16/bfloat16/float32/float64 or a tensor the header does not name; the tensor
        table is checked before any tensor is read.
        limits: module name -> (d_out, d_in, the largest rank it may carry), e.g. the model's shapes
            and the ranks the server sent: a module not named there, or a factor of another shape or a
            larger rank, is refused from the table too, before any tensor is read.
        """
        meta, entries = read_tensor_table(data)
        header = read_header(meta, _HEADER_KEY)
        unknown = sorted(set(header) - _HEADER_FIELDS)
        if unknown:
            raise ValueError(f"update header has unknown fields {unknown}")
        missing = sorted(_HEADER_FIELDS - set(header))
        if missing:
            raise ValueError(f"update header lacks {missing}")
        client_id = strict_str(header["client_id"], "update header: client_id")
        num_examples = strict_int(header["num_examples"], "update header: num_examples", low=1, high=MAX_COUNT)
        rank = strict_int(header["rank"], "update header: rank", low=1)
        use_rslora = strict_bool(header["use_rslora"], "update header: use_rslora")
        alphas = strict_mapping(header["alphas"], "update header: alphas")
        alphas = {str(n): strict_float(a, f"update header: alpha of {n}", low=0.0, low_open=True)
                  for n, a in alphas.items()}
        metrics = strict_mapping(header["metrics"], "update header: metrics")
        # a metric is reported, never computed with: NaN (a client that took no step) is allowed
        metrics = {str(k): strict_float(v, f"update header: metric {k}", finite=False) for k, v in metrics.items()}
        expected = {n + s for n in alphas for s in (_A, _B)}
        if set(entries) != expected:
            missing = sorted(expected - set(entries))
            extra = sorted(set(entries) - expected)
            raise ValueError(f"update tensors do not match its header: missing {missing}, unexpected {extra}")
        for key, (dtype, shape) in entries.items():
            if dtype not in UPDATE_DTYPES:
                raise ValueError(f"{key} has dtype {dtype}; an update holds {sorted(UPDATE_DTYPES)}")
            if len(shape) != 2:
                raise ValueError(f"{key} has shape {shape}; factors are 2-D")
        if limits is not None:
            for name in sorted(alphas):
                _check_factor_shapes(name, entries[name + _A][1], entries[name + _B][1], limits)
        tensors = _load_tensors(data, _HEADER_KEY)
        modules = {n: (tensors[n + _A], tensors[n + _B], alpha) for n, alpha in alphas.items()}
        return cls(client_id=client_id, num_examples=num_examples, rank=rank, modules=modules,
                   use_rslora=use_rslora, metrics=metrics)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClientUpdate:
        return cls.from_bytes(Path(path).read_bytes())


# ------------------------------------------------------------------ helpers
# safetensors' dtype names of the float types an update (or a strategy state) may hold
UPDATE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_HEADER_FIELDS = {"version", "client_id", "num_examples", "rank", "use_rslora", "alphas", "metrics"}


def _check_factor_shapes(name: str, a_shape: list[int], b_shape: list[int],
                         limits: Mapping[str, tuple[int, int, int]]) -> None:
    """ValueError unless A [r, d_in] and B [d_out, r] of module ``name`` fit ``limits[name]`` = (d_out, d_in, max r)."""
    if name not in limits:
        raise ValueError(f"the update names module {name[:120]!r}, which the run does not adapt")
    d_out, d_in, max_rank = limits[name]
    r = a_shape[0]
    if a_shape[1] != d_in or b_shape != [d_out, r] or not 1 <= r:
        raise ValueError(f"{name}: factors of shapes A {a_shape}, B {b_shape}; the model's layer needs "
                         f"A [r, {d_in}] and B [{d_out}, r]")
    if r > max_rank:
        raise ValueError(f"{name}: rank {r} differs from the rank {max_rank} the server sent this client "
                         "(refused before reading any tensor)")


def read_tensor_table(data: bytes) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """(``__metadata__``, name -> (dtype name, shape)) of a safetensors blob, read from its header only.

    safetensors.torch.load drops the metadata, so the header (an 8-byte length, then
    JSON) is parsed here directly, strictly: metadata values must be strings, every
    tensor entry needs a dtype string and a shape of non-negative ints whose bytes fit
    the blob. So a blob's work is known before any tensor is allocated.
    """
    data = bytes(data[:8]) + bytes(data[8:]) if not isinstance(data, bytes) else data
    if len(data) < 8:
        raise ValueError("blob is too short to be safetensors")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError(f"safetensors header claims {size} bytes but the blob has {len(data) - 8}")
    header = json_object(data[8:8 + size], "safetensors header")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("safetensors metadata must map names to strings")
    body = len(data) - 8 - size
    entries = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise ValueError(f"safetensors entry {name!r} has no dtype")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ValueError(f"safetensors entry {name!r} has shape {shape!r}; expected non-negative integers")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= body):
            raise ValueError(f"safetensors entry {name!r} has data offsets {offsets!r} outside the blob's {body} bytes")
        if math.prod(shape) > body:  # more elements than bytes: cannot be real (the shape may be 2**60)
            raise ValueError(f"safetensors entry {name!r} has shape {shape}, more elements than the blob's "
                             f"{body} bytes")
        entries[name] = (entry["dtype"], shape)
    return meta, entries


def read_safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (see :func:`read_tensor_table`)."""
    return read_tensor_table(data)[0]


def read_header(meta: Mapping[str, str], key: str) -> dict:
    """The versioned JSON header stored under ``key`` in a safetensors blob's metadata."""
    if key not in meta:
        raise ValueError(f"safetensors metadata has no {key!r} entry: not a fedlora file of this kind")
    header = json_object(meta[key], f"{key} header")
    if header.get("version") != FORMAT_VERSION or isinstance(header.get("version"), bool):
        raise ValueError(f"{key} has format version {header.get('version')!r}, expected {FORMAT_VERSION}")
    return header


def _load_tensors(data: bytes, key: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{key} blob is not valid safetensors: {exc}") from exc


def read_blob(data: bytes, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON header under ``key``, tensors) of a fedlora safetensors blob; ValueError if malformed.

    Tensors of other than float16/bfloat16/float32/float64 are refused before loading.
    """
    meta, entries = read_tensor_table(data)
    header = read_header(meta, key)
    for name, (dtype, _) in entries.items():
        if dtype not in UPDATE_DTYPES:
            raise ValueError(f"{key}: tensor {name} has dtype {dtype}; expected one of {sorted(UPDATE_DTYPES)}")
    return header, _load_tensors(data, key)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def temp_dir_beside(parent: str | os.PathLike, prefix: str) -> Path:
    """A new temporary folder in ``parent`` that is later renamed into place as a result.

    mkdtemp makes it owner-only (0700); a result keeps the permissions the
    user's umask gives any new folder (0755 under the usual 022).
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a torn one.

    The file gets the permissions the user's umask gives any new file (mkstemp's own are 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def product_norm(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> float:
    """||scaling * B @ A||_F without forming the [d_out, d_in] product.

    ||BA||_F^2 = trace((B^T B)(A A^T)): two r x r Gram matrices, exact in float64.
    """
    a64, b64 = a.detach().double(), b.detach().double()
    sq = ((b64.T @ b64) * (a64 @ a64.T)).sum().clamp_min(0.0)
    return abs(scaling) * math.sqrt(sq.item())
