"""Time one decoding step of `fedcoder eval`'s generation on the GPU, by KV-cache kind.

`fedcoder eval` samples with Hugging Face `generate` at large batches; this measures what a
step costs with the Phi-4-mini-shaped model (random weights, built on the GPU, never saved)
at two context lengths, for each cache kind, and profiles a few steps of each:

* dynamic: transformers' default cache (one `torch.cat` of every layer's cache a step);
* growing: `fedcoder.evaluation.kv_cache.GrowingCache` (written in place);
* static-compiled: transformers' `StaticCache` with its automatic `torch.compile` of the
  decoding step (CUDA graphs); the first call's compile time is reported apart.

    python bench/decode_step.py --tokenizer /tmp/o200k_tok --out $OUT/decode

Rows are left-padded like fedcoder's batches and stopped by fedcoder's own stop-string
criterion, so the host work per step is the same as in `fedcoder eval`.
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
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)

from fedcoder.evaluation.generation import StopOnStrings
from fedcoder.evaluation.kv_cache import GrowingCache, as_generate_kwargs

VARIANTS = ("dynamic", "growing", "static-compiled")
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # HumanEval's


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
    model,
    tokenizer,
    inputs: dict,
    steps: int,
    variant: str,
    cache_tokens: int = 0,
    extra_criteria: list | None = None,
) -> float:
    """Seconds for `steps` new tokens (random weights almost never sample the EOS).

    `cache_tokens`: the static cache's length, the same for every call of one shape so
    that the compiled step is reused.
    """
    rows, width = inputs["input_ids"].shape
    criteria = StopOnStrings(tokenizer, [STOPS] * rows, width, torch.full((rows,), steps))
    kwargs = {}
    if variant == "growing":
        kwargs = as_generate_kwargs(GrowingCache())
    elif variant == "static-compiled":
        kwargs = as_generate_kwargs(
            StaticCache(config=model.config, max_cache_len=cache_tokens or width + steps)
        )
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=steps,
            stopping_criteria=StoppingCriteriaList([criteria, *(extra_criteria or [])]),
            do_sample=True,
            temperature=0.2,
            top_p=0.95,
            top_k=0,
            pad_token_id=0,
            **kwargs,
        )
    sync()
    return time.perf_counter() - started


class _ProfilerStep(StoppingCriteria):
    """Advances the profiler's schedule once per generated token; never stops anything."""

    def __init__(self, profiler) -> None:
        self.profiler = profiler

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs):
        self.profiler.step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def profile_steps(
    model, tokenizer, inputs: dict, steps: int, variant: str, cache_tokens: int, out: Path
) -> dict:
    """torch.profiler over `steps` decoding steps, after the prefill and two more steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=2, warmup=1, active=steps),
    ) as prof:
        generate(model, tokenizer, inputs, steps + 4, variant, cache_tokens, [_ProfilerStep(prof)])
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
            cache = width + steps
            first = generate(model, tokenizer, inputs, 2, variant, cache)  # warm-up, compile
            prefill = generate(model, tokenizer, inputs, 1, variant, cache)
            total = generate(model, tokenizer, inputs, steps, variant, cache)
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
        # The last context's batch and cache length again, so nothing is compiled anew.
        results[f"profile-{variant}"] = profile_steps(
            model, tokenizer, inputs, args.profile_steps, variant, cache, args.out
        )
        print(variant, results[f"profile-{variant}"], flush=True)
        (args.out / "decode.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
