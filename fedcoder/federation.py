"""The server's round loop: send the global adapter, aggregate, record, checkpoint.

Flower's `Strategy.start` runs the same loop, but always from round 1 and
without per-round hooks; fedcoder needs to persist after every round and to
count the bytes of every payload, so the loop is written out here, calling the
strategy's own `configure_train` and `aggregate_train`.
"""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedcoder.aggregation import AdapterFedAvg
from fedcoder.communication import MIB, CommunicationLog, payload_bytes
from fedcoder.config import RunConfig
from fedcoder.results import RunDirectory
from fedcoder.training import cosine_lr

ROUND_TIMEOUT_S = 24 * 3600.0


def build_strategy(config: RunConfig) -> AdapterFedAvg:
    return AdapterFedAvg(
        fraction_train=config.strategy.fraction_train,
        min_train_nodes=config.strategy.min_train_nodes,
        transport_dtype=config.train.transport_dtype,
        max_examples=config.train.examples_per_round,
        seed=config.train.seed,
    )


def run_federation(
    grid: Grid,
    config: RunConfig,
    run: RunDirectory,
    initial_state: dict[str, torch.Tensor],
    base_model: str,
) -> dict[str, torch.Tensor]:
    """Run every round; return the final global adapter (float32 tensors)."""
    strategy = build_strategy(config)
    strategy.summary()
    total_rounds = config.num_server_rounds
    global_arrays = ArrayRecord({k: v.float() for k, v in initial_state.items()})
    comm = CommunicationLog()

    for server_round in range(1, total_rounds + 1):
        started = time.perf_counter()
        lr = cosine_lr(
            server_round,
            total_rounds,
            config.train.learning_rate_max,
            config.train.learning_rate_min,
        )
        train_config = ConfigRecord({"lr": lr, "num-server-rounds": total_rounds})
        messages = list(strategy.configure_train(server_round, global_arrays, train_config, grid))
        bytes_down = sum(payload_bytes(m.content[strategy.arrayrecord_key]) for m in messages)
        replies = list(grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_S))
        bytes_up = sum(
            payload_bytes(r.content[strategy.arrayrecord_key])
            for r in replies
            if not r.has_error() and strategy.arrayrecord_key in r.content
        )
        aggregated, metrics = strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            raise RuntimeError(f"round {server_round}: no valid client reply ({strategy.dropped})")
        global_arrays = aggregated
        dropped_nodes = {node for node, _ in strategy.dropped}
        clients = [
            _client_entry(r)
            for r in replies
            if not r.has_error() and r.metadata.src_node_id not in dropped_nodes
        ]
        comm.bytes_down += bytes_down
        comm.bytes_up += bytes_up

        entry = {
            "round": server_round,
            "lr": lr,
            "train_loss": float(metrics["train_loss"]),
            "clients": clients,
            "dropped": [{"node_id": node, "reason": why} for node, why in strategy.dropped],
            "examples": sum(int(client["num-examples"]) for client in clients),
            "seconds": time.perf_counter() - started,
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
            "mb_round": (bytes_down + bytes_up) / MIB,
            "bytes_cumulative": comm.total_bytes,
            "mb_cumulative": comm.total_mb,
            "gb_cumulative": comm.total_gb,
        }
        if server_round % config.train.save_every_round == 0 or server_round == total_rounds:
            path = run.save_checkpoint(
                server_round, global_arrays.to_torch_state_dict(), base_model
            )
            entry["checkpoint"] = path.name
        run.record_round(entry)
        log(
            INFO,
            "round %d/%d: loss %.4f, lr %.3g, %.1f s, communication %.2f MB (total %.2f MB)",
            server_round,
            total_rounds,
            entry["train_loss"],
            lr,
            entry["seconds"],
            entry["mb_round"],
            comm.total_mb,
        )
    return global_arrays.to_torch_state_dict()


def _client_entry(reply: Message) -> dict:
    return {"node_id": reply.metadata.src_node_id, **dict(reply.content["metrics"])}
