"""A base model's module names, and the check of the adapter's target modules against them.

`fedcoder.model` checks the target modules on a model it has built. `fedcoder run`'s
preflight checks them before Flower starts, where building even a weightless model means
importing torch and transformers (seconds on a GPU host, paid again by every process of
the run). For a local checkpoint in safetensors format the names are in the files'
headers, which the `safetensors` package reads without torch: a parameter
`model.layers.0.self_attn.qkv_proj.weight` says the model has a module `qkv_proj`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from fedcoder.config import LoraSettings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HEAD = "lm_head"


class ModelError(ValueError):
    """A model name, path or adapter cannot be used."""


@dataclass(frozen=True)
class ModuleNames:
    """The last component of every module name, and of those that are linear layers."""

    leaves: frozenset[str]
    linear: frozenset[str]


def check_target_modules(names: ModuleNames, settings: LoraSettings) -> None:
    """Name the first target module the model does not have (PEFT's error is vaguer)."""
    for module in settings.target_modules:
        if module not in names.leaves:
            raise ModelError(
                f"config key 'model.lora.target-modules': the model has no module named "
                f"'{module}' (linear layers it has: {sorted(names.linear)})"
            )


def checkpoint_module_names(directory: Path) -> ModuleNames | None:
    """The module names of an unquantized safetensors checkpoint, or None for any other.

    None (a GGUF file, a Hub id, a pre-quantized or .bin checkpoint, an unreadable
    config.json) leaves the check to a model built from the config, which also gives
    the precise error for what is wrong with it. A weight file whose header cannot be
    read raises ModelError naming it.
    """
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        vocab_size = config["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):  # TypeError: config.json not an object
        return None
    if "quantization_config" in config:
        return None  # packed 4-bit tensors have no (out, in) shape to tell linear layers by
    files = _weight_files(directory)
    if not files:
        return None
    leaves: set[str] = set()
    linear: set[str] = set()
    for file in files:
        try:
            tensors = safe_open(str(file), framework="numpy")
        except (OSError, SafetensorError) as err:  # every process would fail to load it
            raise ModelError(f"model.name '{directory}': cannot read {file.name}: {err}") from None
        with tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                module, _, kind = name.rpartition(".")
                # Every module on the path has a name, as in named_modules():
                # model.layers.0.mlp gives model, layers, 0 and mlp.
                leaves.update(part for part in module.split(".") if part)
                shape = tensors.get_slice(name).get_shape()
                # A linear layer's weight is (out, in); the embeddings and the head are
                # the 2-D weights with a row per token of the vocabulary.
                if kind == "weight" and len(shape) == 2 and shape[0] != vocab_size:
                    linear.add(module.rpartition(".")[2])
    return ModuleNames(frozenset(leaves), frozenset(linear - {HEAD}))


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        files = [directory / name for name in sorted(set(weight_map.values()))]
        return files if all(f.is_file() for f in files) else []
    single = directory / SINGLE_FILE
    return [single] if single.is_file() else []
