"""Layer selection by name pattern, shared by every monitor (no Lightning import): parameters
grouped by owning module (:func:`group_parameters`), modules of given kinds (:func:`select_modules`),
the output head (:func:`last_linear`) and a module by name (:func:`find_module`)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_diag._checks import check_int

__all__ = ["LinearMap", "ParameterGroups", "find_module", "linear_maps", "group_parameters", "last_linear",
           "matches", "select_modules",
           "validate_patterns"]


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


def select_modules(
    model: nn.Module,
    kinds: tuple[type[nn.Module], ...],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip: Sequence[nn.Module] = (),
) -> list[tuple[str, nn.Module]]:
    """The named modules of ``kinds`` (not the root), kept when their name matches an ``include``
    pattern (all by default) and no ``exclude`` pattern, in ``named_modules`` order; ``skip``
    leaves out given modules (e.g. the output head).

    Raises:
        ValueError: ``include`` is given and matches none of the candidates (which are listed).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [name for name, _ in select_modules(net, (nn.Linear,), exclude=["2"])]
        ['0']
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)
                  and not any(m is s for s in skip)]  # fmt: skip
    chosen = [(n, m) for n, m in candidates
              if (include is None or matches(n, include)) and not (exclude and matches(n, exclude))]  # fmt: skip
    if include and not chosen:
        raise ValueError(f"`include={list(include)}` matches no candidate layer; the candidates are "
                         f"{[n for n, _ in candidates][:50]}")  # fmt: skip
    return chosen


def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` registered in the model (the output head of most classifiers and LMs).

    Example:
        >>> last_linear(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))[0]
        '2'
    """
    linears = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def find_module(model: nn.Module, name: str, argument: str, *, matrix: bool = False) -> nn.Module:
    """The module called ``name``; otherwise a ``ValueError`` naming ``argument`` and listing the candidates:
    the modules with a 2-D ``weight`` if ``matrix`` (a classifier), else every module (a feature layer)."""
    modules = dict(model.named_modules())
    if name not in modules:
        what, candidates = "modules", [n for n in modules if n]
        if matrix:
            what = "modules with a 2-D weight"
            candidates = [n for n in candidates if getattr(getattr(modules[n], "weight", None), "ndim", 0) == 2]
        raise ValueError(f"`{argument}={name!r}` is not a module of the model; {what} are: {candidates[:50]}")
    return modules[name]


@dataclass(frozen=True)
class LinearMap:
    """A weight ``W`` of shape ``(d_out, d_in)`` applied to an input of a module we can observe: ``y = W x``.

    Attributes:
        name: the map's name in logged keys (the module's name; ``<mha>.q``/``.k``/``.v`` for the
            blocks of an ``nn.MultiheadAttention`` in-projection).
        module: the module whose forward pre-hook sees the input.
        input: index of that input among the module's positional arguments (``0``; the MHA's
            ``query``, ``key``, ``value`` are 0, 1, 2); ``input_name`` is its keyword name.
        param: attribute of ``module`` holding the weight; ``rows`` the rows of it that are ``W``.
        kind: how input rows are formed: ``"rows"`` (the input's last dimension: Linear, the
            in-projection, a recurrent layer's input-to-hidden weight, whose packed sequences
            give their ``.data``) or ``"patches"`` (``nn.Conv2d``: unfolded patches, ``W``
            reshaped to ``(out_channels, in_channels * kh * kw)``).
    """

    name: str
    module: nn.Module
    input: int = 0
    input_name: str = "input"
    param: str = "weight"
    rows: tuple[int, int] | None = None
    kind: str = "rows"

    def parameter(self) -> Tensor:
        return getattr(self.module, self.param)

    def weight(self) -> Tensor:
        """``W`` as a 2-D ``(d_out, d_in)`` view."""
        w = self.parameter()
        if self.kind == "patches":
            return w.flatten(1)
        return w if self.rows is None else w[self.rows[0] : self.rows[1]]

    def sample_rows(self, x: Tensor, max_rows: int, generator: torch.Generator) -> Tensor:
        """At most ``max_rows`` random rows of ``W``'s input ``x`` (unfolded patches for a convolution), a copy.

        Rows drawn with replacement from ``generator`` when there are more; all of them otherwise.
        """
        if self.kind == "patches":
            x = _patches(self.module, x, max_rows, generator)  # type: ignore[arg-type]
        n = x.numel() // max(x.shape[-1], 1)
        if n <= max_rows:
            return x.reshape(n, x.shape[-1]).clone()
        idx = torch.randint(n, (max_rows,), device=x.device, generator=generator)
        if x.ndim == 2:
            return x.index_select(0, idx)
        # Gather the rows in place of flattening first: a non-contiguous input would be copied whole. Unravelled
        # with Python ints: torch.unravel_index puts its divisors on the device with a blocking copy (a sync).
        index = []
        for size in reversed(x.shape[1:-1]):
            index.append(idx % size)
            idx = idx // size
        return x[(idx, *reversed(index))]


def _patches(conv: nn.Conv2d, x: Tensor, max_rows: int, generator: torch.Generator) -> Tensor:
    """The input patches of enough random images for ``max_rows`` rows: ``(images, L, C * kh * kw)``."""
    x = x.unsqueeze(0) if x.ndim == 3 else x
    per_image = 1
    for n, k, s, p, d in zip(
        x.shape[-2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation  # type: ignore[arg-type]
    ):
        per_image *= max(0, (n + 2 * p - d * (k - 1) - 1) // s + 1)
    images = min(x.shape[0], -(-max_rows // max(per_image, 1)))
    if images < x.shape[0]:
        x = x.index_select(0, torch.randperm(x.shape[0], device=x.device, generator=generator)[:images])
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)


_MHA_INPUTS = ("query", "key", "value")


def linear_maps(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    exclude_head: bool = True,
) -> tuple[list[LinearMap], tuple[str, nn.Module] | None]:
    """Every linear map of the model whose input a forward pre-hook can see, and the excluded head.

    Watched: ``nn.Linear`` layers (trainable 2-D weight); the query, key and value blocks of each
    ``nn.MultiheadAttention`` in-projection (packed ``in_proj_weight`` or separate
    ``q/k/v_proj_weight``), fed by the MHA's ``query``, ``key`` and ``value``; ``nn.Conv2d``
    (``groups=1``, zero padding) on its unfolded input patches; and the input-to-hidden weight of
    the first layer of ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (``<rnn>.ih_l0``, ``<rnn>.ih_l0_reverse``),
    fed by the module's input. Not watchable, so left out: ``nn.MultiheadAttention.out_proj`` (MHA
    multiplies by its weight inside ``F.multi_head_attention_forward``; its input is internal);
    the recurrent hidden-to-hidden weights and the input weights of deeper recurrent layers
    (their inputs are internal states); grouped (or depthwise) convolutions, padding other than
    zeros or given as ``"same"``/``"valid"``, ``nn.Conv1d``, ``nn.Conv3d`` and transposed convolutions; with
    ``exclude_head``, the last ``nn.Linear`` registered that is not an ``out_proj`` (the output
    head). Patterns match a map's name or its module's name.

    Example:
        >>> maps, head = linear_maps(nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2), nn.Linear(4, 2)))
        >>> [m.name for m in maps], head[0]
        (['0', '1.q', '1.k', '1.v'], '2')
    """
    out_projs = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    # The head is the last nn.Linear that is not an out_proj (never called, so never a model's output layer).
    linears = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and id(m) not in out_projs]
    head = linears[-1] if exclude_head and linears else None
    maps: list[LinearMap] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name and id(module) not in out_projs and (
            head is None or module is not head[1]
        ):
            if module.weight.ndim == 2 and module.weight.requires_grad:
                maps.append(LinearMap(name, module))
        elif isinstance(module, nn.MultiheadAttention):
            e = module.embed_dim
            for i, part in enumerate("qkv"):
                packed = module.in_proj_weight is not None
                param, rows = ("in_proj_weight", (i * e, (i + 1) * e)) if packed else (f"{part}_proj_weight", None)
                if getattr(module, param).requires_grad:
                    maps.append(LinearMap(f"{name}.{part}" if name else part, module, i, _MHA_INPUTS[i], param, rows))
        elif isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
            if module.weight.requires_grad and isinstance(module.padding, tuple):  # "same"/"valid" strings: skip
                maps.append(LinearMap(name or "conv", module, kind="patches"))
        elif isinstance(module, nn.RNNBase):
            for param in ("weight_ih_l0", "weight_ih_l0_reverse"):
                if isinstance(getattr(module, param, None), Tensor) and getattr(module, param).requires_grad:
                    maps.append(LinearMap(f"{name}.{param[7:]}" if name else param[7:], module, param=param))
    chosen = [m for m in maps if _keep(m, include, exclude)]
    if include and not chosen:
        raise ValueError(f"`include={list(include)}` matches no watchable layer; the candidates are "
                         f"{[m.name for m in maps][:50]}")  # fmt: skip
    return chosen, head


def _keep(m: LinearMap, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    owner = m.name.rpartition(".")[0] if m.param != "weight" else m.name  # "blocks.0.attn" for "blocks.0.attn.q"
    names = (m.name, owner)
    return (include is None or any(matches(n, include) for n in names)) and not (
        exclude and any(matches(n, exclude) for n in names))
