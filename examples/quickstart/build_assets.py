"""Build the offline assets for the tuneforge quickstart.

The quickstart fine-tunes a *tiny, randomly initialised* Llama-architecture
model on a toy task -- turning English number words into digits -- so that it
runs on a laptop CPU in about a minute without touching the Hugging Face Hub::

    ### Question:
    Write three hundred forty two in digits.

    ### Answer:
    342

Every number from 0 to 999 is written out in words ("three hundred forty
two", no "and", no hyphens).  A fixed random 15% of the numbers is held out
in ``heldout.jsonl`` and never used for training, so correct answers on them
show that the model learned the rule rather than memorised its examples.
Both files are in a fixed shuffled order.

Run it from the repository root::

    python examples/quickstart/build_assets.py            # writes next to this file
    python examples/quickstart/build_assets.py --out DIR  # writes into DIR

It writes:

``train.jsonl`` / ``heldout.jsonl``
    JSON lines ``{"question": "Write seventy three in digits.", "answer": "73"}``.
``model/``
    A byte-level BPE tokenizer trained on the generated text (digits are always
    split one per token, so the answer is spelled digit by digit; ``<unk>``=0,
    ``<s>``=1 (added at the start of every encoding), ``</s>``=2, ``<pad>``=3),
    saved with ``PreTrainedTokenizerFast.save_pretrained``, plus the
    ``config.json`` of a tiny ``LlamaConfig``.  No weights are saved: the
    quickstart builds the model with ``AutoModelForCausalLM.from_config``.

The output is deterministic: re-running the script produces byte-identical
files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SEED = 1234
HELDOUT_FRACTION = 0.15
MAX_NUMBER = 999
PROMPT_TEMPLATE = "### Question:\n{question}\n\n### Answer:\n"

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}

ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen", "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# A deliberately tiny Llama: ~0.5M parameters, learns the task in ~1 minute on 2 CPU cores.
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    initializer_range=0.02,
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    hidden_act="silu",
    use_cache=True,
)


def number_to_words(n: int) -> str:
    """Spell ``0 <= n <= 999`` in English, e.g. 342 -> "three hundred forty two"."""
    if not 0 <= n <= 999:
        raise ValueError(f"out of range: {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] if ones == 0 else f"{TENS[tens]} {ONES[ones]}"
    hundreds, rest = divmod(n, 100)
    head = f"{ONES[hundreds]} hundred"
    return head if rest == 0 else f"{head} {number_to_words(rest)}"


def make_row(n: int) -> dict[str, str]:
    return {"question": f"Write {number_to_words(n)} in digits.", "answer": str(n)}


def split_numbers() -> tuple[list[int], list[int]]:
    numbers = list(range(MAX_NUMBER + 1))
    n_heldout = round(len(numbers) * HELDOUT_FRACTION)
    rng = random.Random(SEED)
    heldout = rng.sample(numbers, n_heldout)  # random order: the first rows are a representative mix
    held = set(heldout)
    train = [n for n in numbers if n not in held]
    rng.shuffle(train)
    return train, heldout


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_tokenizer(texts: list[str]):
    """Train a small byte-level BPE tokenizer whose digits are always single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("unk", "bos", "eos", "pad")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )


def build(out: Path) -> None:
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    train_ids, heldout_ids = split_numbers()
    train_rows = [make_row(n) for n in train_ids]
    heldout_rows = [make_row(n) for n in heldout_ids]
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "heldout.jsonl", heldout_rows)

    # The tokenizer only ever sees training text.
    texts = [PROMPT_TEMPLATE.format(question=r["question"]) + r["answer"] for r in train_rows]
    tokenizer = build_tokenizer(texts)
    for r in train_rows + heldout_rows:
        text = PROMPT_TEMPLATE.format(question=r["question"]) + r["answer"]
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text, text
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids, text

    model_dir = out / "model"
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    config.save_pretrained(model_dir)
    print(
        f"wrote {len(train_rows)} train rows, {len(heldout_rows)} held-out rows, "
        f"a {len(tokenizer)}-token tokenizer and config.json to {out}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    args = parser.parse_args(argv)
    build(args.out)


if __name__ == "__main__":
    main()
