"""Batched generation for evaluation and for collecting on-policy comparisons.

``exact_match`` scores greedy answers; ``ranked_pairs`` turns k samples per
prompt, ranked by a labeler (a human in InstructGPT, a verifiable scoring
function here), into ``(prompt, chosen, rejected)`` rows for a reward model or
DPO: the comparisons then come from the distribution the policy actually
produces, which is what keeps PPO from exploiting a reward model that has only
seen hand-made negatives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def encode_prompts(tokenizer, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``<bos> prompt`` ids (no bos when the tokenizer has none) and attention
    mask, for batched generation."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids = [[*bos, *tokenizer(p, add_special_tokens=False).input_ids] for p in prompts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x) :] = torch.tensor(x)
        attention[i, width - len(x) :] = 1
    return input_ids.to(device), attention.to(device)


def pure_sampling(temperature: float = 1.0) -> dict:
    """``generate`` keyword arguments that sample from exactly ``softmax(logits / temperature)``.

    A model's own generation config (``generation_config.json`` from the hub) may set
    top-k, top-p, min-p, repetition penalties and the like, and ``generate`` applies
    them unless told otherwise; PPO's old log-probs (and an honest sample) need the
    plain distribution, so every such processor is switched off explicitly."""
    from transformers import GenerationConfig

    kw = dict(
        do_sample=True, temperature=temperature, num_beams=1, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, top_h=None, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None, sequence_bias=None,
        suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
        min_length=0, min_new_tokens=None, exponential_decay_length_penalty=None, guidance_scale=None,
        watermarking_config=None, renormalize_logits=False,
    )  # fmt: skip
    known = GenerationConfig()
    return {k: v for k, v in kw.items() if hasattr(known, k)}  # keys this transformers version has


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], *, num_samples: int = 1, do_sample: bool = False, temperature: float = 1.0,
    max_new_tokens: int = 12, batch_size: int = 256,
) -> list[list[str]]:  # fmt: skip
    """``num_samples`` decoded responses per prompt (greedy when ``do_sample`` is off),
    each cut at the first eos, in batches of ``batch_size`` prompts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        input_ids, attention = encode_prompts(tokenizer, chunk, device)
        input_ids = input_ids.repeat_interleave(num_samples, 0)
        attention = attention.repeat_interleave(num_samples, 0)
        sample_kw = pure_sampling(temperature) if do_sample else dict(do_sample=False)
        generated = model.generate(
            input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **sample_kw,
        )  # fmt: skip
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        texts = [" ".join(t.split()) for t in texts]
        out += [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(chunk))]
    model.train(was_training)
    return out


def exact_match(model, tokenizer, prompts: list[str], answers: list[str], max_new_tokens: int = 12) -> float:
    """The fraction of prompts whose greedy answer equals the reference answer."""
    greedy = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    hits = sum(g[0].split() == a.split() for g, a in zip(greedy, answers, strict=True))
    return hits / max(len(prompts), 1)


def ranked_pairs(
    prompts: list[str], samples: list[list[str]], score_fn: Callable[[str, str], float],
    references: list[str] | None = None, *, min_chosen_score: float | None = None, against: str = "worst",
):  # fmt: skip
    """``(prompt, chosen, rejected)`` rows from samples ranked by ``score_fn``.

    Per prompt the best-scored distinct response is chosen against the worst
    (``against="worst"``: one row) or against every strictly worse one
    (``against="all"``: up to k - 1 rows, more signal from the same samples). The
    reference answer (if given) is chosen instead when it scores higher than every
    sample and either the samples all tie or the best one scores below
    ``min_chosen_score`` (so that "chosen" can mean "right", not "least wrong").
    Prompts with nothing to compare drop out.
    """
    from datasets import Dataset

    if against not in ("worst", "all"):
        raise ValueError(f"against: expected 'worst' or 'all', got {against!r}")
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    refs = references if references is not None else [None] * len(prompts)
    for prompt, responses, reference in zip(prompts, samples, refs, strict=True):
        scores = {r: score_fn(prompt, r) for r in responses}
        best = max(scores, key=scores.get)
        high, low = scores[best], min(scores.values())
        if high == low or (min_chosen_score is not None and high < min_chosen_score):
            if reference is not None and reference not in scores and score_fn(prompt, reference) > high:
                best, high = reference, score_fn(prompt, reference)
            elif high == low:
                continue
        worse = sorted((r for r in scores if scores[r] < high), key=lambda r: (scores[r], r))
        for rejected in worse if against == "all" else worse[:1]:
            rows["prompt"].append(prompt)
            rows["chosen"].append(best)
            rows["rejected"].append(rejected)
    return Dataset.from_dict(rows)
