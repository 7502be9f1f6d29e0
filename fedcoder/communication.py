"""Adapter payloads on the wire, and honest accounting of their size.

Also the message exchange itself (`send_and_receive`). Adapters travel as
Flower `ArrayRecord`s. numpy has no bfloat16, so a bf16
transport sends the raw 16-bit patterns as int16 arrays; both ends know the
transport dtype from the run config. Sizes are counted from the records that
are actually sent, in both directions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

MIB = 2**20

_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encode(state: dict[str, torch.Tensor], transport_dtype: str = "float32") -> ArrayRecord:
    """Pack adapter tensors for sending, cast to the transport dtype."""
    dtype = _WIRE_DTYPES[transport_dtype]
    packed = {}
    for key, tensor in state.items():
        wire = tensor.detach().to("cpu", dtype).contiguous()
        packed[key] = wire.view(torch.int16) if dtype is torch.bfloat16 else wire
    return ArrayRecord(packed)


def wire_dtype(transport_dtype: str) -> str:
    """The numpy dtype name an encoded array carries on the wire."""
    return "int16" if transport_dtype == "bfloat16" else transport_dtype


def decode(record: ArrayRecord, transport_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Unpack a received adapter into float32 tensors."""
    state = record.to_torch_state_dict()
    if transport_dtype == "bfloat16":
        return {key: value.view(torch.bfloat16).float() for key, value in state.items()}
    return {key: value.float() for key, value in state.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of a record as Flower counts them (array data + .npy header + key name)."""
    return record.count_bytes()


def raw_bytes(record: ArrayRecord) -> int:
    """Bytes of the tensor data alone, without headers or key names."""
    return sum(array.numpy().nbytes for array in record.values())


@dataclass
class CommunicationLog:
    """Cumulative bytes sent to (down) and received from (up) the clients."""

    bytes_down: int = 0
    bytes_up: int = 0

    @property
    def total_bytes(self) -> int:
        return self.bytes_down + self.bytes_up

    @property
    def total_mb(self) -> float:
        """FlowerTune's "MB": bytes / 2**20 (really MiB)."""
        return self.total_bytes / MIB

    @property
    def total_gb(self) -> float:
        """FlowerTune's leaderboard "GB": its MB / 1000."""
        return self.total_mb / 1000


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None, poll_s: float = 0.2
) -> list[Message]:
    """Push messages and collect their replies as soon as they arrive.

    In a deployment, Flower 1.42's `Grid.send_and_receive` (its HTTP grid) sleeps
    3 s between pulls, so every exchange ends up to 3 s (1.5 s on average) after
    its last reply came in, in every round. This pulls every `poll_s` seconds, as
    Flower's in-memory grid of the simulation engine does (0.1 s). Replies not in
    by `timeout` (None: wait for all) are left out, as Flower does.

    When a node is gone, the SuperLink answers for it with an error reply whose
    source is the SuperLink itself; such a reply is credited to the node that was
    asked, so records name the node that failed.
    """
    messages = list(messages)
    message_ids = list(grid.push_messages(messages))
    asked = {mid: m.metadata.dst_node_id for mid, m in zip(message_ids, messages, strict=True)}
    pending = set(message_ids)
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
