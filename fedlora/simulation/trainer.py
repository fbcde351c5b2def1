"""Local training of many clients in one batched forward/backward.

Each target linear layer of the model becomes

    DeltaLinear(MultiLoRALinear(base))      y = base(x) + LoRA_client(x) + x delta^T

The MultiLoRALinear holds one adapter per client of the round (its own rank);
the DeltaLinear holds a full-precision global delta beside the (possibly 4-bit)
base: FLoRA's folded updates while training, and the global update while
evaluating. A training step packs a micro-batch of every still-active client
into one batch (segments = clients); the loss is the SUM over clients of each
client's own mean token loss, so every adapter receives exactly the gradient it
would get training alone, and a per-client optimizer steps each one as if alone.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.bank import AdapterBank, lora_scaling
from fedlora.data.clients import IGNORE_INDEX, ClientDataset, collate_clients
from fedlora.layers import DeltaLinear, MultiLoRALinear, keep_4bit_layout_trainable, segments

from .corrections import Controls, GradientCorrections
from .optim import PerClientOptimizer, scheduled_lr

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]


def _is_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


def target_layers(linear_names: Sequence[str], target_modules: Sequence[str]) -> list[str]:
    """The linear layers whose last name part is one of ``target_modules`` (e.g. ``q_proj``).

    ValueError naming every target that matches no layer, with the names the model has.
    """
    targets = set(target_modules)
    names = [n for n in linear_names if n.rsplit(".", 1)[-1] in targets]
    unmatched = sorted(targets - {n.rsplit(".", 1)[-1] for n in names})
    if unmatched:
        have = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(f"target_modules {unmatched} match no linear layer of the model; it has {have}")
    return names


class FederatedModel:
    """A causal LM whose target layers carry the round's client adapters."""

    def __init__(self, model: nn.Module, target_modules: Sequence[str], *, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        self.model = model
        self.use_rslora = use_rslora
        model.requires_grad_(False)
        # The backward of every round crosses the frozen 4-bit layers that carry no adapter too: an
        # evaluation must not repack them into bitsandbytes' inference layout (no autograd there).
        for module in model.modules():
            keep_4bit_layout_trainable(module)
        names = target_layers([n for n, m in model.named_modules() if _is_linear(m)], target_modules)
        self.layers: dict[str, tuple[DeltaLinear, MultiLoRALinear]] = {}
        for name in names:
            base = model.get_submodule(name)
            lora = MultiLoRALinear(base, ranks=[1], name=name, lora_dropout=lora_dropout)
            wrapper = DeltaLinear(lora, base.out_features, base.in_features)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
            self.layers[name] = (wrapper, lora)

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (lora.out_features, lora.in_features) for n, (_, lora) in self.layers.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values()))[1].bank.device

    def banks(self) -> list[AdapterBank]:
        return [lora.bank for _, lora in self.layers.values()]

    def load_clients(self, factors: Sequence[Factors]) -> None:
        """One adapter per client: client k's (A, B, alpha) of every module, each at its own rank."""
        for name, (_, lora) in self.layers.items():
            pairs = [(f[name][0], f[name][1]) for f in factors]
            scalings = [lora_scaling(float(f[name][2]), f[name][0].shape[0], self.use_rslora) for f in factors]
            lora.bank = AdapterBank.from_factors(pairs, scalings).to(device=lora.bank.device, dtype=lora.bank.dtype)

    def live_factors(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Client k's (A, B) of every module as views of the trained parameters (gradients flow)."""
        return {name: lora.bank.factors(k) for name, (_, lora) in self.layers.items()}

    def client_factors(self, k: int, alpha_of: Mapping[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        out = {}
        for name, (_, lora) in self.layers.items():
            A, B = lora.bank.factors(k)
            out[name] = (A.detach().float().cpu().clone(), B.detach().float().cpu().clone(), alpha_of[name])
        return out

    def set_deltas(self, deltas: Mapping[str, torch.Tensor] | None) -> None:
        """Global full-precision deltas beside the bases (None: none)."""
        for name, (wrapper, _) in self.layers.items():
            if deltas is None or name not in deltas:
                wrapper.delta.zero_()
                wrapper.has_delta = False
            else:
                wrapper.set_delta_(deltas[name].to(wrapper.delta.device))

    def load_zero_adapter(self) -> None:
        """A single rank-1 adapter with B = 0: the model is exactly base + delta."""
        for _, lora in self.layers.values():
            bank = AdapterBank.create(lora.in_features, lora.out_features, [1], dtype=lora.bank.dtype,
                                      device=lora.bank.device)
            lora.bank = bank


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed next-token loss (fp32) and its number of targets: ([batch], [batch])."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    return ce.sum(1), (shift_labels != IGNORE_INDEX).sum(1)


def client_losses(logits: torch.Tensor, labels: torch.Tensor, seg_lens: Sequence[int]) -> torch.Tensor:
    """Each client's mean next-token loss over its own tokens: [num_clients]."""
    row_sums, row_tokens = token_loss_sums(logits, labels)
    sums = torch.stack([s.sum() for s in torch.split(row_sums, list(seg_lens))])
    counts = torch.stack([c.sum() for c in torch.split(row_tokens, list(seg_lens))])
    return sums / counts.clamp(min=1)


@dataclass
class LocalPlan:
    """How a round's local training runs."""

    steps: list[int]  # steps per client
    batch_size: int
    lr: float
    lr_schedule: str = "constant"
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    batched: bool = True
    train_A: bool = True  # False for FFA-LoRA: A stays at its shared initialisation
    # penalty(k, {module: (A_k, B_k)}) -> a term client k adds to its loss (the rule's local_penalty), or None
    penalty: Callable[[int, dict[str, tuple[torch.Tensor, torch.Tensor]]], torch.Tensor | None] | None = None
    train_B: bool = True  # False in RoLoRA's A-rounds: B stays as the server sent it
    prox_mu: float = 0.0  # FedProx's mu: each client's gradient gains mu (theta - theta^0) (see corrections.py)
    controls: list[Controls] | None = None  # SCAFFOLD: client k's c - c_k per module, added to its gradient

    def lr_sum(self, k: int) -> float:
        """sum_s eta_s over client k's steps: SCAFFOLD option II's K eta_l under any schedule."""
        return sum(scheduled_lr(self.lr, self.lr_schedule, s, self.steps[k]) for s in range(self.steps[k]))


class ExampleStream:
    """A client's examples in a seeded order, reshuffled each pass, ``batch_size`` at a time."""

    def __init__(self, examples: Sequence, seed: int):
        if not examples:
            raise ValueError("the client has no training examples")
        self.examples, self.rng, self.order, self.pos = examples, np.random.default_rng(seed), [], 0

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.examples)).tolist(), 0
            out.append(self.examples[self.order[self.pos]])
            self.pos += 1
        return out


def train_clients(fm: FederatedModel, clients: Sequence[ClientDataset], streams: Sequence[ExampleStream],
                  plan: LocalPlan, pad_token_id: int, progress: Callable | None = None) -> list[list[float]]:
    """Train the adapters already loaded into ``fm`` (client k = adapter k); returns per-client step losses.

    Batched: every step packs one micro-batch of each client that still has
    steps left. Sequential: client after client, one client per forward.
    """
    fm.model.train()
    opt = PerClientOptimizer(fm.banks(), plan.optimizer, weight_decay=plan.weight_decay, momentum=plan.momentum)
    for bank in fm.banks():
        bank.B.requires_grad_(plan.train_B)
        bank.A.requires_grad_(plan.train_A)
    corrections = GradientCorrections(fm.banks(), list(fm.layers), plan.prox_mu, plan.controls)
    losses: list[list[float]] = [[] for _ in clients]
    device = fm.device

    def step(group: list[int], step_idx: dict[int, int]) -> None:
        per_client = [streams[k].take(plan.batch_size) for k in group]
        batch = collate_clients(per_client, pad_token_id)
        seg_lens = batch["seg_lens"].tolist()
        with segments(fm.model, seg_lens, group):
            logits = fm.model(input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device)).logits
        loss = client_losses(logits, batch["labels"].to(device), seg_lens)
        total = loss.sum()
        if plan.penalty is not None:  # each client's own regulariser reaches only its own adapter
            for k in group:
                term = plan.penalty(k, fm.live_factors(k))
                if term is not None:
                    total = total + term
        total.backward()
        if corrections:  # FedProx / SCAFFOLD: each client's term on its own rows and columns
            corrections.add_to_grads()
        lrs = [scheduled_lr(plan.lr, plan.lr_schedule, step_idx[k], plan.steps[k]) for k in group]
        opt.step(group, lrs)
        opt.zero_grad()
        for k, value in zip(group, loss.tolist()):
            losses[k].append(value)
        if progress is not None:
            progress(len(group))

    if plan.batched:
        for s in range(max(plan.steps, default=0)):
            group = [k for k in range(len(clients)) if s < plan.steps[k]]
            step(group, {k: s for k in group})
    else:
        for k in range(len(clients)):
            for s in range(plan.steps[k]):
                step([k], {k: s})
    for bank in fm.banks():
        bank.requires_grad_(False)
    return losses
