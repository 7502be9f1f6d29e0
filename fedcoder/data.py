"""Training data as `datasets`: federated partitions, Alpaca prompts, completion-only labels.

Every source resolves to a `datasets.Dataset` with the string columns instruction, input, output:

- a Hugging Face dataset id (default ``flwrlabs/code-alpaca-20k``), partitioned by Flower Datasets;
- a local file, a directory of Python code or ``builtin:python-stdlib``, read and validated
  by `fedcoder.sources`.

Partitions are IID shards of the whole dataset shuffled with the seed, made exactly as
``FederatedDataset`` with an ``IidPartitioner`` makes them, so a local copy of a Hub dataset
gives every client the same rows as the Hub.

Labels come from a boundary we build ourselves (prompt ids followed by response ids), never
from searching for a tokenized template, and the EOS closing each response is trained.
Padding is recognised by position, not by id, so a tokenizer without a pad token (or whose
pad token is its EOS) needs no special handling: pass any id as ``pad_token_id`` to `collate`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner

from fedcoder.sources import (
    BUILTIN_STDLIB,
    COLUMNS,
    DataError,
    check_columns,
    check_fraction,
    check_partition_count,
    is_held_out,
    read_rows,
    source_kind,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_DATASET = "flwrlabs/code-alpaca-20k"
IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and so transformers) skips

# --- Prompt format ----------------------------------------------------------------------------

# The two Stanford Alpaca headers. A non-empty input gets its own "### Input:" section rather
# than being glued onto the instruction, so code given as context stays visibly separate.
_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)


def format_prompt(record: Mapping[str, str]) -> str:
    """The Alpaca prompt for `record`, ending exactly where the response begins."""
    if record.get("input"):
        return (
            f"{_HEADER_WITH_INPUT}\n\n### Instruction:\n{record['instruction']}\n\n"
            f"### Input:\n{record['input']}\n\n### Response:\n"
        )
    return f"{_HEADER}\n\n### Instruction:\n{record['instruction']}\n\n### Response:\n"


# --- Hugging Face Hub -------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    try:
        yield
    except OSError as err:  # offline, unknown id, gated repo: all OSError subclasses
        raise DataError(
            f"cannot load dataset '{name}' from the Hugging Face Hub ({type(err).__name__}); "
            f"offline, point static.dataset.name at a local .jsonl/.json/.parquet file, "
            f"a directory of Python code or {BUILTIN_STDLIB}"
        ) from err


def _standardized(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """A Hub dataset reduced to string columns instruction, input, output."""
    if len(dataset) == 0:
        raise DataError(f"{source}: the dataset holds no rows")
    check_columns(dataset.column_names, source)
    if "input" not in dataset.column_names:
        dataset = dataset.add_column("input", [""] * len(dataset))
    for column in COLUMNS:
        feature = dataset.features[column]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DataError(f"{source}: column '{column}' must hold strings, found {feature}")
    return dataset.select_columns(list(COLUMNS))


def _load_hub(name: str) -> datasets.Dataset:
    with _hub_errors(name):
        dataset = datasets.load_dataset(name, split="train")
    return _standardized(dataset, name)


@functools.lru_cache(maxsize=4)
def _federated_dataset(
    name: str, num_partitions: int, seed: int, holdout_fraction: float
) -> FederatedDataset:
    # Cached so the clients simulated in one process share a single download and shuffle.
    def prepare(splits: datasets.DatasetDict) -> datasets.DatasetDict:
        train = _standardized(splits["train"], name)
        return datasets.DatasetDict({"train": _holdout_split(train, holdout_fraction, seed)[0]})

    return FederatedDataset(
        dataset=name,
        partitioners={"train": IidPartitioner(num_partitions=num_partitions)},
        shuffle=True,
        seed=seed,
        preprocessor=prepare,  # runs after the shuffle, like the local path below
    )


# --- Whole datasets, partitions and the held-out split --------------------------------------


def load_records(name: str) -> datasets.Dataset:
    """The whole dataset `name`, unshuffled: a builtin, a local file or directory, or a Hub id."""
    if source_kind(name) == "hub":
        return _load_hub(name)
    return datasets.Dataset.from_list(read_rows(name))


def load_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    *,
    seed: int = 42,
    holdout_fraction: float = 0.0,
) -> datasets.Dataset:
    """Client `partition_id`'s IID share of `name`, with the held-out rows removed.

    The whole dataset is shuffled with `seed`, held-out rows are dropped and the rest is cut
    into `num_partitions` contiguous shards, as FederatedDataset(IidPartitioner) does it.
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition_id {partition_id} is outside 0..{num_partitions - 1}")
    check_fraction(holdout_fraction)
    if source_kind(name) == "hub":
        with _hub_errors(name):
            # Reading .partitioners downloads, shuffles and preprocesses the dataset once.
            federated = _federated_dataset(name, num_partitions, seed, holdout_fraction)
            partitioner = federated.partitioners["train"]
    else:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        # Shuffle before dropping held-out rows, the order FederatedDataset applies them in,
        # so a local copy of a Hub dataset yields exactly the Hub partitions.
        shuffled = load_records(name).shuffle(seed=seed)
        partitioner.dataset = _holdout_split(shuffled, holdout_fraction, seed)[0]
    check_partition_count(name, len(partitioner.dataset), num_partitions)
    return partitioner.load_partition(partition_id)


def load_holdout(name: str, fraction: float, seed: int = 42) -> datasets.Dataset:
    """The rows of `name` that `load_partition(..., holdout_fraction=fraction)` keeps out.

    Roughly `fraction` of the rows: membership is decided per prompt, so the count varies a little.
    """
    check_fraction(fraction)
    return _holdout_split(load_records(name), fraction, seed)[1]


def _holdout_split(
    dataset: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(kept, held out) rows of `dataset`, each in its original order."""
    if fraction == 0.0:
        return dataset, dataset.select([])
    held_out = [
        is_held_out(instruction, input_, fraction, seed)
        for instruction, input_ in zip(dataset["instruction"], dataset["input"], strict=True)
    ]
    kept = [index for index, out in enumerate(held_out) if not out]
    dropped = [index for index, out in enumerate(held_out) if out]
    return dataset.select(kept), dataset.select(dropped)


# --- Per-round sampling -----------------------------------------------------------------------


def round_sample(
    dataset_len: int, n_examples: int, seed: int, server_round: int, dynamic_seed: bool
) -> list[int]:
    """Indices of the `n_examples` a client trains on in `server_round`, in training order.

    A permutation of the partition seeded by seed + server_round - 1 when `dynamic_seed`, else by
    `seed` alone, so every round replays the same first examples (FlowerTune's behaviour
    without dynamic-data-seed). The permutation repeats when the partition is smaller.
    """
    if dataset_len <= 0:
        raise DataError("cannot sample training examples from an empty partition")
    round_seed = seed + server_round - 1 if dynamic_seed else seed
    order = np.random.default_rng(round_seed).permutation(dataset_len)
    return np.resize(order, n_examples).tolist()


# --- Tokenization and batching ----------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence; labels are IGNORE_INDEX on the prompt and on what truncation cut."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    n_loss_tokens: int


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, record: Mapping[str, str], seq_length: int
) -> TokenizedExample:
    """Tokenize prompt and response separately and join them, so the loss starts at the response.

    The prompt keeps the tokenizer's BOS (if it adds one); the response gets no special tokens
    but an EOS, which is trained so the model learns to stop. Sequences longer than
    `seq_length` lose their tail; when that cuts the whole response, no token carries a loss.
    (SentencePiece tokenizers that prefix a space add one to the first response token; the
    byte-level BPE of Phi, Qwen or SmolLM does not.)
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so responses cannot be terminated")
    prompt_ids = _bos(tokenizer) + _ids(tokenizer, format_prompt(record))
    response_ids = _ids(tokenizer, record["output"]) + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    labels = labels[:seq_length]
    return TokenizedExample(
        input_ids=input_ids[:seq_length],
        labels=labels,
        truncated=len(input_ids) > seq_length,
        n_loss_tokens=sum(label != IGNORE_INDEX for label in labels),
    )


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos_token_id] if the tokenizer prepends it to plain text, else []."""
    # Probe rather than read add_bos_token: that flag is absent or stale on many tokenizers.
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []


@dataclass(frozen=True)
class DataStats:
    """Counts of what a client trained on; add two to accumulate over rounds or clients.

    truncated: examples cut at seq_length; zero_loss: those the cut left without a loss token.
    """

    examples: int = 0
    truncated: int = 0
    zero_loss: int = 0

    @classmethod
    def of(cls, examples: Iterable[TokenizedExample]) -> DataStats:
        examples = list(examples)
        return cls(
            examples=len(examples),
            truncated=sum(example.truncated for example in examples),
            zero_loss=sum(example.n_loss_tokens == 0 for example in examples),
        )

    def __add__(self, other: DataStats) -> DataStats:
        return DataStats(
            examples=self.examples + other.examples,
            truncated=self.truncated + other.truncated,
            zero_loss=self.zero_loss + other.zero_loss,
        )


def collate(
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example (rounded up to `pad_to_multiple_of`).

    Padding is located by each example's length, never by comparing ids, so it stays correct
    when `pad_token_id` is the EOS id: padded positions get attention_mask 0 and label
    IGNORE_INDEX while each real EOS keeps its label.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example.input_ids) for example in examples)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_rows(examples: Sequence[TokenizedExample], row_length: int) -> list[list[int]]:
    """Indices of `examples` in rows of at most `row_length` tokens, by first-fit decreasing.

    An example longer than `row_length` gets a row of its own.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    by_length = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    for index in by_length:
        length = len(examples[index].input_ids)
        row = next((r for r, space in enumerate(free) if space >= length), None)
        if row is None:
            rows.append([index])
            free.append(row_length - length)
        else:
            rows[row].append(index)
            free[row] -= length
    return rows


def collate_packed(
    rows: Sequence[Sequence[TokenizedExample]], pad_token_id: int, width: int = 0
) -> dict:
    """Batch rows that each hold several examples end to end, with no attention across them.

    Positions restart at 0 for every example: transformers turns such position_ids into a
    block-diagonal causal mask (sdpa, eager) or variable-length attention (flash attention),
    so each example sees exactly the context it would see alone. The first label of every
    example is ignored, because the previous example's last token would otherwise be trained
    to predict it; unpacked, that label is never a target either. The padding after a row's
    last example forms a segment of its own with no labels, and there is no attention_mask:
    transformers detects packing only without one. `width`: pad every row to this many
    tokens (at least the longest row) instead of to the longest row.
    """
    if not rows or not all(rows):
        raise ValueError("cannot collate an empty row")
    width = max(width, *(sum(len(example.input_ids) for example in row) for row in rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            end = start + len(example.input_ids)
            input_ids[r, start:end] = torch.tensor(example.input_ids)
            labels[r, start + 1 : end] = torch.tensor(example.labels[1:])
            position_ids[r, start:end] = torch.arange(end - start)
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def micro_batches(
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    *,
    max_tokens: int,
    row_length: int,
    packing: bool,
    full_rows: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """One optimizer step's examples as micro-batches of at most `max_tokens` tokens each.

    Tokens are counted with padding (rows x width); 0 means no limit. A single row or example
    larger than the budget still forms a micro-batch. With `packing`, examples share rows of
    `row_length` tokens (`collate_packed`); without it, consecutive examples are padded to
    the longest of their micro-batch (`collate`), so `max_tokens=0` gives the plain batch.
    `full_rows` pads packed rows to `row_length`, so that micro-batches differ only in their
    number of rows (`fedcoder.cuda_graphs`).
    """
    if packing:
        groups = [[examples[i] for i in row] for row in pack_rows(examples, row_length)]
        groups.sort(key=lambda row: -sum(len(example.input_ids) for example in row))
        length = [sum(len(example.input_ids) for example in row) for row in groups]
        if full_rows:  # the budget counts the padding too
            length = [max(size, row_length) for size in length]
    else:
        groups = [[example] for example in examples]
        length = [len(example.input_ids) for example in examples]
    batches: list[list[list[TokenizedExample]]] = []
    width = 0
    for group, size in zip(groups, length, strict=True):
        if batches and (not max_tokens or (len(batches[-1]) + 1) * max(width, size) <= max_tokens):
            batches[-1].append(group)
            width = max(width, size)
        else:
            batches.append([group])
            width = size
    if packing:
        width = row_length if full_rows else 0
        return [collate_packed(batch, pad_token_id, width) for batch in batches]
    return [collate([group[0] for group in batch], pad_token_id) for batch in batches]
