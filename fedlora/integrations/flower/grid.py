"""A Flower Grid that stops waiting for nodes that have left the federation.

Flower's ``send_and_receive`` waits for every reply until the round timeout. A node that
has left (a SuperNode stopped or killed, no longer among ``get_node_ids()``) cannot reply,
so once every outstanding reply is owed by such nodes the round goes on without waiting
out the timeout; the strategy reports them missing. Everything else is the wrapped Grid's.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class DepartureAwareGrid(Grid):
    """Wraps ``grid``; ``poll_s``: how often replies are pulled and departures looked for."""

    def __init__(self, grid: Grid, poll_s: float = 0.5):
        self.grid, self.poll_s = grid, poll_s

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        owed = {i: m.metadata.dst_node_id for i, m in zip(ids, messages) if i}  # message id -> node
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while owed:
            got = list(self.grid.pull_messages(list(owed)))
            for reply in got:
                owed.pop(reply.metadata.reply_to_message_id, None)
            replies += got
            if not owed or (deadline is not None and time.monotonic() >= deadline):
                break
            connected = set(self.grid.get_node_ids())
            if not any(node in connected for node in owed.values()):
                break  # only nodes that left owe replies: none can come
            time.sleep(self.poll_s)  # the Grid has no blocking receive
        return replies
