"""The training speed-ups compute the same loss and gradients as the plain path.

Micro-batching, packing, the chunked head loss and the factored DoRA norm are only kept
because they change no number beyond float rounding; each test compares one of them with the
straightforward computation on a tiny random Phi3 model in fp32.
"""

import dataclasses

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.variants import DoraLinearVariant

from fedcoder import training
from fedcoder.config import LoraSettings, ModelSettings, TrainSettings
from fedcoder.data import IGNORE_INDEX, collate, micro_batches, pack_rows, tokenize_example
from fedcoder.dora import FactoredNormDora
from fedcoder.model import (
    adapter_state,
    add_adapter,
    load_base_model,
    resident_model,
    set_adapter_state,
)

RECORDS = [
    {
        "instruction": f"Return x plus {i}." + " Explain why." * (i % 5),
        "input": "" if i % 3 else f"x = {i}",
        "output": f"def f(x):\n    return x + {i}\n" * (1 + i % 4),
    }
    for i in range(24)
]


def tiny_peft(model_dir, *, dropout=0.0):
    base, tokenizer = load_base_model(str(model_dir), dtype=torch.float32, device="cpu")
    settings = ModelSettings(
        name=str(model_dir),
        quantization=0,
        gradient_checkpointing=False,
        lora=LoraSettings(dropout=dropout),
    )
    model = add_adapter(base, settings, seed=0)
    # A trained-looking adapter: B = 0 and magnitude = ||W|| would hide DoRA's terms.
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
        elif "lora_magnitude_vector" in name:
            param.data *= 1 + 0.1 * torch.rand(param.shape, generator=generator)
    model.train()
    return model, tokenizer


def loss_and_grads(model, batches):
    """The step loss (mean over all labelled tokens of all batches) and the adapter gradients."""
    model.zero_grad()
    count = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
    total = 0.0
    for batch in batches:
        loss = training.summed_loss(model, batch) / count
        loss.backward()
        total += loss.item()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return total, grads


def assert_close(grads, expected, rtol=1e-4):
    for name, grad in expected.items():
        error = (grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < rtol, f"{name}: relative error {error:.2e}"


@pytest.fixture
def examples(tiny_model_dir, tiny_tokenizer):
    return [tokenize_example(tiny_tokenizer, record, 384) for record in RECORDS]


def test_transformers_loss_is_what_the_plain_batch_gives(tiny_model_dir, examples):
    model, tokenizer = tiny_peft(tiny_model_dir)
    batch = collate(examples, tokenizer.pad_token_id)
    mean = model(**batch).loss.item()  # transformers' own causal-LM loss
    loss, _ = loss_and_grads(model, [batch])
    assert loss == pytest.approx(mean, rel=1e-5)


@pytest.mark.parametrize(("max_tokens", "packing"), [(0, True), (700, True), (300, False)])
def test_micro_batches_and_packing_keep_loss_and_gradients(
    tiny_model_dir, examples, max_tokens, packing
):
    model, tokenizer = tiny_peft(tiny_model_dir)
    expected_loss, expected = loss_and_grads(model, [collate(examples, tokenizer.pad_token_id)])
    batches = micro_batches(
        examples, tokenizer.pad_token_id, max_tokens=max_tokens, row_length=384, packing=packing
    )
    if packing:  # several examples really share a row
        assert sum(batch["input_ids"].shape[0] for batch in batches) < len(examples)
    loss, grads = loss_and_grads(model, batches)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_close(grads, expected)


def test_chunked_head_loss_matches_the_full_logits(tiny_model_dir, examples, monkeypatch):
    model, tokenizer = tiny_peft(tiny_model_dir)
    batch = collate(examples, tokenizer.pad_token_id)
    monkeypatch.setattr(training, "PLAIN_HEAD_MODEL_TYPES", frozenset())
    expected_loss, expected = loss_and_grads(model, [batch])
    monkeypatch.undo()
    # Chunks of ~30 tokens, so the loop runs many times.
    monkeypatch.setattr(training, "_LOGITS_BYTES_PER_CHUNK", 4 * len(tokenizer) * 30)
    assert training.plain_head(model) is not None
    loss, grads = loss_and_grads(model, [batch])
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_close(grads, expected)


def use_peft_dora(model) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_variant:
                module.lora_variant[adapter] = DoraLinearVariant()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_factored_dora_norm_matches_peft(tiny_model_dir, examples, dropout):
    model, tokenizer = tiny_peft(tiny_model_dir, dropout=dropout)
    variants = [
        v for m in model.modules() if isinstance(m, LoraLayer) for v in m.lora_variant.values()
    ]
    assert variants and all(isinstance(v, FactoredNormDora) for v in variants)
    batch = collate(examples, tokenizer.pad_token_id)
    torch.manual_seed(3)  # the same dropout masks for both
    loss, grads = loss_and_grads(model, [batch])
    use_peft_dora(model)
    torch.manual_seed(3)
    expected_loss, expected = loss_and_grads(model, [batch])
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_close(grads, expected)


def test_a_round_with_packed_micro_batches_gives_the_same_adapter(tiny_model_dir):
    settings = TrainSettings(seq_length=384, batch_size=8, max_steps=2, optim="adamw_torch",
                             bf16=False, micro_batch_tokens=0, packing=False)  # fmt: skip
    model, tokenizer = tiny_peft(tiny_model_dir)
    start = {key: value.clone() for key, value in adapter_state(model).items()}

    def train(settings):
        set_adapter_state(model, start)
        report = training.train_round(model, tokenizer, RECORDS, settings, lr=1e-3, server_round=1)
        return report, {key: value.clone() for key, value in adapter_state(model).items()}

    plain, expected = train(settings)
    fast, state = train(dataclasses.replace(settings, micro_batch_tokens=500, packing=True))
    assert fast.step_losses == pytest.approx(plain.step_losses, rel=1e-5)
    assert fast.tokens == plain.tokens > 0
    for key, value in expected.items():
        assert torch.allclose(state[key], value, rtol=1e-4, atol=1e-6), key


def test_pack_rows_fills_rows_without_overflow(examples):
    rows = pack_rows(examples, 200)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    for row in rows:
        lengths = [len(examples[i].input_ids) for i in row]
        assert sum(lengths) <= 200 or len(row) == 1


def test_micro_batches_stay_under_the_token_budget(examples):
    for packing in (True, False):
        batches = micro_batches(examples, 0, max_tokens=400, row_length=200, packing=packing)
        for batch in batches:
            rows, width = batch["input_ids"].shape
            assert rows * width <= 400 or rows == 1
        labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        assert labelled == sum(e.n_loss_tokens for e in examples)


def test_packed_rows_restart_positions_and_drop_cross_example_targets(examples):
    batch = micro_batches(examples[:3], 0, max_tokens=0, row_length=2000, packing=True)[0]
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    lengths = sorted((len(e.input_ids) for e in examples[:3]), reverse=True)
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    for start in starts:
        assert batch["position_ids"][0, start] == 0
        assert batch["labels"][0, start] == IGNORE_INDEX


def test_out_of_memory_splits_the_step_into_smaller_micro_batches(tiny_model_dir, caplog):
    settings = TrainSettings(seq_length=384, batch_size=8, max_steps=2, optim="adamw_torch",
                             bf16=False, micro_batch_tokens=0, packing=True)  # fmt: skip
    model, tokenizer = tiny_peft(tiny_model_dir)
    start = {key: value.clone() for key, value in adapter_state(model).items()}
    plain = training.train_round(model, tokenizer, RECORDS, settings, lr=1e-3, server_round=1)
    expected = {key: value.clone() for key, value in adapter_state(model).items()}

    def memory_limit(module, args, kwargs):  # a GPU that holds 400 tokens of activations
        if kwargs["input_ids"].numel() > 400:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    set_adapter_state(model, start)
    model.get_base_model().get_decoder().register_forward_pre_hook(memory_limit, with_kwargs=True)
    with caplog.at_level("WARNING"):
        report = training.train_round(model, tokenizer, RECORDS, settings, lr=1e-3, server_round=1)
    assert "out of GPU memory" in caplog.text
    assert report.step_losses == pytest.approx(plain.step_losses, rel=1e-5)
    for key, value in expected.items():
        assert torch.allclose(adapter_state(model)[key], value, rtol=1e-4, atol=1e-6), key


def test_8bit_adamw_without_per_parameter_syncs_updates_like_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    from fedcoder.optim8bit import AdamW8bit

    # Adapter-like shapes: 8-bit state, and 32-bit state under bitsandbytes' 4096-element floor.
    shapes = [(16, 3072), (5120, 16), (3072,), (8192,)]

    def train(optimizer_class):
        params = [
            torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i)))
            for i, shape in enumerate(shapes)
        ]
        optimizer = optimizer_class(params, lr=1e-2, weight_decay=0.0)
        for step in range(3):
            for i, param in enumerate(params):
                seed = torch.Generator().manual_seed(100 * step + i)
                param.grad = torch.randn(param.shape, generator=seed)
            optimizer.step()
        return params

    for ours, theirs in zip(train(AdamW8bit), train(bnb.optim.AdamW8bit), strict=True):
        assert torch.equal(ours, theirs)


def test_compiled_decoder_layers_train_the_same_adapter(tiny_model_dir):
    # aot_eager traces and partitions the graphs as inductor does but runs them with eager
    # kernels, so dropout masks and results are exactly the uncompiled ones; inductor draws
    # its own masks (same distribution). The GPU figure is in docs/performance.md.
    settings = TrainSettings(
        batch_size=4, max_steps=3, optim="adamw_torch", bf16=False, micro_batch_tokens=256
    )
    adapters, losses = {}, {}
    for backend in ("", "aot_eager"):
        model_settings = ModelSettings(
            name=str(tiny_model_dir), quantization=0, compile=backend,
            lora=LoraSettings(dropout=0.05),
        )  # fmt: skip
        model, tokenizer, _ = resident_model(model_settings, bf16=False, seed=0)
        layers = model.get_base_model().get_decoder().layers
        assert all((layer._compiled_call_impl is not None) == bool(backend) for layer in layers)
        torch.manual_seed(0)
        report = training.train_round(model, tokenizer, RECORDS, settings, lr=1e-3, server_round=1)
        adapters[backend], losses[backend] = adapter_state(model), report.step_losses
    assert losses["aot_eager"] == pytest.approx(losses[""], rel=1e-6)
    for key, value in adapters[""].items():
        torch.testing.assert_close(adapters["aot_eager"][key], value)
