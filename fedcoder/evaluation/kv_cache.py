"""A key/value cache for batched decoding, preallocated and written in place.

transformers' default `DynamicCache` appends each step's keys and values with
`torch.cat`, which copies the whole cache of every layer at every step: at batch
168 and a context of 1,000 tokens that is about 44 GB of memory traffic a step
for Phi-4-mini, several times the weights themselves. `StaticCache` avoids the
copy but attends over its full length from the first step, and it learns where
to write from arguments whose names change between transformers releases.

`SlotCache` holds one buffer per layer, allocated once for the whole batch. The
decoding loop says, through the cache's `Cursor`, where the next keys and values
go (`slots`, a tensor on the device, so that a CUDA graph captured once replays
correctly at every step) and how much of the buffer attention sees (`window`,
grown in blocks, so attention covers little more than the tokens there are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

BLOCK_TOKENS = 256


@dataclass
class Cursor:
    """What the decoding loop tells every layer of a `SlotCache` before a forward pass.

    Layers hold the cursor rather than the cache, so that no reference cycle keeps a
    batch's buffers (tens of GB on a GPU) alive until the garbage collector runs.
    """

    capacity: int  # positions a row can hold
    slots: torch.Tensor  # where the next forward pass's tokens go
    window: int = 0  # positions attention sees; must cover every slot written
    filled: int = 0  # tokens written, which transformers may ask for

    def window_for(self, tokens: int) -> int:
        """The window that covers `tokens` positions: whole blocks, at most the capacity.

        Growing in blocks keeps a step's attention close to the tokens there are while
        changing the window, and with it the shapes of a step, only once a block.
        """
        return min(self.capacity, -(-tokens // BLOCK_TOKENS) * BLOCK_TOKENS)


class SlotLayer(DynamicLayer):
    """One decoder layer's keys and values: views of the cache's buffers."""

    def __init__(self, cursor: Cursor, key_buffer: torch.Tensor, value_buffer: torch.Tensor):
        super().__init__()
        self.cursor, self.key_buffer, self.value_buffer = cursor, key_buffer, value_buffer
        self.device, self.dtype = key_buffer.device, key_buffer.dtype
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, heads, _, dim = self.key_buffer.shape
        if key_states.shape[:2] != (rows, heads) or key_states.shape[-1] != dim:
            raise ValueError(
                f"the model's keys have shape {tuple(key_states.shape)}; the cache holds "
                f"{rows} rows x {heads} key/value heads x {dim} dimensions"
            )
        self.key_buffer.index_copy_(-2, self.cursor.slots, key_states)
        self.value_buffer.index_copy_(-2, self.cursor.slots, value_states)
        self.keys = self.key_buffer[..., : self.cursor.window, :]
        self.values = self.value_buffer[..., : self.cursor.window, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cursor.filled

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SlotCache is for sampling, which never crops its cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SlotCache is for sampling, not beam search")


class SlotCache(Cache):
    """Keys and values of `capacity` positions for each of `rows` rows, in every layer.

    All layers' keys are one tensor, and all values another, allocated before the
    prompts' forward pass: allocated layer by layer between that pass's activations,
    a 45 GB cache (MBPP at batch 168 on Phi-4-mini) fragmented memory enough to run an
    80 GB GPU out of it. The caller moves `cursor` before each forward pass; the
    attention mask is the caller's too, and must hide the slots not yet written.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        rows: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        config = config.get_text_config()
        heads = config.num_key_value_heads or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, rows, heads, capacity, dim)
        # Zeros, not empty: masked-out slots are still multiplied by a zero weight, and
        # uninitialised memory may hold NaN, which a zero weight does not cancel.
        keys = torch.zeros(shape, dtype=dtype, device=device)
        values = torch.zeros(shape, dtype=dtype, device=device)
        self.cursor = Cursor(capacity, slots=torch.zeros(1, dtype=torch.long, device=device))
        super().__init__(
            layers=[SlotLayer(self.cursor, k, v) for k, v in zip(keys, values, strict=True)]
        )


def cache_kwarg(cache: Cache) -> dict[str, Cache]:
    """`cache` as a model's forward takes it: named `cache` from transformers 5.24, before
    that `past_key_values` (which 5.24 still takes, with a deprecation warning)."""
    renamed = Version(transformers.__version__) >= Version("5.24")
    return {"cache" if renamed else "past_key_values": cache}
