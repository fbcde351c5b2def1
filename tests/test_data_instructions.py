"""Instruction JSONL: parsing, partitions and prompt-masked labels."""
import json

import numpy as np
import pytest

from fedlora.data import IGNORE_INDEX, collate_clients, load_instructions, read_jsonl
from fedlora.models import byte_tokenizer
from fedlora.data import instructions as ins

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def synthetic_rows(n=60, clients=4, categories=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"instruction": f"Task {i}: add {i} and {2 * i}.", "output": f"The sum is {3 * i}.",
               "client": f"user{i % clients}", "category": f"cat{rng.integers(categories)}"}
        if i % 3 == 0:
            row["input"] = f"numbers: {i}, {2 * i} — ünïcode"
        rows.append(row)
    return rows


@pytest.fixture
def tok():
    return byte_tokenizer()


def test_read_jsonl_validates(tmp_path):
    recs = read_jsonl(write_jsonl(tmp_path / "ok.jsonl", synthetic_rows(5)))
    assert len(recs) == 5 and recs[0].input.startswith("numbers") and recs[1].input == ""
    assert recs[2].extra == {"client": "user2", "category": recs[2].extra["category"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:3: not valid JSON"):
        read_jsonl(bad)
    bad.write_text('{"instruction": "a"}\n')
    with pytest.raises(ValueError, match="'output' must be a string"):
        read_jsonl(bad)
    bad.write_text('["instruction"]\n')
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_jsonl(bad)
    with pytest.raises(ValueError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def check_masking(tok, rec, ex, prompt_text, answer_text, bos):
    prompt_ids = ([tok.bos_token_id] if bos else []) + tok(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer_text, add_special_tokens=False)["input_ids"]
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert ids == prompt_ids + answer_ids
    for i, (tid, lab) in enumerate(zip(ids, labels)):
        if i < len(prompt_ids):
            assert lab == IGNORE_INDEX, f"prompt token {i} is not masked"
        else:
            assert lab == tid, f"answer token {i} label {lab} != id {tid}"
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == answer_text


def test_label_masking_plain_template(tmp_path, tok):
    recs = read_jsonl(write_jsonl(tmp_path / "d.jsonl", synthetic_rows(6)))
    for rec in recs:
        ex = ins.encode_instruction(tok, rec, max_len=1024)
        prompt = ins.format_prompt(tok, rec)
        assert prompt.startswith("### Instruction:\n" + rec.instruction) and prompt.endswith("### Response:\n")
        assert ("### Input:\n" + rec.input in prompt) == bool(rec.input)
        check_masking(tok, rec, ex, prompt, rec.output + "</s>", bos=True)


def test_label_masking_chat_template(tmp_path, tok):
    tok.chat_template = CHATML
    rec = read_jsonl(write_jsonl(tmp_path / "d.jsonl", synthetic_rows(1)))[0]
    prompt = ins.format_prompt(tok, rec)
    assert prompt == f"<|im_start|>user\n{rec.instruction}\n\n{rec.input}<|im_end|>\n<|im_start|>assistant\n"
    ex = ins.encode_instruction(tok, rec, max_len=1024)
    # The answer carries the template's end-of-turn marker, so the model learns to stop.
    check_masking(tok, rec, ex, prompt, rec.output + "<|im_end|>\n", bos=False)


def test_truncation(tmp_path, tok):
    rec = ins.InstructionRecord("Say hi.", "hello there")
    n_prompt = 1 + len(ins.format_prompt(tok, rec).encode())
    ex = ins.encode_instruction(tok, rec, max_len=n_prompt + 3)
    assert ex["input_ids"].numel() == n_prompt + 3
    assert tok.decode([t for t in ex["labels"].tolist() if t != IGNORE_INDEX]) == "hel"
    assert ins.encode_instruction(tok, rec, max_len=n_prompt) is None  # nothing left to learn


def test_dirichlet_deterministic_covering_and_skewed():
    cats = [f"c{i % 6}" for i in range(600)]
    a = ins.partition_dirichlet(cats, num_clients=10, alpha=0.1, seed=7)
    assert a == ins.partition_dirichlet(cats, num_clients=10, alpha=0.1, seed=7)
    assert a != ins.partition_dirichlet(cats, num_clients=10, alpha=0.1, seed=8)
    assert sorted(i for idx in a.values() for i in idx) == list(range(600))
    assert len(a) == 10 and min(len(v) for v in a.values()) >= 1

    def mean_categories(parts):
        return np.mean([len({cats[i] for i in idx}) for idx in parts.values()])

    iidish = ins.partition_dirichlet(cats, num_clients=10, alpha=1000.0, seed=7)
    assert mean_categories(a) < 4 < mean_categories(iidish) == 6


def test_dirichlet_errors():
    with pytest.raises(ValueError, match="alpha"):
        ins.partition_dirichlet(["a"] * 10, 2, alpha=0)
    with pytest.raises(ValueError, match="cannot give"):
        ins.partition_dirichlet(["a"] * 3, 4, alpha=1.0)
    with pytest.raises(ValueError, match="no Dirichlet"):
        ins.partition_dirichlet(["a"] * 20, 10, alpha=1e-3, min_per_client=2, max_tries=3)


def test_iid_partition():
    parts = ins.partition_iid(23, 5, seed=1)
    assert parts == ins.partition_iid(23, 5, seed=1)
    assert sorted(len(v) for v in parts.values()) == [4, 4, 5, 5, 5]
    assert sorted(i for v in parts.values() for i in v) == list(range(23))
    with pytest.raises(ValueError, match="num_clients"):
        ins.partition_iid(3, 4)


def test_load_instructions_by_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(60, clients=4))
    data = load_instructions(path, tok, partition="field", heldout_fraction=0.2, unseen_clients=1, seed=0)
    assert len(data.train_clients) == 3 and len(data.unseen_clients) == 1
    ids = [c.client_id for c in data.train_clients + data.unseen_clients]
    assert sorted(ids) == ["user0", "user1", "user2", "user3"]
    for c in data.train_clients:
        assert c.num_examples == 12 and len(c.heldout) == 3
        texts = [tok.decode(ex["input_ids"]) for ex in c.train + c.heldout]
        assert len(set(texts)) == 15  # train and held-out are disjoint records
        assert all(f"user{int(t.split('Task ')[1].split(':')[0]) % 4}" == c.client_id for t in texts)
    assert data.unseen_clients[0].train == [] and len(data.unseen_clients[0].heldout) == 15
    again = load_instructions(path, tok, partition="field", heldout_fraction=0.2, unseen_clients=1, seed=0)
    assert [c.client_id for c in again.unseen_clients] == [c.client_id for c in data.unseen_clients]

    batch = collate_clients([c.train[:2] for c in data.train_clients], pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["seg_lens"].tolist() == [2, 2, 2]
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == tok.pad_token_id).all()


def test_load_instructions_dirichlet_and_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(80, categories=4))
    data = load_instructions(path, tok, partition="dirichlet", num_clients=5, alpha=0.5, heldout_fraction=0.0)
    assert sum(c.num_examples for c in data.train_clients) == 80
    with pytest.raises(ValueError, match="needs num_clients"):
        load_instructions(path, tok, partition="iid")
    with pytest.raises(ValueError, match="partition must be"):
        load_instructions(path, tok, partition="zipf", num_clients=2)
    with pytest.raises(ValueError, match="'group' is missing"):
        load_instructions(path, tok, partition="field", client_field="group")
