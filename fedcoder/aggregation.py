"""Server-side strategy: which clients train each round and how their adapters are averaged.

Built on Flower's FedAvg, changing only what the adapter recipe needs:
- sampling uses the strategy's own seeded RNG over the nodes' data identities
  (which partition or dataset each node trains on, asked once per node:
  `fedcoder.identities`), not over node ids, which change each time a
  simulation or SuperNode starts; so a run, and a run resumed after a crash,
  samples the same data in each round;
- replies are combined in the order of those identities, so float sums, and
  with them the global adapter, are bit-identical from run to run;
- each reply is checked before it is averaged (same tensors as the global
  adapter, finite values, a sane example count); a bad reply is dropped, never
  averaged in;
- tensors are averaged in float32 whatever the transport dtype, weighted by
  the examples each client actually trained on this round; or, for federations
  that do not trust every member, combined by a coordinate-wise trimmed mean or
  median, which bound the pull of any single client (unweighted: a weight is
  itself something a hostile client could inflate);
- a round with fewer valid replies than `min_train_replies` aggregates nothing,
  so the caller can retry it with a fresh sample.
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

from fedcoder.communication import decode, encode, wire_dtype
from fedcoder.identities import NodeIdentities

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
        min_train_replies: int = 1,
        aggregation: str = "fedavg",
        trim_fraction: float = 0.2,
        wait_for_nodes_s: float = 300.0,
        identities: NodeIdentities | None = None,
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
        self.min_train_replies = min_train_replies
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.rng = random.Random(seed)
        self.wait_for_nodes_s = wait_for_nodes_s
        # Given when the ServerApp asked the nodes before building the strategy.
        self.identities = identities or NodeIdentities()
        self._expected: dict[str, tuple[int, ...]] = {}
        self.dropped: list[tuple[int, str]] = []
        # The last adapter aggregate_train returned, as the float32 tensors it packed:
        # the round loop saves and validates these instead of unpacking the record again.
        self.aggregated_state: dict[str, torch.Tensor] = {}

    def identity(self, node_id: int) -> str:
        """What a node trains on (e.g. "partition 3/10"), or its id if it never said."""
        return self.identities.name(node_id)

    def sample(self, grid: Grid) -> list[int]:
        """Pick this round's clients with the strategy's own RNG, over data identities."""
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
        self.identities.ask(grid, node_ids)
        self.identities.collect(grid)
        candidates = sorted(node_ids, key=lambda node: (self.identity(node), node))
        size = max(int(len(candidates) * self.fraction_train), self.min_train_nodes)
        return self.rng.sample(candidates, min(size, len(candidates)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter (in the transport dtype) to this round's clients."""
        self._expected = {key: tuple(array.shape) for key, array in arrays.items()}
        config["server-round"] = server_round
        wire = wire_dtype(self.transport_dtype)
        if any(array.dtype != wire for array in arrays.values()):
            # The global adapter is float32 (aggregate_train's): re-encoded only for a
            # 16-bit transport, since a float32 one would rebuild the same bytes.
            arrays = encode(arrays.to_torch_state_dict(), self.transport_dtype)
        record = {self.arrayrecord_key: arrays, self.configrecord_key: config}
        return self._construct_messages(RecordDict(record), self.sample(grid), MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the valid replies' adapters in float32 (see the module docstring)."""
        self.dropped = []
        accepted: list[tuple[dict[str, torch.Tensor], MetricRecord]] = []
        ordered = sorted(replies, key=lambda r: self.identity(r.metadata.src_node_id))
        for reply in ordered:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._drop(node, f"client error: {reply.error.reason}")
                continue
            state, metrics, problem = self._unpack(reply)
            if problem:
                self._drop(node, problem)
                continue
            accepted.append((state, metrics))
        if not accepted or len(accepted) < self.min_train_replies:
            return None, None
        states = [state for state, _ in accepted]
        if self.aggregation == "fedavg":
            combined = _weighted_mean(states, [float(m[WEIGHT_KEY]) for _, m in accepted])
        else:
            combined = {
                key: _robust(
                    torch.stack([s[key] for s in states]), self.aggregation, self.trim_fraction
                )
                for key in self._expected
            }
        metrics = self.train_metrics_aggr_fn([_as_content(m) for _, m in accepted], WEIGHT_KEY)
        self.aggregated_state = combined
        return ArrayRecord(combined), metrics

    def _unpack(self, reply: Message) -> tuple[dict[str, torch.Tensor], MetricRecord, str | None]:
        content = reply.content
        if self.arrayrecord_key not in content or "metrics" not in content:
            return {}, MetricRecord(), "reply has no arrays or no metrics"
        metrics = content["metrics"]
        examples = metrics.get(WEIGHT_KEY, 0)
        if not 0 < examples <= self.max_examples:
            return {}, metrics, f"{WEIGHT_KEY}={examples} outside (0, {self.max_examples}]"
        wire = content[self.arrayrecord_key]
        expected_dtype = wire_dtype(self.transport_dtype)
        for key, array in wire.items():
            if array.dtype != expected_dtype:
                return {}, metrics, f"{key}: dtype {array.dtype} != {expected_dtype}"
        state = decode(wire, self.transport_dtype)
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


def _weighted_mean(
    states: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        key: sum(w / total * state[key] for w, state in zip(weights, states, strict=True))
        for key in states[0]
    }


def _robust(stacked: torch.Tensor, method: str, trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise trimmed mean or median over the clients (dimension 0)."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    if method == "median":
        return ordered[(n - 1) // 2 : n // 2 + 1].mean(dim=0)
    cut = int(trim_fraction * n)
    return ordered[cut : n - cut].mean(dim=0)


def _as_content(metrics: MetricRecord) -> RecordDict:
    return RecordDict({"metrics": metrics})
