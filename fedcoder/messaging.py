"""Pushing messages to nodes and collecting their replies.

Flower 1.42's `Grid.send_and_receive` pushes and waits in one call, and in a
deployment (its HTTP grid) it sleeps 3 s between pulls, so every exchange ends
up to 3 s (1.5 s on average) after its last reply came in. Here pushing and
collecting are two steps, so the server can do other work while nodes answer
(`fedcoder.identities` asks them before the server loads its own stack), and
replies are pulled every 0.2 s, or every 0.05 s from the Simulation Engine's in-memory
grid, where a pull is a dictionary lookup (Flower's own waits 0.1 s).

Imports Flower only: the ServerApp uses it before it imports torch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

# The node each pushed message went to, by message id.
Asked = dict[str, int]


def push(grid: Grid, messages: Iterable[Message]) -> Asked:
    """Send `messages`; return which node each was sent to, for `collect`."""
    messages = list(messages)
    message_ids = grid.push_messages(messages)
    return {mid: m.metadata.dst_node_id for mid, m in zip(message_ids, messages, strict=True)}


def collect(grid: Grid, asked: Asked, *, timeout: float | None) -> list[Message]:
    """The replies to the `asked` messages, pulled as they arrive.

    Replies not in by `timeout` seconds (None: wait for all) are left out, as
    Flower does. When a node is gone, the SuperLink answers for it with an error
    reply whose source is the SuperLink itself; such a reply is credited to the
    node that was asked, so records name the node that failed.
    """
    poll_s = 0.05 if in_memory(grid) else 0.2
    pending = set(asked)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        pulled = list(grid.pull_messages(pending))
        for reply in pulled:
            node = asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            # Metadata has no setter; Flower's own grids write its fields the same way.
            reply.metadata.__dict__["_src_node_id"] = node
        replies.extend(pulled)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
        left = None if deadline is None else deadline - time.monotonic()
        if not pending or (left is not None and left <= 0):
            break
        time.sleep(poll_s if left is None else min(poll_s, left))
    return replies


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None
) -> list[Message]:
    """Push `messages` and collect their replies (see `collect`)."""
    return collect(grid, push(grid, messages), timeout=timeout)


def in_memory(grid: Grid) -> bool:
    """Whether `grid` is the Simulation Engine's, in this process (an InMemoryGrid)."""
    # Looked up in sys.modules: importing Flower's SuperLink package would cost a deployed
    # ServerApp half a second, and where it is not imported, no grid is one.
    module = sys.modules.get("flwr.superlink.grid")
    return module is not None and isinstance(grid, module.InMemoryGrid)
