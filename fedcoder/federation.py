"""The server's round loop: send the global adapter, aggregate, record, persist.

Flower's `Strategy.start` runs the same loop, but always from round 1, without
per-round hooks and without retrying a failed round; fedcoder persists its
state after every round (so a killed server resumes where it stopped), counts
the bytes of every payload, and retries a round that got too few valid
replies. The strategy's own `configure_train` and `aggregate_train` do the
sampling and the averaging.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedcoder.aggregation import AdapterFedAvg
from fedcoder.communication import MIB, CommunicationLog, payload_bytes
from fedcoder.config import RunConfig
from fedcoder.identities import NodeIdentities
from fedcoder.messaging import send_and_receive
from fedcoder.results import RunDirectory
from fedcoder.run_state import RunState
from fedcoder.training import cosine_lr


class RoundFailedError(RuntimeError):
    """A round got too few valid replies in every allowed attempt."""


def build_strategy(config: RunConfig, identities: NodeIdentities | None = None) -> AdapterFedAvg:
    return AdapterFedAvg(
        fraction_train=config.strategy.fraction_train,
        min_train_nodes=config.strategy.min_train_nodes,
        transport_dtype=config.train.transport_dtype,
        max_examples=config.train.examples_per_round,
        seed=config.train.seed,
        min_train_replies=config.strategy.min_train_replies,
        aggregation=config.strategy.aggregation,
        trim_fraction=config.strategy.trim_fraction,
        identities=identities,
    )


@dataclass
class _Attempt:
    """One try at a round: who was asked, what came back, what was used."""

    sampled: list[int]
    replies: list[Message]
    bytes_down: int
    bytes_up: int
    aggregated: ArrayRecord | None
    metrics: Any
    dropped: list[tuple[int, str]] = field(default_factory=list)
    # Pushing the messages until the last reply is in, and checking and averaging the
    # replies: with the clients' own handler-seconds, where a round's time goes.
    exchange_seconds: float = 0.0
    aggregate_seconds: float = 0.0

    def record(self, strategy: AdapterFedAvg) -> dict[str, Any]:
        answered = {reply.metadata.src_node_id for reply in self.replies}
        return {
            "sampled": [strategy.identity(node) for node in self.sampled],
            "dropped": [
                {"node_id": node, "client": strategy.identity(node), "reason": why}
                for node, why in self.dropped
            ],
            "no_reply": [strategy.identity(n) for n in self.sampled if n not in answered],
            "aggregated": self.aggregated is not None,
            "exchange_seconds": self.exchange_seconds,
            "aggregate_seconds": self.aggregate_seconds,
        }


def run_federation(
    grid: Grid,
    config: RunConfig,
    run: RunDirectory,
    initial_state: dict[str, torch.Tensor],
    base_model: str,
    resume_from: RunState | None = None,
    identities: NodeIdentities | None = None,
) -> dict[str, torch.Tensor]:
    """Run the remaining rounds; return the final global adapter (float32 tensors).

    `identities`: the nodes' answers to the data-identity query, if the caller asked already.
    """
    strategy = build_strategy(config, identities)
    strategy.summary()
    total_rounds = config.num_server_rounds
    comm = CommunicationLog()
    first_round = 1
    global_state = {k: v.float() for k, v in initial_state.items()}
    if resume_from is not None:
        strategy.rng.setstate(resume_from.rng_state)
        comm = CommunicationLog(resume_from.bytes_down, resume_from.bytes_up)
        global_state = resume_from.adapter
        first_round = resume_from.round + 1
        log(INFO, "resuming %s after round %d", run.path, resume_from.round)
    global_arrays = ArrayRecord(global_state)
    validator = _validator(config, base_model)
    # Writing a round's results (metrics, plot, state, checkpoint) overlaps the next round's
    # training; the next write waits for it, so the saved state is never more than a round
    # behind, and every write is atomic (a crash mid-write keeps the round before).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcoder-persist") as writer:
        written: Future | None = None
        for server_round in range(first_round, total_rounds + 1):
            entry, global_arrays, state = _run_round(
                grid, strategy, config, global_arrays, server_round, comm, validator
            )
            checkpoint = (
                "validation" in entry
                or server_round % config.train.save_every_round == 0
                or server_round == total_rounds
            )
            if checkpoint:
                entry["checkpoint"] = run.checkpoint_dir(server_round).name
            if written is not None:
                written.result()  # raises what the previous round's write raised
            saved = RunState(
                round=server_round,
                adapter=state,
                rng_state=strategy.rng.getstate(),
                bytes_down=comm.bytes_down,
                bytes_up=comm.bytes_up,
                rounds=[],  # run.rounds once this round is recorded (_persist)
                fingerprint=config.fingerprint(),
            )
            written = writer.submit(_persist, run, entry, saved, base_model)
            log(
                INFO,
                "round %d/%d: loss %.4f, lr %.3g, %.1f s, %d retries, %.2f MB (total %.2f MB)%s",
                server_round,
                total_rounds,
                entry["train_loss"],
                entry["lr"],
                entry["seconds"],
                entry["retries"],
                entry["mb_round"],
                comm.total_mb,
                f", validation pass@1 {entry['validation']['pass@1']:.3f}"
                if "validation" in entry
                else "",
            )
        if written is not None:
            written.result()
    return global_arrays.to_torch_state_dict()


def _run_round(
    grid: Grid,
    strategy: AdapterFedAvg,
    config: RunConfig,
    global_arrays: ArrayRecord,
    server_round: int,
    comm: CommunicationLog,
    validator: Any,
) -> tuple[dict[str, Any], ArrayRecord, dict[str, torch.Tensor]]:
    """Train, aggregate and validate one round.

    Returns its metrics entry and the new global adapter, as sent and as tensors.
    """
    started = time.perf_counter()
    total_rounds = config.num_server_rounds
    lr = cosine_lr(
        server_round, total_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    attempts = []
    for _ in range(1 + config.strategy.max_round_retries):
        attempt = _attempt_round(grid, strategy, config, global_arrays, server_round, lr)
        attempts.append(attempt)
        comm.bytes_down += attempt.bytes_down
        comm.bytes_up += attempt.bytes_up
        if attempt.aggregated is not None:
            break
        log(WARNING, "round %d: too few valid replies (%s)", server_round, attempt.dropped)
    else:
        raise RoundFailedError(
            f"round {server_round}: fewer than {config.strategy.min_train_replies} valid "
            f"replies in {len(attempts)} attempts (strategy.max-round-retries); the run "
            "can be continued later with results.resume=true"
        )
    dropped = {node for node, _ in attempt.dropped}
    accepted = [
        r for r in attempt.replies if not r.has_error() and r.metadata.src_node_id not in dropped
    ]
    clients = sorted(  # replies arrive in any order
        (_client_entry(strategy, r) for r in accepted), key=lambda c: c["client"]
    )
    records = [a.record(strategy) for a in attempts]
    bytes_down = sum(a.bytes_down for a in attempts)
    bytes_up = sum(a.bytes_up for a in attempts)
    entry: dict[str, Any] = {
        "round": server_round,
        "lr": lr,
        "train_loss": float(attempt.metrics["train_loss"]),
        "clients": clients,
        "dropped": records[-1]["dropped"],
        "attempts": records,
        "retries": len(attempts) - 1,
        "examples": sum(int(client["num-examples"]) for client in clients),
        "bytes_down": bytes_down,
        "bytes_up": bytes_up,
        "mb_round": (bytes_down + bytes_up) / MIB,
        "bytes_cumulative": comm.total_bytes,
        "mb_cumulative": comm.total_mb,
        "gb_cumulative": comm.total_gb,
    }
    state = strategy.aggregated_state
    if validator is not None and (
        server_round % config.validation.every_rounds == 0 or server_round == total_rounds
    ):
        entry["validation"] = validator.score(state)
    entry["seconds"] = time.perf_counter() - started
    return entry, attempt.aggregated, state


def _persist(run: RunDirectory, entry: dict[str, Any], saved: RunState, base_model: str) -> None:
    """Write a finished round: its checkpoint if due, metrics.json and plot, resumable state."""
    if "checkpoint" in entry:
        run.save_checkpoint(entry["round"], saved.adapter, base_model)
    run.record_round(entry)
    run.save_state(dataclasses.replace(saved, rounds=run.rounds))


def _client_entry(strategy: AdapterFedAvg, reply: Message) -> dict[str, Any]:
    node = reply.metadata.src_node_id
    return {"node_id": node, "client": strategy.identity(node), **dict(reply.content["metrics"])}


def _attempt_round(
    grid: Grid,
    strategy: AdapterFedAvg,
    config: RunConfig,
    global_arrays: ArrayRecord,
    server_round: int,
    lr: float,
) -> _Attempt:
    train_config = ConfigRecord({"lr": lr, "num-server-rounds": config.num_server_rounds})
    messages = list(strategy.configure_train(server_round, global_arrays, train_config, grid))
    key = strategy.arrayrecord_key
    timeout = config.strategy.round_timeout or None
    # Replies not in by the timeout count as missing; Flower drops them when they come.
    pushed = time.perf_counter()
    replies = send_and_receive(grid, messages, timeout=timeout)
    collected = time.perf_counter()
    aggregated, metrics = strategy.aggregate_train(server_round, replies)
    return _Attempt(
        sampled=[m.metadata.dst_node_id for m in messages],
        replies=replies,
        bytes_down=sum(payload_bytes(m.content[key]) for m in messages),
        bytes_up=sum(
            payload_bytes(r.content[key]) for r in replies if not r.has_error() and key in r.content
        ),
        aggregated=aggregated,
        metrics=metrics,
        dropped=list(strategy.dropped),
        exchange_seconds=collected - pushed,
        aggregate_seconds=time.perf_counter() - collected,
    )


def _validator(config: RunConfig, base_model: str):
    if config.validation.every_rounds == 0:
        return None
    from fedcoder.validation import Validator  # loads the eval stack only when asked for

    return Validator(config, base_model)
