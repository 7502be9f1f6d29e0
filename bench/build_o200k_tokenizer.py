"""Build a Hugging Face tokenizer for OpenAI's o200k_base, the vocabulary of Phi-4-mini.

The Hub (and so Phi-4-mini's own tokenizer.json) is out of reach here, but the npm package
js-tiktoken ships the o200k_base merge ranks. Run where npm and PyPI are reachable:

    npm pack js-tiktoken@1.0.21 && tar xzf js-tiktoken-1.0.21.tgz package/dist/ranks/o200k_base.js
    pip install tiktoken   # transformers' TikTokenConverter reads the ranks with it
    python bench/build_o200k_tokenizer.py package/dist/ranks/o200k_base.js /tmp/o200k_tok

The result encodes text exactly as tiktoken's o200k_base does (the script checks a sample),
with <|endoftext|> = 199999 as BOS, EOS and padding, like Phi-4-mini.
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

SAMPLE = "def add(a, b):\n    return a + b  # Größe, 数字 1234567\n"


def read_js_ranks(path: Path) -> dict:
    """js-tiktoken's rank file: a JS module exporting {pat_str, special_tokens, bpe_ranks}.

    bpe_ranks is newline-separated groups "! <first rank> <base64 token> <base64 token> ...".
    """
    text = path.read_text()
    data = json.loads(text[text.index("{") : text.rindex("}") + 1])
    ranks = {}
    for line in filter(None, data["bpe_ranks"].split("\n")):
        _, first, *tokens = line.split(" ")
        ranks.update({token: int(first) + i for i, token in enumerate(tokens)})
    return {"pattern": data["pat_str"], "special": data["special_tokens"], "ranks": ranks}


def build(js_ranks: Path, out: Path) -> PreTrainedTokenizerFast:
    spec = read_js_ranks(js_ranks)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp, "o200k_base.tiktoken")
        vocab.write_text("".join(f"{token} {rank}\n" for token, rank in spec["ranks"].items()))
        converter = TikTokenConverter(
            vocab_file=str(vocab),
            pattern=spec["pattern"],
            extra_special_tokens=list(spec["special"]),
        )
        backend = json.loads(converter.converted().to_str())
    # The converter numbers special tokens after the last merge; o200k_base fixes their ids
    # (<|endoftext|> = 199999), and `tokenizers` keeps an added token's id only if the model's
    # vocabulary holds it too.
    for token in backend["added_tokens"]:
        token["id"] = spec["special"][token["content"]]
    backend["model"]["vocab"].update(spec["special"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False))
    end = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_file=str(out / "tokenizer.json"), bos_token=end, eos_token=end, pad_token=end
    ).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("js_ranks", type=Path, help="js-tiktoken's dist/ranks/o200k_base.js")
    parser.add_argument("out", type=Path, help="tokenizer directory to write")
    args = parser.parse_args()
    tokenizer = build(args.js_ranks, args.out)

    import tiktoken

    spec = read_js_ranks(args.js_ranks)
    reference = tiktoken.Encoding(
        "o200k_base",
        pat_str=spec["pattern"],
        mergeable_ranks={base64.b64decode(k): v for k, v in spec["ranks"].items()},
        special_tokens=spec["special"],
    )
    ours = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    if ours != reference.encode_ordinary(SAMPLE) or tokenizer.eos_token_id != 199999:
        raise SystemExit("the converted tokenizer does not match tiktoken's o200k_base")
    print(f"{args.out}: o200k_base, {len(tokenizer)} tokens, eos/pad id {tokenizer.eos_token_id}")


if __name__ == "__main__":
    main()
