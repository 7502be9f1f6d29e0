"""The server strategy: example-weighted fp32 FedAvg, and bad replies dropped."""

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcoder.aggregation import AdapterFedAvg
from fedcoder.communication import encode

# Flower creates messages inside a running app, which sets the run identity.
TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1

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


def test_sampling_is_seeded():
    class Grid:
        def get_node_ids(self):
            return list(range(100, 110))

    first = [strategy().sample(Grid()) for _ in range(3)]
    assert first[0] == first[1] == first[2] and len(first[0]) == 2
    s = strategy()
    assert len({tuple(s.sample(Grid())) for _ in range(10)}) > 1


def test_array_record_input_is_unchanged():
    assert isinstance(encode(GLOBAL), ArrayRecord)
