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

from fedlora.data.clients import IGNORE_INDEX, collate_clients, spread_budget
from fedlora.layers import segments
from fedlora.strategies import Strategy
from fedlora.strategies.base import merge_parts

from .trainer import FederatedModel, token_loss_sums

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


def example_losses(fm: FederatedModel, examples: Sequence, pad_token_id: int, batch_size: int = EVAL_BATCH,
                   progress: Callable[[int], object] | None = None) -> tuple[list[float], list[int]]:
    """Each example's summed next-token loss and its number of targets, in ``examples``' order, of the
    model as it stands (single adapter loaded): what every loss of an evaluation is a token-weighted mean of."""
    fm.model.eval()
    sums: list[float] = []
    tokens: list[int] = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = list(examples[i:i + batch_size])
            batch = collate_clients([chunk], pad_token_id)
            with segments(fm.model, [len(chunk)], [0]):
                logits = fm.model(input_ids=batch["input_ids"].to(fm.device),
                                  attention_mask=batch["attention_mask"].to(fm.device)).logits
            row_sums, row_tokens = token_loss_sums(logits, batch["labels"].to(fm.device))
            sums += row_sums.double().tolist()
            tokens += row_tokens.tolist()
            if progress is not None:
                progress(len(chunk))
    return sums, tokens


def evaluate_loss(fm: FederatedModel, examples: Sequence, pad_token_id: int, batch_size: int = EVAL_BATCH,
                  progress: Callable[[int], object] | None = None) -> float:
    """Token-weighted mean next-token loss of the model as it stands (single zero adapter loaded)."""
    if not examples:
        return float("nan")
    sums, tokens = example_losses(fm, examples, pad_token_id, batch_size, progress)
    return math.fsum(sums) / max(sum(tokens), 1)


def loss_entry(loss_sum: float, tokens: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def by_rank(sums: Sequence[float], tokens: Sequence[int], owners: Sequence[tuple[str, int]]) -> dict[str, dict]:
    """Token-weighted loss and perplexity of the examples of each client rank: rank (a string, JSON's
    key) -> {loss, ppl, clients, tokens}. ``owners``: (client id, its rank) of each example.

    The same per-example sums as the overall loss, so sum_r tokens_r * loss_r / sum_r tokens_r is that
    loss up to float64 rounding."""
    if len(owners) != len(sums):
        raise ValueError(f"{len(owners)} example owners for {len(sums)} scored examples")
    ranks = sorted({int(rank) for _, rank in owners})
    out = {}
    for r in ranks:
        mine = [i for i, (_, rank) in enumerate(owners) if int(rank) == r]
        count = sum(tokens[i] for i in mine)
        out[str(r)] = {**loss_entry(math.fsum(sums[i] for i in mine), count),
                       "clients": len({owners[i][0] for i in mine}), "tokens": count}
    return out


def heldout_groups(clients: Sequence, budget: int) -> list[tuple[object, int]]:
    """(client, how many of its held-out examples are scored) in data order, up to ``budget`` examples in
    all, spread over the clients: the clients of ``eval_sets("heldout", budget)``, counted without reading
    an example."""
    clients = list(clients)
    counts = spread_budget([len(c.heldout) for c in clients], budget)
    return [(c, n) for c, n in zip(clients, counts) if n]


def group_owners(groups: Sequence[tuple[object, int]], rank_of: Mapping[str, int]) -> list[tuple[str, int]]:
    """(client id, its rank) of every example of ``groups`` ((client, n) pairs, :func:`heldout_groups`), in order."""
    return [(c.client_id, rank_of[c.client_id]) for c, n in groups for _ in range(n)]


def heldout_owners(clients: Sequence, budget: int, rank_of: Mapping[str, int]) -> list[tuple[str, int]]:
    """(client id, its rank) of every held-out example an evaluation scores, in order (see heldout_groups)."""
    return group_owners(heldout_groups(clients, budget), rank_of)


def evaluation_size(heldout: Sequence, unseen: Sequence, rouge_sets: Mapping[str, list]) -> int:
    """The examples one evaluation goes through (its progress bar's total): scored, then generated from."""
    return len(heldout) + len(unseen) + sum(len(ex) for picked in rouge_sets.values() for _, ex in picked)


def evaluate_model(fm: FederatedModel, deltas, heldout, unseen, pad_id: int, tokenizer, rouge_sets,
                   max_new_tokens: int, progress: Callable[[int], object] | None = None,
                   heldout_ranks: Sequence[tuple[str, int]] | None = None) -> dict:
    """Loss, perplexity (and Rouge-L for instruction data) of the base model plus ``deltas``
    ({module: dense update}; None: the base model alone, the baseline before round 1).

    heldout_ranks: (client id, client rank) of each held-out example (:func:`heldout_owners`): adds
    ``eval_heldout_by_rank``, the same scored tokens grouped by the rank of the client they belong to.
    """
    fm.load_zero_adapter()
    fm.set_deltas(deltas)
    out = {}
    for name, examples in (("heldout", heldout), ("unseen", unseen)):
        if examples:
            sums, tokens = example_losses(fm, examples, pad_id, progress=progress)
            out.update({f"eval_{name}_{k}": v for k, v in loss_entry(math.fsum(sums), sum(tokens)).items()})
            if name == "heldout" and heldout_ranks is not None:
                out["eval_heldout_by_rank"] = by_rank(sums, tokens, heldout_ranks)
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
                    max_new_tokens: int, spectrum: int = 0, progress: Callable[[int], object] | None = None,
                    heldout_ranks: Sequence[tuple[str, int]] | None = None) -> dict:
    """The metrics of the global model: base + the rule's global update (reconstructed once for every metric).

    ``spectrum`` > 0 adds the top singular values of the update of the first,
    middle and last layers' modules (how much of its rank the rule uses).
    """
    deltas = strategy.global_deltas()
    out = evaluate_model(fm, deltas, heldout, unseen, pad_id, tokenizer, rouge_sets, max_new_tokens, progress,
                         heldout_ranks)
    if spectrum:
        out["spectrum"] = update_spectrum(deltas, spectrum_modules(list(deltas)), spectrum)
    return out


def evaluate_personal(fm: FederatedModel, strategy: Strategy, clients, factors_of, pad_id: int,
                      budget: int, rank_of: Mapping[str, int] | None = None, key: str = "eval_personal_heldout",
                      progress: Callable[[int], object] | None = None) -> dict:
    """Each client's personalised model on its own held-out examples (rules with ``personal`` factors).

    clients: the training clients in data order; factors_of(client) -> the factors it would start
    the next round from (the rule's shared factors with its own personal ones). The examples are
    the global evaluation's held-out set (up to ``budget``, spread over the clients), so
    ``eval_personal_heldout_*`` and ``eval_heldout_*`` score the same tokens. Token-weighted.
    ``key``: the metrics' prefix (a rule without a global model reports these as ``eval_heldout``);
    with ``rank_of`` also ``{key}_by_rank`` (see :func:`by_rank`).
    """
    groups = heldout_groups(clients, budget)
    sums, tokens = own_model_losses(fm, strategy, groups, factors_of, pad_id, progress)
    if not sum(tokens):
        return {}
    out = {f"{key}_{k}": v for k, v in loss_entry(math.fsum(sums), sum(tokens)).items()}
    if rank_of is not None:
        out[f"{key}_by_rank"] = by_rank(sums, tokens, group_owners(groups, rank_of))
    return {**out, "eval_personal_clients": len(groups)}


def own_model_losses(fm: FederatedModel, strategy: Strategy, groups: Sequence[tuple[object, int]], factors_of,
                     pad_id: int, progress: Callable[[int], object] | None = None) -> tuple[list[float], list[int]]:
    """:func:`example_losses` of each client's first ``n`` held-out examples ((client, n) of ``groups``) under
    its own model: the rule's ``client_base()`` plus the factors ``factors_of(client)``."""
    base = strategy.client_base()
    fm.set_deltas(merge_parts(base) if base else None)
    sums: list[float] = []
    tokens: list[int] = []
    for client, count in groups:
        fm.load_clients([factors_of(client)])
        s, n = example_losses(fm, list(client.heldout[:count]), pad_id, progress=progress)
        sums += s
        tokens += n
    fm.set_deltas(None)
    return sums, tokens


def personal_rouge_l(fm: FederatedModel, strategy: Strategy, groups: Sequence[tuple[float, list, object]], factors_of,
                     tokenizer, pad_id: int, max_new_tokens: int) -> float:
    """Rouge-L of each client's own model on its own examples, averaged as :func:`rouge_l` averages clients
    (by client size). groups: (client size, examples, client) as ``eval_sets`` and heldout_groups pair them."""
    base = strategy.client_base()
    fm.set_deltas(merge_parts(base) if base else None)
    total = weight = 0.0
    for size, examples, client in groups:
        fm.load_clients([factors_of(client)])
        score = rouge_l(fm, tokenizer, [(size, examples)], pad_id, max_new_tokens)
        if math.isfinite(score):  # a client none of whose examples had a prompt and an answer
            total += size * score
            weight += size
    fm.set_deltas(None)
    return total / weight if weight else float("nan")
