"""Server-side strategy: which clients train each round and how their adapters are averaged.

Built on Flower's FedAvg, changing only what the adapter recipe needs:
- sampling uses the strategy's own seeded RNG, so a run is reproducible and its
  sampling state can be saved and restored;
- each reply is checked before it is averaged (same tensors as the global
  adapter, finite values, a sane example count); a bad reply is dropped, never
  averaged in;
- tensors are averaged in float32 whatever the transport dtype, weighted by
  the examples each client actually trained on this round.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcoder.communication import decode, encode

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"


class AdapterFedAvg(FedAvg):
    """FedAvg over PEFT adapter tensors (see the module docstring)."""

    def __init__(
        self,
        *,
        fraction_train: float,
        min_train_nodes: int,
        transport_dtype: str,
        max_examples: int,
        seed: int,
        wait_for_nodes_s: float = 300.0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=min_train_nodes,
            min_available_nodes=min_train_nodes,
            weighted_by_key=WEIGHT_KEY,
        )
        self.transport_dtype = transport_dtype
        self.max_examples = max_examples
        self.rng = random.Random(seed)
        self.wait_for_nodes_s = wait_for_nodes_s
        self._expected: dict[str, tuple[int, ...]] = {}
        self.dropped: list[tuple[int, str]] = []

    def sample(self, grid: Grid) -> list[int]:
        """Pick this round's clients with the strategy's own RNG (sorted ids: reproducible)."""
        deadline = time.monotonic() + self.wait_for_nodes_s
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= self.min_available_nodes or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if len(node_ids) < self.min_available_nodes:
            raise RuntimeError(
                f"only {len(node_ids)} nodes connected, at least "
                f"{self.min_available_nodes} needed (strategy.min-train-nodes)"
            )
        size = max(int(len(node_ids) * self.fraction_train), self.min_train_nodes)
        return self.rng.sample(node_ids, min(size, len(node_ids)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter (in the transport dtype) to this round's clients."""
        global_state = arrays.to_torch_state_dict()
        self._expected = {key: tuple(value.shape) for key, value in global_state.items()}
        config["server-round"] = server_round
        record = {
            self.arrayrecord_key: encode(global_state, self.transport_dtype),
            self.configrecord_key: config,
        }
        return self._construct_messages(RecordDict(record), self.sample(grid), MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies' adapters in float32, weighted by examples trained."""
        self.dropped = []
        accepted: list[tuple[dict[str, torch.Tensor], MetricRecord]] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._drop(node, f"client error: {reply.error.reason}")
                continue
            state, metrics, problem = self._unpack(reply)
            if problem:
                self._drop(node, problem)
                continue
            accepted.append((state, metrics))
        if not accepted:
            return None, None
        weights = [float(metrics[WEIGHT_KEY]) for _, metrics in accepted]
        total = sum(weights)
        averaged = {
            key: sum(
                w / total * state[key] for w, (state, _) in zip(weights, accepted, strict=True)
            )
            for key in self._expected
        }
        metrics = self.train_metrics_aggr_fn([_as_content(m) for _, m in accepted], WEIGHT_KEY)
        return ArrayRecord(averaged), metrics

    def _unpack(self, reply: Message) -> tuple[dict[str, torch.Tensor], MetricRecord, str | None]:
        content = reply.content
        if self.arrayrecord_key not in content or "metrics" not in content:
            return {}, MetricRecord(), "reply has no arrays or no metrics"
        metrics = content["metrics"]
        examples = metrics.get(WEIGHT_KEY, 0)
        if not 0 < examples <= self.max_examples:
            return {}, metrics, f"{WEIGHT_KEY}={examples} outside (0, {self.max_examples}]"
        state = decode(content[self.arrayrecord_key], self.transport_dtype)
        if state.keys() != self._expected.keys():
            missing = sorted(self._expected.keys() - state.keys())
            extra = sorted(state.keys() - self._expected.keys())
            return {}, metrics, f"adapter keys differ (missing {missing[:2]}, extra {extra[:2]})"
        for key, tensor in state.items():
            if tuple(tensor.shape) != self._expected[key]:
                return {}, metrics, f"{key}: shape {tuple(tensor.shape)} != {self._expected[key]}"
            if not torch.isfinite(tensor).all():
                return {}, metrics, f"{key}: non-finite values"
        if not math.isfinite(metrics.get("train_loss", 0.0)):
            return {}, metrics, "train_loss is not finite"
        return state, metrics, None

    def _drop(self, node: int, reason: str) -> None:
        log.warning("Dropping reply from node %d: %s", node, reason)
        self.dropped.append((node, reason))


def _as_content(metrics: MetricRecord) -> RecordDict:
    return RecordDict({"metrics": metrics})
