"""Time one decoding step of `fedcoder eval`'s generation on the GPU, by decoding loop.

This measures what a step costs with the Phi-4-mini-shaped model (random weights, built on
the GPU, never saved) at a few context lengths, and profiles a few steps of each:

* dynamic: transformers' `generate` with its default cache (one `torch.cat` of every
  layer's cache a step), the library's own path;
* fedcoder-eager: fedcoder's loop (`fedcoder.evaluation.decoding`) launching each step's
  kernels from Python;
* fedcoder: the same loop replaying each step from a CUDA graph, as `fedcoder eval` does.

It also checks that the graphs decode the tokens the eager loop decodes (greedy).

    python bench/decode_step.py --tokenizer /tmp/o200k_tok --out $OUT/decode

Rows are left-padded like fedcoder's batches and checked for HumanEval's stop strings, so
the host work per step is the same as in `fedcoder eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from phi4mini import phi4mini_config
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

from fedcoder.evaluation.decoding import decode, sampler
from fedcoder.evaluation.generation import StopStrings

VARIANTS = ("dynamic", "fedcoder-eager", "fedcoder")
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # HumanEval's
SAMPLE = {"greedy": False, "temperature": 0.2, "top_p": 0.95}  # the leaderboard's


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch(width: int, size: int, vocab: int, generator: torch.Generator) -> dict:
    """`size` random prompts of 50-100 % of `width` tokens, left-padded to `width`."""
    lengths = torch.randint(width // 2, width + 1, (size,), generator=generator)
    lengths[0] = width
    ids = torch.randint(1000, vocab - 1000, (size, width), generator=generator)
    mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}


def generate(
    model, tokenizer, inputs: dict, steps: int, variant: str, on_step=None, greedy: bool = False
) -> tuple[float, list[list[int]]]:
    """Seconds for `steps` new tokens (random weights almost never sample the EOS), and
    the tokens. `on_step` is called once a step."""
    rows = inputs["input_ids"].shape[0]
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        if variant == "dynamic":
            tokens = model.generate(
                **inputs,
                max_new_tokens=steps,
                stopping_criteria=[_EachStep(on_step)] if on_step else None,
                do_sample=not greedy,
                temperature=SAMPLE["temperature"],
                top_p=SAMPLE["top_p"],
                top_k=0,
                pad_token_id=0,
            )[:, inputs["input_ids"].shape[1] :].tolist()
        else:
            choose = sampler(**{**SAMPLE, "greedy": greedy})
            prompts = [
                ids[mask.bool()].tolist()
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
            ]
            tokens = decode(
                model,
                prompts,
                [steps] * rows,
                pad_id=0,
                eos_ids=[tokenizer.eos_token_id],
                choose=(lambda logits: (on_step(), choose(logits))[1]) if on_step else choose,
                stop_check=StopStrings(tokenizer, [STOPS] * rows),
                cuda_graphs=variant == "fedcoder",
            )
    sync()
    return time.perf_counter() - started, tokens


class _EachStep(StoppingCriteria):
    """Calls `on_step` once per generated token; never stops anything."""

    def __init__(self, on_step) -> None:
        self.on_step = on_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs):
        self.on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def profile_steps(model, tokenizer, inputs: dict, steps: int, variant: str, out: Path) -> dict:
    """torch.profiler over `steps` decoding steps, after the prefill and two more steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=2, warmup=1, active=steps),
    ) as prof:
        generate(model, tokenizer, inputs, steps + 4, variant, on_step=prof.step)
    events = prof.key_averages()
    (out / f"profile-{variant}.txt").write_text(
        events.table(sort_by="self_device_time_total", row_limit=30)
    )
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "steps": steps,
        "gpu_busy_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1000 / steps,
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1000 / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="o200k tokenizer directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {VARIANTS}")
    parser.add_argument("--batch-size", type=int, default=168)
    parser.add_argument(
        "--contexts", default="300:256,1200:64", help="prompt width:new tokens, comma-separated"
    )
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU: a dry run")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}")
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    started = time.perf_counter()
    config = phi4mini_config()
    if args.tiny:
        config.update({"hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 2})
    with torch.device("cpu" if args.tiny else "cuda"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32 if args.tiny else torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    results: dict = {
        "command": sys.argv,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "batch_size": args.batch_size,
        "build_seconds": time.perf_counter() - started,
        "runs": [],
    }
    generator = torch.Generator().manual_seed(0)
    contexts = [tuple(int(x) for x in c.split(":")) for c in args.contexts.split(",")]
    for variant in variants:
        for width, steps in contexts:
            inputs = batch(width, args.batch_size, model.config.vocab_size, generator)
            first, _ = generate(model, tokenizer, inputs, 2, variant)  # warm-up
            prefill, _ = generate(model, tokenizer, inputs, 1, variant)
            total, _ = generate(model, tokenizer, inputs, steps, variant)
            run = {
                "variant": variant,
                "width": width,
                "steps": steps,
                "first_call_seconds": first,
                "prefill_seconds": prefill,
                "seconds": total,
                "ms_per_step": (total - prefill) / (steps - 1) * 1000,
            }
            if torch.cuda.is_available():
                run["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
        results[f"profile-{variant}"] = profile_steps(
            model, tokenizer, inputs, args.profile_steps, variant, args.out
        )
        print(variant, results[f"profile-{variant}"], flush=True)
        (args.out / "decode.json").write_text(json.dumps(results, indent=1))
    if {"fedcoder", "fedcoder-eager"} <= set(variants):
        # Greedy, over more than one cache window, so a captured step that misread its
        # inputs would show.
        inputs = batch(300, 16, model.config.vocab_size, generator)
        _, eager = generate(model, tokenizer, inputs, 300, "fedcoder-eager", greedy=True)
        _, graphs = generate(model, tokenizer, inputs, 300, "fedcoder", greedy=True)
        results["graphs_decode_like_eager"] = graphs == eager
        print("graphs decode like eager:", graphs == eager, flush=True)
        (args.out / "decode.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
