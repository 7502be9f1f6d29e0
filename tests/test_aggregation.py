"""The server strategy: example-weighted fp32 FedAvg, and bad replies dropped."""

import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedcoder.aggregation import AdapterFedAvg
from fedcoder.communication import decode, encode, wire_dtype
from fedcoder.identities import IDENTITY_KEY

GLOBAL = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_magnitude_vector": torch.ones(3)}


def strategy(transport: str = "float32") -> AdapterFedAvg:
    s = AdapterFedAvg(fraction_train=0.2, min_train_nodes=2, transport_dtype=transport,
                      max_examples=160, seed=0)  # fmt: skip
    s._expected = {k: tuple(v.shape) for k, v in GLOBAL.items()}
    return s


def reply(state: dict, examples: int, loss: float = 1.0, transport: str = "float32") -> Message:
    content = RecordDict({
        "arrays": encode(state, transport),
        "metrics": MetricRecord({"num-examples": examples, "train_loss": loss}),
    })  # fmt: skip
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def filled(value: float) -> dict:
    return {k: torch.full_like(v, value) for k, v in GLOBAL.items()}


def test_weighted_by_examples_trained():
    arrays, metrics = strategy().aggregate_train(
        1, [reply(filled(1.0), 30, 2.0), reply(filled(4.0), 10, 6.0)]
    )
    state = arrays.to_torch_state_dict()
    for value in state.values():
        assert value.dtype == torch.float32
        assert torch.allclose(value, torch.full_like(value, (30 * 1 + 10 * 4) / 40))
    assert metrics["train_loss"] == pytest.approx((30 * 2 + 10 * 6) / 40)


def test_bf16_transport_is_averaged_in_fp32():
    a = {k: torch.full_like(v, 1.0 + 2**-7) for k, v in GLOBAL.items()}  # exact in bf16
    arrays, _ = strategy("bfloat16").aggregate_train(
        1, [reply(a, 1, transport="bfloat16"), reply(filled(1.0), 1, transport="bfloat16")]
    )
    for value in arrays.to_torch_state_dict().values():
        assert torch.allclose(value, torch.full_like(value, 1.0 + 2**-8))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (reply({**filled(1.0), "m.lora_A.weight": torch.full((2, 3), float("nan"))}, 10),
         "non-finite"),
        (reply({**filled(1.0), "m.lora_A.weight": torch.zeros(3, 2)}, 10), "shape"),
        (reply({"m.lora_A.weight": torch.zeros(2, 3)}, 10), "keys differ"),
        (reply(filled(1.0), 10, transport="float16"), "dtype"),
        (reply(filled(1.0), 10**9), "num-examples"),
        (reply(filled(1.0), 0), "num-examples"),
    ],
)  # fmt: skip
def test_bad_reply_is_dropped_not_averaged(bad, reason):
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply(filled(2.0), 10), bad])
    for value in arrays.to_torch_state_dict().values():
        assert torch.equal(value, torch.full_like(value, 2.0))
    assert len(s.dropped) == 1 and reason in s.dropped[0][1]


def test_no_valid_reply_gives_nothing():
    s = strategy()
    assert s.aggregate_train(1, [reply(filled(1.0), 0)]) == (None, None)


class FakeGrid:
    """Nodes with fresh random ids each time (as in every new simulation) that answer
    the strategy's identity query with the partition they hold."""

    def __init__(self, seed: int, partitions: int = 10):
        ids = random.Random(seed).sample(range(1, 10**9), partitions)
        self.partition_of = dict(zip(ids, range(partitions), strict=True))

    def get_node_ids(self):
        return list(self.partition_of)

    def push_messages(self, messages):
        self.replies = {}
        for number, msg in enumerate(messages):
            assert msg.metadata.message_type == MessageType.QUERY
            identity = f"partition {self.partition_of[msg.metadata.dst_node_id]}/10"
            content = RecordDict({"identity": ConfigRecord({IDENTITY_KEY: identity})})
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_reply_to_message_id"] = str(number)
            self.replies[str(number)] = reply
        return list(self.replies)

    def pull_messages(self, message_ids):
        return [self.replies[i] for i in message_ids]


def sampled_partitions(s: AdapterFedAvg, grid: FakeGrid, rounds: int) -> list[list[int]]:
    return [[grid.partition_of[node] for node in s.sample(grid)] for _ in range(rounds)]


def test_sampling_is_seeded_and_follows_data_not_node_ids():
    # Same seed, different node ids (a restarted simulation): same partitions each round.
    first = sampled_partitions(strategy(), FakeGrid(seed=1), rounds=5)
    again = sampled_partitions(strategy(), FakeGrid(seed=2), rounds=5)
    assert first == again and all(len(chosen) == 2 for chosen in first)
    assert len({tuple(chosen) for chosen in first}) > 1  # rounds differ


def test_sampling_state_can_be_saved_and_restored():
    grid = FakeGrid(seed=3)
    s = strategy()
    sampled_partitions(s, grid, rounds=2)
    saved = s.rng.getstate()
    expected = sampled_partitions(s, grid, rounds=3)
    restored = strategy()
    restored.rng.setstate(saved)
    assert sampled_partitions(restored, FakeGrid(seed=4), rounds=3) == expected


def test_too_few_valid_replies_aggregate_nothing():
    s = strategy()
    s.min_train_replies = 2
    assert s.aggregate_train(1, [reply(filled(1.0), 10), reply(filled(1.0), 0)]) == (None, None)
    assert len(s.dropped) == 1


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_robust_aggregation_bounds_one_hostile_client(method):
    s = strategy()
    s.aggregation, s.trim_fraction = method, 0.2
    honest = [reply(filled(v), 10) for v in (1.0, 2.0, 3.0, 4.0)]
    hostile = reply(filled(1e6), 160)  # large update and a large claimed weight
    arrays, _ = s.aggregate_train(1, [*honest, hostile])
    for value in arrays.to_torch_state_dict().values():
        # median of 1,2,3,4,1e6 is 3; trimming one per side leaves mean(2,3,4) = 3
        assert torch.equal(value, torch.full_like(value, 3.0))
    plain, _ = strategy().aggregate_train(1, [*honest, hostile])
    assert plain.to_torch_state_dict()["m.lora_A.weight"].max() > 1e5


def test_median_of_an_even_count_is_the_middle_mean():
    s = strategy()
    s.aggregation = "median"
    arrays, _ = s.aggregate_train(1, [reply(filled(v), 10) for v in (1.0, 2.0, 4.0, 8.0)])
    value = arrays.to_torch_state_dict()["m.lora_A.weight"]
    assert torch.equal(value, torch.full_like(value, 3.0))


def test_array_record_input_is_unchanged():
    assert isinstance(encode(GLOBAL), ArrayRecord)


@pytest.mark.parametrize("transport", ["float32", "bfloat16"])
def test_clients_get_the_global_adapter_in_the_transport_dtype(transport):
    torch.manual_seed(0)
    global_state = {k: torch.randn(v.shape) for k, v in GLOBAL.items()}
    s = strategy(transport)
    messages = list(s.configure_train(3, ArrayRecord(global_state), ConfigRecord(), FakeGrid(0)))
    assert len(messages) == 2
    expected = {k: v.to(getattr(torch, transport)).float() for k, v in global_state.items()}
    for message in messages:
        sent = message.content["arrays"]
        assert {a.dtype for a in sent.values()} == {wire_dtype(transport)}
        received = decode(sent, transport)
        assert all(torch.equal(received[k], expected[k]) for k in expected)
        assert message.content["config"]["server-round"] == 3


def test_the_kept_aggregate_is_the_adapter_sent_next():
    s = strategy()
    arrays, _ = s.aggregate_train(1, [reply(filled(1.0), 30), reply(filled(4.0), 10)])
    sent = arrays.to_torch_state_dict()
    assert s.aggregated_state.keys() == sent.keys()
    assert all(torch.equal(s.aggregated_state[k], sent[k]) for k in sent)
