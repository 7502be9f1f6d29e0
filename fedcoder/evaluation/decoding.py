"""fedcoder's decoding loop: a batch's prompts in one forward pass, then one token a step.

Why not transformers' `generate`: at the batch sizes evaluation runs, a decoding step of
Phi-4-mini gives the GPU about 26 ms of work, but Python takes about 67 ms to launch its
~1,500 kernels (docs/performance.md), so the GPU mostly waits. A CUDA graph launches a
captured step at once. It needs every tensor the step reads to keep its address, and
the step not to depend on Python values that change: here the KV cache is allocated
once (`SlotCache`), and the next token, its position, its cache slot and the attention
mask are tensors on the device that the loop updates in place. `generate` offers this
only through `torch.compile`, which compiles for 40 s or more for each batch shape.

On a CPU, or with `cuda_graphs=False`, the same loop runs each step eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from transformers import PreTrainedModel, TemperatureLogitsWarper, TopPLogitsWarper

from fedcoder.evaluation.kv_cache import SlotCache, cache_kwarg

log = logging.getLogger(__name__)

# Stop strings are checked every this many steps: decoding every row's newest tokens
# costs the host as much as a step, and a batch whose rows all hit a stop string runs
# at most this many steps too many.
CHECK_EVERY = 8


class StopCheck(Protocol):
    """Says which rows have completed a stop string, from their newest tokens."""

    lookback: int  # tokens that a stop string completed by the newest token can span

    def __call__(self, rows: list[int], tails: list[list[int]]) -> list[bool]: ...


# Next tokens (rows) from float32 logits (rows x vocabulary).
Chooser = Callable[[torch.Tensor], torch.Tensor]


def sampler(greedy: bool, temperature: float, top_p: float) -> Chooser:
    """Next tokens from float32 logits (rows x vocabulary), as `generate` would draw them.

    transformers' own warpers, in `generate`'s order and on its conditions, so that a
    seeded run draws the tokens `generate` draws.
    """
    if greedy:
        return lambda logits: logits.argmax(dim=-1)
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def draw(logits: torch.Tensor) -> torch.Tensor:
        for warp in warpers:
            logits = warp(None, logits)  # neither warper reads the tokens so far
        return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)

    return draw


def decode(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    choose: Chooser,
    stop_check: StopCheck | None = None,
    cuda_graphs: bool = True,
) -> list[list[int]]:
    """The tokens generated for each prompt, at least up to its end.

    A row ends at an EOS, at its budget of new tokens, or when `stop_check` finds a stop
    string; the loop ends when every row has. Rows are returned with as many tokens as
    the batch ran steps, so the caller cuts each at its own end.
    """
    device = model.device
    if device.type == "cuda":
        # The previous batch's cache, freed but still held by PyTorch's allocator in blocks
        # of its own size, would otherwise fragment memory under this batch's (45 GB for
        # MBPP at batch 168 on Phi-4-mini: an out-of-memory error on 80 GB).
        torch.cuda.empty_cache()
    rows, width, steps = len(prompts), max(map(len, prompts)), max(budgets)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    real = torch.arange(width, device=device) >= (width - lengths)[:, None]  # left padding
    dtype = model.get_input_embeddings().weight.dtype  # what the layers compute in
    # Row r's prompt fills slots [width - len(r), width) and its t-th new token slot
    # (width + t) % capacity: past the end they wrap into the left padding, which is
    # widest for the shortest prompts, the rows with the most new tokens. So the cache
    # holds the longest row, not the widest prompt plus the most new tokens (for MBPP's
    # longest prompts at batch 168, 45 GB rather than 61). The last token chosen is never
    # fed back, so it needs no slot.
    capacity = max(len(p) + b - 1 for p, b in zip(prompts, budgets, strict=True))
    cache = SlotCache(model.config, rows, max(width, capacity), dtype, device)
    # Additive masks (0: attend, the dtype's minimum: do not), which every attention
    # implementation in transformers takes; a boolean one would be added as 0/1 by some.
    hidden = torch.finfo(dtype).min
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # A padding position attends to itself: a query that sees nothing gets NaN, and its
    # NaN keys and values would poison the real rows' attention even at zero weight.
    seen = real[:, None, None, :] & causal | torch.eye(width, dtype=torch.bool, device=device)
    prompt_mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, hidden)
    cursor = cache.cursor
    cursor.slots, cursor.window, cursor.filled = torch.arange(width, device=device), width, width
    logits = _forward(model, ids, (real.cumsum(-1) - 1).clamp(min=0), prompt_mask, cache)

    # mask[r, 0, 0, j]: whether row r's next token may attend to cache slot j.
    mask = torch.full((rows, 1, 1, cursor.capacity), hidden, dtype=dtype, device=device)
    mask[:, 0, 0, :width].masked_fill_(real, 0)
    token = ids[:, -1:].clone()
    position = lengths[:, None] - 1
    cursor.slots = torch.zeros(1, dtype=torch.long, device=device)
    step = _Step(model, token, position, mask, cache, cuda_graphs and device.type == "cuda")
    chosen_tokens = torch.empty(rows, steps, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    budget = torch.tensor(list(budgets), device=device)
    eos = torch.tensor(list(eos_ids), device=device)
    unchecked = list(range(rows)) if stop_check is not None else []
    for t in range(steps):
        chosen = choose(logits.float())
        chosen_tokens[:, t] = chosen
        done |= torch.isin(chosen, eos) | (budget <= t + 1)
        if t == steps - 1:
            break
        if (t + 1) % CHECK_EVERY == 0:
            unchecked = _check_stops(stop_check, chosen_tokens[:, : t + 1], done, unchecked)
        # Waits for the GPU, but with the step replayed from a graph the host has little
        # else to do, and a batch whose rows all ended runs no step too many.
        if bool(done.all()):
            break
        token.copy_(chosen[:, None])
        position += 1
        # This slot is free in every row still running; a done row may overwrite its prompt.
        slot = (width + t) % cursor.capacity
        cursor.slots.fill_(slot)
        mask[..., slot] = 0
        cursor.filled = min(cursor.capacity, width + t + 1)
        cursor.window = cursor.window_for(cursor.filled)
        logits = step()
    return chosen_tokens[:, : t + 1].tolist()


def _check_stops(
    stop_check: StopCheck | None, chosen: torch.Tensor, done: torch.Tensor, unchecked: list[int]
) -> list[int]:
    """Mark done the rows that completed a stop string; return those still to check."""
    if stop_check is None or not unchecked:
        return unchecked
    finished = done.tolist()
    unchecked = [row for row in unchecked if not finished[row]]
    if not unchecked:
        return unchecked
    # Any stop string completed since the last check lies within these tokens.
    tails = chosen[unchecked, -(CHECK_EVERY + stop_check.lookback) :].tolist()
    hits = stop_check(unchecked, tails)
    stopped = [row for row, hit in zip(unchecked, hits, strict=True) if hit]
    if stopped:
        done[stopped] = True
    return [row for row, hit in zip(unchecked, hits, strict=True) if not hit]


def _forward(
    model: PreTrainedModel,
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache: SlotCache,
) -> torch.Tensor:
    """The logits of each row's last position."""
    output = model(
        input_ids=ids,
        position_ids=positions,
        attention_mask=mask,  # 4-D, so transformers uses it as it is
        use_cache=True,
        logits_to_keep=1,
        **cache_kwarg(cache),
    )
    return output.logits[:, -1]


class _Step:
    """One decoding step, eager, or replayed from a CUDA graph captured per cache window."""

    def __init__(
        self,
        model: PreTrainedModel,
        token: torch.Tensor,
        position: torch.Tensor,
        mask: torch.Tensor,
        cache: SlotCache,
        cuda_graphs: bool,
    ) -> None:
        self.model, self.token, self.position = model, token, position
        self.mask, self.cache = mask, cache
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = (
            {} if cuda_graphs else None
        )

    def __call__(self) -> torch.Tensor:
        window = self.cache.cursor.window
        if self.graphs is None:
            return self._eager(window)
        if window not in self.graphs:
            try:
                self._capture(window)
            except RuntimeError as err:  # an operation that a graph cannot hold
                log.warning("decoding without CUDA graphs: capturing a step failed: %s", err)
                self.graphs = None
                return self._eager(window)
        graph, logits = self.graphs[window]
        graph.replay()
        return logits

    def _eager(self, window: int) -> torch.Tensor:
        mask = self.mask[..., :window]
        return _forward(self.model, self.token, self.position, mask, self.cache)

    def _capture(self, window: int) -> None:
        # A window is never used again once the next one starts: free its graph's memory.
        self.graphs.clear()
        # The warm-up runs the step for real (rewriting the same slot with the same keys
        # and values) so that lazy set-up, such as cuBLAS workspaces, is not captured.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager(window)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._eager(window)
        self.graphs[window] = (graph, logits)
