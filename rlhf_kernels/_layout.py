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
