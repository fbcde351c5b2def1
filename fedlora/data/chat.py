"""Multi-turn conversations as supervised examples: the model's chat template, loss on assistant turns only.

A conversation (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``)
is rendered turn by turn. With a chat template, the text each turn adds is the
difference between the renderings of the conversation up to it and up to the
turn before; an assistant turn is split once more at the generation prompt
(``<|im_start|>assistant\\n`` for ChatML), which stays unlabelled, so the labels
cover exactly the reply and the template's own end-of-turn marker (the model
learns to stop). Each piece is tokenized on its own so a BPE merge can never
blur the boundary. Without a chat template a plain format is used.
"""
from __future__ import annotations

from collections.abc import Sequence

from .clients import IGNORE_INDEX, Example, make_example

ROLES = ("system", "user", "assistant")
PLAIN_HEADERS = {"system": "### System:\n", "user": "### Human:\n", "assistant": "### Assistant:\n"}
# A token is rarely longer than this many characters; a piece is cut to
# (tokens still needed) * this before tokenizing, so a 50,000-character paste
# costs no more than the part of it that can fit (and is re-tokenized whole if the cut shows).
_CHARS_PER_TOKEN_BOUND = 16


def check_messages(messages: Sequence[dict]) -> None:
    """Reject anything but {"role": one of ROLES, "content": str} turns with a user turn before an assistant turn."""
    if not messages:
        raise ValueError("conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"turn {i}: expected {{'role', 'content'}}, got {m!r:.80}")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ValueError(f"turn {i}: role must be one of {ROLES} and content a string")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles or "user" not in roles[: roles.index("assistant")]:
        raise ValueError("conversation has no user turn followed by an assistant turn")


def _pieces(tokenizer, messages: Sequence[dict]):
    """Yield ``(text, is_answer)`` pieces whose concatenation is the rendered conversation."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        if tokenizer.bos_token:
            yield tokenizer.bos_token, False
        for m in messages:
            if m["role"] == "assistant":
                yield PLAIN_HEADERS["assistant"], False
                yield m["content"] + (tokenizer.eos_token or "") + "\n\n", True
            else:
                yield PLAIN_HEADERS[m["role"]] + m["content"] + "\n\n", False
        return

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(list(messages[:upto]), tokenize=False,
                                             add_generation_prompt=generation_prompt)

    previous = ""
    for k, m in enumerate(messages):
        full = render(k + 1)
        if m["role"] == "assistant":
            prompt = render(k, generation_prompt=True) if k else previous
            if not (prompt.startswith(previous) and full.startswith(prompt)):
                raise ValueError("the tokenizer's chat template re-renders earlier turns (not prefix-stable); "
                                 "assistant-only labels need one that only appends")
            yield prompt[len(previous):], False
            yield full[len(prompt):], True
        else:
            if not full.startswith(previous):
                raise ValueError("the tokenizer's chat template re-renders earlier turns (not prefix-stable); "
                                 "assistant-only labels need one that only appends")
            yield full[len(previous):], False
        previous = full


def _tokenize(tokenizer, text: str, needed: int | None) -> list[int]:
    """Token ids of ``text``; when only ``needed`` ids can be used, only a prefix long enough for them."""
    limit = None if needed is None else needed * _CHARS_PER_TOKEN_BOUND + 64
    if limit is not None and len(text) > limit:
        ids = tokenizer(text[:limit], add_special_tokens=False)["input_ids"]
        # The tokens of a prefix match the whole text's except near the cut: keep a margin past it.
        if len(ids) >= needed + 8:
            return list(ids)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_conversation(tokenizer, messages: Sequence[dict], max_len: int) -> Example:
    """One example of at most ``max_len`` tokens; labels are the assistant tokens, -100 elsewhere.

    Long conversations keep their start; when the first reply would begin past
    ``max_len`` (a long pasted prompt), the prompt is cut from the left so the
    example keeps its last ``max_len - k`` prompt tokens and ``k`` reply tokens,
    ``k = min(tokens from the reply on, max_len // 2)``: every conversation with a reply
    yields exactly one example that trains on some of it.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    check_messages(messages)
    ids: list[int] = []
    labels: list[int] = []
    first_answer = None
    for text, is_answer in _pieces(tokenizer, messages):
        # Tokens still useful: up to max_len from the first reply token on; the whole prompt before it
        # (a long prompt is cut from the left below, so its end is needed).
        if first_answer is None:
            needed = max_len if is_answer else None
        else:
            needed = first_answer + max_len - len(ids)
        piece = _tokenize(tokenizer, text, needed)
        if is_answer and first_answer is None and piece:
            first_answer = len(ids)
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
        if first_answer is not None and len(ids) >= first_answer + max_len:
            break
    if first_answer is None:  # only possible with an empty reply and a template that adds no end marker
        raise ValueError("conversation renders no assistant token")
    if first_answer < max_len:
        start = 0
    else:
        start = first_answer - (max_len - min(len(ids) - first_answer, max_len // 2))
    return make_example(ids[start:start + max_len], labels[start:start + max_len])
