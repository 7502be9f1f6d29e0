"""Where training rows come from, read and validated without loading any ML library.

Every local source gives a list of rows, each a dict of the strings instruction, input and
output:

- a ``.jsonl``, ``.json`` or ``.parquet`` file (``input`` optional, defaulting to "");
- a directory of Python code, turned into (docstring -> function) pairs, so a data holder
  can tune on its own private code;
- ``builtin:python-stdlib``: the same extraction applied to this interpreter's standard library.

A name that is none of these is a Hugging Face Hub id, which `fedcoder.data` loads with
`datasets`. A local file is validated row by row: each row needs string instruction and
output columns, and may not exceed MAX_ROW_BYTES (1 MB of UTF-8 across its three columns).
The limit is far above any useful example (seq-length tokens are a few KB of text), so a
row that large is a broken export or a stray binary blob, and refusing it names the file
and line rather than letting one row exhaust a client's memory in tokenization.

Kept apart from `fedcoder.data` (datasets, pyarrow, torch) so that `fedcoder run` checks a
local dataset before Flower starts without paying for those imports.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
import textwrap
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

BUILTIN_STDLIB = "builtin:python-stdlib"
COLUMNS = ("instruction", "input", "output")
MAX_ROW_BYTES = 1_000_000
MIN_DOCSTRING_CHARS = 20
MAX_FUNCTION_LINES = 120
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

_REQUIRED = ("instruction", "output")
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


# --- Local files ------------------------------------------------------------------------------


def read_file(path: str | Path) -> list[dict[str, str]]:
    """Read and validate a .jsonl, .json or .parquet file of instruction/input/output rows."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}' (use {', '.join(FILE_SUFFIXES)})"
        )
    records = [_validated(row, where) for where, row in reader(path)]
    if not records:
        raise DataError(f"{path}: the file holds no rows")
    return records


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read it as Parquet ({err})") from None
    check_columns(table.column_names, str(path))
    present = [column for column in COLUMNS if column in table.column_names]
    for number, row in enumerate(table.select(present).to_pylist(), start=1):
        yield f"{path} row {number}", row


_READERS: dict[str, Callable[[Path], Iterator[tuple[str, object]]]] = {
    ".jsonl": _jsonl_rows,
    ".json": _json_rows,
    ".parquet": _parquet_rows,
}


def check_columns(names: Sequence[str], source: str) -> None:
    """Raise a DataError naming `source` unless it has the required columns."""
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


def _read_source_tree(root: Path) -> list[dict[str, str]]:
    pairs = extract_function_pairs(root)
    if not pairs:
        raise DataError(
            f"{root}: no Python function with a docstring of {MIN_DOCSTRING_CHARS}+ characters"
        )
    return pairs


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDCODER_CACHE", "~/.cache/fedcoder")).expanduser()


def _read_stdlib() -> list[dict[str, str]]:
    """Pairs from this interpreter's standard library, extracted once and cached as JSONL."""
    version = ".".join(map(str, sys.version_info[:3]))
    cache = _cache_dir() / (
        f"python-stdlib-{sys.implementation.name}{version}-v{_EXTRACTION_VERSION}.jsonl"
    )
    if cache.is_file():
        return read_file(cache)
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
    return pairs


def _write_jsonl(path: Path, records: Iterable[Mapping[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: clients in parallel processes may build the same cache at once.
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with partial.open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(partial, path)


_BUILTINS: dict[str, Callable[[], list[dict[str, str]]]] = {BUILTIN_STDLIB: _read_stdlib}


# --- Resolving a name --------------------------------------------------------------------------


def source_kind(name: str) -> str:
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
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(FILE_SUFFIXES):
        raise DataError(f"{name}: no such file or directory")
    return "hub"


def read_rows(name: str) -> list[dict[str, str]]:
    """The rows of a local source `name` (a builtin, a file or a directory), in order."""
    kind = source_kind(name)
    if kind == "builtin":
        return _BUILTINS[name]()
    if kind == "file":
        return read_file(Path(name).expanduser())
    if kind == "directory":
        return _read_source_tree(Path(name).expanduser())
    raise DataError(f"{name}: a Hugging Face Hub id, not a local source")


# --- Held-out rows and partitions -------------------------------------------------------------


def check_fraction(fraction: float) -> None:
    """Raise unless the holdout fraction is in [0, 1)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")


def is_held_out(instruction: str, input_: str, fraction: float, seed: int) -> bool:
    """Whether the prompt (instruction, input) is held out of training at `fraction`."""
    # A seeded hash of the prompt, not a row index: the answer does not depend on row order
    # (the Hub path only sees rows after FederatedDataset shuffled them), and duplicate
    # prompts fall on the same side, so held-out loss is never measured on trained prompts.
    prompt = f"{instruction}\0{input_}".encode("utf-8", "replace")
    digest = hashlib.blake2b(prompt, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def check_partition_count(name: str, training_rows: int, num_partitions: int) -> None:
    """Raise unless `training_rows` give each of `num_partitions` clients at least one row."""
    if training_rows < num_partitions:
        raise DataError(
            f"{name}: {training_rows} training rows cannot fill {num_partitions} partitions"
        )
