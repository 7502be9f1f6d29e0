"""Batched generation on a tiny random model: padding, budgets, stop strings, the model path."""

from __future__ import annotations

import json

import pytest
import torch

from fedcoder.cli import main
from fedcoder.evaluation import GenerationSettings
from fedcoder.evaluation.decoding import CHECK_EVERY
from fedcoder.evaluation.generation import Generator, default_dtype, load_model
from fedcoder.evaluation.tasks import Problem

# Already stripped, so that they are exactly what the model sees.
PROMPTS = ["def add(a, b):", "def fib(n):\n    if n < 2:", "SELECT name FROM users"]


def _problem(prompt: str, stop: tuple[str, ...] = ()) -> Problem:
    return Problem(
        task="humaneval",
        problem_id=prompt,
        prompt=prompt,
        tests="",
        entry_point="",
        stop=stop,
        request=prompt,
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def _generate(tiny, problems, **settings) -> list[list[str]]:
    model, tokenizer = tiny
    return Generator(model, tokenizer, GenerationSettings(**settings))(problems)


def test_batched_greedy_equals_one_at_a_time(tiny):
    problems = [_problem(p) for p in PROMPTS]
    batched = _generate(tiny, problems, greedy=True, max_length=40, batch_size=3)
    alone = _generate(tiny, problems, greedy=True, max_length=40, batch_size=1)
    assert batched == alone
    assert all(len(samples) == 1 and samples[0] for samples in batched)


def test_each_sequence_gets_its_own_token_budget(tiny):
    model, tokenizer = tiny
    problems = [_problem(p) for p in PROMPTS]
    completions = _generate(tiny, problems, greedy=True, max_length=40, batch_size=3)
    for prompt, [completion] in zip(PROMPTS, completions, strict=True):
        # Random weights rarely emit EOS, so each uses all of what prompt + completion allows.
        total = len(tokenizer(prompt + completion)["input_ids"])
        assert total <= 40 + 1  # +1: re-tokenizing may split a merge at the boundary


def test_sampling_is_seeded_and_gives_n_samples(tiny):
    problems = [_problem(p) for p in PROMPTS[:2]]
    first = _generate(tiny, problems, n_samples=3, temperature=1.0, max_length=30)
    again = _generate(tiny, problems, n_samples=3, temperature=1.0, max_length=30)
    assert first == again
    assert [len(samples) for samples in first] == [3, 3]
    assert len(set(first[0])) > 1  # at T=1 the three samples differ


class _Emit:
    """Makes the model predict one fixed token and counts its forward passes."""

    def __init__(self, model, token: int):
        self.calls = 0
        self.handles = [
            model.register_forward_hook(self._count),
            model.lm_head.register_forward_hook(lambda _m, _i, logits: self._force(logits, token)),
        ]

    def _count(self, *_):
        self.calls += 1

    @staticmethod
    def _force(logits: torch.Tensor, token: int) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[..., token] = 0.0
        return forced

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_stop_strings_end_generation_early_and_are_cut(tiny):
    model, tokenizer = tiny
    [newline] = tokenizer("\n")["input_ids"]
    emit = _Emit(model, newline)
    try:
        both = [_problem(p, stop=("\n\n",)) for p in PROMPTS[:2]]
        assert _generate(tiny, both, greedy=True, max_length=60) == [[""], [""]]
        # Stop strings are checked every CHECK_EVERY steps: stopped then, not after ~50.
        assert emit.calls <= CHECK_EVERY
        emit.calls = 0
        # A sequence with no stop string keeps going to its budget; the other is cut.
        mixed = [_problem(PROMPTS[0], stop=("\n\n",)), _problem(PROMPTS[0])]
        stopped, unstopped = _generate(tiny, mixed, greedy=True, max_length=30)
        budget = 30 - len(tokenizer(PROMPTS[0])["input_ids"])
        assert stopped == [""] and unstopped == ["\n" * budget]
        assert emit.calls == budget
    finally:
        emit.remove()


def test_eos_ends_a_sequence_and_is_not_part_of_it(tiny):
    model, tokenizer = tiny
    emit = _Emit(model, tokenizer.eos_token_id)
    try:
        assert _generate(tiny, [_problem(PROMPTS[0])], greedy=True, max_length=60) == [[""]]
        assert emit.calls == 1
    finally:
        emit.remove()


def test_chat_mode_uses_the_chat_template(tiny):
    model, tokenizer = tiny
    tokenizer.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}A:"
    try:
        generator = Generator(model, tokenizer, GenerationSettings(mode="chat", greedy=True))
        ids = generator._prompt_ids(_problem("def add(a, b):"))
        assert tokenizer.decode(ids) == "User: def add(a, b):\nA:"
    finally:
        tokenizer.chat_template = None


def test_fedcoder_eval_with_a_model_and_a_merged_adapter(tmp_path, tiny_model_dir, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(adapter)

    out = tmp_path / "out"
    args = ["--base", tiny_model_dir, "--adapter", adapter, "--tasks", "humaneval"]
    args += ["--limit", "2", "--max-length", "448", "--out", out]
    assert main(["eval", *map(str, args)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["humaneval"]["n_problems"] == 2 and results["humaneval"]["pass@1"] == 0.0
    assert results["config"]["source"]["adapter"] == str(adapter)
    # "auto" is recorded as what it resolved to: float32 here, bfloat16 on a GPU.
    assert results["config"]["source"]["dtype"] == default_dtype()
    assert results["config"]["max_length"] == {"humaneval": 448}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["problem_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert all(s["status"] in ("failed", "timeout") for s in samples)


@pytest.mark.parametrize("greedy", [True, False])
def test_decoding_draws_what_transformers_generate_draws(tiny, monkeypatch, greedy):
    from transformers import set_seed

    from fedcoder.evaluation import decoding, kv_cache

    # Small blocks, so that the steps from a left-padded batch cross several windows.
    monkeypatch.setattr(kv_cache, "BLOCK_TOKENS", 8)
    model, tokenizer = tiny
    settings = GenerationSettings(greedy=greedy)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    # As `fedcoder eval` gives them: shorter prompts get more new tokens, whose slots in
    # the cache wrap around into those prompts' padding.
    budgets = [40 - len(p) for p in prompts]
    batch = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "top_k": 0}
    sampling |= {"temperature": settings.temperature, "top_p": settings.top_p}
    set_seed(7)
    with torch.inference_mode():
        expected = model.generate(
            **batch,
            max_new_tokens=max(budgets),
            **sampling,
            pad_token_id=tokenizer.pad_token_id,
        )[:, batch["input_ids"].shape[1] :].tolist()
    set_seed(7)
    with torch.inference_mode():
        rows = decoding.decode(
            model,
            prompts,
            budgets,
            pad_id=tokenizer.pad_token_id,
            eos_ids=[tokenizer.eos_token_id],
            choose=decoding.sampler(settings.greedy, settings.temperature, settings.top_p),
        )
    assert len(set(budgets)) > 1  # so the rows with the most new tokens wrap around
    for row, want, budget in zip(rows, expected, budgets, strict=True):
        assert row[:budget] == want[:budget]
    assert len({tuple(row) for row in rows}) == len(rows)  # the rows did not collapse into one


def test_a_batch_frees_its_kv_cache_without_the_garbage_collector(tiny):
    import gc

    from fedcoder.evaluation import decoding
    from fedcoder.evaluation.kv_cache import SlotCache

    model, tokenizer = tiny
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    gc.collect()
    gc.disable()  # on a GPU a batch's cache is tens of GB: it must go with the batch
    try:
        with torch.inference_mode():
            decoding.decode(
                model,
                prompts,
                [5] * len(prompts),
                pad_id=tokenizer.pad_token_id,
                eos_ids=[tokenizer.eos_token_id],
                choose=decoding.sampler(True, 1.0, 1.0),
            )
        assert not [o for o in gc.get_objects() if type(o) is SlotCache]
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_decode_like_eager_steps(tiny_model_dir, monkeypatch):
    from fedcoder.evaluation import decoding, kv_cache

    # Several windows, so that each captured graph must read the moving slot and mask.
    monkeypatch.setattr(kv_cache, "BLOCK_TOKENS", 8)
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float32", device="cuda")
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    budgets = [40 - len(p) for p in prompts]
    runs = []
    for graphs in (False, True):
        with torch.inference_mode():
            runs.append(
                decoding.decode(
                    model,
                    prompts,
                    budgets,
                    pad_id=tokenizer.pad_token_id,
                    eos_ids=[tokenizer.eos_token_id],
                    choose=decoding.sampler(True, 1.0, 1.0),
                    cuda_graphs=graphs,
                )
            )
    assert runs[0] == runs[1]
