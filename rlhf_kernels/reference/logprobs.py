"""Plain PyTorch log-prob oracles.

These are the formulas of :func:`rlhf_kernels.token_logprobs`, written as
directly as PyTorch allows. They compute in the input's precision promoted to
at least float32, so calling them on float64 logits gives the float64 oracle
the tests compare every backend against; on float32/bf16/fp16 logits they are
the ``"torch"`` backend.
"""

from __future__ import annotations

import torch


def kept_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels != ignore_index``, compared in int64: a narrower label dtype would wrap an
    ``ignore_index`` outside its range (int32 labels against -2**63 compare with 0)."""
    return (labels if labels.dtype == torch.int64 else labels.long()) != ignore_index


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    acc = torch.promote_types(logits.dtype, torch.float32)
    vocab = logits.shape[-1]
    valid = kept_labels(labels, ignore_index)
    if mask is not None:
        valid = valid & mask.bool()
    labels = labels.long()  # (compared with vocab in int64: uint8 would wrap a vocab of 300 to 44)
    in_range = (labels >= 0) & (labels < vocab)

    # rows that are not kept read as 0: whatever their logits (inf, NaN), no NaN reaches their gradient
    # (in place on the division's own output, which its backward does not need: no third [N, V])
    z = (logits.to(acc) / temperature).masked_fill_(~valid.unsqueeze(-1), 0.0)
    logp = torch.log_softmax(z, dim=-1)
    safe_labels = torch.where(valid & in_range, labels, torch.zeros_like(labels))
    picked = logp.gather(-1, safe_labels.long().unsqueeze(-1)).squeeze(-1)
    # An out-of-range label that is not ignored has no log-prob: NaN, as the kernels write.
    picked = torch.where(in_range, picked, torch.full_like(picked, float("nan")))
    zero = torch.zeros((), dtype=acc, device=logits.device)
    logprobs = torch.where(valid, picked, zero)
    if not return_entropy:
        return logprobs

    probs = logp.exp()
    # 0 * log 0 = 0 for vocab entries at -inf (masked vocab), without a NaN gradient.
    plogp = probs * logp.masked_fill(probs == 0, 0.0)
    entropy = -plogp.sum(-1)
    entropy = torch.where(in_range, entropy, torch.full_like(entropy, float("nan")))
    entropy = torch.where(valid, entropy, zero)
    return logprobs, entropy
