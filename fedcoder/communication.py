"""Adapter payloads on the wire, and honest accounting of their size.

Adapters travel as Flower `ArrayRecord`s (the exchange itself is
`fedcoder.messaging`). numpy has no bfloat16, so a bf16
transport sends the raw 16-bit patterns as int16 arrays; both ends know the
transport dtype from the run config. Sizes are counted from the records that
are actually sent, in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

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
