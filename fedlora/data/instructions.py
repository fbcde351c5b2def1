"""Instruction-tuning data from a JSONL file, partitioned into federated clients.

Each line is a JSON object with ``instruction`` (required), ``input`` (optional)
and ``output`` (required), plus any other fields (a client id, a category).
Partitions: by a client field (natural federation, e.g. FedIT's per-user data),
Dirichlet(alpha) label skew over a category field (FederatedScope-LLM's
heterogeneous splits), or IID. Loss is taken only on answer tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .clients import IGNORE_INDEX, ClientDataset, FederatedData, make_example, split_indices

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class InstructionRecord:
    instruction: str
    output: str
    input: str = ""
    extra: dict = field(default_factory=dict)  # every other field of the JSON line


def read_jsonl(path: str | Path) -> list[InstructionRecord]:
    """Parse and validate an instruction JSONL file (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"instruction file not found: {path}")
    records = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for key in ("instruction", "output"):
                if not isinstance(obj.get(key), str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a string")
            inp = obj.get("input", "")
            if inp is None:
                inp = ""
            if not isinstance(inp, str):
                raise ValueError(f"{path}:{lineno}: field 'input' must be a string")
            extra = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
            records.append(InstructionRecord(obj["instruction"], obj["output"], inp, extra))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


# ---------------------------------------------------------------- partitions

def _field_values(records: Sequence[InstructionRecord], name: str) -> list[str]:
    missing = [i for i, r in enumerate(records) if name not in r.extra]
    if missing:
        raise ValueError(f"field {name!r} is missing from {len(missing)} record(s), first at index {missing[0]}")
    return [str(r.extra[name]) for r in records]


def partition_by_field(records: Sequence[InstructionRecord], field_name: str = "client") -> dict[str, list[int]]:
    """client id (the field's value) -> record indices, in file order."""
    out: dict[str, list[int]] = {}
    for i, value in enumerate(_field_values(records, field_name)):
        out.setdefault(value, []).append(i)
    return dict(sorted(out.items()))


def partition_iid(num_records: int, num_clients: int, seed: int = 0) -> dict[str, list[int]]:
    """Seeded shuffle, then near-equal contiguous shares."""
    if num_clients < 1 or num_clients > num_records:
        raise ValueError(f"num_clients must be in [1, {num_records}] for {num_records} records, got {num_clients}")
    perm = np.random.default_rng(seed).permutation(num_records)
    return {f"client_{j}": sorted(part.tolist()) for j, part in enumerate(np.array_split(perm, num_clients))}


def partition_dirichlet(categories: Sequence[str], num_clients: int, alpha: float, seed: int = 0,
                        min_per_client: int = 1, max_tries: int = 100) -> dict[str, list[int]]:
    """Label-skewed split: for each category, client shares ~ Dirichlet(alpha).

    Small alpha gives clients few categories each; large alpha approaches IID.
    Every record goes to exactly one client. Draws are repeated (seeded, at most
    ``max_tries``) until every client has ``min_per_client`` records, as in the
    common FL benchmark code, since an empty client cannot train.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_clients * min_per_client > len(categories):
        raise ValueError(f"{len(categories)} records cannot give {num_clients} clients {min_per_client} each")
    rng = np.random.default_rng(seed)
    labels = np.asarray([str(c) for c in categories])
    for _ in range(max_tries):
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for cat in sorted(set(labels.tolist())):
            idx = np.flatnonzero(labels == cat)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for j, part in enumerate(np.split(idx, cuts)):
                shares[j].extend(part.tolist())
        if min(len(s) for s in shares) >= min_per_client:
            return {f"client_{j}": sorted(s) for j, s in enumerate(shares)}
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of {num_clients} "
                     f"clients >= {min_per_client} records; raise alpha or lower num_clients")


# ---------------------------------------------------------------- encoding

def _user_text(rec: InstructionRecord) -> str:
    return f"{rec.instruction}\n\n{rec.input}" if rec.input else rec.instruction


def format_prompt(tokenizer, rec: InstructionRecord) -> str:
    """The prompt text: the tokenizer's chat template when it has one, else a plain template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": _user_text(rec)}],
                                             tokenize=False, add_generation_prompt=True)
    template = PLAIN_TEMPLATE_INPUT if rec.input else PLAIN_TEMPLATE
    return template.format(instruction=rec.instruction, input=rec.input)


def _answer_text(tokenizer, rec: InstructionRecord, prompt: str) -> str:
    """The text after the prompt: the answer plus whatever ends the turn.

    With a chat template, the full conversation is rendered and the prompt
    stripped from its front, so the answer ends with the template's own
    end-of-turn marker (e.g. SmolLM2's <|im_end|>) and the model learns to stop.
    """
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": _user_text(rec)}, {"role": "assistant", "content": rec.output}],
            tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
        # Templates that rewrite earlier turns: fall back to answer + EOS below.
    return rec.output + (tokenizer.eos_token or "")


def encode_instruction(tokenizer, rec: InstructionRecord, max_len: int = 512):
    """One supervised example; ``labels`` are -100 on every prompt token.

    Prompt and answer are tokenized separately so the boundary is exact (a BPE
    merge across it would blur which tokens are answer). Too-long examples are
    cut on the right; one left with no answer token returns None.
    """
    prompt = format_prompt(tokenizer, rec)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None and not getattr(tokenizer, "chat_template", None):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    answer_ids = list(tokenizer(_answer_text(tokenizer, rec, prompt), add_special_tokens=False)["input_ids"])
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_len]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None
    return make_example(ids, labels)


def load_instructions(path: str | Path, tokenizer, partition: str = "field", client_field: str = "client",
                      category_field: str = "category", num_clients: int | None = None, alpha: float = 0.5,
                      heldout_fraction: float = 0.1, unseen_clients: int = 0, max_len: int = 512,
                      seed: int = 0) -> FederatedData:
    """Read ``path``, partition it, encode it.

    partition: "field" (by ``client_field``), "dirichlet" (over ``category_field``,
    ``num_clients`` clients, concentration ``alpha``) or "iid" (``num_clients``).
    Each training client holds out ``heldout_fraction`` of its records; the last
    ``unseen_clients`` clients of a seeded shuffle are held out entirely.
    """
    records = read_jsonl(path)
    if partition == "field":
        parts = partition_by_field(records, client_field)
    elif partition in ("dirichlet", "iid"):
        if num_clients is None:
            raise ValueError(f"partition={partition!r} needs num_clients")
        parts = (partition_iid(len(records), num_clients, seed) if partition == "iid" else
                 partition_dirichlet(_field_values(records, category_field), num_clients, alpha, seed))
    else:
        raise ValueError(f"partition must be 'field', 'dirichlet' or 'iid', got {partition!r}")
    if not 0 <= unseen_clients < len(parts):
        raise ValueError(f"unseen_clients must be in [0, {len(parts) - 1}], got {unseen_clients}")

    rng = np.random.default_rng(seed + 1)  # not the partition's stream: changing one leaves the other
    ids = list(parts)
    order = rng.permutation(len(ids))
    unseen_ids = {ids[i] for i in order[len(ids) - unseen_clients:]} if unseen_clients else set()

    def encode(indices):
        return [ex for ex in (encode_instruction(tokenizer, records[i], max_len) for i in indices) if ex is not None]

    train, unseen = [], []
    for cid in ids:
        idx = parts[cid]
        if cid in unseen_ids:
            unseen.append(ClientDataset(cid, [], encode(idx), {"records": len(idx)}))
            continue
        keep, held = split_indices(len(idx), heldout_fraction, rng)
        train.append(ClientDataset(cid, encode([idx[i] for i in keep]), encode([idx[i] for i in held]),
                                   {"records": len(idx)}))
    return FederatedData(train, unseen)
