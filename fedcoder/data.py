"""Training data: sources, federated partitions, Alpaca prompts and completion-only labels.

Every source resolves to a `datasets.Dataset` with the string columns instruction, input, output:

- a Hugging Face dataset id (default ``flwrlabs/code-alpaca-20k``), partitioned by Flower Datasets;
- a local ``.jsonl``, ``.json`` or ``.parquet`` file (``input`` optional, defaulting to "");
- a local directory of Python code, turned into (docstring -> function) pairs, so a data holder
  can tune on its own private code;
- ``builtin:python-stdlib``: the same extraction applied to this interpreter's standard library.

A local file is validated row by row before training: each row needs string instruction and
output columns, and may not exceed MAX_ROW_BYTES (1 MB of UTF-8 across its three columns). The
limit is far above any useful example (seq-length tokens are a few KB of text), so a row that
large is a broken export or a stray binary blob, and refusing it names the file and line rather
than letting one row exhaust a client's memory in tokenization.

Partitions are IID shards of the whole dataset shuffled with the seed, made exactly as
``FederatedDataset`` with an ``IidPartitioner`` makes them, so a local copy of a Hub dataset
gives every client the same rows as the Hub.

Labels come from a boundary we build ourselves (prompt ids followed by response ids), never
from searching for a tokenized template, and the EOS closing each response is trained.
Padding is recognised by position, not by id, so a tokenizer without a pad token (or whose
pad token is its EOS) needs no special handling: pass any id as ``pad_token_id`` to `collate`.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import textwrap
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_DATASET = "flwrlabs/code-alpaca-20k"
BUILTIN_STDLIB = "builtin:python-stdlib"
COLUMNS = ("instruction", "input", "output")
IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and so transformers) skips
MAX_ROW_BYTES = 1_000_000
MIN_DOCSTRING_CHARS = 20
MAX_FUNCTION_LINES = 120

_REQUIRED = ("instruction", "output")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Virtual environments, VCS folders and caches are never someone's own code.
_SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
# The standard library's own test suites and bundled tools would swamp the library code.
_STDLIB_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data"}
)
# Bump when the extraction rules change, so caches built by older rules are not reused.
_EXTRACTION_VERSION = 1


class DataError(ValueError):
    """A data source is missing, unreadable or malformed; the message names where."""


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


# --- Local files ------------------------------------------------------------------------------


def _load_file(path: str | Path) -> datasets.Dataset:
    """Read and validate a .jsonl, .json or .parquet file of instruction/input/output rows."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}' (use {', '.join(_FILE_SUFFIXES)})"
        )
    records = [_validated(row, where) for where, row in reader(path)]
    if not records:
        raise DataError(f"{path}: the file holds no rows")
    return datasets.Dataset.from_list(records)


def _validated(row: object, where: str) -> dict[str, str]:
    """`row` as {instruction, input, output}, or a DataError naming `where` it came from."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {'/'.join(COLUMNS)}, got {row!r:.40}")
    for column in _REQUIRED:
        if column not in row:
            raise DataError(
                f"{where}: missing required column '{column}' (found: {', '.join(map(str, row))})"
            )
    record = {column: row.get(column) for column in COLUMNS}
    if record["input"] is None:
        record["input"] = ""
    for column, value in record.items():
        if not isinstance(value, str):
            raise DataError(
                f"{where}: column '{column}' must be a string, got {type(value).__name__}"
            )
    size = sum(len(value.encode("utf-8", "replace")) for value in record.values())
    if size > MAX_ROW_BYTES:
        raise DataError(f"{where}: row is {size:,} bytes, over the {MAX_ROW_BYTES:,}-byte limit")
    return record


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig drops a byte-order mark, which json would otherwise reject.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (bad byte at offset {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    # Split on "\n" only: str.splitlines would also break inside JSON strings holding a raw
    # U+2028, which json.dumps(ensure_ascii=False) writes unescaped.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: not valid JSON ({err.msg})") from None
        yield f"{path} line {number}", row


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON at line {err.lineno} ({err.msg}); "
            "a file with one JSON object per line must be named .jsonl"
        ) from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of rows, got a {type(rows).__name__}")
    for number, row in enumerate(rows, start=1):
        yield f"{path} row {number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read it as Parquet ({err})") from None
    _check_columns(table.column_names, str(path))
    present = [column for column in COLUMNS if column in table.column_names]
    for number, row in enumerate(table.select(present).to_pylist(), start=1):
        yield f"{path} row {number}", row


_READERS: dict[str, Callable[[Path], Iterator[tuple[str, object]]]] = {
    ".jsonl": _jsonl_rows,
    ".json": _json_rows,
    ".parquet": _parquet_rows,
}


def _check_columns(names: Sequence[str], source: str) -> None:
    for column in _REQUIRED:
        if column not in names:
            raise DataError(
                f"{source}: missing required column '{column}' (found: {', '.join(names)})"
            )


# --- Python source trees ----------------------------------------------------------------------


def extract_function_pairs(
    root: str | Path, *, skip_dirs: Iterable[str] = ()
) -> list[dict[str, str]]:
    """(docstring -> function) pairs from every .py file below `root`, in sorted path order.

    instruction is the cleaned docstring, output the function's source without it, input "".
    Files that are not UTF-8 or do not parse are skipped, as are functions whose docstring is
    shorter than MIN_DOCSTRING_CHARS, that span more than MAX_FUNCTION_LINES, or whose body is
    nothing but the docstring and a placeholder. Hidden directories and `skip_dirs` are pruned.
    """
    skipped = _SKIPPED_DIRS.union(skip_dirs)
    pairs = []
    for path in _python_files(Path(root), skipped):
        pairs.extend(_pairs_in_file(path))
    return pairs


def _python_files(root: Path, skipped: frozenset[str]) -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(root):
        # Pruning in place keeps os.walk out of test suites, virtualenvs and .git entirely.
        subdirs[:] = [name for name in subdirs if not name.startswith(".") and name not in skipped]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files)


def _pairs_in_file(path: Path) -> list[dict[str, str]]:
    try:
        # read_text turns \r\n and \r into \n, so ast's line numbers index source.split("\n").
        source = path.read_text(encoding="utf-8-sig")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in someone else's code are not ours
            tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.split("\n")
    functions = [
        node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    pairs = (_function_pair(node, lines) for node in sorted(functions, key=lambda n: n.lineno))
    return [pair for pair in pairs if pair is not None]


def _function_pair(
    node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]
) -> dict[str, str] | None:
    docstring = ast.get_docstring(node, clean=True)  # clean=True applies inspect.cleandoc
    if docstring is None or len(docstring) < MIN_DOCSTRING_CHARS:
        return None
    doc = node.body[0]
    if node.end_lineno - node.lineno >= MAX_FUNCTION_LINES or not _stands_alone(doc, lines):
        return None
    if all(_is_placeholder(statement) for statement in node.body[1:]):
        return None
    # Slice the original lines rather than ast.unparse a copy: comments, blank lines and the
    # author's formatting are part of the code the model should learn to write.
    signature = lines[node.lineno - 1 : doc.lineno - 1]
    body = lines[doc.end_lineno : node.end_lineno]
    while not body[0].strip():  # the blank line that usually follows a docstring
        body.pop(0)
    code = textwrap.dedent("\n".join(signature + body))
    if code[:1].isspace():  # a multi-line string further left than the def blocks the dedent
        return None
    return {"instruction": docstring, "input": "", "output": code}


def _stands_alone(doc: ast.stmt, lines: list[str]) -> bool:
    """Whether the docstring has its lines to itself, so dropping them leaves valid code."""
    # ast column offsets count UTF-8 bytes, not characters.
    before = lines[doc.lineno - 1].encode()[: doc.col_offset]
    after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset :]
    return not before.strip() and not after.strip()


def _is_placeholder(statement: ast.stmt) -> bool:
    """pass, ... or raise NotImplementedError: a stub, not an implementation."""
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return statement.value.value is Ellipsis
    return isinstance(statement, ast.Raise) and "NotImplementedError" in ast.unparse(statement)


def _load_source_tree(root: Path) -> datasets.Dataset:
    pairs = extract_function_pairs(root)
    if not pairs:
        raise DataError(
            f"{root}: no Python function with a docstring of {MIN_DOCSTRING_CHARS}+ characters"
        )
    return datasets.Dataset.from_list(pairs)


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDCODER_CACHE", "~/.cache/fedcoder")).expanduser()


def _load_stdlib() -> datasets.Dataset:
    """Pairs from this interpreter's standard library, extracted once and cached as JSONL."""
    version = ".".join(map(str, sys.version_info[:3]))
    cache = _cache_dir() / (
        f"python-stdlib-{sys.implementation.name}{version}-v{_EXTRACTION_VERSION}.jsonl"
    )
    if cache.is_file():
        return _load_file(cache)
    started = time.perf_counter()
    pairs = extract_function_pairs(sysconfig.get_paths()["stdlib"], skip_dirs=_STDLIB_SKIPPED_DIRS)
    log.info(
        "%s: %d pairs extracted in %.1f s",
        BUILTIN_STDLIB,
        len(pairs),
        time.perf_counter() - started,
    )
    try:
        _write_jsonl(cache, pairs)
    except OSError as err:
        log.warning("%s: not cached, %s is not writable (%s)", BUILTIN_STDLIB, cache, err)
    return datasets.Dataset.from_list(pairs)


def _write_jsonl(path: Path, records: Iterable[Mapping[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: clients in parallel processes may build the same cache at once.
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with partial.open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(partial, path)


_BUILTINS: dict[str, Callable[[], datasets.Dataset]] = {BUILTIN_STDLIB: _load_stdlib}


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
    _check_columns(dataset.column_names, source)
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


# --- Resolving a name, partitions and the held-out split ------------------------------------


def _kind(name: str) -> str:
    """Which source `name` denotes: "builtin", "file", "directory" or "hub"."""
    if name.startswith("builtin:"):
        if name not in _BUILTINS:
            raise DataError(f"unknown builtin dataset '{name}' (available: {', '.join(_BUILTINS)})")
        return "builtin"
    path = Path(name).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir():
        return "directory"
    # A Hub id is "owner/name"; anything else path-like is a local path that does not exist.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(_FILE_SUFFIXES):
        raise DataError(f"{name}: no such file or directory")
    return "hub"


def load_records(name: str) -> datasets.Dataset:
    """The whole dataset `name`, unshuffled: a builtin, a local file or directory, or a Hub id."""
    kind = _kind(name)
    if kind == "builtin":
        return _BUILTINS[name]()
    if kind == "file":
        return _load_file(Path(name).expanduser())
    if kind == "directory":
        return _load_source_tree(Path(name).expanduser())
    return _load_hub(name)


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
    _check_fraction(holdout_fraction)
    if _kind(name) == "hub":
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
    if len(partitioner.dataset) < num_partitions:
        raise DataError(
            f"{name}: {len(partitioner.dataset)} training rows cannot fill "
            f"{num_partitions} partitions"
        )
    return partitioner.load_partition(partition_id)


def load_holdout(name: str, fraction: float, seed: int = 42) -> datasets.Dataset:
    """The rows of `name` that `load_partition(..., holdout_fraction=fraction)` keeps out.

    Roughly `fraction` of the rows: membership is decided per prompt, so the count varies a little.
    """
    _check_fraction(fraction)
    return _holdout_split(load_records(name), fraction, seed)[1]


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")


def _holdout_split(
    dataset: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(kept, held out) rows of `dataset`, each in its original order."""
    if fraction == 0.0:
        return dataset, dataset.select([])
    held_out = [
        _is_held_out(instruction, input_, fraction, seed)
        for instruction, input_ in zip(dataset["instruction"], dataset["input"], strict=True)
    ]
    kept = [index for index, out in enumerate(held_out) if not out]
    dropped = [index for index, out in enumerate(held_out) if out]
    return dataset.select(kept), dataset.select(dropped)


def _is_held_out(instruction: str, input_: str, fraction: float, seed: int) -> bool:
    # A seeded hash of the prompt, not a row index: the answer does not depend on row order
    # (the Hub path only sees rows after FederatedDataset shuffled them), and duplicate
    # prompts fall on the same side, so held-out loss is never measured on trained prompts.
    prompt = f"{instruction}\0{input_}".encode("utf-8", "replace")
    digest = hashlib.blake2b(prompt, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


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


def collate_packed(rows: Sequence[Sequence[TokenizedExample]], pad_token_id: int) -> dict:
    """Batch rows that each hold several examples end to end, with no attention across them.

    Positions restart at 0 for every example: transformers turns such position_ids into a
    block-diagonal causal mask (sdpa, eager) or variable-length attention (flash attention),
    so each example sees exactly the context it would see alone. The first label of every
    example is ignored, because the previous example's last token would otherwise be trained
    to predict it; unpacked, that label is never a target either. The padding after a row's
    last example forms a segment of its own with no labels, and there is no attention_mask:
    transformers detects packing only without one.
    """
    if not rows or not all(rows):
        raise ValueError("cannot collate an empty row")
    width = max(sum(len(example.input_ids) for example in row) for row in rows)
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
) -> list[dict[str, torch.Tensor]]:
    """One optimizer step's examples as micro-batches of at most `max_tokens` tokens each.

    Tokens are counted with padding (rows x width); 0 means no limit. A single row or example
    larger than the budget still forms a micro-batch. With `packing`, examples share rows of
    `row_length` tokens (`collate_packed`); without it, consecutive examples are padded to
    the longest of their micro-batch (`collate`), so `max_tokens=0` gives the plain batch.
    """
    if packing:
        groups = [[examples[i] for i in row] for row in pack_rows(examples, row_length)]
        groups.sort(key=lambda row: -sum(len(example.input_ids) for example in row))
        length = [sum(len(example.input_ids) for example in row) for row in groups]
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
        return [collate_packed(batch, pad_token_id) for batch in batches]
    return [collate([group[0] for group in batch], pad_token_id) for batch in batches]
