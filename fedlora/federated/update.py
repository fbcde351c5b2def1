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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedlora.bank import lora_scaling

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
    def from_bytes(cls, data: bytes) -> ClientUpdate:
        """Parse a blob made by :meth:`to_bytes`; ValueError on anything malformed."""
        header, tensors = read_blob(data, _HEADER_KEY)
        alphas = header.get("alphas")
        if not isinstance(alphas, dict):
            raise ValueError("update header has no 'alphas' mapping")
        expected = {n + s for n in alphas for s in (_A, _B)}
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))
            extra = sorted(set(tensors) - expected)
            raise ValueError(f"update tensors do not match its header: missing {missing}, unexpected {extra}")
        try:
            modules = {n: (tensors[n + _A], tensors[n + _B], float(alpha)) for n, alpha in alphas.items()}
            return cls(
                client_id=str(header["client_id"]),
                num_examples=int(header["num_examples"]),
                rank=int(header["rank"]),
                modules=modules,
                use_rslora=bool(header.get("use_rslora", False)),
                metrics={k: float(v) for k, v in header.get("metrics", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"update header is malformed: {exc!r}") from exc

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClientUpdate:
        return cls.from_bytes(Path(path).read_bytes())


# ------------------------------------------------------------------ helpers
def read_safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, read as JSON from its header.

    safetensors.torch.load drops the metadata, so the header (an 8-byte length,
    then JSON) is parsed here directly.
    """
    if len(data) < 8:
        raise ValueError("blob is too short to be safetensors")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    if size > len(data) - 8:
        raise ValueError(f"safetensors header claims {size} bytes but the blob has {len(data) - 8}")
    try:
        header = json.loads(bytes(data[8:8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"safetensors header is not JSON: {exc}") from exc
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}


def read_header(data: bytes, key: str) -> dict:
    """The versioned JSON header stored under ``key`` in a safetensors blob's metadata."""
    meta = read_safetensors_metadata(data)
    if key not in meta:
        raise ValueError(f"safetensors metadata has no {key!r} entry: not a fedlora file of this kind")
    try:
        header = json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key} header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{key} header must be a JSON object")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{key} has format version {header.get('version')!r}, expected {FORMAT_VERSION}")
    return header


def read_blob(data: bytes, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON header under ``key``, tensors) of a fedlora safetensors blob; ValueError if malformed."""
    header = read_header(data, key)
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{key} blob is not valid safetensors: {exc}") from exc
    return header, tensors


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
