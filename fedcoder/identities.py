"""Which data each node trains on, asked once per node.

Node ids change every time a simulation or a SuperNode starts, so the server
samples clients by what they train on (e.g. "data.jsonl partition 00003/10"),
which is what makes a run, and a run resumed after a crash, sample the same
data in each round. Each node says it in reply to a query message, which the
ClientApp answers without its model.

The ServerApp asks as soon as it starts, before it imports torch and builds the
initial adapter, and collects the answers when it first samples: a worker that
will keep its model starts loading it when it answers (`fedcoder.client_app`),
so client and server start-up overlap instead of following each other.

Imports Flower only, so that asking costs the ServerApp no import time.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcoder.messaging import Asked, collect, push

IDENTITY_KEY = "data-identity"
ANSWER_TIMEOUT_S = 300.0


class NodeIdentities:
    """The data identity of each node that has answered, and the questions still out."""

    def __init__(self) -> None:
        self.known: dict[int, str] = {}
        self._asked: Asked = {}

    def name(self, node_id: int) -> str:
        """What a node trains on, or its id if it never said."""
        return self.known.get(node_id, f"node {node_id}")

    def ask(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Send the query to every node among `node_ids` not known or asked yet; don't wait."""
        waiting = set(self._asked.values())
        new = [node for node in node_ids if node not in self.known and node not in waiting]
        if new:
            self._asked.update(push(grid, [_query(node) for node in new]))

    def collect(self, grid: Grid, timeout: float = ANSWER_TIMEOUT_S) -> None:
        """Wait for the answers to every question out; a node that does not answer in
        time stays unknown, and a later `ask` asks it again."""
        if not self._asked:
            return
        for reply in collect(grid, self._asked, timeout=timeout):
            if not reply.has_error() and "identity" in reply.content:
                identity = reply.content["identity"].get(IDENTITY_KEY)
                if isinstance(identity, str):
                    self.known[reply.metadata.src_node_id] = identity
        self._asked = {}


def _query(node_id: int) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY)
