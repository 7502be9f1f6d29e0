"""CUDA graphs of a training micro-batch: its forward and backward, recorded once, replayed.

Why: a step of the 4-bit DoRA recipe launches about 15,000 small kernels from Python
(PEFT's and bitsandbytes' per-layer code, autograd), and the GPU waits on the host for most
of the step (docs/performance.md). A CUDA graph records a micro-batch's kernels once and
replays them all with one launch, so the step runs at the GPU's pace. The kernels, their
order and their inputs are those of the eager step, so the math is the same; dropout draws
from the same generator (its masks are the graph's own draws, repeatable from the seed).

How: a graph replays fixed shapes, so packed micro-batches are padded to full rows of
`train.seq-length` tokens (the padding is a segment of its own, without labels, as
`fedcoder.data.collate_packed` makes it) and the loss covers every position with a 0/1
weight instead of gathering the labelled ones; only the number of rows then varies, and
there is one graph per row count. A row count runs eagerly the first time it occurs (that
run trains like any other and is the warm-up a capture needs), and is recorded right after.
Two things run outside the graph on every replay, because they read values on the host:
the rotary embeddings (Phi-3's long-RoPE checks the longest position) and the attention
mask (transformers checks whether a batch is packed); the mask is built here from the
position ids, the same block-diagonal causal mask transformers builds for packed rows.

Anything unsupported (CPU, no packing, another attention implementation, gradient
checkpointing, a head the chunked loss does not cover) keeps the eager path, and so does a
capture that fails: the reason is logged once.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from peft import PeftModel

from fedcoder.config import TrainSettings
from fedcoder.data import IGNORE_INDEX

log = logging.getLogger(__name__)

# Decoders whose layers take (hidden, attention_mask, position_ids, position_embeddings)
# and attend causally over the whole row (checked against the sliding window below).
GRAPH_MODEL_TYPES = frozenset({"llama", "mistral", "phi3"})


def unsupported(model: PeftModel, train: TrainSettings) -> str:
    """Why this model and configuration train without CUDA graphs; "" if they can use them."""
    from fedcoder.training import plain_head

    causal_lm = model.get_base_model()
    config = causal_lm.config
    window = getattr(config, "sliding_window", None)
    device = next(p for p in model.parameters() if p.requires_grad).device
    layers = causal_lm.get_decoder().layers  # gradient checkpointing is set on each layer
    checks = [
        (not train.cuda_graphs, "train.cuda-graphs is off"),
        (device.type != "cuda", f"the model is on {device.type}"),
        (not train.packing, "train.packing is off (graphs need full rows)"),
        (config.model_type not in GRAPH_MODEL_TYPES, f"model type {config.model_type}"),
        (window is not None and window < train.seq_length, "a sliding attention window"),
        (config._attn_implementation != "sdpa", f"attention {config._attn_implementation}"),
        (
            any(getattr(layer, "gradient_checkpointing", False) for layer in layers),
            "gradient checkpointing is on",
        ),
        (any(layer._compiled_call_impl for layer in layers), "model.compile is on"),
        (plain_head(model) is None, "the loss is not the plain head's"),
    ]
    return next((why for failed, why in checks if failed), "")


def packed_inputs(
    model: PeftModel, batch: dict[str, torch.Tensor], labelled: int
) -> dict[str, torch.Tensor]:
    """A packed micro-batch on the GPU as the graph reads it (see the module docstring).

    `labelled`: the labelled tokens of the whole step, which the summed loss is divided by.
    """
    from fedcoder.training import to_device

    decoder = model.get_base_model().get_decoder()
    embeddings = decoder.get_input_embeddings().weight
    labels = batch["labels"]
    # Position t predicts label t + 1; the last position of a row predicts nothing.
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
    weights = (targets != IGNORE_INDEX).flatten()
    moved = {
        key: to_device(value, embeddings.device)
        for key, value in {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "targets": targets.flatten().clamp_min(0),
            "weights": weights.float(),
            "labelled": torch.tensor(float(labelled)),
        }.items()
    }
    cos, sin = decoder.rotary_emb(embeddings[:0], moved["position_ids"])
    attention_mask = packed_attention_mask(moved["position_ids"])
    return {**moved, "attention_mask": attention_mask, "cos": cos, "sin": sin}


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, width, width) booleans: a token sees the earlier tokens of its own example.

    An example starts wherever its position is 0, as `collate_packed` lays them out.
    """
    example = (position_ids == 0).cumsum(-1)
    same = example[:, :, None] == example[:, None, :]
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def packed_loss(model: PeftModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The micro-batch's summed loss over its labelled tokens / the step's labelled tokens.

    What the model's forward does, layer by layer, with the mask and rotary embeddings given:
    the body a graph records (and, for a row count's first micro-batch, runs eagerly).
    """
    from fedcoder.training import HeadCrossEntropy, plain_head

    decoder = model.get_base_model().get_decoder()
    hidden = decoder.get_input_embeddings()(inputs["input_ids"])
    for layer in decoder.layers[: decoder.config.num_hidden_layers]:
        hidden = layer(
            hidden,
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            position_embeddings=(inputs["cos"], inputs["sin"]),
        )
    hidden = decoder.norm(hidden).flatten(0, 1)
    head = plain_head(model)
    summed = HeadCrossEntropy.apply(hidden, head.weight, inputs["targets"], inputs["weights"])
    return summed / inputs["labelled"]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # what every replay reads: filled in before it
    loss: torch.Tensor
    grads: list[torch.Tensor]  # what every replay writes: read before the next replay
    param_addresses: list[int]


class MicroBatchGraphs:
    """One model's graphs, by row count; kept with the model, since capturing costs a step.

    All graphs share one memory pool: a replay may overwrite another graph's outputs, so a
    replay's loss and gradients are consumed (added up, or given to the parameters until
    the optimizer step) before the next replay (`_release`).
    """

    def __init__(self, model: PeftModel, bf16: bool) -> None:
        # Weak: `_graphs` is keyed by the model, so a strong reference would keep a replaced
        # resident model (and these graphs' GPU memory) alive.
        self._model = weakref.ref(model)
        self.bf16 = bf16
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs: dict[int, _Graph] = {}
        self.failed = ""
        self._pool = torch.cuda.graph_pool_handle()
        self._lent: list[torch.Tensor] = []  # graph outputs that are some .grad now

    def backward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add this micro-batch's gradient to every parameter's .grad; its loss, detached."""
        rows = inputs["input_ids"].shape[0]
        graph = self.graphs.get(rows)
        addresses = [p.data_ptr() for p in self.params]
        if graph is not None and graph.param_addresses != addresses:
            log.warning("adapter tensors moved since their CUDA graphs were captured: recapturing")
            self.graphs.clear()
            graph = None
        if graph is None:
            loss = self._eager(inputs)
            if not self.failed:
                self._capture(inputs, addresses)
            return loss
        self._release()
        for key, value in inputs.items():
            graph.inputs[key].copy_(value, non_blocking=True)
        graph.graph.replay()
        for param, grad in zip(self.params, graph.grads, strict=True):
            if param.grad is None:
                param.grad = grad
                self._lent.append(grad)
            else:
                param.grad += grad
        return graph.loss.clone()

    def _eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self._release()  # the backward may add into a lent .grad
        with self._autocast():
            loss = packed_loss(self._model(), inputs)
        loss.backward()
        return loss.detach()

    def _capture(self, inputs: dict[str, torch.Tensor], addresses: list[int]) -> None:
        self._release()
        step_grads = [p.grad for p in self.params]
        for param in self.params:
            param.grad = None  # so that the capture allocates the gradients the replay writes
        static = {key: value.clone() for key, value in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                with self._autocast():
                    loss = packed_loss(self._model(), static)
                loss.backward()
            grads = [p.grad for p in self.params]
            if any(grad is None for grad in grads):
                raise RuntimeError("some adapter tensors got no gradient")
            self.graphs[static["input_ids"].shape[0]] = _Graph(
                graph, static, loss.detach(), grads, addresses
            )
        except Exception as err:  # noqa: BLE001 - any failure leaves the eager path, which works
            self.failed = f"{type(err).__name__}: {err}"
            self.graphs.clear()
            log.warning("CUDA graph capture failed, training without graphs: %s", self.failed)
        finally:
            for param, grad in zip(self.params, step_grads, strict=True):
                param.grad = grad

    def _release(self) -> None:
        """Give a .grad that is a graph's output memory of its own, before a replay reuses it."""
        if not self._lent:
            return
        lent = {id(grad) for grad in self._lent}
        for param in self.params:
            if param.grad is not None and id(param.grad) in lent:
                param.grad = param.grad.clone()
        self._lent = []

    def _autocast(self) -> torch.autocast:
        # Autocast's cast cache would keep tensors from one replay to the next.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False)


_graphs: weakref.WeakKeyDictionary[PeftModel, MicroBatchGraphs] = weakref.WeakKeyDictionary()
_told: set[str] = set()


def forget(model: PeftModel) -> None:
    """Drop the model's graphs: needed after changing its modules (dropout, DoRA variant),
    which a graph would otherwise go on replaying as they were when it was recorded."""
    _graphs.pop(model, None)


def graphs_for(model: PeftModel, train: TrainSettings) -> MicroBatchGraphs | None:
    """The model's graphs, or None (and why, logged once) when it trains eagerly."""
    known = _graphs.get(model)
    if known is not None:
        return None if known.failed else known
    why = unsupported(model, train)
    if why:
        if why not in _told:
            _told.add(why)
            log.info("training without CUDA graphs: %s", why)
        return None
    _graphs[model] = MicroBatchGraphs(model, train.bf16)
    return _graphs[model]
