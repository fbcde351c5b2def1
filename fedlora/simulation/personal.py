"""Each client's personal factors between rounds (the rule's ``personal`` hook: FedSA-LoRA's B, local-only's
A and B), on disk.

``root/<client>/round-NNNN.safetensors`` holds module -> factor tensors (``{module}.lora_B``)
and a JSON header (client id, round), written atomically after the client trained in round
NNNN (the round's index from 0, as it seeds the round). Round t starts a client from its newest file written before round t, so a run resumed
from a checkpoint taken before (or after) a crashed round's files were written starts every
client from exactly what an uninterrupted run would; the two newest files per client are kept.
Files are parsed strictly like every fedlora blob (safetensors, never pickle). The simulation
keeps the folder under its output directory; a Flower node keeps its own.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from fedlora.federated.update import FORMAT_VERSION, ClientUpdate, atomic_write, read_blob

_KEY = "fedlora.personal"
_SUFFIX = {"A": ".lora_A", "B": ".lora_B"}
PersonalFactors = dict[str, dict[str, torch.Tensor]]  # module -> {"A" | "B": tensor}


class PersonalStore:
    """Personal factors per client and round under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def folder(self, client_id: str) -> Path:
        # a readable, filesystem-safe name made unique by a hash of the exact id
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", client_id)[:48]
        return self.root / f"{safe}-{hashlib.sha256(client_id.encode()).hexdigest()[:12]}"

    def rounds(self, client_id: str) -> list[int]:
        folder = self.folder(client_id)
        found = (re.fullmatch(r"round-(\d{4,})\.safetensors", p.name) for p in folder.glob("round-*.safetensors"))
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, client_id: str, before_round: int) -> PersonalFactors | None:
        """The client's factors from its newest round < ``before_round``, or None (it has none yet)."""
        done = [r for r in self.rounds(client_id) if r < before_round]
        if not done:
            return None
        path = self.folder(client_id) / f"round-{done[-1]:04d}.safetensors"
        header, tensors = read_blob(path.read_bytes(), _KEY)
        if header.get("client_id") != client_id or header.get("round") != done[-1]:
            raise ValueError(f"{path}: holds client {header.get('client_id')!r} round {header.get('round')!r}, "
                             f"expected {client_id!r} round {done[-1]}")
        out: PersonalFactors = {}
        for key, tensor in tensors.items():
            name, factor = _split(key, path)
            out.setdefault(name, {})[factor] = tensor
        return out

    def save(self, client_id: str, round_idx: int, factors: PersonalFactors) -> None:
        folder = self.folder(client_id)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name + _SUFFIX[f]: t.detach().cpu().contiguous() for name, fs in factors.items()
                   for f, t in fs.items()}
        header = {"version": FORMAT_VERSION, "client_id": client_id, "round": int(round_idx)}
        atomic_write(folder / f"round-{round_idx:04d}.safetensors",
                     st_save(tensors, metadata={_KEY: json.dumps(header)}))
        for old in self.rounds(client_id)[: -self.keep]:
            (folder / f"round-{old:04d}.safetensors").unlink(missing_ok=True)


def _split(key: str, path: Path) -> tuple[str, str]:
    for factor, suffix in _SUFFIX.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], factor
    raise ValueError(f"{path}: unexpected tensor {key!r} (expected MODULE.lora_A or MODULE.lora_B)")


def with_personal(factors, client_id: str, round_idx: int, personal, store: PersonalStore | None, module_shapes):
    """A client's starting factors with its own ``personal`` factors in place of the server's.

    ``factors``: module -> (A, B, alpha), a personal factor may be None (a Flower node is not sent
    it). A client without stored factors yet starts a personal B at PEFT's init for it (B = 0;
    FedSA-LoRA's only personal factor) and a personal A at the A given (local-only: the client's
    own seeded init). A stored factor whose shape differs from the one the client trains now is
    an error naming it.
    """
    if not personal:
        return dict(factors)
    if store is None:
        raise ValueError("this rule keeps personal factors per client: the runtime needs a PersonalStore")
    if set(personal) - {"A", "B"}:
        raise ValueError(f"personal factors {sorted(personal)}: only A and B can be kept per client")
    stored = store.load(client_id, round_idx) or {}
    out = {}
    for name, (a, b, alpha) in factors.items():
        ref = a if a is not None else b  # dtype and device of what the client trains
        rank = a.shape[0] if a is not None else b.shape[1]
        d_out, d_in = module_shapes[name]
        given = {"A": a, "B": b}
        for factor in personal:
            want = (rank, d_in) if factor == "A" else (d_out, rank)
            mine = stored.get(name, {}).get(factor)
            if mine is None:
                if factor == "B":
                    given["B"] = torch.zeros(want, dtype=ref.dtype, device=ref.device)
                elif a is None:
                    raise ValueError(f"client {client_id!r}: no A of {name} to start from (none stored, none given)")
            elif tuple(mine.shape) != want:
                raise ValueError(f"client {client_id!r}: its stored {factor} of {name} has shape {tuple(mine.shape)}, "
                                 f"but it trains that module at rank {rank} (expected {want})")
            else:
                given[factor] = mine.to(dtype=ref.dtype, device=ref.device)
        out[name] = (given["A"], given["B"], alpha)
    return out


def keep_personal(update: ClientUpdate, round_idx: int, personal, store: PersonalStore | None) -> None:
    """Store the ``personal`` factors of a client's trained ``update`` for its next round."""
    if personal:
        store.save(update.client_id, round_idx, {name: {f: (a, b)["AB".index(f)] for f in personal}
                                                 for name, (a, b, _) in update.modules.items()})


def withhold(update: ClientUpdate, factors) -> ClientUpdate:
    """``update`` with ``factors`` zeroed: what leaves a client that keeps them to itself."""
    if not factors:
        return update
    modules = {name: (a.new_zeros(a.shape) if "A" in factors else a, b.new_zeros(b.shape) if "B" in factors else b,
                      alpha) for name, (a, b, alpha) in update.modules.items()}
    return ClientUpdate(update.client_id, update.num_examples, update.rank, modules, update.use_rslora,
                        dict(update.metrics))
