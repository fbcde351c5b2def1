"""Client updates: safetensors round trips, validation reasons, differential privacy."""
import json
import math
import pickle
import re
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from fedlora.federated import ClientUpdate, DPConfig, privatize, update_norm, validate_update
from fedlora.federated.update import product_norm

from .fl_helpers import SHAPES, product64, random_update

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def no_pickle(monkeypatch):
    """Make every unpickling entry point explode, so a load path that uses one fails."""
    def boom(*a, **k):
        raise AssertionError("pickle used in a load path")
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_update_round_trip_is_bit_exact(dtype, no_pickle, tmp_path):
    upd = random_update("client-7", 5, n=123, alpha=16.0, dtype=dtype, use_rslora=True)
    upd.metrics = {"loss": 1.25}
    for back in (ClientUpdate.from_bytes(upd.to_bytes()), _via_file(upd, tmp_path / "u.safetensors")):
        assert (back.client_id, back.num_examples, back.rank, back.use_rslora) == ("client-7", 123, 5, True)
        assert back.metrics == {"loss": 1.25}
        assert set(back.modules) == set(upd.modules)
        for name, (a, b, alpha) in upd.modules.items():
            a2, b2, alpha2 = back.modules[name]
            assert a2.dtype == dtype and torch.equal(a2, a) and torch.equal(b2, b) and alpha2 == alpha
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left its temporary file behind"


def _via_file(upd, path):
    upd.save(path)
    return ClientUpdate.load(path)


def test_update_scaling_follows_peft():
    upd = random_update("c", 4, alpha=8.0)
    assert upd.scaling(Q) == 2.0
    upd.use_rslora = True
    assert upd.scaling(Q) == 4.0


def test_from_bytes_rejects_malformed_blobs():
    upd = random_update("c", 3)
    with pytest.raises(ValueError, match="too short"):
        ClientUpdate.from_bytes(b"abc")
    with pytest.raises(ValueError, match="no 'fedlora.update'"):
        ClientUpdate.from_bytes(st_save({"x": torch.zeros(2)}))
    # header lists a module whose tensors are absent
    header = json.loads(_metadata(upd.to_bytes())["fedlora.update"])
    header["alphas"]["extra.module"] = 1.0
    tensors = {f"{n}.lora_{k}": t for n, (a, b, _) in upd.modules.items() for k, t in (("A", a), ("B", b))}
    blob = st_save(tensors, metadata={"fedlora.update": json.dumps(header)})
    with pytest.raises(ValueError, match="missing .*extra.module.lora_A"):
        ClientUpdate.from_bytes(blob)
    header["alphas"].pop("extra.module")
    header["version"] = 99
    with pytest.raises(ValueError, match="format version 99"):
        ClientUpdate.from_bytes(st_save(tensors, metadata={"fedlora.update": json.dumps(header)}))


def _metadata(blob: bytes) -> dict:
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + size])["__metadata__"]


def test_product_norm_matches_dense():
    upd = random_update("c", 6, dtype=torch.float64)
    a, b, _ = upd.modules[Q]
    assert math.isclose(product_norm(a, b, 3.0), (3.0 * b @ a).norm().item(), rel_tol=1e-12)
    ref = math.sqrt(sum(product64(a, b, upd.scaling(n)).norm().item() ** 2 for n, (a, b, _) in upd.modules.items()))
    assert math.isclose(update_norm(upd), ref, rel_tol=1e-12)


# ------------------------------------------------------------------ validation
def _with(upd, name, a=None, b=None, alpha=None):
    a0, b0, al0 = upd.modules[name]
    upd.modules[name] = (a0 if a is None else a, b0 if b is None else b, al0 if alpha is None else alpha)
    return upd


@pytest.mark.parametrize("mutate, reason", [
    (lambda u: _with(u, Q, a=u.modules[Q][0].clone().index_fill_(1, torch.tensor([3]), float("nan"))),
     "q_proj: A has non-finite values"),
    (lambda u: _with(u, Q, b=u.modules[Q][1].clone().fill_(float("inf"))), "q_proj: B has non-finite values"),
    (lambda u: _with(u, Q, a=torch.ones(4, 41)), r"A has shape \(4, 41\), expected \(r, 40\)"),
    (lambda u: _with(u, Q, b=torch.ones(48, 3)), r"B has shape \(48, 3\), expected \(48, 4\)"),
    (lambda u: u.modules.pop(Q) and u, r"missing modules \['model.layers.0.self_attn.q_proj'\]"),
    (lambda u: u.modules.update(extra=u.modules[Q]) or u, r"unexpected modules \['extra'\]"),
    (lambda u: setattr(u, "rank", 3) or u, r"A has shape \(4, \d+\), expected \(r, \d+\) with 1 <= r <= the client's rank 3"),
    (lambda u: _with(u, Q, a=torch.ones(0, 40), b=torch.ones(48, 0)), r"A has shape \(0, 40\)"),
    (lambda u: setattr(u, "num_examples", 0) or u, "num_examples must be a positive int"),
    (lambda u: _with(u, Q, alpha=float("nan")), "alpha must be a finite number > 0"),
    (lambda u: setattr(u, "client_id", "") or u, "client_id must be a non-empty string"),
])
def test_validation_names_the_problem(mutate, reason):
    assert validate_update(random_update("c", 4), SHAPES) is None
    got = validate_update(mutate(random_update("c", 4)), SHAPES)
    assert got is not None and re.search(reason, got), got


def test_validation_rank_rule_and_norm_bound():
    upd = random_update("c", 4)
    got = validate_update(upd, SHAPES, rank_check=lambda r, name: None if r == 8 else f"wrong rank {r}")
    assert got.endswith(": wrong rank 4") and got.split(":")[0] in SHAPES
    norm = update_norm(upd)
    assert validate_update(upd, SHAPES, max_norm=norm * 1.001) is None
    assert "exceeds the bound" in validate_update(upd, SHAPES, max_norm=norm * 0.999)


# --------------------------------------------------------------------- privacy
def _change_norm(new, ref, factors="AB"):
    sq = 0.0
    for name, (a, b, _) in new.modules.items():
        for i, f in enumerate("AB"):
            if f in factors:
                sq += ((a, b)[i].double() - ref[name][i].double()).square().sum().item()
    return math.sqrt(sq)


def test_privatize_clips_the_change_without_noise():
    upd = random_update("c", 4, dtype=torch.float64)
    ref = {n: (torch.zeros_like(a), torch.zeros_like(b)) for n, (a, b, _) in upd.modules.items()}
    full = _change_norm(upd, ref)
    clipped = privatize(upd, ref, DPConfig(clip_norm=full / 4, noise_multiplier=0.0))
    assert math.isclose(_change_norm(clipped, ref), full / 4, rel_tol=1e-12)
    a, b, _ = clipped.modules[Q]
    assert torch.allclose(a, upd.modules[Q][0] / 4) and torch.allclose(b, upd.modules[Q][1] / 4)
    same = privatize(upd, ref, DPConfig(clip_norm=full * 2, noise_multiplier=0.0))
    assert all(torch.equal(same.modules[n][0], upd.modules[n][0]) for n in upd.modules)


def test_privatize_noise_is_seeded_gaussian_and_spares_frozen_factors():
    upd = random_update("c", 8, dtype=torch.float64)
    ref = {n: (a.clone(), b.clone()) for n, (a, b, _) in upd.modules.items()}  # zero change: output = noise
    cfg = DPConfig(clip_norm=0.5, noise_multiplier=2.0, seed=3)
    noisy = privatize(upd, ref, cfg, round_idx=1, trainable=("B",))
    noise = torch.cat([(noisy.modules[n][1] - ref[n][1]).flatten() for n in upd.modules])
    assert abs(noise.std().item() - 1.0) < 0.05 and abs(noise.mean().item()) < 0.05  # std = z * C = 1
    assert all(torch.equal(noisy.modules[n][0], upd.modules[n][0]) for n in upd.modules)  # A untouched
    again = privatize(upd, ref, cfg, round_idx=1, trainable=("B",))
    assert all(torch.equal(again.modules[n][1], noisy.modules[n][1]) for n in upd.modules)
    other = privatize(upd, ref, cfg, round_idx=2, trainable=("B",))
    assert not torch.equal(other.modules[Q][1], noisy.modules[Q][1])
