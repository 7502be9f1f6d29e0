"""Client training on one GPU: FlowerTune's recipe and fedcoder's, side by side.

Both train the Phi-4-mini-shaped model (bench/phi4mini.py) with the same numerics (nf4 4-bit
base with double quantization and bf16 compute, prepare_model_for_kbit_training, DoRA r16
alpha 64 dropout 0.075 on qkv/o/gate_up/down, paged AdamW 8-bit, bf16 autocast, batch 16,
10 steps, sequences cut at 512 tokens, cosine LR over rounds) on Code Alpaca examples
tokenized with o200k_base, in the same order, from the same global adapter, with the same
client sampling, so their losses can be compared step by step.

Parts (--parts), run in this order:
  levers     fedcoder's train_round on one client-round with each speed-up switched on in turn
  fedcoder   the 10-round, 2-clients-per-round experiment through fedcoder's client path
             (resident model, `fedcoder.training.train_round`), FedAvg between rounds
  reference  the same experiment as the FlowerTune app's client runs it: the base model and
             tokenizer loaded afresh for every client-round, the whole partition tokenized,
             a transformers Trainer with gradient checkpointing and batches padded to their
             longest example (trl 0.8.1's SFTTrainer adds nothing else to the Trainer)
  profile    torch.profiler over three steps of fedcoder's path, with and without CUDA graphs:
             GPU time by kernel family, and how busy the GPU is
  compile    fedcoder's path with torch.compile on every decoder layer (last: may not finish)

Writes OUT/throughput.json and OUT/steps.csv and prints a table. "Tokens" are input tokens
without padding. --tiny runs everything on CPU with a 2-layer model, to check the script.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phi4mini  # noqa: E402
from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.lora.variants import DoraLinearVariant  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from fedcoder import cuda_graphs, training  # noqa: E402
from fedcoder.config import LoraSettings, ModelSettings, TrainSettings  # noqa: E402
from fedcoder.data import (  # noqa: E402
    IGNORE_INDEX,
    collate,
    load_partition,
    micro_batches,
    round_sample,
    tokenize_example,
)
from fedcoder.dora import FactoredNormDora  # noqa: E402
from fedcoder.model import (  # noqa: E402
    adapter_state,
    add_adapter,
    compile_decoder_layers,
    load_base_model,
    lora_config,
    set_adapter_state,
)

PARTS = ("levers", "fedcoder", "profile", "reference", "compile")
NUM_CLIENTS = 10
CLIENTS_PER_ROUND = 2


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda() else 0.0


def reserved_gib() -> float:
    # What the process holds, CUDA graph pools included: replays allocate nothing, so after
    # the round that captured them the peak of allocations no longer shows their memory.
    return torch.cuda.memory_reserved() / 2**30 if cuda() else 0.0


def free_memory() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


@contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in the main thread after `seconds` (for torch.compile)."""

    def expire(signum, frame):
        raise TimeoutError(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- the experiment both recipes run ----------------------------------------------------------


@dataclasses.dataclass
class Experiment:
    model_path: str
    model: ModelSettings
    train: TrainSettings
    partitions: list[list[dict]]
    rounds: int
    schedule: list[list[int]]  # partitions sampled in each round

    def lr(self, server_round: int) -> float:
        t = self.train
        return training.cosine_lr(
            server_round, self.rounds, t.learning_rate_max, t.learning_rate_min
        )

    def order(self, server_round: int, partition: int) -> list[int]:
        t = self.train
        return round_sample(
            len(self.partitions[partition]),
            t.examples_per_round,
            seed=t.seed,
            server_round=server_round,
            dynamic_seed=t.dynamic_data_seed,
        )


def make_experiment(
    model_path: Path | str, data: Path | str, *, rounds: int, steps: int, batch_size: int
) -> Experiment:
    quantized = cuda()
    model = ModelSettings(
        name=str(model_path),
        quantization=4 if quantized else 0,
        gradient_checkpointing=True,
        attn_implementation="sdpa",
        lora=LoraSettings(r=16, alpha=64, dropout=0.075, use_dora=True),
    )
    train = TrainSettings(
        seq_length=512,
        batch_size=batch_size,
        max_steps=steps,
        optim="paged_adamw_8bit" if quantized else "adamw_torch",
        bf16=quantized,
        learning_rate_max=5e-5,
        learning_rate_min=5e-6,
        dynamic_data_seed=True,
        seed=42,
    )
    partitions = [
        load_partition(str(data), pid, NUM_CLIENTS, seed=train.seed).to_list()
        for pid in range(NUM_CLIENTS)
    ]
    rng = random.Random(train.seed)
    schedule = [sorted(rng.sample(range(NUM_CLIENTS), CLIENTS_PER_ROUND)) for _ in range(rounds)]
    return Experiment(str(model_path), model, train, partitions, rounds, schedule)


def fedavg(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # Every client trains on the same number of examples, so the weights are equal.
    return {key: sum(state[key] for state in states) / len(states) for key in states[0]}


def cpu_state(model) -> dict[str, torch.Tensor]:
    return {key: value.float().cpu().clone() for key, value in adapter_state(model).items()}


def client_seed(exp: Experiment, server_round: int, partition: int) -> int:
    return exp.train.seed * 100_003 + server_round * 1_009 + partition  # as client_app.py


# --- fedcoder ---------------------------------------------------------------------------------


def load_resident(exp: Experiment):
    """fedcoder's resident model, built with checkpointing so the levers can switch it off."""
    reset_peak()
    started = time.perf_counter()
    base, tokenizer = load_base_model(
        exp.model_path,
        quantization=exp.model.quantization,
        dtype=torch.bfloat16 if exp.train.bf16 else torch.float32,
        attn_implementation=exp.model.attn_implementation,
    )
    model = add_adapter(base, exp.model, seed=exp.train.seed)
    sync()
    return model, tokenizer, time.perf_counter() - started


def set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.enable_input_require_grads()
    else:
        base.gradient_checkpointing_disable()
        if hasattr(base, "_require_grads_hook"):
            base.disable_input_require_grads()


def set_factored_dora(model, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter, variant in module.lora_variant.items():
                if isinstance(variant, DoraLinearVariant):
                    module.lora_variant[adapter] = FactoredNormDora() if on else DoraLinearVariant()


def set_fused_loss(on: bool) -> None:
    # fedcoder.training takes the chunked head loss only for the model types listed here.
    training.PLAIN_HEAD_MODEL_TYPES = frozenset({"phi3"} if on else ())


@contextmanager
def no_dropout(model):
    """DoRA with lora_dropout 0 (a different model update: an option, never the default)."""
    saved = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in list(module.lora_dropout):
                saved.append((module, adapter, module.lora_dropout[adapter]))
                module.lora_dropout[adapter] = torch.nn.Identity()
    try:
        yield
    finally:
        for module, adapter, dropout in saved:
            module.lora_dropout[adapter] = dropout


def fedcoder_client_round(exp, model, tokenizer, settings, state, server_round, partition):
    set_adapter_state(model, state)
    torch.manual_seed(client_seed(exp, server_round, partition))
    reset_peak()
    sync()
    started = time.perf_counter()
    report = training.train_round(
        model,
        tokenizer,
        exp.partitions[partition],
        settings,
        lr=exp.lr(server_round),
        server_round=server_round,
    )
    sync()
    seconds = time.perf_counter() - started
    return report, seconds, peak_gib()


@dataclasses.dataclass(frozen=True)
class Lever:
    name: str
    checkpointing: bool = False
    factored_dora: bool = True
    fused_loss: bool = True
    micro_batch_tokens: int = 4096
    packing: bool = True
    optimizer: str = "adamw_8bit"  # or "paged_adamw_8bit"; "bitsandbytes": its own paged step
    dropout0: bool = False
    cuda_graphs: bool = False


FEDCODER_LEVERS = [
    Lever("resident model, GC, padded batch of 16", True, False, False, 0, False, "bitsandbytes"),
    Lever("+ factored DoRA norm", True, True, False, 0, False, "bitsandbytes"),
    Lever("+ chunked head loss on labelled tokens", True, True, True, 0, False, "bitsandbytes"),
    Lever("+ no GC, micro-batches of <= 4096 tokens", packing=False, optimizer="bitsandbytes"),
    Lever("+ packing", optimizer="bitsandbytes"),
    Lever("+ 8-bit AdamW step without a GPU sync per parameter", optimizer="paged_adamw_8bit"),
    Lever("+ optimizer state in plain GPU memory"),
    Lever("+ CUDA graphs of each micro-batch shape (fedcoder default)", cuda_graphs=True),
    Lever("option: lora_dropout 0 (changes the update)", dropout0=True, cuda_graphs=True),
]  # fmt: skip
DEFAULT_LEVER = FEDCODER_LEVERS[-2]
_MAKE_OPTIMIZER = training.make_optimizer


def bitsandbytes_paged_adamw(params, name, lr, device):
    """bitsandbytes' PagedAdamW8bit as the reference recipe's Trainer builds it."""
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.0)


def apply_lever(model, exp, lever: Lever) -> TrainSettings:
    cuda_graphs.forget(model)  # they would replay the modules of the lever before
    set_checkpointing(model, lever.checkpointing)
    set_factored_dora(model, lever.factored_dora)
    set_fused_loss(lever.fused_loss)
    bitsandbytes = lever.optimizer == "bitsandbytes"
    training.make_optimizer = bitsandbytes_paged_adamw if bitsandbytes else _MAKE_OPTIMIZER
    return dataclasses.replace(
        exp.train,
        micro_batch_tokens=lever.micro_batch_tokens,
        packing=lever.packing,
        optim="paged_adamw_8bit" if bitsandbytes else lever.optimizer,
        cuda_graphs=lever.cuda_graphs,
    )


def run_levers(exp, model, tokenizer, state, repeats: int, first: int) -> list[dict]:
    rows = []
    server_round, partition = 1, exp.schedule[0][0]
    for lever in FEDCODER_LEVERS[first:]:
        settings = apply_lever(model, exp, lever)
        runs = []
        with no_dropout(model) if lever.dropout0 else _nothing():
            for _ in range(repeats):  # the first run of a new shape pays for warm-up
                runs.append(
                    fedcoder_client_round(
                        exp, model, tokenizer, settings, state, server_round, partition
                    )
                )
        report, seconds, peak = runs[-1]
        row = {
            "variant": lever.name,
            "seconds": seconds,
            "step_s": seconds / report.steps,
            "tokens": report.tokens,
            "tokens_per_s": report.tokens / seconds,
            "peak_gib": peak,
            "train_loss": report.train_loss,
            "step_losses": report.step_losses,
            "first_run_seconds": runs[0][1],
        }
        print(json.dumps({k: v for k, v in row.items() if k != "step_losses"}), flush=True)
        rows.append(row)
    return rows


@contextmanager
def _nothing():
    yield


def check_numerics(exp, model, tokenizer, state) -> dict:
    """One batch, no dropout: the reference's loss (PEFT DoRA, padded, transformers' loss) and
    fedcoder's (factored DoRA, packed micro-batches, chunked head loss) on the same adapter."""
    set_adapter_state(model, state)
    records = exp.partitions[exp.schedule[0][0]][:16]
    examples = [tokenize_example(tokenizer, r, exp.train.seq_length) for r in records]
    device = next(p for p in model.parameters() if p.requires_grad).device
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=exp.train.bf16):
        set_factored_dora(model, False)
        batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
        reference = model(**batch).loss.item()
        set_factored_dora(model, True)
        set_fused_loss(True)
        batches = micro_batches(
            examples, tokenizer.pad_token_id, max_tokens=4096, row_length=512, packing=True
        )
        count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        ours = sum(training.summed_loss(model, batch).item() for batch in batches)
    return {"reference_loss": reference, "fedcoder_loss": ours / count}


def run_fedcoder(exp, model, tokenizer, state, settings, load_seconds) -> dict:
    rounds = []
    for server_round, sampled in enumerate(exp.schedule, start=1):
        started = time.perf_counter()
        states, clients = [], []
        for partition in sampled:
            report, seconds, peak = fedcoder_client_round(
                exp, model, tokenizer, settings, state, server_round, partition
            )
            states.append(cpu_state(model))
            clients.append(
                {
                    "partition": partition,
                    "train_seconds": seconds,
                    "tokens": report.tokens,
                    "tokens_per_s": report.tokens / seconds,
                    "peak_gib": peak,
                    "reserved_gib": reserved_gib(),
                    "train_loss": report.train_loss,
                    "step_losses": report.step_losses,
                }
            )
        state = fedavg(states)
        rounds.append(
            {"round": server_round, "seconds": time.perf_counter() - started, "clients": clients}
        )
        print(f"fedcoder round {server_round}: {rounds[-1]['seconds']:.1f} s", flush=True)
    total = sum(r["seconds"] for r in rounds) + load_seconds
    return {"load_seconds": load_seconds, "rounds": rounds, "total_seconds": total}


# Kernel families, by the first pattern a kernel's name contains (lower case).
KERNEL_FAMILIES = (
    ("matmul", ("gemm", "cutlass", "sm90_", "sm100_", "cublas", "nvjet", "xmma")),
    ("4-bit dequantize", ("dequantize", "kdequant")),
    ("attention", ("fmha", "attention", "flash", "efficient")),
    ("softmax / log-softmax", ("softmax",)),
    ("8-bit optimizer", ("koptimizer", "optimizer")),
    ("dropout", ("fused_dropout", "bernoulli")),
    ("reduction", ("reduce",)),
    ("copy / cast", ("copy", "cat", "gather", "scatter", "index")),
    ("elementwise", ("elementwise", "vectorized")),
)


def kernel_family(name: str) -> str:
    lower = name.lower()
    return next((f for f, keys in KERNEL_FAMILIES if any(k in lower for k in keys)), "other")


def run_profile(exp, model, tokenizer, state, settings, out: Path) -> dict:
    """Kernel times of three steps, replayed from CUDA graphs and eager, after a warm-up round.

    The GPU time by kernel family says what a step's work is; against the wall time it says
    how much of the step the GPU idles (host-bound) with and without the graphs.
    """
    from torch.profiler import ProfilerActivity, profile

    partition = exp.schedule[0][0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    results = {}
    for name, graphs in (("graphs", True), ("eager", False)):
        variant = dataclasses.replace(settings, cuda_graphs=graphs)
        fedcoder_client_round(exp, model, tokenizer, variant, state, 1, partition)  # warm-up
        short = dataclasses.replace(variant, max_steps=3)
        with profile(activities=activities) as prof:
            report, seconds, _ = fedcoder_client_round(
                exp, model, tokenizer, short, state, 1, partition
            )
        events = prof.key_averages()
        sort = "self_cuda_time_total" if cuda() else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=60, max_name_column_width=90)
        (out / f"profile-{name}.txt").write_text(table)
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        families: dict[str, float] = {}
        for event in kernels:
            family = kernel_family(event.key)
            families[family] = families.get(family, 0.0) + event.self_device_time_total / 1e6
        busy = sum(families.values())
        launches = sum(
            e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))
        )
        results[name] = {
            "seconds": seconds,
            "steps": short.max_steps,
            "tokens": report.tokens,
            "kernel_seconds": busy,
            "gpu_busy_fraction": busy / seconds if seconds else 0.0,
            "kernel_launches": launches,
            "kernels": sum(e.count for e in kernels),
            "by_family_seconds": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        }
        print(f"profile {name}: {json.dumps(results[name])}", flush=True)
    return results


# --- the FlowerTune client recipe -------------------------------------------------------------


class InOrderTrainer(Trainer):
    """The Trainer, fed the examples in fedcoder's order so both recipes see the same batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(loss.item())  # the logged loss is rounded to 4 digits
        return loss


class StepClock(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.seconds.append(time.perf_counter() - self._started)


def reference_model(exp):
    """FlowerTune's get_model: the quantized base, kbit preparation with checkpointing, DoRA."""
    kwargs = {"dtype": torch.bfloat16 if exp.train.bf16 else torch.float32}
    if exp.model.quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(
        exp.model_path, attn_implementation="sdpa", **kwargs
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.config.use_cache = False
    return get_peft_model(model, lora_config(exp.model.lora))


def reference_server_work(exp, state=None) -> float:
    """FlowerTune's server loads a whole model for the initial adapter, and again for every
    checkpoint it saves (rounds 5 and 10 here); the seconds one such load (and save) takes."""
    started = time.perf_counter()
    model = reference_model(exp)
    if state is None:
        adapter_state(model)
    else:
        set_adapter_state(model, state)
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
    del model
    free_memory()
    return time.perf_counter() - started


def reference_client_round(exp, state, server_round, partition) -> tuple[dict, dict]:
    reset_peak()
    started = time.perf_counter()
    model = reference_model(exp)
    tokenizer = AutoTokenizer.from_pretrained(exp.model_path)
    set_adapter_state(model, state)
    sync()
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    tokenized = [
        tokenize_example(tokenizer, record, exp.train.seq_length)
        for record in exp.partitions[partition]
    ]
    examples = [tokenized[i] for i in exp.order(server_round, partition)]
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=exp.train.batch_size,
            gradient_accumulation_steps=1,
            max_steps=exp.train.max_steps,
            learning_rate=exp.lr(server_round),
            lr_scheduler_type="constant",
            optim=exp.train.optim,
            bf16=exp.train.bf16,
            use_cpu=not cuda(),
            gradient_checkpointing=True,
            max_grad_norm=exp.train.max_grad_norm,
            weight_decay=0.0,
            seed=exp.train.seed,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        clock = StepClock()
        trainer = InOrderTrainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
            callbacks=[clock],
        )
        setup_seconds = time.perf_counter() - started
        trainer.train()
    sync()
    train_seconds = time.perf_counter() - started - setup_seconds
    new_state = cpu_state(model)
    peak = peak_gib()
    losses = trainer.step_losses
    trainer.accelerator.free_memory()  # accelerate keeps references to the model and optimizer
    del trainer, model
    free_memory()
    left_gib = torch.cuda.memory_allocated() / 2**30 if cuda() else 0.0
    size = exp.train.batch_size
    batches = [examples[i : i + size] for i in range(0, len(examples), size)]
    tokens = [sum(len(e.input_ids) for e in batch) for batch in batches]
    padded = [len(batch) * max(len(e.input_ids) for e in batch) for batch in batches]
    steps = clock.seconds
    client = {
        "partition": partition,
        "load_seconds": load_seconds,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "step_seconds": steps,
        "tokens": sum(tokens),
        "padded_tokens": sum(padded),
        "tokens_per_s": sum(tokens) / sum(steps),
        "tokens_per_s_with_load": sum(tokens) / (load_seconds + setup_seconds + train_seconds),
        "peak_gib": peak,
        "gib_left_after_round": left_gib,
        "step_losses": losses,
        "train_loss": sum(losses) / len(losses),
    }
    return client, new_state


def run_reference(exp, state, rounds: int, deadline: float, saved: Path | None) -> dict:
    """The reference experiment's rounds; with `saved`, continued from (and saved to) there
    after each round, so that its 10 rounds can span processes (a device call is 10 minutes).
    Each round records the process it ran in: a continued run starts without the GPU memory
    that reloading leaks within one process, so its rounds are the faster for it."""
    results = {"server_load_seconds": [], "rounds": [], "process": 0}
    if saved and (saved / "reference.json").is_file():
        from safetensors.torch import load_file

        results = json.loads((saved / "reference.json").read_text())
        results["process"] += 1
        state = load_file(saved / "state.safetensors")
        print(f"reference: continuing after round {len(results['rounds'])}", flush=True)
    else:
        results["server_load_seconds"].append(reference_server_work(exp))
    for server_round, sampled in enumerate(exp.schedule[:rounds], start=1):
        if server_round <= len(results["rounds"]):
            continue
        if time.perf_counter() > deadline:
            print(f"reference: stopped before round {server_round} (time budget)", flush=True)
            break
        started = time.perf_counter()
        clients, states = [], []
        for partition in sampled:
            client, new_state = reference_client_round(exp, state, server_round, partition)
            clients.append(client)
            states.append(new_state)
        state = fedavg(states)
        if server_round % 5 == 0 or server_round == exp.rounds:
            results["server_load_seconds"].append(reference_server_work(exp, state))
        seconds = time.perf_counter() - started
        results["rounds"].append(
            {
                "round": server_round,
                "seconds": seconds,
                "process": results["process"],
                "clients": clients,
            }
        )
        print(f"reference round {server_round}: {seconds:.1f} s", flush=True)
        if saved:
            from safetensors.torch import save_file

            saved.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, saved / "state.safetensors")
            (saved / "reference.json").write_text(json.dumps(results))
    results["total_seconds"] = (
        sum(r["seconds"] for r in results["rounds"]) + results["server_load_seconds"][0]
    )
    return results


def run_compile(exp, model, tokenizer, state, seconds: int) -> dict:
    settings = apply_lever(model, exp, DEFAULT_LEVER)
    started = time.perf_counter()
    try:
        with time_limit(seconds):
            compile_decoder_layers(model, "inductor")  # what model.compile = "inductor" does
            partition = exp.schedule[0][0]
            first = fedcoder_client_round(exp, model, tokenizer, settings, state, 1, partition)
            report, run_seconds, peak = fedcoder_client_round(
                exp, model, tokenizer, settings, state, 1, partition
            )
    except Exception as err:  # a compile failure is a result here, not a crash
        return {"error": f"{type(err).__name__}: {str(err)[:300]}",
                "seconds": time.perf_counter() - started}  # fmt: skip
    return {
        "first_run_seconds": first[1],
        "seconds": run_seconds,
        "tokens_per_s": report.tokens / run_seconds,
        "peak_gib": peak,
        "train_loss": report.train_loss,
    }


# --- output -----------------------------------------------------------------------------------


def environment() -> dict:
    import peft
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": torch.cuda.get_device_name(0) if cuda() else platform.processor() or "cpu",
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return info


def write_steps_csv(path: Path, results: dict) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["recipe", "round", "partition", "step", "loss"])
        for recipe in ("reference", "fedcoder"):
            for entry in results.get(recipe, {}).get("rounds", []):
                for client in entry["clients"]:
                    for step, loss in enumerate(client["step_losses"], start=1):
                        writer.writerow([recipe, entry["round"], client["partition"], step, loss])


def summary(results: dict) -> str:
    lines = ["| what | s/step | tokens/s | peak GiB | round s |", "|---|---|---|---|---|"]
    for row in results.get("levers", []):
        lines.append(
            f"| {row['variant']} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} "
            f"| {row['peak_gib']:.1f} | {row['seconds']:.1f} |"
        )
    for recipe in ("reference", "fedcoder"):
        rounds = results.get(recipe, {}).get("rounds", [])
        clients = [c for r in rounds for c in r["clients"]]
        if not clients:
            continue
        tokens = sum(c["tokens"] for c in clients)
        train = sum(sum(c["step_seconds"]) if "step_seconds" in c else c["train_seconds"]
                    for c in clients)  # fmt: skip
        steps = sum(len(c["step_losses"]) for c in clients)
        lines.append(
            f"| {recipe}: {len(rounds)} rounds x {CLIENTS_PER_ROUND} clients | "
            f"{train / steps:.3f} | {tokens / train:,.0f} | "
            f"{max(c['peak_gib'] for c in clients):.1f} | "
            f"{results[recipe]['total_seconds'] / len(rounds):.1f} |"
        )
    return "\n".join(lines)


def tiny_config():
    """Phi-4-mini's vocabulary and attention layout on 2 narrow layers: a CPU dry run."""
    config = phi4mini.phi4mini_config()
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2})  # fmt: skip
    return config


def checksum(state: dict[str, torch.Tensor]) -> float:
    """Identifies the initial adapter, so separate runs can be shown to start from the same one."""
    return float(sum(value.double().abs().sum() for value in state.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/phi4mini_random"))
    parser.add_argument("--tokenizer", type=Path, default=Path("/tmp/o200k_tok"))
    parser.add_argument("--data", type=Path, required=True, help="Code Alpaca .jsonl")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--parts", default="levers,fedcoder,reference", help=f"of {PARTS}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per client-round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reference-rounds", type=int, default=10)
    parser.add_argument(
        "--reference-saved",
        type=Path,
        help="directory to save the reference's state to after each round and continue from",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per lever (last one kept)")
    parser.add_argument("--first-lever", type=int, default=0, help="skip the levers before")
    parser.add_argument(
        "--budget-s", type=float, default=540, help="start no reference round after this"
    )
    parser.add_argument("--compile-s", type=int, default=150, help="time limit for compile")
    parser.add_argument("--tiny", action="store_true", help="2-layer model: a CPU dry run")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    config = tiny_config() if args.tiny else phi4mini.phi4mini_config()
    results: dict = {"environment": environment(), "command": sys.argv}
    results["create_model_seconds"] = phi4mini.ensure_model(args.model, args.tokenizer, config)
    exp = make_experiment(
        args.model, args.data, rounds=args.rounds, steps=args.steps, batch_size=args.batch_size
    )
    results["schedule"] = exp.schedule

    def save():
        (args.out / "throughput.json").write_text(json.dumps(results, indent=1))
        write_steps_csv(args.out / "steps.csv", results)

    model, tokenizer, load_seconds = load_resident(exp)
    results["resident_load_seconds"] = load_seconds
    state = cpu_state(model)  # the global adapter before round 1, for both recipes
    results["initial_adapter_checksum"] = checksum(state)
    if "levers" in parts:
        results["numerics"] = check_numerics(exp, model, tokenizer, state)
        print("numerics", results["numerics"], flush=True)
        results["levers"] = run_levers(exp, model, tokenizer, state, args.repeats, args.first_lever)
        save()
    if "fedcoder" in parts:
        fedcoder_settings = apply_lever(model, exp, DEFAULT_LEVER)
        results["fedcoder"] = run_fedcoder(
            exp, model, tokenizer, state, fedcoder_settings, load_seconds
        )
        save()
    if "profile" in parts:
        fedcoder_settings = apply_lever(model, exp, DEFAULT_LEVER)
        results["profile"] = run_profile(exp, model, tokenizer, state, fedcoder_settings, args.out)
        print("profile", results["profile"], flush=True)
        save()
    if "reference" in parts:
        del model
        free_memory()
        results["reference"] = run_reference(
            exp, state, args.reference_rounds, started + args.budget_s, args.reference_saved
        )
        save()
        if "compile" in parts:
            model, tokenizer, _ = load_resident(exp)
    if "compile" in parts:
        results["compile"] = run_compile(exp, model, tokenizer, state, args.compile_s)
        print("compile", results["compile"], flush=True)
    results["wall_seconds"] = time.perf_counter() - started
    save()
    print(summary(results))
    print(f"wall {results['wall_seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
