"""`fedcoder loss`: held-out loss of a base model plus an adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedcoder.cli import main
from fedcoder.data import collate, load_holdout, tokenize_example

FRACTION = 0.3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rows = [
        {"instruction": f"Write a function that adds {i} to a number.", "input": "",
         "output": f"def add_{i}(x):\n    return x + {i}\n"}
        for i in range(40)
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _loss(capsys, *args) -> dict:
    assert main(["loss", *map(str, args)]) == 0
    assert "held-out loss" in capsys.readouterr().out
    return json.loads((args[args.index("--out") + 1]).read_text())


def test_loss_is_the_models_own_loss_on_the_held_out_rows(
    tmp_path, tiny_model_dir, dataset, capsys
):
    out = tmp_path / "base.json"
    args = ["--base", tiny_model_dir, "--dataset", dataset, "--holdout-fraction", FRACTION]
    result = _loss(capsys, *args, "--batch-size", 3, "--device", "cpu", "--out", out)

    # The same number, one row at a time through transformers' own shifted, masked loss.
    rows = list(load_holdout(str(dataset), FRACTION))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    total, tokens = 0.0, 0
    for row in rows:
        example = tokenize_example(tokenizer, row, 512)
        with torch.no_grad():
            loss = model(**collate([example], tokenizer.pad_token_id)).loss.item()
        # Every response token is predicted (the first by the prompt's last), the prompt's none.
        total, tokens = total + loss * example.n_loss_tokens, tokens + example.n_loss_tokens
    assert 0 < len(rows) < 40
    assert result["examples"] == len(rows) == len(result["per_example"]["tokens"])
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["ci95"][0] < result["loss"] < result["ci95"][1] and result["stderr"] > 0


def test_an_adapter_changes_the_loss(tmp_path, tiny_model_dir, dataset, capsys):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, target_modules=["qkv_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(adapter)
    common = ["--base", tiny_model_dir, "--dataset", dataset, "--holdout-fraction", FRACTION]
    plain = _loss(capsys, *common, "--out", tmp_path / "a.json")
    tuned = _loss(capsys, *common, "--adapter", adapter, "--out", tmp_path / "b.json")
    assert tuned["loss"] != pytest.approx(plain["loss"])
    assert tuned["per_example"]["tokens"] == plain["per_example"]["tokens"]
    assert tuned["config"]["adapter"] == str(adapter)


def test_no_held_out_rows_is_a_one_line_error(tiny_model_dir, dataset, capsys):
    code = main(["loss", "--base", str(tiny_model_dir), "--dataset", str(dataset),
                 "--holdout-fraction", "0"])  # fmt: skip
    assert code == 2
    assert "no held-out rows" in capsys.readouterr().err
