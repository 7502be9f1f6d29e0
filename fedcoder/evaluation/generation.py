"""Batched generation with a Hugging Face causal LM, cut at each task's stop strings.

Prompts are sorted by length and left-padded into batches, so one forward pass
serves many prompts with little padding. Each sequence gets exactly the token
budget it would get alone (max_length minus its own prompt length, at most
max_new_tokens), and a sequence is done once it emits EOS, spends its budget,
or produces a stop string; generation ends when every sequence in the batch is done.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from fedcoder.evaluation.decoding import decode, sampler
from fedcoder.evaluation.errors import EvalError
from fedcoder.evaluation.settings import GenerationSettings
from fedcoder.evaluation.tasks import Problem, completion_prompt, truncate_at_stop

log = logging.getLogger(__name__)


def load_model(
    base: str,
    adapter: str | Path | None = None,
    *,
    quantization: int = 0,
    dtype: str | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model, with the adapter merged in unless the base is quantized.

    dtype is a torch dtype name; None means `default_dtype()`.
    """
    from peft import PeftModel

    from fedcoder.model import ModelError, load_base_model

    if adapter is not None:
        saved = _read_adapter(Path(adapter))  # before the base model, which may take minutes
    try:
        model, tokenizer = load_base_model(
            base,
            quantization=quantization,
            dtype=getattr(torch, dtype or default_dtype()),
            device=device,
        )
    except ModelError as err:
        raise EvalError(str(err)) from err
    if adapter is not None:
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except Exception as err:  # PEFT raises many types for a broken or mismatched adapter
            raise _adapter_error(adapter, err) from err
        _check_adapter_weights(model, Path(adapter), saved)
        if not quantization:  # merged weights run as fast as the base model
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's file names


def _read_adapter(adapter: Path) -> set[str]:
    """Check an adapter directory's config and weights; return the names of its tensors."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    if not adapter.is_dir():
        raise EvalError(f"adapter '{adapter}': no such directory")
    if not (adapter / "adapter_config.json").is_file():
        raise EvalError(
            f"adapter '{adapter}' is not a PEFT adapter directory (no adapter_config.json)"
        )
    try:
        PeftConfig.from_pretrained(str(adapter))
    except Exception as err:
        raise _adapter_error(adapter, err) from err
    # Without weights PEFT takes the path for a Hub repo id and fails on its format.
    if not any((adapter / name).is_file() for name in _ADAPTER_WEIGHTS):
        raise EvalError(f"adapter '{adapter}' has no weights ({' or '.join(_ADAPTER_WEIGHTS)})")
    try:
        return set(load_peft_weights(str(adapter), device="cpu"))
    except Exception as err:
        raise _adapter_error(adapter, err) from err


def _check_adapter_weights(model: torch.nn.Module, adapter: Path, saved: set[str]) -> None:
    """Refuse an adapter whose weights lack tensors that its adapter_config.json declares.

    PEFT only warns about those and leaves them at their initial values (LoRA B = 0), so the
    scores would silently be the base model's on those modules.
    """
    from peft import get_peft_model_state_dict

    missing = sorted(get_peft_model_state_dict(model).keys() - saved)
    if missing:
        raise EvalError(
            f"adapter '{adapter}' cannot be loaded: its weights lack {len(missing)} tensors "
            f"that its adapter_config.json declares, e.g. {missing[0]}"
        )


def _adapter_error(adapter: str | Path, err: Exception) -> EvalError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = lines or [type(err).__name__]
    # torch's load_state_dict opens with a heading line ("Error(s) in loading state_dict
    # for ...:"); the first size mismatch under it is what tells the user why.
    reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return EvalError(f"adapter '{adapter}' cannot be loaded: {reason}")


def default_dtype() -> str:
    """bfloat16 on a GPU; float32 on a CPU, where most processors run bfloat16 slowly."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


@contextlib.contextmanager
def dora_caching(model: torch.nn.Module) -> Iterator[None]:
    """PEFT's DoRA caching while an unmerged adapter generates (a no-op for other models).

    Unmerged DoRA otherwise recomputes every layer's B @ A and weight norm at each
    decoding step (on a 4- or 8-bit base, after dequantizing the weight), which costs
    more than the step itself. The cache holds one weight-sized matrix per adapted
    layer, so it is dropped afterwards, and dropped before too, so that nothing of a
    previous adapter is reused.
    """
    from peft import PeftModel
    from peft.helpers import DoraCaching

    if not isinstance(model, PeftModel):
        yield
        return
    model.train()  # PEFT clears DoRA caches whenever a model enters train mode
    model.eval()
    try:
        with DoraCaching():
            yield
    finally:
        model.train()
        model.eval()


class StopStrings:
    """Which rows' newest tokens complete one of their stop strings (a `StopCheck`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[Sequence[str]]):
        self.tokenizer = tokenizer
        self.stops = stops
        # Every token decodes to at least one character, so a stop string just
        # completed lies within the last len(stop) tokens; one more for safety.
        self.lookback = max((len(s) for row in stops for s in row), default=0) + 1

    def __call__(self, rows: list[int], tails: list[list[int]]) -> list[bool]:
        texts = self.tokenizer.batch_decode(tails)
        return [
            any(s in text for s in self.stops[row]) for row, text in zip(rows, texts, strict=True)
        ]


class Generator:
    """Turns the problems of one task into `n_samples` completions each."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: GenerationSettings,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({i for i in [*eos, tokenizer.eos_token_id] if i is not None})
        if not self.eos_ids:
            raise EvalError("the tokenizer and generation config define no EOS token")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.choose = sampler(settings.greedy, settings.temperature, settings.top_p)

    def __call__(self, problems: Sequence[Problem]) -> list[list[str]]:
        if not problems:
            return []
        settings = self.settings
        # Seeded per chunk of problems, so a resumed run draws what an
        # uninterrupted one would have drawn.
        key = f"{settings.seed}:{problems[0].task}:{problems[0].problem_id}"
        set_seed(zlib.crc32(key.encode()))
        max_length = settings.max_length or problems[0].spec.max_length
        prompts = [self._prompt_ids(problem) for problem in problems]
        jobs = [(i, s) for i in range(len(problems)) for s in range(settings.n_samples)]
        jobs = [job for job in jobs if self._fits(problems[job[0]], prompts[job[0]], max_length)]
        # Longest first: similar lengths share a batch, and a batch that does not
        # fit in memory fails at once rather than at the end of the run.
        jobs.sort(key=lambda job: -len(prompts[job[0]]))
        completions = [[""] * settings.n_samples for _ in problems]
        starts = range(0, len(jobs), settings.batch_size)
        # The task's bar moves only once a chunk is scored; this one shows the batches.
        with dora_caching(self.model):
            for start in tqdm(starts, desc="generating", unit="batch", leave=False):
                batch = jobs[start : start + settings.batch_size]
                texts = self._generate(
                    [prompts[i] for i, _ in batch],
                    [self._stops(problems[i]) for i, _ in batch],
                    max_length,
                )
                for (i, s), text in zip(batch, texts, strict=True):
                    completions[i][s] = text
        return completions

    def _prompt_ids(self, problem: Problem) -> list[int]:
        if self.settings.mode == "chat":
            # The chat template already holds whatever special tokens the model expects.
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": problem.request}],
                tokenize=False,
                add_generation_prompt=True,
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(completion_prompt(problem))["input_ids"]

    def _stops(self, problem: Problem) -> tuple[str, ...]:
        return problem.stop if self.settings.mode == "completion" else ()

    @staticmethod
    def _fits(problem: Problem, prompt: list[int], max_length: int) -> bool:
        if len(prompt) < max_length:
            return True
        log.warning(
            "%s %s: the prompt alone has %d tokens (max length %d); its completion is empty",
            problem.task,
            problem.problem_id,
            len(prompt),
            max_length,
        )
        return False

    def _generate(
        self, prompts: list[list[int]], stops: list[tuple[str, ...]], max_length: int
    ) -> list[str]:
        cap = self.settings.max_new_tokens or max_length  # no cap beyond max_length
        budgets = [min(max_length - len(p), cap) for p in prompts]
        started = time.perf_counter()
        with torch.inference_mode():
            rows = decode(
                self.model,
                prompts,
                budgets,
                pad_id=self.pad_id,
                eos_ids=self.eos_ids,
                choose=self.choose,
                stop_check=StopStrings(self.tokenizer, stops) if any(stops) else None,
                cuda_graphs=self.settings.cuda_graphs,
            )
        # Every row runs as many steps as the batch's longest, so this is what the device did.
        steps, seconds = len(rows[0]), time.perf_counter() - started
        log.info(
            "generated %d sequences x %d steps in %.2f s (%.0f tokens/s)",
            len(rows),
            steps,
            seconds,
            len(rows) * steps / seconds,
        )
        return [
            truncate_at_stop(self._decode(prompt, row[:budget]), row_stops)
            for prompt, row, budget, row_stops in zip(prompts, rows, budgets, stops, strict=True)
        ]

    def _decode(self, prompt: list[int], generated: list[int]) -> str:
        """The text after the prompt, up to the first EOS.

        Decoding prompt and continuation together keeps a leading space that
        SentencePiece tokenizers drop when the continuation is decoded alone.
        Special tokens stay, since `<file_sep>` is itself a stop string.
        """
        end = next(
            (j for j, token in enumerate(generated) if token in self.eos_ids), len(generated)
        )
        head = self.tokenizer.decode(prompt)
        full = self.tokenizer.decode(prompt + generated[:end])
        if full.startswith(head):
            return full[len(head) :]
        return self.tokenizer.decode(generated[:end])
