"""Communication accounting, including the FlowerTune Code baseline's 3.66 GB budget."""

import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType, RecordDict
from peft import get_peft_model
from transformers import Phi3Config

from fedcoder.communication import (
    MIB,
    CommunicationLog,
    decode,
    encode,
    payload_bytes,
)
from fedcoder.config import LoraSettings
from fedcoder.messaging import send_and_receive
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


class _SlowGrid:
    """A grid whose replies become available `delay_s` after the push.

    Node 2 never answers; node 4 is gone, and the SuperLink (node 1) answers for it.
    """

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.pushed_at = 0.0
        self.replies: dict[str, Message] = {}

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        ids = []
        for number, message in enumerate(messages):
            message_id = f"m{number}"
            ids.append(message_id)
            node = message.metadata.dst_node_id
            if node == 2:
                continue  # never answers
            if node == 4:  # gone: the SuperLink answers for it, as itself
                reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = 1
            else:
                reply = Message(RecordDict(), reply_to=message)
            reply.metadata.__dict__["_reply_to_message_id"] = message_id
            self.replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        if time.monotonic() - self.pushed_at < self.delay_s:
            return []
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _queries(node_ids):
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]


def test_replies_are_collected_soon_after_they_arrive():
    # Flower 1.42's own send_and_receive sleeps 3 s between pulls.
    grid = _SlowGrid(delay_s=0.3)
    started = time.monotonic()
    replies = send_and_receive(grid, _queries([1, 3]), timeout=None)
    assert len(replies) == 2
    assert time.monotonic() - started < 1.0


def test_missing_replies_are_left_out_at_the_timeout():
    grid = _SlowGrid(delay_s=0.0)
    started = time.monotonic()
    replies = send_and_receive(grid, _queries([1, 2, 3]), timeout=0.5)
    elapsed = time.monotonic() - started
    assert len(replies) == 2
    assert 0.5 <= elapsed < 1.5


def test_an_error_reply_for_a_gone_node_is_credited_to_that_node():
    replies = send_and_receive(_SlowGrid(delay_s=0.0), _queries([3, 4]), timeout=None)
    by_node = {reply.metadata.src_node_id: reply for reply in replies}
    assert sorted(by_node) == [3, 4]
    assert by_node[4].has_error() and not by_node[3].has_error()
