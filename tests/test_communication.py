"""Communication accounting, including the FlowerTune Code baseline's 3.66 GB budget."""

import math

import pytest
import torch
from flwr.app import ArrayRecord
from peft import get_peft_model
from transformers import Phi3Config

from fedcoder.communication import MIB, CommunicationLog, decode, encode, payload_bytes
from fedcoder.config import LoraSettings
from fedcoder.model import lora_config, meta_model

NPY_HEADER = 128  # numpy .npy v1 header of a 1-D or 2-D float array, as Flower serializes it


def phi4_mini_config() -> Phi3Config:
    return Phi3Config(
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def phi4_adapter_shapes() -> dict[str, torch.Size]:
    model = get_peft_model(meta_model(phi4_mini_config()), lora_config(LoraSettings()))
    from peft import get_peft_model_state_dict

    return {k: v.shape for k, v in get_peft_model_state_dict(model).items()}


def test_baseline_adapter_size(phi4_adapter_shapes):
    assert len(phi4_adapter_shapes) == 384
    assert sum(math.prod(s) for s in phi4_adapter_shapes.values()) == 23_953_408


def test_baseline_communication_budget_is_3_66_gb(phi4_adapter_shapes):
    record = ArrayRecord(
        {k: torch.zeros(tuple(s), dtype=torch.float32) for k, s in phi4_adapter_shapes.items()}
    )
    one_copy = payload_bytes(record)
    key_bytes = sum(len(k) for k in phi4_adapter_shapes)
    # Flower 1.42 counts data + .npy header + key name for every array.
    assert one_copy == 23_953_408 * 4 + 384 * NPY_HEADER + key_bytes
    log = CommunicationLog()
    for _ in range(10):  # 10 rounds x 2 clients x (down + up)
        log.bytes_down += 2 * one_copy
        log.bytes_up += 2 * one_copy
    # The published run (no key names) logged 3,656.88 MB; with key names it is 3,657.8x.
    published_mb = 40 * (23_953_408 * 4 + 384 * NPY_HEADER) / MIB
    assert round(published_mb, 2) == 3656.88
    assert log.total_mb == pytest.approx(published_mb + 40 * key_bytes / MIB)
    assert round(log.total_mb, 1) == 3657.8
    assert round(log.total_gb, 2) == 3.66


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_transport_round_trip(dtype):
    state = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_magnitude_vector": torch.rand(8)}
    record = encode(state, dtype)
    back = decode(record, dtype)
    wire = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    for key, value in state.items():
        assert back[key].dtype == torch.float32
        assert torch.equal(back[key], value.to(wire).float())


def test_bf16_transport_halves_the_payload():
    state = {f"layer{i}.lora_B.weight": torch.randn(64, 16) for i in range(4)}
    fp32, bf16 = payload_bytes(encode(state, "float32")), payload_bytes(encode(state, "bfloat16"))
    overhead = sum(NPY_HEADER + len(k) for k in state)
    assert bf16 - overhead == (fp32 - overhead) // 2
