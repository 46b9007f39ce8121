"""The built-in verifiable task: sort a short list of digits.

A prompt is ``<bos> sort 3 1 2 =`` and the right completion ``1 2 3 <eos>``, so
success is exact match and preference is objective. Everything a pipeline
needs is generated here: data sets in the usual column layouts, a tokenizer
built with the ``tokenizers`` library, and tiny Llama-style models built from
a ``transformers`` config (no hub access needed).
"""

from __future__ import annotations

import random

DIGITS = [str(d) for d in range(10)]
SPECIAL = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
TASK_WORDS = ["sort", "="]


def _digits(rng: random.Random, min_len: int, max_len: int) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(rng.randint(min_len, max_len))]


def prompt_text(digits: list[str]) -> str:
    return "sort " + " ".join(digits) + " ="


def answer_text(digits: list[str]) -> str:
    return " ".join(sorted(digits))


def _corrupt(rng: random.Random, digits: list[str]) -> str:
    """A plausible wrong answer: a swap of two unequal neighbours, a changed digit, a
    dropped digit, a changed digit with the list still sorted (the hardest to tell
    from the right answer: the order is fine, the multiset is not), or the input
    left unsorted."""
    right = sorted(digits)
    for _ in range(10):
        kind = rng.randrange(5)
        wrong = list(right)
        if kind == 0 and len(wrong) > 1:
            i = rng.randrange(len(wrong) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        elif kind == 1:
            i = rng.randrange(len(wrong))
            wrong[i] = rng.choice([d for d in DIGITS if d != wrong[i]])
        elif kind == 2 and len(wrong) > 1:
            del wrong[rng.randrange(len(wrong))]
        elif kind == 3:
            i = rng.randrange(len(wrong))
            wrong[i] = rng.choice([d for d in DIGITS if d != wrong[i]])
            wrong.sort()
        else:
            wrong = list(digits)
        if wrong != right:
            return " ".join(wrong)
    return " ".join(right[:-1]) if len(right) > 1 else ("1" if right != ["1"] else "2")


def sft_dataset(n: int, seed: int = 0, min_len: int = 3, max_len: int = 6):
    """Columns ``prompt``, ``completion``."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [_digits(rng, min_len, max_len) for _ in range(n)]
    return Dataset.from_dict({"prompt": [prompt_text(d) for d in rows], "completion": [answer_text(d) for d in rows]})


def preference_dataset(n: int, seed: int = 0, min_len: int = 3, max_len: int = 6):
    """Columns ``prompt``, ``chosen`` (the sorted list), ``rejected`` (a near miss)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [_digits(rng, min_len, max_len) for _ in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [prompt_text(d) for d in rows],
            "chosen": [answer_text(d) for d in rows],
            "rejected": [_corrupt(rng, d) for d in rows],
        }
    )


def prompt_dataset(n: int, seed: int = 0, min_len: int = 3, max_len: int = 6):
    """Column ``prompt`` (for PPO) and ``answer`` (for scoring)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [_digits(rng, min_len, max_len) for _ in range(n)]
    return Dataset.from_dict({"prompt": [prompt_text(d) for d in rows], "answer": [answer_text(d) for d in rows]})


def score(prompt: str, completion: str) -> float:
    """Verifiable reward in [0, 1]: 1 for the exact sorted list, else the fraction of
    positions right (a wrong length scores at most half)."""
    digits = prompt.replace("sort", "").replace("=", "").split()
    right = sorted(digits)
    got = completion.replace(SPECIAL["eos"], " ").split()
    if got == right:
        return 1.0
    hits = sum(a == b for a, b in zip(got, right, strict=False)) / max(len(right), 1)
    return hits * (0.5 if len(got) != len(right) else 0.9)


def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """:func:`score` of each (prompt, completion): the rollout trainers' ``reward_fn``."""
    return [score(p, c) for p, c in zip(prompts, completions, strict=True)]


def build_tokenizer():
    """A word-level tokenizer over the task's vocabulary, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL.values(), *TASK_WORDS, *DIGITS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL["pad"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        padding_side="right",
    )


def build_model(tokenizer, *, kind: str = "causal", hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A tiny Llama: ``kind="causal"`` (policy), ``"reward"`` (a scalar head on the
    sequence) or ``"value"`` (a scalar head on every token)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaForTokenClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        num_labels=1,
    )
    torch.manual_seed(seed)
    cls = {"causal": LlamaForCausalLM, "reward": LlamaForSequenceClassification, "value": LlamaForTokenClassification}[
        kind
    ]
    return cls(config)
