"""What a process of a fedcoder run pays before it does any work, each part in a fresh interpreter.

    python3 bench/startup_probe.py --model /tmp/phi4mini_random --data DATA.jsonl [--out DIR]

Times, each in its own `python3 -c` so nothing is already imported:

  preflight       `fedcoder run`'s checks of a run config (model name, data, run directory)
  meta-model      the target-module check the preflight made before it read the checkpoint
                  headers: import torch and transformers, build the model on the meta device
  import torch, import transformers+peft, import bitsandbytes, CUDA init
                  what every Ray worker imports (and the ServerApp, less bitsandbytes)
                  before it loads the model, one after the other as the worker does
  initial adapter the ServerApp's adapter before round 1 (DoRA reads the row norms of every
                  target weight from the safetensors files), after its imports
  load (--load)   a worker's resident model, phase by phase: the 4-bit load, the kbit
                  preparation, PEFT's DoRA wrap, fedcoder's DoRA norms (the run config's
                  model settings)

Prints one JSON object (and writes DIR/startup_probe.json with --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = """
import json, time
t = [time.perf_counter()]
import torch; t.append(time.perf_counter())
import transformers, peft
from transformers import AutoModelForCausalLM
from peft import get_peft_model; t.append(time.perf_counter())
try:
    import bitsandbytes  # not on a CPU-only development machine
except ImportError:
    pass
t.append(time.perf_counter())
if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
t.append(time.perf_counter())
names = ["import torch", "import transformers+peft", "import bitsandbytes", "CUDA init"]
print(json.dumps({n: round(b - a, 2) for n, a, b in zip(names, t, t[1:])}))
"""


LOAD = """
import json, time
t = [time.perf_counter()]
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from pathlib import Path
from fedcoder.dora import use_factored_norm
from fedcoder.model import load_base_model, lora_config
from fedcoder.preflight import preflight
settings = preflight(Path("."), run_config=[{overrides!r}]).config.model
t.append(time.perf_counter())
base, _ = load_base_model(settings.name, quantization=settings.quantization)
torch.cuda.synchronize(); t.append(time.perf_counter())
base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
torch.cuda.synchronize(); t.append(time.perf_counter())
model = get_peft_model(base, lora_config(settings.lora))
torch.cuda.synchronize(); t.append(time.perf_counter())
use_factored_norm(model)
torch.cuda.synchronize(); t.append(time.perf_counter())
names = ["imports", "4-bit load", "kbit preparation", "PEFT DoRA wrap", "factored DoRA norms"]
print(json.dumps({{n: round(b - a, 2) for n, a, b in zip(names, t, t[1:])}}))
"""


INITIAL = """
import json, time
from pathlib import Path
from fedcoder.model import initial_adapter
from fedcoder.preflight import preflight
config = preflight(Path("."), run_config=[{overrides!r}]).config
t = time.perf_counter()
initial_adapter(config.model, seed=config.train.seed)
print(json.dumps(round(time.perf_counter() - t, 2)))
"""


def timed(code: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"probe failed:\n{code}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started, result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model directory")
    parser.add_argument("--data", required=True, help="a local training .jsonl")
    parser.add_argument("--out", type=Path, help="also write DIR/startup_probe.json")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each probe (2)")
    parser.add_argument("--load", action="store_true", help="also time a worker's model load")
    args = parser.parse_args()
    overrides = f"model.name='{args.model}' static.dataset.name='{args.data}'"
    probes = {
        "preflight": (
            "from pathlib import Path; from fedcoder.preflight import preflight; "
            f"preflight(Path('.'), run_config=[{overrides!r}])"
        ),
        "meta-model": (
            "from fedcoder.model import meta_model, module_names; "
            f"module_names(meta_model({args.model!r}))"
        ),
    }
    report: dict = {"python": sys.version.split()[0]}
    for name, code in probes.items():
        report[name] = [round(timed(code)[0], 2) for _ in range(args.repeats)]
    report["ml-stack"] = [json.loads(timed(IMPORTS)[1]) for _ in range(args.repeats)]
    code = INITIAL.format(overrides=overrides)
    report["initial adapter"] = [json.loads(timed(code)[1]) for _ in range(args.repeats)]
    if args.load:
        code = LOAD.format(overrides=overrides)
        report["load"] = [json.loads(timed(code)[1]) for _ in range(args.repeats)]
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "startup_probe.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
