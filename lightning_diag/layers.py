"""Layer selection by name pattern, shared by every monitor (no Lightning import)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_diag._checks import check_int

__all__ = ["ParameterGroups", "group_parameters", "matches", "validate_patterns"]


def validate_patterns(name: str, patterns: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """Normalise an ``include``/``exclude`` argument to a tuple of glob patterns (or None)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = tuple(patterns)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"`{name}` must be None or glob patterns (non-empty strings), got {patterns!r}")
    return patterns


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True if ``name`` matches any glob pattern (``fnmatch``, case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class ParameterGroups:
    """Trainable parameters of a model and the layer each belongs to.

    Attributes:
        layers: layer names, in model order.
        names: parameter names (``named_parameters`` order).
        params: the parameters.
        layer_of: for each parameter, the index of its layer in ``layers``.
    """

    layers: list[str]
    names: list[str]
    params: list[Tensor]
    layer_of: list[int]


def group_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    depth: int | None = None,
) -> ParameterGroups:
    """Group a model's trainable parameters into layers.

    A layer is the module that owns the parameter (``blocks.0.attn.qkv`` owns
    ``blocks.0.attn.qkv.weight`` and ``.bias``); parameters owned by the root module are a layer
    each. ``depth`` truncates layer names to their first ``depth`` dotted parts, so ``depth=2``
    groups everything under ``blocks.0``. A parameter is kept when its name or its layer's name
    matches an ``include`` pattern (all by default) and neither matches an ``exclude`` pattern.
    Frozen parameters (``requires_grad=False``) are skipped.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> group_parameters(net).layers
        ['0', '2']
    """
    check_int("depth", depth, 1, optional=True)
    layers: dict[str, int] = {}
    names, params, layer_of = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = name.rpartition(".")[0] or name
        if depth is not None:
            owner = ".".join(owner.split(".")[:depth])
        keep = include is None or matches(name, include) or matches(owner, include)
        if not keep or (exclude and (matches(name, exclude) or matches(owner, exclude))):
            continue
        names.append(name)
        params.append(param)
        layer_of.append(layers.setdefault(owner, len(layers)))
    return ParameterGroups(list(layers), names, params, layer_of)
