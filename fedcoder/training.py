"""One client's local training for one round: a plain, readable PyTorch loop.

No Trainer: the loop is short, and owning it lets us count what FlowerTune
cannot (examples actually trained, truncated, left without loss tokens) and
keep the model resident between rounds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedcoder.config import TrainSettings
from fedcoder.cuda_graphs import MicroBatchGraphs, graphs_for, packed_inputs
from fedcoder.data import IGNORE_INDEX, DataStats, micro_batches, round_sample, tokenize_example

log = logging.getLogger(__name__)


def cosine_lr(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """Learning rate of a round: cosine-annealed from lr_max towards lr_min over rounds 1..T.

    lr(t) = min + 0.5 (max - min)(1 + cos(pi t / T)); constant within a round.
    """
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / num_rounds))


def make_optimizer(
    params: Sequence[torch.nn.Parameter], name: str, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """The configured optimizer; torch AdamW where bitsandbytes' 8-bit ones cannot run.

    paged_adamw_8bit and adamw_8bit are bitsandbytes' AdamW8bit, with its state in paged
    (unified) or plain GPU memory: the same update either way (fedcoder/optim8bit.py).
    """
    if name != "adamw_torch" and device.type == "cuda":
        try:
            from fedcoder.optim8bit import AdamW8bit
        except ImportError:
            log.warning(
                "optim %s needs bitsandbytes (pip install fedcoder[gpu]); using torch AdamW", name
            )
        else:
            paged = name == "paged_adamw_8bit"
            return AdamW8bit(params, lr=lr, weight_decay=0.0, is_paged=paged)
    elif name != "adamw_torch":
        log.info("optim %s runs only on CUDA; using torch AdamW on %s", name, device.type)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# Causal LMs whose logits are exactly lm_head(final hidden state): no soft-capping, no scaling.
# Others (Gemma 2/3, Cohere, Granite, ...) take the plain loss path.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "phi3", "qwen2", "qwen3"})
_LOGITS_BYTES_PER_CHUNK = 1 << 30


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, a chunk of rows at a time.

    With a 200k vocabulary the logits of a batch dwarf everything else held for backward
    (4 bytes x 200k per token in fp32). For a frozen head the only gradient needed is the
    hidden states', (softmax - onehot) @ weight, so it is computed chunk by chunk in the
    forward pass and the logits are never kept. Hand-written rather than taken from Liger
    Kernel because Liger needs Triton and a GPU, and this must also run (and be tested) on CPU.
    `weights` (0 or 1 per row, optional) leave rows out without changing the shapes, as a
    CUDA graph needs (`fedcoder.cuda_graphs`).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor | None = None,
    ):
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
        weight = weight.to(dtype)  # what autocast would run lm_head in
        chunk = max(1, _LOGITS_BYTES_PER_CHUNK // (4 * weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                log_probs = F.linear(hidden[rows].to(dtype), weight).float().log_softmax(-1)
                target = targets[rows, None]
                picked = log_probs.gather(1, target)
                if weights is not None:
                    picked = picked * weights[rows, None]
                total -= picked.sum()
                if grad is not None:  # d(-log p_target)/d logits = softmax - onehot
                    probs = log_probs.exp_()
                    probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
                    if weights is not None:
                        probs.mul_(weights[rows, None])
                    grad[rows] = (probs.to(dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None


def plain_head(model: PeftModel) -> torch.nn.Linear | None:
    """The frozen lm_head when logits are nothing but lm_head(hidden), else None."""
    causal_lm = model.get_base_model()
    head = causal_lm.get_output_embeddings()
    if (
        causal_lm.config.model_type in PLAIN_HEAD_MODEL_TYPES
        and type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
    ):
        return head
    return None


def summed_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the next-token losses over every labelled position of `batch`.

    `batch` is on the CPU, as `micro_batches` makes it: it is copied to the model's device
    without waiting for the GPU, and the labelled positions are found on the CPU, so the host
    never stalls to learn a shape and keeps queueing work. For models with a plain frozen
    head, logits are computed only where a label is, in chunks (`HeadCrossEntropy`): about
    half of a Code Alpaca sequence is prompt, whose logits the plain path computes and throws
    away. Same value as the transformers loss times its count.
    """
    device = model.get_base_model().get_input_embeddings().weight.device
    labels = batch["labels"]
    inputs = {key: to_device(value, device) for key, value in batch.items() if key != "labels"}
    head = plain_head(model)
    if head is None:
        # num_items_in_batch=1 turns transformers' mean into the sum.
        labels = to_device(labels, device)
        return model(**inputs, labels=labels, use_cache=False, num_items_in_batch=1).loss
    decoder = model.get_base_model().get_decoder()
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    rows, columns = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    # Position t predicts label t + 1; index the hidden states as one (rows x width) list.
    positions = to_device(rows * labels.shape[1] + columns, device)
    targets = to_device(labels[rows, columns + 1], device)
    hidden = hidden.flatten(0, 1).index_select(0, positions)
    return HeadCrossEntropy.apply(hidden, head.weight, targets)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor goes to a GPU from pinned memory, without waiting."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _accumulate_gradients(
    model: PeftModel,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    bf16: bool,
    graphs: MicroBatchGraphs | None = None,
) -> torch.Tensor | None:
    """Backpropagate one optimizer step's micro-batches; the step loss, or None if unlabelled.

    Each micro-batch's summed loss is divided by the labelled tokens of the whole step, so the
    gradients add up to those of the mean loss over the step's batch. With `graphs`, each
    micro-batch (padded to full rows) replays its row count's CUDA graph.
    """
    counts = [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches]
    if not sum(counts):
        return None
    step_loss = torch.zeros((), device=device)
    for batch, count in zip(batches, counts, strict=True):
        if not count:
            continue  # contributes no gradient
        if graphs is not None:
            step_loss += graphs.backward(packed_inputs(model, batch, sum(counts)))
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = summed_loss(model, batch) / sum(counts)
        loss.backward()
        step_loss += loss.detach()
    return step_loss  # read once the round is over: reading it now would wait for the GPU


def _smaller_budget(batches: Sequence[dict[str, torch.Tensor]], budget: int) -> int:
    """Half the largest micro-batch that just ran out of memory; re-raise when one row is left."""
    sizes = [batch["input_ids"].numel() for batch in batches]
    if all(batch["input_ids"].shape[0] == 1 for batch in batches):
        raise torch.OutOfMemoryError(
            f"out of GPU memory with one sequence of {max(sizes)} tokens per forward pass; "
            "set model.gradient-checkpointing=true or a shorter train.seq-length"
        )
    return max(sizes) // 2 if not budget else min(budget, max(sizes)) // 2


@dataclass
class RoundReport:
    """What a client reports about its local training in one round.

    train_loss is the mean of the per-step losses; each step's loss is the mean over every
    labelled token of its batch, however the batch was split into micro-batches.
    tokens counts the input tokens trained on, without padding.
    """

    train_loss: float
    examples: int
    truncated: int
    zero_loss: int
    loss_tokens: int
    tokens: int
    steps: int
    train_seconds: float
    step_losses: list[float]

    def as_metrics(self) -> dict[str, float | int]:
        """The scalar counts, for a Flower MetricRecord (per-step losses stay local)."""
        return {key: value for key, value in asdict(self).items() if key != "step_losses"}


def train_round(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    settings: TrainSettings,
    *,
    lr: float,
    server_round: int,
) -> RoundReport:
    """Train the adapter in place for `settings.max_steps` optimizer steps.

    `records` is the client's partition; which examples it sees this round
    depends on the round when `dynamic_data_seed` is on. Each step's
    batch_size x gradient_accumulation_steps examples run as micro-batches of
    at most `micro_batch_tokens` tokens (packed when `packing` is on); every
    micro-batch's summed loss is divided by the labelled tokens of the whole
    step, so the update equals that of one pass over the whole batch.
    """
    started = time.perf_counter()
    device = next(p for p in model.parameters() if p.requires_grad).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, settings.optim, lr, device)
    indices = round_sample(
        len(records),
        settings.examples_per_round,
        seed=settings.seed,
        server_round=server_round,
        dynamic_seed=settings.dynamic_data_seed,
    )
    examples = [tokenize_example(tokenizer, records[i], settings.seq_length) for i in indices]
    stats = DataStats.of(examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_step = settings.batch_size * settings.gradient_accumulation_steps

    model.train()
    graphs = graphs_for(model, settings)
    step_losses = []
    budget = settings.micro_batch_tokens
    for step in range(settings.max_steps):
        step_examples = examples[step * per_step : (step + 1) * per_step]
        while True:
            batches = micro_batches(
                step_examples,
                pad_id,
                max_tokens=budget,
                row_length=settings.seq_length,
                packing=settings.packing,
                full_rows=graphs is not None,
            )
            try:
                step_loss = _accumulate_gradients(model, batches, device, settings.bf16, graphs)
                break
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                budget = _smaller_budget(batches, budget)
                log.warning("out of GPU memory: %d tokens per micro-batch this round", budget)
            torch.cuda.empty_cache()  # after the error released the tensors it held
        if step_loss is None:
            continue  # nothing to learn from; a mean over zero tokens is undefined
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(step_loss)
    model.eval()
    step_losses = torch.stack(step_losses).tolist() if step_losses else []

    return RoundReport(
        train_loss=sum(step_losses) / len(step_losses) if step_losses else 0.0,
        examples=stats.examples - stats.zero_loss,
        truncated=stats.truncated,
        zero_loss=stats.zero_loss,
        loss_tokens=sum(example.n_loss_tokens for example in examples),
        tokens=sum(len(example.input_ids) for example in examples),
        steps=settings.max_steps,
        train_seconds=time.perf_counter() - started,
        step_losses=step_losses,
    )
