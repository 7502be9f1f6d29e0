"""Held-out loss: how well a base model plus an adapter predicts responses it never trained on.

The rows are those a run with `dataset.holdout-fraction` keeps out of every client's
partition (`fedcoder.data.load_holdout`, same dataset, fraction and seed). Each row is
tokenized exactly as in training (Alpaca prompt, loss on the response and its EOS,
cut at the same sequence length), and the loss is the mean cross-entropy per response
token over all rows, with a bootstrap standard error over rows. Per-row sums are kept,
so two models can be compared row by row (`fedcoder.resampling`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedcoder.data import IGNORE_INDEX, DataError, collate, load_holdout, tokenize_example
from fedcoder.resampling import resampled_means, summary


def example_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    *,
    seq_length: int = 512,
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed cross-entropy and loss-token count of each record, in record order."""
    examples = [tokenize_example(tokenizer, record, seq_length) for record in records]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    sums = np.zeros(len(examples))
    counts = np.zeros(len(examples), dtype=np.int64)
    device = next(model.parameters()).device
    model.eval()
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="held-out loss", unit="batch", leave=False):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], pad_id)
        with torch.inference_mode():
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
        # Position t predicts token t + 1, as in the training loss.
        targets = batch["labels"][:, 1:].to(device)
        losses = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2),
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        sums[rows] = losses.sum(dim=1).cpu().numpy()
        counts[rows] = (targets != IGNORE_INDEX).sum(dim=1).cpu().numpy()
    return sums, counts


def heldout_loss(
    base: str,
    adapter: str | Path | None = None,
    *,
    dataset: str,
    holdout_fraction: float,
    seed: int = 42,
    seq_length: int = 512,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str | None = None,
) -> dict[str, Any]:
    """Loss per response token of `base` (+ `adapter`) on the held-out rows of `dataset`.

    `holdout_fraction` and `seed` must be the run's `dataset.holdout-fraction` and
    `train.seed`, so the rows are exactly those its clients never saw.
    """
    from fedcoder.evaluation.generation import load_model

    records = list(load_holdout(dataset, holdout_fraction, seed=seed))
    if not records:
        raise DataError(f"{dataset}: no held-out rows at holdout fraction {holdout_fraction}")
    model, tokenizer = load_model(base, adapter, dtype=dtype, device=device)
    sums, counts = example_losses(
        model, tokenizer, records, seq_length=seq_length, batch_size=batch_size
    )
    scored = counts > 0
    if not scored.any():
        raise DataError(f"no held-out row keeps a response token at seq_length {seq_length}")
    # Rows that truncation left without a response token carry no loss and no weight.
    means = sums[scored] / counts[scored]
    return {
        "loss": float(sums.sum() / counts.sum()),
        **summary(resampled_means(means, counts[scored])),
        "examples": int(scored.sum()),
        "no_loss_tokens": int((~scored).sum()),
        "tokens": int(counts.sum()),
        "config": {
            "base": base,
            "adapter": str(adapter) if adapter is not None else None,
            "dataset": dataset,
            "holdout_fraction": holdout_fraction,
            "seed": seed,
            "seq_length": seq_length,
            "dtype": dtype,
        },
        "per_example": {"loss_sum": sums.tolist(), "tokens": counts.tolist()},
    }
