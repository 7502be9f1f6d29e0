"""CUDA graphs of the training step: the recorded body computes the eager step's numbers.

What a graph records (`fedcoder.cuda_graphs.packed_loss` on rows padded to full length, the
mask and rotary embeddings made outside it, the loss weighted over every position) is
checked against the plain path on CPU; recording and replaying it needs a GPU.
"""

import dataclasses

import pytest
import torch
from test_training_speedups import RECORDS, assert_close, loss_and_grads, tiny_peft

from fedcoder import training
from fedcoder.config import LoraSettings, ModelSettings, TrainSettings
from fedcoder.cuda_graphs import graphs_for, packed_inputs, packed_loss, unsupported
from fedcoder.data import IGNORE_INDEX, collate, micro_batches, tokenize_example
from fedcoder.model import adapter_state, resident_model, set_adapter_state


@pytest.fixture
def examples(tiny_model_dir, tiny_tokenizer):
    return [tokenize_example(tiny_tokenizer, record, 384) for record in RECORDS]


@pytest.mark.parametrize("max_tokens", [0, 800])
def test_the_graph_body_on_full_rows_gives_the_plain_loss_and_gradients(
    tiny_model_dir, examples, max_tokens
):
    model, tokenizer = tiny_peft(tiny_model_dir)
    expected_loss, expected = loss_and_grads(model, [collate(examples, tokenizer.pad_token_id)])
    batches = micro_batches(
        examples,
        tokenizer.pad_token_id,
        max_tokens=max_tokens,
        row_length=384,
        packing=True,
        full_rows=True,
    )
    assert all(batch["input_ids"].shape[1] == 384 for batch in batches)
    assert max_tokens == 0 or all(batch["input_ids"].numel() <= max_tokens for batch in batches)
    labelled = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
    model.zero_grad()
    loss = 0.0
    for batch in batches:
        step = packed_loss(model, packed_inputs(model, batch, labelled))
        step.backward()
        loss += step.item()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_close(grads, expected)


def test_training_without_a_gpu_or_with_graphs_off_says_why(tiny_model_dir):
    model, _ = tiny_peft(tiny_model_dir)
    assert unsupported(model, TrainSettings()) == "the model is on cpu"
    assert unsupported(model, TrainSettings(cuda_graphs=False)) == "train.cuda-graphs is off"
    assert graphs_for(model, TrainSettings()) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_round_replayed_from_cuda_graphs_trains_the_eager_adapter(tiny_model_dir, dropout):
    settings = TrainSettings(seq_length=384, batch_size=8, max_steps=4, optim="adamw_torch",
                             bf16=False, micro_batch_tokens=800)  # fmt: skip
    model_settings = ModelSettings(
        name=str(tiny_model_dir), quantization=0, lora=LoraSettings(dropout=dropout)
    )
    model, tokenizer, _ = resident_model(model_settings, bf16=False, seed=0)
    start = {key: value.clone() for key, value in adapter_state(model).items()}

    def train(settings):
        set_adapter_state(model, start)
        torch.manual_seed(5)
        report = training.train_round(model, tokenizer, RECORDS, settings, lr=1e-3, server_round=1)
        return report, {key: value.clone() for key, value in adapter_state(model).items()}

    eager, expected = train(dataclasses.replace(settings, cuda_graphs=False))
    # Round 1 runs each row count's first micro-batch eagerly and records it; the later
    # rounds only replay. Steps have 1-row and 2-row micro-batches, several per step.
    runs = [train(settings) for _ in range(3)]
    graphs = graphs_for(model, settings)
    assert graphs is not None and sorted(graphs.graphs) == [1, 2] and not graphs.failed
    # Replays draw their own dropout masks, repeatably from the seed.
    assert runs[1][0].step_losses == runs[2][0].step_losses
    for key, value in runs[1][1].items():
        assert torch.equal(runs[2][1][key], value), key
    for report, state in runs[:2]:
        if dropout:
            assert report.step_losses == pytest.approx(eager.step_losses, rel=1e-2)
            continue
        # Without dropout, the eager round's numbers, up to float rounding.
        assert report.step_losses == pytest.approx(eager.step_losses, rel=1e-5)
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6)
