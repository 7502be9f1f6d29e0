"""A key/value cache for batched sampling that is written in place.

transformers' default `DynamicCache` appends each step's keys and values with
`torch.cat`, which copies the whole cache of every layer at every step: at batch
168 and a context of 1,000 tokens that is about 44 GB of memory traffic a step
for Phi-4-mini, several times the weights themselves. `StaticCache` avoids the
copy but attends over its full preallocated length from the first step and is
meant to be paired with `torch.compile`, which recompiles for every batch shape.

`GrowingCache` keeps a buffer per layer that grows in blocks, writes each step
into it, and hands attention a view of the filled part: no copy per step, and
attention only over the tokens there are.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, DynamicLayer

BLOCK_TOKENS = 256


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a buffer grown in blocks."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = key_states.new_empty(0)
        self._value_buffer = value_states.new_empty(0)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self._key_buffer.numel() == 0 or end > self._key_buffer.shape[-2]:
            capacity = -(-end // BLOCK_TOKENS) * BLOCK_TOKENS
            self._key_buffer = _grown(self._key_buffer, key_states, start, capacity)
            self._value_buffer = _grown(self._value_buffer, value_states, start, capacity)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingCache is for sampling, which never crops its cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("GrowingCache is for sampling, not beam search")


def _grown(buffer: torch.Tensor, like: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
    shape = (*like.shape[:-2], capacity, like.shape[-1])
    grown = like.new_empty(shape)
    if filled:
        grown[..., :filled, :] = buffer[..., :filled, :]
    return grown


class GrowingCache(Cache):
    """A cache of `GrowingLayer`s, one per decoder layer, made as the model first calls it."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)


def as_generate_kwargs(cache: Cache) -> dict[str, Cache]:
    """`cache` as `generate` takes it: named `cache` from transformers 5.24, before that
    `past_key_values` (which 5.24 still takes, with a deprecation warning)."""
    renamed = Version(transformers.__version__) >= Version("5.24")
    return {"cache" if renamed else "past_key_values": cache}
