"""ShareGPT: the truncated-array parser, records, the derived partition signal, chat-template labels, lazy clients."""
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.data import IGNORE_INDEX
from fedlora.data import sharegpt as sg
from fedlora.data.chat import encode_conversation
from fedlora.data.json_stream import ArrayEnd, iter_json_array, read_span
from fedlora.models import byte_tokenizer

from .test_data_instructions import CHATML


# ---------------------------------------------------------------- the streaming parser

def parse(raw: bytes, **kw):
    end = ArrayEnd()
    out = list(iter_json_array(io.BytesIO(raw), end, **kw))
    return out, end


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3),
                           max_leaves=6)


@settings(max_examples=60, deadline=None)
@given(elements=st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=3), min_size=1, max_size=6),
       indent=st.sampled_from([None, 2]), chunk=st.integers(1, 9), data=st.data())
def test_truncated_array_yields_exactly_the_complete_elements(elements, indent, chunk, data):
    # Objects only: an object is complete exactly when its closing brace is in the file, so the
    # expected output is decidable (a bare number cut at the end would be ambiguous).
    raw = json.dumps(elements, indent=indent, ensure_ascii=False).encode("utf-8")
    cut = data.draw(st.integers(0, len(raw)), label="cut")
    truncated = raw[:cut]
    if not truncated.strip():
        with pytest.raises(ValueError, match="empty file"):
            parse(truncated)
        return
    got, end = parse(truncated, chunk_bytes=chunk)
    # Reference: where each element ends in the full file, found by re-serializing the prefix.
    decoder = json.JSONDecoder()
    text = raw.decode("utf-8")
    pos, spans = text.index("[") + 1, []
    for _ in elements:
        while text[pos] in " \n,":
            pos += 1
        _, stop = decoder.raw_decode(text, pos)
        spans.append((len(text[:pos].encode()), len(text[:stop].encode())))
        pos = stop
    expected = [(e, a, b) for e, (a, b) in zip(elements, spans) if b <= cut]
    assert got == expected
    assert end.elements == len(expected)
    assert end.complete == (cut == len(raw))
    if len(expected) < len(elements) and cut > spans[len(expected)][0]:
        assert end.truncated_bytes == cut - spans[len(expected)][0]  # the cut element's bytes
    else:
        assert end.truncated_bytes == 0


def test_spans_reread_and_multibyte_across_chunks(tmp_path):
    rows = [{"id": f"x{i}", "v": "é中🙂" * i} for i in range(6)]
    raw = json.dumps(rows, indent=2, ensure_ascii=False).encode()
    path = tmp_path / "a.json"
    path.write_bytes(raw[:-30])  # inside the last element
    with path.open("rb") as fh:
        end = ArrayEnd()
        got = list(iter_json_array(fh, end, chunk_bytes=3))  # 3 bytes: every 4-byte emoji is split
    assert [e for e, _, _ in got] == rows[:5] and not end.complete and end.truncated_bytes > 0
    assert [read_span(path, a, b) for _, a, b in got] == rows[:5]


def test_parser_rejects_what_is_not_a_cut_array():
    with pytest.raises(ValueError, match=r"byte 0: expected '\['"):
        parse(b'{"a": 1}')
    with pytest.raises(ValueError, match=r"byte 10: expected ',', found '{'"):
        parse(b'[{"a": 1} {"b": 2}]')
    # A broken element followed by more data than one element may hold is malformed, not cut off.
    with pytest.raises(ValueError, match="does not decode within 16 bytes"):
        parse(b'[{"a": tru}, ' + b'{"b": 1}, ' * 10 + b']', max_element_bytes=16, chunk_bytes=4)
    with pytest.raises(ValueError, match="empty file"):
        parse(b"  \n")
    got, end = parse(b'[{"a": 12345}, 678]', chunk_bytes=2)  # numbers cut by chunk boundaries
    assert [e for e, _, _ in got] == [{"a": 12345}, 678] and end.complete


# ---------------------------------------------------------------- records and categories

def turn(who, text):
    return {"from": who, "value": text}


def test_conversation_messages_roles_and_trimming():
    rec = {"id": "a_1", "conversations": [turn("gpt", "...continued"), turn("system", "be brief"),
                                          turn("human", "hi"), turn("chatgpt", "hello"), turn("user", "more?")]}
    # The reply before any question and the unanswered last question are dropped; system turns ahead stay.
    assert sg.conversation_messages(rec) == [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]
    assert sg.conversation_messages({"id": "b", "conversations": [turn("gpt", "x")]}) \
        == "no user turn followed by a reply"
    assert sg.conversation_messages({"id": "b", "conversations": []}) == "no user turn followed by a reply"
    assert sg.conversation_messages({"id": "b", "conversations": [turn("robot", "x")]}).startswith("unknown role")
    assert sg.conversation_messages({"id": 3, "conversations": []}).startswith("not an object")
    assert sg.conversation_messages({"id": "b", "conversations": [{"from": "human", "value": 5}]}) \
        .startswith("a turn without")
    assert sg.thread_key("QWJhYvA_12") == "QWJhYvA" and sg.thread_key("plain") == "plain"
    assert sg.thread_key("a_b") == "a_b"


@pytest.mark.parametrize("text, reply, category", [
    ("How do I reverse a list?", "```python\nx[::-1]\n```", "code"),
    ("Solve this equation: 2x + 3 = 7", "x = 2", "math"),
    ("Write a poem about the sea", "Waves...", "writing"),
    ("Give me a marketing plan for my startup", "1.", "business"),
    ("Explain photosynthesis", "Plants...", "knowledge"),
    ("continue", "ok", "other"),
    ("Qual é a melhor forma de aprender uma língua? Eu não sei o que fazer para começar", "...", "pt"),
    ("请用中文解释一下机器学习", "好的", "zh"),
    ("日本語で説明してください", "はい", "ja"),
])
def test_derived_category(text, reply, category):
    assert sg.derive_category([{"role": "user", "content": text}, {"role": "assistant", "content": reply}]) == category


# ---------------------------------------------------------------- a truncated ShareGPT file the test writes

def write_sharegpt(path, n_threads=24, cut=True):
    """Threads of 1-3 parts, a few records to skip, then the file cut inside one more record."""
    rng = np.random.default_rng(0)
    topics = ["Write a story about {i}", "Fix this python error {i}", "Solve the equation x + {i} = 0",
              "Qual é a melhor forma de fazer {i}? Eu não sei o que fazer para começar"]
    rows = []
    for t in range(n_threads):
        for part in range(int(rng.integers(1, 4))):
            convo = [turn("human", topics[t % 4].format(i=t)), turn("gpt", f"Answer {t}.{part} " + "z" * 30)]
            if part:
                convo = [turn("gpt", "(continued)")] + convo  # later parts start mid-reply
            rows.append({"id": f"T{t:03d}_{part}", "conversations": convo})
    rows.insert(3, {"id": "E_0", "conversations": []})                      # skipped: no reply
    rows.insert(7, {"id": "R_0", "conversations": [turn("alien", "x")]})     # skipped: unknown role
    rows.insert(9, dict(rows[1]))                                           # skipped: repeated id
    rows.append({"id": "LAST_0", "conversations": [turn("human", "will be cut"), turn("gpt", "never seen")]})
    raw = json.dumps(rows, indent=2).encode()
    if cut:
        raw = raw[: raw.rindex(b"never seen")]
    path.write_bytes(raw)
    return rows


def test_index_of_a_truncated_file(tmp_path):
    path = tmp_path / "sg.json"
    rows = write_sharegpt(path)
    index = sg.index_sharegpt(path)
    s = index.stats
    assert s["complete_records"] == len(rows) - 1 and not s["array_complete"] and s["truncated_bytes"] > 0
    assert s["skipped"] == {"no user turn followed by a reply": 1, "repeated id": 1, "unknown role 'alien'": 1}
    assert s["kept_conversations"] == len(rows) - 4 == len(index.starts)
    assert index.num_threads == 24 and s["threads"] == 24
    assert set(s["threads_per_category"]) == {"writing", "code", "math", "pt"}
    # Each indexed span re-reads as its record; parts of a thread share its number.
    kept = [r for r in rows[:-1] if r["conversations"] and r["id"] not in ("R_0",)]
    kept = [r for i, r in enumerate(kept) if r["id"] not in {k["id"] for k in kept[:i]}]
    for k, row in enumerate(kept):
        assert read_span(path, index.starts[k], index.stops[k]) == row
        assert index.thread[k] == index.thread[[sg.thread_key(r["id"]) for r in kept].index(sg.thread_key(row["id"]))]


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_partition_covers_every_conversation_once_and_keeps_threads_together(tmp_path, partition):
    path = tmp_path / "sg.json"
    write_sharegpt(path)
    index = sg.index_sharegpt(path)
    fed = sg.load_sharegpt(byte_tokenizer(), index=index, num_clients=6, partition=partition, alpha=0.5,
                           unseen_fraction=0.2, heldout_fraction=0.3, max_len=64, seed=3)
    assert fed.num_train_clients == 5 and len(fed.unseen) == 1
    train, held, unseen = fed.train.records, fed.heldout.records, fed.unseen.records
    everything = np.concatenate([train, held, unseen])
    assert sorted(everything.tolist()) == list(range(len(index.starts)))
    owner = {}
    for name, cidx in (("train", fed.train), ("heldout", fed.heldout), ("unseen", fed.unseen)):
        for j in range(len(cidx)):
            for r in cidx.records_of(j):
                key = int(index.thread[r])
                owner.setdefault(key, set()).add((name, cidx.ids[j]))
    assert all(len(v) == 1 for v in owner.values())  # a thread sits in one client and one split
    again = sg.load_sharegpt(byte_tokenizer(), index=index, num_clients=6, partition=partition, alpha=0.5,
                             unseen_fraction=0.2, heldout_fraction=0.3, max_len=64, seed=3)
    assert again.train.records.tolist() == train.tolist() and again.unseen.ids == fed.unseen.ids
    with pytest.raises(ValueError, match="partition must be 'dirichlet' or 'iid'"):
        sg.load_sharegpt(byte_tokenizer(), index=index, partition="field")
    with pytest.raises(ValueError, match=r"num_clients must be in \[1, 24\]"):
        sg.load_sharegpt(byte_tokenizer(), index=index, num_clients=25)


def test_clients_are_tokenized_only_when_used(tmp_path, monkeypatch):
    path = tmp_path / "sg.json"
    write_sharegpt(path)
    calls = []
    real = sg.encode_conversation

    def counting(tokenizer, messages, max_len):
        calls.append(messages[0]["content"])
        return real(tokenizer, messages, max_len)

    monkeypatch.setattr(sg, "encode_conversation", counting)
    fed = sg.load_sharegpt(byte_tokenizer(), path, num_clients=4, partition="iid", max_len=48)
    client = fed.train_client(1)
    assert calls == [] and len(client.train) == fed.train.size(1)
    ex = client.train[0]
    assert len(calls) == 1 and client.train[0] is ex  # kept while the client object lives
    assert ex["input_ids"].numel() <= 48 and (ex["labels"] != IGNORE_INDEX).any()
    sets = fed.eval_sets("heldout", 3)
    assert sum(len(exs) for _, exs in sets) == min(3, len(fed.heldout.records))
    assert fed.eval_sets("heldout", 3) is sets  # encoded once, reused every round
    with pytest.raises(ValueError, match="split must be"):
        fed.eval_sets("train", 3)


# ---------------------------------------------------------------- chat template and labels

def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    return tok


def test_labels_cover_exactly_the_replies_and_their_end_markers():
    tok = chat_tokenizer()
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "bye now"}]
    ex = encode_conversation(tok, messages, max_len=512)
    text = tok.apply_chat_template(messages, tokenize=False)
    # The byte tokenizer has no merges: token i is byte i, so labels can be checked by character spans.
    assert tok.decode(ex["input_ids"]) == text
    expected = [IGNORE_INDEX] * len(text)
    for reply in ("hello<|im_end|>\n", "bye now<|im_end|>\n"):
        at = text.index("<|im_start|>assistant\n" + reply) + len("<|im_start|>assistant\n")
        expected[at:at + len(reply)] = ex["input_ids"][at:at + len(reply)].tolist()
    assert ex["labels"].tolist() == expected


def test_plain_format_without_chat_template():
    tok = byte_tokenizer()
    ex = encode_conversation(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ä"}], 512)
    assert ex["input_ids"][0] == tok.bos_token_id
    assert tok.decode(ex["input_ids"][1:]) == "### Human:\nq\n\n### Assistant:\nä</s>\n\n"
    assert tok.decode(ex["input_ids"][ex["labels"] != IGNORE_INDEX]) == "ä</s>\n\n"


def test_truncation_keeps_the_start_or_cuts_a_long_prompt_from_the_left():
    tok = chat_tokenizer()
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r" * 100}]
    ex = encode_conversation(tok, short, max_len=80)  # the prompt is 47 bytes: the reply starts inside
    full = encode_conversation(tok, short, max_len=4096)
    assert ex["input_ids"].tolist() == full["input_ids"][:80].tolist()
    assert ex["labels"].tolist() == full["labels"][:80].tolist()
    long_prompt = [{"role": "user", "content": "p" * 300 + "END"}, {"role": "assistant", "content": "abcdef"}]
    ex = encode_conversation(tok, long_prompt, max_len=80)
    reply_tokens = len("abcdef<|im_end|>\n")  # 17 < 80 // 2: the whole reply is kept
    assert ex["input_ids"].numel() == 80
    assert tok.decode(ex["input_ids"][-reply_tokens:]) == "abcdef<|im_end|>\n"
    assert tok.decode(ex["input_ids"][:-reply_tokens]).endswith("END<|im_end|>\n<|im_start|>assistant\n")
    assert (ex["labels"] != IGNORE_INDEX).sum() == reply_tokens
    long_both = [{"role": "user", "content": "p" * 300}, {"role": "assistant", "content": "r" * 300}]
    ex = encode_conversation(tok, long_both, max_len=40)
    assert (ex["labels"] != IGNORE_INDEX).sum() == 20  # max_len // 2 reply tokens


def test_chat_rejects_bad_conversations_and_unstable_templates():
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match="no user turn followed by an assistant turn"):
        encode_conversation(tok, [{"role": "assistant", "content": "x"}], 64)
    with pytest.raises(ValueError, match="role must be one of"):
        encode_conversation(tok, [{"role": "bot", "content": "x"}], 64)
    tok.chat_template = ("{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="not prefix-stable"):
        encode_conversation(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], 64)
