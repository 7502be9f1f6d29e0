"""Local training: the loop learns, counts what it trained on, and leaves the base frozen."""

import pytest
import torch

from fedcoder.config import ModelSettings, TrainSettings
from fedcoder.model import adapter_state, add_adapter, load_base_model
from fedcoder.training import make_optimizer, train_round

RECORDS = [
    {
        "instruction": f"Return x plus {i}.",
        "input": "",
        "output": f"def f(x):\n    return x + {i}\n",
    }
    for i in range(40)
]


def tiny_peft(model_dir):
    base, tokenizer = load_base_model(str(model_dir), dtype=torch.float32, device="cpu")
    settings = ModelSettings(name=str(model_dir), quantization=0, gradient_checkpointing=False)
    return add_adapter(base, settings, seed=0), tokenizer


def train_settings(**kw) -> TrainSettings:
    base = dict(seq_length=128, batch_size=4, max_steps=3, optim="adamw_torch", bf16=False)
    return TrainSettings(**{**base, **kw})


def test_loss_goes_down_over_rounds(tiny_model_dir):
    model, tokenizer = tiny_peft(tiny_model_dir)
    losses = [
        train_round(model, tokenizer, RECORDS, train_settings(), lr=3e-3, server_round=r).train_loss
        for r in range(1, 6)
    ]
    assert losses[-1] < losses[0]


def test_only_the_adapter_changes(tiny_model_dir):
    model, tokenizer = tiny_peft(tiny_model_dir)
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    train_round(model, tokenizer, RECORDS, train_settings(), lr=1e-3, server_round=1)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_report_counts_examples_truncation_and_zero_loss(tiny_model_dir):
    model, tokenizer = tiny_peft(tiny_model_dir)
    long_prompt = [{"instruction": "word " * 200, "input": "", "output": "x"}] * 8
    report = train_round(model, tokenizer, long_prompt, train_settings(seq_length=32, max_steps=2),
                         lr=1e-3, server_round=1)  # fmt: skip
    assert report.zero_loss == report.truncated == 8 and report.examples == 0
    report = train_round(model, tokenizer, RECORDS, train_settings(max_steps=2,
                         gradient_accumulation_steps=2), lr=1e-3, server_round=1)  # fmt: skip
    assert report.examples == 2 * 2 * 4 and report.zero_loss == 0 and report.steps == 2


def test_cpu_falls_back_to_torch_adamw(caplog):
    param = torch.nn.Parameter(torch.zeros(2))
    with caplog.at_level("INFO"):
        optimizer = make_optimizer([param], "paged_adamw_8bit", 1e-3, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert "paged_adamw_8bit runs only on CUDA" in caplog.text


@pytest.mark.parametrize("dynamic", [True, False])
def test_round_data_seed(tiny_model_dir, dynamic):
    model, tokenizer = tiny_peft(tiny_model_dir)
    settings = train_settings(dynamic_data_seed=dynamic, max_steps=1)
    state = {k: v.clone() for k, v in adapter_state(model).items()}

    def loss_at(server_round):
        from fedcoder.model import set_adapter_state

        set_adapter_state(model, state)
        torch.manual_seed(0)
        return train_round(model, tokenizer, RECORDS, settings, lr=0.0,
                           server_round=server_round).train_loss  # fmt: skip

    assert (loss_at(1) != loss_at(2)) is dynamic
