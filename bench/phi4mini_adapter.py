"""A fedcoder DoRA adapter for the Phi-4-mini-shaped model, to evaluate a 4-bit base plus it.

The baseline's adapter (DoRA r16 alpha64 on qkv/o/gate_up/down), built by fedcoder's own
`add_adapter` and written by `save_adapter` as the server writes checkpoints. LoRA B is
set to small random values (it starts at zero), so the adapter changes what the model
computes and an evaluation exercises the whole adapter path.

    python3 bench/phi4mini_adapter.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedcoder.config import ModelSettings
from fedcoder.model import adapter_state, add_adapter, load_base_model
from fedcoder.results import save_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="e.g. /tmp/phi4mini_random (bench/phi4mini.py)")
    parser.add_argument("out", type=Path, help="adapter directory to write")
    args = parser.parse_args()
    if (args.out / "adapter_config.json").is_file():
        return
    settings = ModelSettings(name=str(args.model), quantization=0, gradient_checkpointing=False)
    base, _ = load_base_model(settings.name)
    state = adapter_state(add_adapter(base, settings, seed=0, training=False))
    generator = torch.Generator().manual_seed(0)
    state = {
        key: 0.01 * torch.randn(value.shape, generator=generator) if "lora_B" in key else value
        for key, value in state.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(
        args.out, {k: v.float().cpu() for k, v in state.items()}, settings.lora, str(args.model)
    )
    print(args.out)


if __name__ == "__main__":
    main()
