"""Logit growth: the largest attention logit per layer, and the output logits' normaliser.

Wortsman et al. 2023 (arXiv 2309.14322): attention logits ``q . k / sqrt(d_head)`` that keep
growing and output logits whose ``log Z`` drifts away from 0 precede divergence (cured by
qk-layernorm and z-loss). Dehghani et al. 2023 (ViT-22B): huge attention logits make attention
one-hot. Kimi K2 (arXiv 2507.20534) caps the per-head maximum logit at 100 (QK-clip). Prieto et al.
2025: softmax collapse, when rounding makes the top probability exactly 1 and the gradient of the
correct class vanishes. DESIGN.md section 9.

- :func:`attention_logit_stats`: exact over the keys for (sampled) queries, from ``q`` and ``k``
  as ``F.scaled_dot_product_attention`` takes them, masks and ``is_causal`` honoured.
- :func:`mha_attention_stats`: the same for ``nn.MultiheadAttention``, from its inputs and
  in-projection.
- :class:`AttentionLogitRecorder`: a context manager that, while active, records these for every
  ``nn.MultiheadAttention`` call and every ``F.scaled_dot_product_attention`` call (through a
  ``TorchFunctionMode``) in a model, per layer; zero cost once exited.
- :func:`output_logit_stats`: ``log Z`` per row, ``max |logit|``, softmax collapse.

Tensors in, tensors out, on the inputs' device, computed in float32 at least, no host sync.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_diag._checks import check_int

__all__ = [
    "AttentionLogitRecorder",
    "AttentionLogitStats",
    "OutputLogitStats",
    "attention_logit_stats",
    "compiled_regions",
    "mha_attention_stats",
    "output_logit_stats",
    "sdpa_attention_stats",
    "traced_modules",
]

_SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32  # bf16 logits of 100 are only known to +-0.5
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class AttentionLogitStats(NamedTuple):
    """Attention-logit figures of one call (or the aggregate of several, see the recorder).

    Attributes:
        max_logit: ``()`` largest unmasked pre-softmax logit ``q . k * scale + bias`` over the
            sampled queries and all keys; NaN when no position is unmasked.
        max_logit_per_head: ``(H,)`` the same per head (``H = 1`` without a head dimension).
        entropy_min: ``()`` smallest over heads of the mean attention entropy (nats) of the
            sampled query rows; ``log S`` is uniform attention over ``S`` keys, 0 is one-hot.
        entropy_per_head: ``(H,)`` mean entropy per head (fully masked rows left out).
    """

    max_logit: Tensor
    max_logit_per_head: Tensor
    entropy_min: Tensor
    entropy_per_head: Tensor


def _no_autocast(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast off: under it ``F.linear``/``matmul`` would run in bf16 whatever the inputs' dtype."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return nullcontext()


def _query_index(length: int, max_queries: int | None, device: torch.device) -> Tensor | None:
    """Evenly spaced query positions, first and last included; None for all of them."""
    if max_queries is None or length <= max_queries:
        return None
    if max_queries == 1:
        return torch.full((1,), length - 1, device=device)
    return torch.arange(max_queries, device=device) * (length - 1) // (max_queries - 1)


def attention_logit_stats(
    query: Tensor,
    key: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    max_queries: int | None = None,
) -> AttentionLogitStats:
    """Largest pre-softmax attention logit and attention entropy, as SDPA would compute them.

    Logits ``z = q k^T * scale`` (``scale`` defaults to ``1 / sqrt(E)``) plus a float mask, in
    float32 at least, under ``no_grad``. Masks follow ``F.scaled_dot_product_attention``: a
    boolean ``attn_mask`` is True where a query may attend (False = masked); a float mask is added
    to the logits, ``-inf`` masking (finite values, e.g. ALiBi, are part of the logit);
    ``is_causal`` masks key ``j > i`` for query ``i`` (top-left aligned, as SDPA). Masked
    positions never count, whatever their ``q . k``.

    Cost: one ``(..., L', S)`` product and softmax, ``L' = min(L, max_queries)`` query rows picked
    evenly (first and last included), so the maximum is exact over those rows and a lower bound
    overall.

    Args:
        query: ``(..., H, L, E)`` (or ``(N, L, E)`` / ``(L, E)`` without heads).
        key: ``(..., H_k, S, E)``; ``H_k`` may divide ``H`` with ``enable_gqa``.
        attn_mask: boolean or float, broadcastable to ``(..., H, L, S)``.
        is_causal: SDPA's causal flag.
        scale: SDPA's ``scale``.
        enable_gqa: SDPA's grouped-query flag (query head ``h`` reads key head ``h // (H / H_k)``).
        max_queries: sample at most this many query positions (None: all).

    Returns:
        :class:`AttentionLogitStats`.

    Example:
        >>> q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (N=1, L=2, E=2)
        >>> k = torch.tensor([[[0.0, 1.0], [3.0, 0.0]]])
        >>> float(attention_logit_stats(q, k, scale=1.0).max_logit)  # q0 . k1 = 3
        3.0
        >>> float(attention_logit_stats(q, k, scale=1.0, is_causal=True).max_logit)  # k1 hidden from q0
        2.0
    """
    if query.ndim < 2 or key.ndim != query.ndim or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"expected `query` (..., L, E) and `key` (..., S, E) of equal rank and E, got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    if max_queries is not None:
        check_int("max_queries", max_queries, 1)
    dtype = _compute_dtype(query, key)
    with torch.no_grad(), _no_autocast(query.device):
        q, k = query.detach().to(dtype), key.detach().to(dtype)
        mask = None if attn_mask is None else attn_mask.detach()
        if q.ndim == 2:
            q, k = q.unsqueeze(0), k.unsqueeze(0)
        if q.ndim == 3:  # (N, L, E): no head dimension, one head (in the mask too)
            q, k = q.unsqueeze(-3), k.unsqueeze(-3)
            if mask is not None and mask.ndim >= 3:
                mask = mask.unsqueeze(-3)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        length, keys = q.shape[-2], k.shape[-2]
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        index = _query_index(length, max_queries, q.device)
        if index is not None:
            q = q.index_select(-2, index)
        z = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., H, L', S)

        allowed = torch.ones((), dtype=torch.bool, device=z.device)
        if is_causal:
            causal = torch.ones(length, keys, dtype=torch.bool, device=z.device).tril()
            allowed = causal if index is None else causal.index_select(0, index)
        if mask is not None:  # broadcast from the right, as SDPA does
            if index is not None and mask.ndim >= 2 and mask.shape[-2] != 1:
                mask = mask.index_select(-2, index)
            if mask.dtype == torch.bool:
                allowed = allowed & mask
            else:
                z = z + mask.to(z.dtype)
                allowed = allowed & (mask != -math.inf)
        z = torch.where(allowed, z, -math.inf)  # masked entries never count, even if NaN

        head = z.ndim - 3  # z: (batch..., H, L', S)
        per_head = z.amax(dim=tuple(d for d in range(z.ndim) if d != head))
        per_head = torch.where(per_head == -math.inf, math.nan, per_head)  # nothing unmasked

        valid = (z > -math.inf).any(-1)  # rows with at least one key: (batch..., H, L')
        p = torch.softmax(torch.where(valid.unsqueeze(-1), z, 0.0), dim=-1)
        row_entropy = torch.special.entr(p).sum(-1)  # -sum p log p, with 0 log 0 = 0
        rows_dims = tuple(d for d in range(z.ndim - 1) if d != head)
        rows = valid.to(z.dtype).sum(dim=rows_dims)
        entropy = torch.where(valid, row_entropy, 0.0).sum(dim=rows_dims) / rows  # 0 / 0 = NaN
    return AttentionLogitStats(per_head.amax(), per_head, entropy.amin(), entropy)


def sdpa_attention_stats(*args: Any, max_queries: int | None = None, **kwargs: Any) -> AttentionLogitStats:
    """:func:`attention_logit_stats` from the arguments of an ``F.scaled_dot_product_attention`` call.

    Example:
        >>> q = k = v = torch.ones(1, 2, 4, 8)
        >>> float(sdpa_attention_stats(q, k, v, scale=0.5).max_logit)  # 8 * 0.5
        4.0
    """
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    return attention_logit_stats(
        bound["query"], bound["key"], attn_mask=bound.get("attn_mask"), is_causal=bool(bound.get("is_causal", False)),
        scale=bound.get("scale"), enable_gqa=bool(bound.get("enable_gqa", False)), max_queries=max_queries,
    )


def _mha_mask(mask: Tensor | None, ignore_is_true: bool, dtype: torch.dtype) -> Tensor | None:
    """MultiheadAttention's masks (bool: True = ignore) as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask if ignore_is_true else ~mask,
                                                                                    -math.inf)
    return mask.to(dtype)


def mha_attention_stats(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    max_queries: int | None = None,
) -> AttentionLogitStats:
    """:func:`attention_logit_stats` of an ``nn.MultiheadAttention`` call, from its arguments.

    Takes the arguments of ``module.forward`` (so a forward pre-hook can pass them on; ``value``,
    ``need_weights`` and ``average_attn_weights`` are ignored). ``q`` and ``k`` are recomputed
    from the in-projection (``in_proj_weight``/``in_proj_bias``, or ``q_proj_weight`` and
    ``k_proj_weight`` when ``kdim``/``vdim`` differ), split into ``num_heads``; ``batch_first``,
    unbatched inputs, ``add_bias_kv`` and ``add_zero_attn`` as the module does them. Masks follow
    the *module's* convention, the opposite of SDPA's for booleans: ``key_padding_mask`` ``(N, S)``
    and ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)`` are True where a key is *ignored*;
    float masks are added. ``is_causal`` is only a hint to the module when ``attn_mask`` is given
    (the mask decides); without a mask it applies the causal mask.

    Example:
        >>> mha = nn.MultiheadAttention(4, 2, batch_first=True)
        >>> x = torch.randn(3, 5, 4)
        >>> s = mha_attention_stats(mha, x, x, x)
        >>> s.max_logit_per_head.shape
        torch.Size([2])
    """
    dtype = _compute_dtype(query, key)
    with torch.no_grad(), _no_autocast(query.device):
        x_q, x_k = query.detach().to(dtype), key.detach().to(dtype)
        if x_q.ndim == 2:  # unbatched (L, E)
            x_q, x_k = x_q.unsqueeze(0), x_k.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not module.batch_first:
            x_q, x_k = x_q.transpose(0, 1), x_k.transpose(0, 1)
        embed, heads = module.embed_dim, module.num_heads
        if module._qkv_same_embed_dim:
            w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed:2 * embed]
        else:
            w_q, w_k = module.q_proj_weight, module.k_proj_weight
        bias = module.in_proj_bias
        b_q, b_k = (None, None) if bias is None else (bias[:embed].to(dtype), bias[embed:2 * embed].to(dtype))
        q = F.linear(x_q, w_q.to(dtype), b_q)  # (N, L, E)
        k = F.linear(x_k, w_k.to(dtype), b_k)  # (N, S, E)
        batch = q.shape[0]

        kpm = _mha_mask(key_padding_mask, True, dtype)
        am = _mha_mask(attn_mask, True, dtype)
        extra = 0
        if module.bias_k is not None:  # a learned key appended to every sequence, never masked
            k = torch.cat([k, module.bias_k.to(dtype).expand(batch, 1, embed)], dim=1)
            extra += 1
        q = q.unflatten(-1, (heads, embed // heads)).transpose(1, 2)  # (N, H, L, d)
        k = k.unflatten(-1, (heads, embed // heads)).transpose(1, 2)
        if module.add_zero_attn:  # a zero key appended after the projection: logit 0
            k = torch.cat([k, k.new_zeros(batch, heads, 1, k.shape[-1])], dim=2)
            extra += 1
        mask = None
        if kpm is not None:
            mask = F.pad(kpm, (0, extra))[:, None, None, :]  # (N, 1, 1, S)
        if am is not None:
            am = F.pad(am, (0, extra))
            am = am.view(batch, heads, *am.shape[-2:]) if am.ndim == 3 else am
            mask = am if mask is None else mask + am
        causal = is_causal and attn_mask is None
        if causal and extra:  # appended keys stay visible: build the mask by hand
            length, keys = q.shape[-2], k.shape[-2]
            tri = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril()
            tri[:, keys - extra:] = True
            tri_mask = torch.zeros(length, keys, dtype=dtype, device=q.device).masked_fill(~tri, -math.inf)
            mask, causal = (tri_mask if mask is None else mask + tri_mask), False
        return attention_logit_stats(q, k, attn_mask=mask, is_causal=causal, max_queries=max_queries)


# -- recording every attention call of a model ----------------------------------------------------


def compiled_regions(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost ``torch.compile``'d modules of ``model``, by name: ``torch.compile(module)``
    wrappers (``OptimizedModule``, whose own hooks run eagerly around the compiled call) and modules
    compiled in place by ``module.compile()`` (whose hooks are compiled with them).

    Hooks on the modules inside (and on an in-place compiled module itself) would be traced by
    dynamo: a guard fails, the region recompiles, and hooks with side effects break the trace.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), torch.compile(nn.Linear(2, 1)))
        >>> list(compiled_regions(net))
        ['1']
    """
    regions: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer in regions):
            continue
        if _is_compile_wrapper(module) or getattr(module, "_compiled_call_impl", None) is not None:
            regions[name or "model"] = module
    return regions


def traced_modules(model: nn.Module) -> set[nn.Module]:
    """The modules of ``model`` whose hooks dynamo would trace (see :func:`compiled_regions`)."""
    inside: set[nn.Module] = set()
    for module in compiled_regions(model).values():
        inside.update((module._orig_mod if _is_compile_wrapper(module) else module).modules())
    return inside


def _is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile(module)`` wrapper (``OptimizedModule``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by any torch.compile: no import cost here
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


class _SdpaInterceptor(TorchFunctionMode):
    """Hands the arguments of every ``F.scaled_dot_product_attention`` call to ``on_call``, then
    runs the call unchanged (inside ``__torch_function__`` the mode is off: no recursion)."""

    def __init__(self, on_call: Callable[..., None]) -> None:
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA and not torch.compiler.is_compiling():  # dynamo tracing a module compiled in place
            self.on_call(*args, **kwargs)
        return func(*args, **kwargs)


class AttentionLogitRecorder:
    """Context manager recording attention-logit statistics of every attention call in a model.

    While active: a forward pre-hook on every ``nn.MultiheadAttention`` of ``model`` computes
    :func:`mha_attention_stats` from its arguments, and a ``TorchFunctionMode`` sees every
    ``F.scaled_dot_product_attention`` call and computes :func:`sdpa_attention_stats` (an SDPA
    call made *inside* a recorded ``MultiheadAttention`` is not counted twice). A call is named
    after the innermost module of ``model`` running it (tracked with forward hooks), the root
    being ``"model"``; several calls under one name are aggregated (maximum of the maxima, minimum
    of the entropies). On exit, also by an exception, every hook is removed and the mode popped:
    outside the block the model runs exactly as without the recorder (enter it on check steps
    only). While active, every torch function call pays a Python dispatch through the mode.

    A statistic that fails to compute (an exotic input such as a nested tensor) never breaks the
    forward: the call is skipped and counted in :attr:`errors` (name -> first error message).

    ``torch.compile``'d modules (:func:`compiled_regions`, listed in :attr:`compiled`) are left
    alone: no hook inside them (dynamo would trace it and recompile), and the ``TorchFunctionMode``
    is off while one runs (its guards see the usual mode stack, so nothing recompiles; for a module
    compiled in place, ``module.compile()``, its compiled call is wrapped for the block). Their
    attention calls are not recorded.

    Args:
        model: the module whose attention calls are recorded.
        max_queries: query rows sampled per call (None: all).
        mha: hook ``nn.MultiheadAttention`` modules.
        sdpa: intercept ``F.scaled_dot_product_attention``.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> x = torch.randn(2, 5, 8)
        >>> with AttentionLogitRecorder(mha) as rec:
        ...     _ = mha(x, x, x, need_weights=False)  # the module calls SDPA inside: counted once
        >>> list(rec.stats()), rec.num_calls
        (['model'], 1)
    """

    def __init__(self, model: nn.Module, *, max_queries: int | None = 128, mha: bool = True,
                 sdpa: bool = True) -> None:
        if max_queries is not None:
            check_int("max_queries", max_queries, 1)
        self.model, self.max_queries, self.mha, self.sdpa = model, max_queries, mha, sdpa
        self._names: dict[nn.Module, str] = {}
        self._stack: list[nn.Module] = []
        self._inside_mha = 0
        self._exit: ExitStack | None = None
        self._stats: dict[str, AttentionLogitStats] = {}
        self._mode: _SdpaInterceptor | None = None
        self._suspended: list[TorchFunctionMode | None] = []
        self.num_calls = 0
        self.errors: dict[str, str] = {}
        self.compiled: list[str] = []

    def reset(self) -> None:
        """Forget what was recorded."""
        self._stats, self.num_calls, self.errors = {}, 0, {}

    def stats(self) -> dict[str, AttentionLogitStats]:
        """Per layer name, the aggregate of the calls recorded since the last :meth:`reset`."""
        return dict(self._stats)

    def _record(self, name: str, compute: Callable[[], AttentionLogitStats]) -> None:
        try:
            new = compute()
        except Exception as err:  # noqa: BLE001 -- never break the forward for a statistic
            self.errors.setdefault(name, f"{type(err).__name__}: {err}")
            return
        self.num_calls += 1
        old = self._stats.get(name)
        if old is not None and old.max_logit_per_head.shape == new.max_logit_per_head.shape:
            new = AttentionLogitStats(
                torch.maximum(old.max_logit, new.max_logit),
                torch.maximum(old.max_logit_per_head, new.max_logit_per_head),
                torch.minimum(old.entropy_min, new.entropy_min),
                torch.minimum(old.entropy_per_head, new.entropy_per_head),
            )
        elif old is not None:  # same name, different head count: keep the model-level figures
            new = new._replace(max_logit=torch.maximum(old.max_logit, new.max_logit),
                               entropy_min=torch.minimum(old.entropy_min, new.entropy_min))
        self._stats[name] = new

    def _current(self) -> str:
        return self._names[self._stack[-1]] if self._stack else "model"

    def _on_sdpa(self, *args: Any, **kwargs: Any) -> None:
        if not self._inside_mha:
            self._record(self._current(), lambda: sdpa_attention_stats(*args, max_queries=self.max_queries, **kwargs))

    def __enter__(self) -> AttentionLogitRecorder:
        if self._exit is not None:
            raise RuntimeError("AttentionLogitRecorder is not re-entrant")
        # Named at entry, not at construction: the model may have changed in between.
        self._names = {module: (name or "model") for name, module in self.model.named_modules()}
        traced, regions = traced_modules(self.model), compiled_regions(self.model)
        self.compiled = list(regions)
        stack = ExitStack()
        try:
            for region in regions.values():  # compiled in place: the mode is off inside (see above)
                compiled_call = getattr(region, "_compiled_call_impl", None)
                if compiled_call is not None and self.sdpa:
                    region._compiled_call_impl = self._suspended_call(compiled_call)
                    stack.callback(setattr, region, "_compiled_call_impl", compiled_call)
            for module in self._names:
                if module in traced:
                    continue
                if _is_compile_wrapper(module) and self.sdpa:  # the mode is off inside (see above)
                    stack.callback(module.register_forward_pre_hook(self._suspend).remove)
                    stack.callback(module.register_forward_hook(self._resume, always_call=True).remove)
                stack.callback(module.register_forward_pre_hook(self._push).remove)
                stack.callback(module.register_forward_hook(self._pop, always_call=True).remove)
                if self.mha and isinstance(module, nn.MultiheadAttention):
                    stack.callback(module.register_forward_pre_hook(self._on_mha, with_kwargs=True).remove)
                    stack.callback(module.register_forward_hook(self._leave_mha, always_call=True).remove)
            if self.sdpa:
                self._mode = stack.enter_context(_SdpaInterceptor(self._on_sdpa))
        except BaseException:
            stack.close()
            raise
        self._exit = stack
        return self

    def __exit__(self, *exc: object) -> None:
        exit_stack, self._exit = self._exit, None
        self._stack.clear()
        self._inside_mha = 0
        while self._suspended:  # a compiled call that never returned: the mode goes back before it is popped
            self._resume(None, None, None)
        self._mode = None
        if exit_stack is not None:
            exit_stack.close()

    # hooks
    def _push(self, module: nn.Module, args: Any) -> None:
        self._stack.append(module)

    def _suspend(self, module: nn.Module | None, args: Any) -> None:
        stack = torch.overrides._get_current_function_mode_stack()
        mine = self._mode is not None and bool(stack) and stack[-1] is self._mode
        self._suspended.append(torch._C._pop_torch_function_stack() if mine else None)

    def _suspended_call(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def suspended(*args: Any, **kwargs: Any) -> Any:
            self._suspend(None, args)
            try:
                return call(*args, **kwargs)
            finally:
                self._resume(None, args, None)

        return suspended

    def _resume(self, module: nn.Module | None, args: Any, output: Any) -> None:
        mode = self._suspended.pop() if self._suspended else None
        if mode is not None:
            torch._C._push_on_torch_function_stack(mode)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def _on_mha(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        self._inside_mha += 1
        bound = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
        self._record(self._names[module], lambda: mha_attention_stats(module, **bound, max_queries=self.max_queries))

    def _leave_mha(self, module: nn.Module, args: Any, output: Any) -> None:
        self._inside_mha = max(0, self._inside_mha - 1)


_MHA_SIGNATURE = inspect.signature(lambda query, key, value, key_padding_mask=None, need_weights=True,
                                   attn_mask=None, average_attn_weights=True, is_causal=False: None)


# -- output logits --------------------------------------------------------------------------------


class OutputLogitStats(NamedTuple):
    """Figures of a ``(..., vocab)`` logits tensor, one row per leading index.

    Attributes:
        log_z_mean: ``()`` mean over rows of ``log Z = logsumexp(logits)``.
        log_z_max: ``()`` its maximum.
        log_z_min: ``()`` its minimum (Wortsman et al.'s divergence drives ``log Z`` far below 0).
        output_max: ``()`` largest ``|logit|``.
        softmax_collapse: ``()`` share of rows whose float32 top softmax probability is exactly 1
            (NaN if a row's logits are not all finite, or with one output).
        num_rows: ``()`` rows counted (for a sum-then-divide reduction across processes).
    """

    log_z_mean: Tensor
    log_z_max: Tensor
    log_z_min: Tensor
    output_max: Tensor
    softmax_collapse: Tensor
    num_rows: Tensor


_CHUNK_ELEMENTS = 1 << 24  # rows are processed in chunks of at most this many logits (64 MiB fp32)


def output_logit_stats(logits: Tensor, valid: Tensor | None = None) -> OutputLogitStats:
    """``log Z`` statistics, ``max |logit|`` and softmax collapse of output logits.

    Per row (all leading dims flattened), in float32 at least: ``m = max z``, the tail
    ``t = sum_{z_i < m} exp(z_i - m)`` (plus ties of the maximum), ``log Z = m + log1p(t)``.
    Softmax collapse (Prieto et al. 2025) is the share of rows whose float32 softmax normaliser
    ``1 + t`` rounds to exactly 1 (``t <= 2^-24``, half an ulp of 1): the kernel's top probability
    ``1 / (1 + t)`` is then exactly 1 and the cross-entropy gradient of the top logit,
    ``exp(-log(1 + t)) - 1``, exactly 0. That is a logit gap above ~16.6 for one competitor, above
    ``16.6 + log(n)`` for ``n`` equal ones. ``t`` is summed without the leading 1, which would
    round small terms away one by one; a softmax kernel that adds in another order can decide
    differently within a few percent of the threshold. Rows are processed in chunks, so the
    float32 temporaries stay bounded for large vocabularies. A row with a NaN or infinite logit
    counts as NaN in the collapse share (NaN in, NaN out), and so does every row of a one-output
    head (``vocab == 1``: regression, binary cross-entropy), whose softmax is meaningless.

    Args:
        logits: ``(..., vocab)``.
        valid: optional boolean ``(...)``: rows to count (e.g. not padding). No valid row gives
            NaN figures.

    Example:
        >>> z = torch.tensor([[0.0, 200.0], [0.0, 10.0], [0.0, 0.0]])
        >>> s = output_logit_stats(z)
        >>> float(s.softmax_collapse), float(s.output_max), round(float(s.log_z_min), 4)
        (0.3333333432674408, 200.0, 0.6931)
    """
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"expected `logits` of shape (..., vocab) with vocab >= 1, got {tuple(logits.shape)}")
    dtype = _compute_dtype(logits)
    vocab = logits.shape[-1]
    rows = logits.detach().reshape(-1, vocab)
    keep = None
    if valid is not None:
        if valid.shape != logits.shape[:-1]:
            raise ValueError(f"`valid` must have shape {tuple(logits.shape[:-1])}, got {tuple(valid.shape)}")
        keep = valid.reshape(-1).to(torch.bool)
    per_chunk = max(1, _CHUNK_ELEMENTS // vocab)
    log_z, top_one, abs_max = [], [], []
    with torch.no_grad():
        for chunk in rows.split(per_chunk):
            z = chunk.to(dtype)
            m = z.amax(-1, keepdim=True)
            # t = s - 1, summed without the leading 1: a sum that starts with 1 rounds every term
            # below 2^-24 away (29 terms of 1e-8 would vanish instead of adding up to 3e-7).
            ties = (z == m).sum(-1) - 1
            tail = torch.where(z == m, 0.0, torch.exp(z - m)).sum(-1) + ties
            log_z.append(m.squeeze(-1) + torch.log1p(tail))
            # A row with a NaN or infinite logit has no softmax (the kernel gives NaN), nor has one output:
            # NaN, never a healthy-looking 0 or a meaningless 1.
            broken = ~torch.isfinite(m.squeeze(-1)) if vocab > 1 else torch.ones_like(tail, dtype=torch.bool)
            top_one.append(torch.where(broken, math.nan, ((1 / (1 + tail.float())) == 1.0).to(dtype)))
            abs_max.append(z.abs().amax(-1))
        log_z_all, collapse, row_max = torch.cat(log_z), torch.cat(top_one), torch.cat(abs_max)
        if keep is not None:
            n = keep.to(dtype).sum()
        else:
            n = torch.full((), float(log_z_all.numel()), dtype=dtype, device=rows.device)

        def pick(x: Tensor, fill: float) -> Tensor:  # invalid rows replaced by a neutral value
            return x if keep is None else torch.where(keep, x, fill)

        nan = torch.full((), math.nan, dtype=dtype, device=rows.device)
        empty = n == 0
        return OutputLogitStats(
            log_z_mean=pick(log_z_all, 0.0).sum() / n,  # 0 / 0 = NaN
            log_z_max=torch.where(empty, nan, pick(log_z_all, -math.inf).amax()),
            log_z_min=torch.where(empty, nan, pick(log_z_all, math.inf).amin()),
            output_max=torch.where(empty, nan, pick(row_max, -math.inf).amax()),
            softmax_collapse=pick(collapse, 0.0).sum() / n,
            num_rows=n,
        )
