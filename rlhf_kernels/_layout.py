"""How the kernels address the rows of a ``[..., V]`` tensor without copying it."""

from __future__ import annotations

import torch


def row_layout(t: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """Merge the leading dims of ``t`` (all but the last) into at most three.

    Returns ``(size1, size2, stride0, stride1, stride2)`` such that row ``n``
    starts at ``i0*stride0 + i1*stride1 + i2*stride2`` with
    ``(i0, i1, i2) = unravel(n, (-, size1, size2))``; ``None`` when more than
    three leading dims remain after merging (the caller then copies).
    """
    dims: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 3:
        return None
    while len(dims) < 3:
        dims.insert(0, [1, 0])
    return dims[1][0], dims[2][0], dims[0][1], dims[1][1], dims[2][1]


def rows_may_overlap(t: torch.Tensor) -> bool:
    """Whether two rows of ``t`` (``[..., V]``, last stride 1) can share memory.

    ``torch._debug_has_internal_overlap`` answers "too hard to tell" for any view
    that is not dense, such as ``logits[:, :-1]``; rows are then disjoint when,
    taking the leading dims by increasing stride, each stride clears everything the
    dims inside it span. Anything else (an ``expand``, overlapping windows) counts
    as overlapping, so in-place writes fall back to a fresh buffer.
    """
    if not torch.compiler.is_compiling():  # (dynamo cannot trace it; the stride walk below decides then)
        verdict = torch._debug_has_internal_overlap(t)
        if verdict != 2:  # 0: no overlap, 1: overlap
            return verdict == 1
    if t.stride(-1) != 1:
        return True
    extent = t.shape[-1]  # elements one block of rows spans, starting with one row
    for size, stride in sorted((d for d in zip(t.shape[:-1], t.stride()[:-1], strict=True) if d[0] > 1),
                               key=lambda d: d[1]):  # fmt: skip
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False
