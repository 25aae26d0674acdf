"""Fused norms over many tensors: per tensor, per layer (group) and total.

Every function here launches a fixed number of kernels whatever the number of tensors
(``torch._foreach_norm`` for all dense tensors of a device and dtype at once, then one
``stack``/``index_add_``), returns device tensors and never synchronises with the host.

Sharded tensors (FSDP, DeepSpeed ZeRO-3) are normed through their local shards: a global norm is
the square root of the sum over ranks of the local *squared* norms, so :func:`squared_norms` and
:func:`grouped_squares` give the figures to sum with one all-reduce before the square root. The
reduction itself is not done here (no ``torch.distributed``): see
``lightning_diag.callbacks._sharding``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["count_nonfinite", "grouped_norms", "grouped_squares", "squared_norms", "tensor_norms", "total_norm"]


def tensor_norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor, accumulated and returned in float64, stacked into one 1-D tensor.

    Dense tensors go through one ``torch._foreach_norm(..., dtype=torch.float64)`` call (fused on
    CUDA, where the squares are summed in float64); sparse tensors (rare: an
    ``nn.Embedding(sparse=True)`` gradient) are coalesced and normed one by one. float64 because
    float32 squares overflow from norms of about ``1.8e19``: a finite gradient of ``1e20`` would
    read as ``inf`` and escape clipping. In float64 every finite float32/bf16/fp16 tensor gets a
    finite norm, and one that holds an inf or NaN a non-finite one.

    Example:
        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.full((4,), 1e20)])
        tensor([5.0000e+00, 2.0000e+20], dtype=torch.float64)
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    out: list[Tensor | None] = [None] * len(tensors)
    index = [i for i, t in enumerate(tensors) if not t.is_sparse]
    if index:
        norms = torch._foreach_norm([tensors[i] for i in index], 2, dtype=torch.float64)
        for i, n in zip(index, norms):
            out[i] = n
    for i, t in enumerate(tensors):
        if t.is_sparse:
            out[i] = torch.linalg.vector_norm(t.coalesce().values(), dtype=torch.float64)
    return torch.stack(out)  # type: ignore[arg-type]


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Squared L2 norm of each tensor, in float64: ``tensor_norms(tensors).square()``.

    What a rank contributes for its local shards: squared norms add over the disjoint pieces of a
    tensor (``||g||^2 = sum_i ||g_i||^2``) where norms do not. Same fused kernels as
    :func:`tensor_norms`, plus one ``square``; an empty tensor (a rank that holds no piece of a
    parameter) gives 0, a non-finite one inf/NaN. float64: the square of any finite float32 norm
    (up to about ``1e39``) is finite.

    Example:
        >>> squared_norms([torch.tensor([3.0, 4.0]), torch.ones(0)])
        tensor([25.,  0.], dtype=torch.float64)
    """
    return tensor_norms(tensors).square()


def grouped_squares(squares: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Sum of squared norms per group: the per-layer figure to all-reduce before ``sqrt``.

    ``grouped_squares(norms.square(), index, n).sqrt()`` equals :func:`grouped_norms`; keeping the
    squares lets sharded callers add the per-layer sums of every rank (one SUM all-reduce of a
    ``num_groups`` vector) and take the square root afterwards.

    Args:
        squares: 1-D tensor of per-tensor squared norms (e.g. from :func:`squared_norms`).
        group_index: 1-D long tensor, same length, the group of each tensor in ``[0, num_groups)``.
        num_groups: number of groups (a group with no tensor gets 0).

    Example:
        >>> grouped_squares(torch.tensor([9.0, 16.0, 1.0]), torch.tensor([0, 0, 1]), 2)
        tensor([25.,  1.])
    """
    if squares.shape != group_index.shape:
        raise ValueError(
            f"`squares` and `group_index` must have the same shape, got {tuple(squares.shape)} "
            f"and {tuple(group_index.shape)}"
        )
    return squares.new_zeros(num_groups).index_add_(0, group_index, squares)


def grouped_norms(norms: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Combine per-tensor norms into per-group norms: ``sqrt(sum of squares)`` per group.

    Args:
        norms: 1-D tensor of per-tensor L2 norms.
        group_index: 1-D long tensor, same length, the group of each tensor in ``[0, num_groups)``.
        num_groups: number of groups (a group with no tensor gets 0).

    Example:
        >>> grouped_norms(torch.tensor([3.0, 4.0, 1.0]), torch.tensor([0, 0, 1]), 2)
        tensor([5., 1.])
    """
    return grouped_squares(norms.square(), group_index, num_groups).sqrt()


def total_norm(norms: Tensor) -> Tensor:
    """Global L2 norm from per-tensor norms (what ``clip_grad_norm_`` calls the total norm).

    Example:
        >>> total_norm(torch.tensor([3.0, 4.0]))
        tensor(5.)
    """
    return norms.square().sum().sqrt()


def count_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """Number of inf/NaN entries over all tensors, as a 0-d long tensor.

    One reduction per tensor: call it on the rare path (a non-finite norm was seen), not
    every step; :func:`tensor_norms` already flags which tensors are affected.

    Example:
        >>> count_nonfinite([torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])])
        tensor(2)
    """
    if not tensors:
        return torch.zeros((), dtype=torch.long)
    counts = [
        (~torch.isfinite(t.coalesce().values() if t.is_sparse else t)).sum() for t in tensors
    ]
    return torch.stack(counts).sum()
