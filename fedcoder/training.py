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
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedcoder.config import TrainSettings
from fedcoder.data import DataStats, collate, round_sample, tokenize_example

log = logging.getLogger(__name__)


def cosine_lr(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """Learning rate of a round: cosine-annealed from lr_max towards lr_min over rounds 1..T.

    lr(t) = min + 0.5 (max - min)(1 + cos(pi t / T)); constant within a round.
    """
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / num_rounds))


def make_optimizer(
    params: Sequence[torch.nn.Parameter], name: str, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """The configured optimizer; torch AdamW where bitsandbytes' 8-bit ones cannot run."""
    if name != "adamw_torch" and device.type == "cuda":
        try:
            import bitsandbytes as bnb
        except ImportError:
            log.warning(
                "optim %s needs bitsandbytes (pip install fedcoder[gpu]); using torch AdamW", name
            )
        else:
            cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            return cls(params, lr=lr, weight_decay=0.0)
    elif name != "adamw_torch":
        log.info("optim %s runs only on CUDA; using torch AdamW on %s", name, device.type)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


@dataclass
class RoundReport:
    """What a client reports about its local training in one round."""

    train_loss: float
    examples: int
    truncated: int
    zero_loss: int
    loss_tokens: int
    steps: int
    train_seconds: float

    def as_metrics(self) -> dict[str, float | int]:
        return asdict(self)


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
    depends on the round when `dynamic_data_seed` is on.
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
    batch_size = settings.batch_size

    model.train()
    step_losses = []
    for step in range(settings.max_steps):
        step_loss = 0.0
        for micro in range(settings.gradient_accumulation_steps):
            start = (step * settings.gradient_accumulation_steps + micro) * batch_size
            batch = collate(examples[start : start + batch_size], pad_id)
            if not (batch["labels"] != -100).any():
                continue  # nothing to learn from; a zero-token mean would be NaN
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                loss = model(**batch).loss / settings.gradient_accumulation_steps
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(step_loss)
    model.eval()

    return RoundReport(
        train_loss=sum(step_losses) / len(step_losses),
        examples=stats.examples - stats.zero_loss,
        truncated=stats.truncated,
        zero_loss=stats.zero_loss,
        loss_tokens=sum(example.n_loss_tokens for example in examples),
        steps=settings.max_steps,
        train_seconds=time.perf_counter() - started,
    )
