"""Evaluation of the global model (base + the rule's global update): loss, perplexity, Rouge-L.

FlexLoRA's protocol: held-out examples of training clients and clients never
trained on ("unseen"). For instruction data also Rouge-L of greedy generations:
an encoded instruction example holds the prompt (labels -100) followed by the
answer; the model continues the prompt greedily and the continuation is scored
against the answer with Google's `rouge-score` (Rouge-L F-measure). Clients are
averaged with weights proportional to their size, as FlexLoRA reports it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from fedlora.data.clients import IGNORE_INDEX, collate_clients
from fedlora.layers import segments
from fedlora.strategies import Strategy
from fedlora.strategies.base import merge_parts

from .trainer import FederatedModel, client_losses

_LAYER = re.compile(r"\.(\d+)\.")
EVAL_BATCH = 8  # sequences per forward pass when scoring


def split_prompt(example) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, reference answer ids) of an instruction example."""
    answer = example["labels"] != IGNORE_INDEX
    if not answer.any():
        return example["input_ids"], example["input_ids"][:0]
    first = int(answer.nonzero()[0])
    return example["input_ids"][:first], example["input_ids"][answer]


@torch.no_grad()
def rouge_l(fm: FederatedModel, tokenizer, per_client: Sequence[tuple[float, list]], pad_token_id: int,
            max_new_tokens: int = 64, progress: Callable[[int], object] | None = None) -> float:
    """Client-size-weighted mean Rouge-L F of greedy continuations (single zero adapter loaded)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    fm.model.eval()
    total = weight = 0.0
    for client_weight, examples in per_client:
        scores = []
        for ex in examples:
            if progress is not None:
                progress(1)
            prompt, reference = split_prompt(ex)
            if reference.numel() == 0 or prompt.numel() == 0:
                continue
            ids = prompt[None].to(fm.device)
            with segments(fm.model, [1], [0]):
                out = fm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
            generated = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            target = tokenizer.decode(reference, skip_special_tokens=True)
            scores.append(scorer.score(target, generated)["rougeL"].fmeasure)
        if scores:
            total += client_weight * sum(scores) / len(scores)
            weight += client_weight
    return total / weight if weight else float("nan")


@torch.no_grad()
def evaluate_loss(fm: FederatedModel, examples: Sequence, pad_token_id: int, batch_size: int = EVAL_BATCH,
                  progress: Callable[[int], object] | None = None) -> float:
    """Token-weighted mean next-token loss of the model as it stands (single zero adapter loaded)."""
    if not examples:
        return float("nan")
    fm.model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        batch = collate_clients([chunk], pad_token_id)
        with segments(fm.model, [len(chunk)], [0]):
            logits = fm.model(input_ids=batch["input_ids"].to(fm.device),
                              attention_mask=batch["attention_mask"].to(fm.device)).logits
        labels = batch["labels"].to(fm.device)[:, 1:]
        n = int((labels != IGNORE_INDEX).sum())
        total += float(client_losses(logits, batch["labels"].to(fm.device), [len(chunk)])[0]) * n
        tokens += n
        if progress is not None:
            progress(len(chunk))
    return total / max(tokens, 1)


def evaluation_size(heldout: Sequence, unseen: Sequence, rouge_sets: Mapping[str, list]) -> int:
    """The examples one evaluation goes through (its progress bar's total): scored, then generated from."""
    return len(heldout) + len(unseen) + sum(len(ex) for picked in rouge_sets.values() for _, ex in picked)


def evaluate_model(fm: FederatedModel, deltas, heldout, unseen, pad_id: int, tokenizer, rouge_sets,
                   max_new_tokens: int, progress: Callable[[int], object] | None = None) -> dict:
    """Loss, perplexity (and Rouge-L for instruction data) of the base model plus ``deltas``
    ({module: dense update}; None: the base model alone, the baseline before round 1)."""
    fm.load_zero_adapter()
    fm.set_deltas(deltas)
    out = {}
    for name, examples in (("heldout", heldout), ("unseen", unseen)):
        if examples:
            loss = evaluate_loss(fm, examples, pad_id, progress=progress)
            out[f"eval_{name}_loss"] = loss
            out[f"eval_{name}_ppl"] = math.exp(min(loss, 50.0))
    for name, picked in rouge_sets.items():
        if picked:
            out[f"eval_{name}_rougeL"] = rouge_l(fm, tokenizer, picked, pad_id, max_new_tokens, progress=progress)
    fm.set_deltas(None)
    return out


def spectrum_modules(names: Sequence[str]) -> list[str]:
    """The modules of the first, middle and last layer among ``names`` (by the layer number in the name)."""
    def layer(name: str) -> int:
        match = _LAYER.search(name)
        return int(match.group(1)) if match else -1

    layers = sorted({layer(n) for n in names})
    picked = {layers[0], layers[len(layers) // 2], layers[-1]}
    return [n for n in names if layer(n) in picked]


def update_spectrum(deltas, names: Sequence[str], k: int) -> dict[str, list[float]]:
    """The ``k`` largest singular values of each named global update (float64)."""
    return {n: torch.linalg.svdvals(deltas[n].double())[:k].tolist() for n in names}


def evaluate_global(fm: FederatedModel, strategy: Strategy, heldout, unseen, pad_id: int, tokenizer, rouge_sets,
                    max_new_tokens: int, spectrum: int = 0, progress: Callable[[int], object] | None = None) -> dict:
    """The metrics of the global model: base + the rule's global update (reconstructed once for every metric).

    ``spectrum`` > 0 adds the top singular values of the update of the first,
    middle and last layers' modules (how much of its rank the rule uses).
    """
    deltas = strategy.global_deltas()
    out = evaluate_model(fm, deltas, heldout, unseen, pad_id, tokenizer, rouge_sets, max_new_tokens, progress)
    if spectrum:
        out["spectrum"] = update_spectrum(deltas, spectrum_modules(list(deltas)), spectrum)
    return out


def label_tokens(examples: Sequence) -> int:
    """The next-token targets of ``examples``: what evaluate_loss averages over."""
    return sum(int((ex["labels"][1:] != IGNORE_INDEX).sum()) for ex in examples)


def evaluate_personal(fm: FederatedModel, strategy: Strategy, clients, factors_of, pad_id: int,
                      budget: int) -> dict:
    """Each client's personalised model on its own held-out examples (rules with ``personal`` factors).

    clients: the training clients in data order; factors_of(client) -> the factors it would start
    the next round from (the rule's shared factors with its own personal ones). The examples are
    the global evaluation's held-out set (up to ``budget``, client by client), so
    ``eval_personal_heldout_*`` and ``eval_heldout_*`` score the same tokens. Token-weighted.
    """
    base = strategy.client_base()
    fm.set_deltas(merge_parts(base) if base else None)
    total = tokens = 0.0
    scored = 0
    for client in clients:
        if budget <= 0:
            break
        examples = list(client.heldout[:budget])
        if not examples:
            continue
        budget -= len(examples)
        fm.load_clients([factors_of(client)])
        n = label_tokens(examples)
        total += evaluate_loss(fm, examples, pad_id) * n
        tokens += n
        scored += 1
    fm.set_deltas(None)
    if not tokens:
        return {}
    loss = total / tokens
    return {"eval_personal_heldout_loss": loss, "eval_personal_heldout_ppl": math.exp(min(loss, 50.0)),
            "eval_personal_clients": scored}
