"""What a monitor needs to measure correctly under sharding: FSDP2, FSDP1, DeepSpeed ZeRO.

Everything here is Lightning-aware and small; the math stays in :mod:`lightning_diag.metrics`
(``squared_norms``, ``grouped_squares``, ``row_sharded_power_iteration``, ``alignment_moments``),
which takes the reduction as an argument. DESIGN.md section 10 says what correct means.

**What a callback sees under FSDP2** (Lightning's ``ModelParallelStrategy`` with ``fully_shard``
applied in ``configure_model``; checked with torch 2.13 and Lightning 2.6 on 2 CPU processes
with gloo):

- ``setup``: plain ``nn.Parameter`` objects, *not yet* sharded. Lightning calls
  ``configure_model`` after the callbacks' ``setup``; ``fully_shard`` then *replaces* every
  parameter by a new ``DTensor`` parameter (and swaps the module's class, ``Linear`` ->
  ``FSDPLinear``; module objects and names stay). A list of parameters taken in ``setup`` is
  stale: those objects never get a ``.grad``. Resolve parameters in ``on_fit_start`` or later
  (:func:`resolve_parameters`); the optimizer's parameters are the module's from then on.
- ``on_fit_start`` / ``on_train_start`` / ``on_before_optimizer_step``: ``p`` and ``p.grad`` are
  ``DTensor`` with the *global* shape, placements ``(Shard(0),)`` on the ``data_parallel`` mesh
  (HSDP: ``(Replicate(), Shard(0))``), and ``p.to_local()`` holds this rank's rows: a ``(5, 6)``
  weight on 2 ranks is ``(3, 6)`` on rank 0 and ``(2, 6)`` on rank 1, a ``(1, 5)`` one is
  ``(1, 5)`` and ``(0, 5)`` (uneven, possibly empty; the padding FSDP2 adds is not visible).
  ``to_local()`` is the gradient's storage: scaling it in place scales the gradient.
- Forward hooks (registered in ``setup`` or later): ``module.weight`` is the *unsharded* plain
  ``nn.Parameter`` with the full shape during the forward pass (FSDP2's own pre-forward hook,
  prepended, has all-gathered it); the inputs are this rank's part of the batch. Between steps
  it is the sharded ``DTensor`` again.
- Any op mixing a ``DTensor`` with a plain tensor raises (``aten.bmm.default got mixed
  torch.Tensor and DTensor``): hence :func:`local_tensor` before any math.
- ``torch.nn.utils.get_total_norm([p.grad ...])`` returns a 0-d ``DTensor`` with placement
  ``Replicate()`` whose value is already the global norm (torch 2.13 all-reduces inside; older
  versions returned a ``Partial`` one to ``.full_tensor()``). That is one collective per call
  and per-layer figures would need one each: :meth:`Sharding.global_squares` does all layers in
  one all-reduce.

**FSDP1** (``FSDPStrategy``, CUDA only in Lightning; flat parameters, Lightning's default
``use_orig_params=True``): outside forward/backward ``p`` and ``p.grad`` are 1-D views of the
part of the parameter's flattened values that lies in this rank's shard of the flat parameter
(an arbitrary contiguous range, not whole rows), or ``p.grad is None`` where none of it does
(``torch.distributed.fsdp._flat_param.FlatParamHandle._use_sharded_grad_views``). So ``None``
does not mean "no gradient" and differs between ranks; the local squares still add up over the
FSDP process group. Names carry ``_fsdp_wrapped_module.`` (:func:`clean_name`). Weights are not
row-sharded, so spectral figures must be computed where the weight is whole: in a forward
pre-hook, where ``module.weight`` is the unsharded 2-D view.

**DeepSpeed ZeRO** (``DeepSpeedStrategy``): stages 2 and 3 leave ``p.grad`` ``None``; the
gradients live in the engine's partitioned fp32 buffers. DeepSpeed could not be installed and
run here (it needs CUDA), so :func:`deepspeed_zero_stage` only detects it and
:func:`deepspeed_limitation` is the one message a monitor gives; the accessors at the end are
written from DeepSpeed 0.19.8's source and not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_diag.layers import ParameterGroups, group_parameters
from lightning_diag.metrics.norms import grouped_squares

__all__ = [
    "Sharding", "clean_name", "count_flagged", "deepspeed_global_grad_norm", "deepspeed_limitation", "deepspeed_local_grads",
    "deepspeed_zero_stage", "is_row_sharded", "local_grads", "local_tensor", "local_tensors", "max_over_ranks",
    "mean_over_ranks",
    "resolve_parameters", "sharding_of", "sum_over_ranks", "weight_rows", "whole_tensor",
]

try:  # torch >= 2.5 exports DTensor publicly; 2.4 under _tensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]

# Segments that wrappers insert into parameter names: FSDP1 units, activation checkpointing,
# torch.compile'd submodules. Stripped so that layer names are the model's own.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

Kind = Literal["none", "dtensor", "fsdp", "deepspeed"]


# -- names and parameters ---------------------------------------------------------------------


def clean_name(name: str) -> str:
    """A parameter or module name without the segments that wrappers insert.

    Example:
        >>> clean_name("net.0._fsdp_wrapped_module._checkpoint_wrapped_module.weight")
        'net.0.weight'
    """
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


class _CleanNames:
    """Presents a module's parameters under clean names to :func:`group_parameters`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        return [(clean_name(n), p) for n, p in self.module.named_parameters()]


def resolve_parameters(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    depth: int | None = None,
) -> ParameterGroups:
    """The watched parameters as the optimizer sees them: call at ``on_fit_start`` or later.

    Not in ``setup``: ``configure_model`` (FSDP2, tensor parallelism) runs after it and replaces
    the parameters. Names are cleaned of wrapper segments (:func:`clean_name`) before the
    ``include``/``exclude`` patterns are matched, so patterns name the model's own layers. Under
    FSDP1 the parameters come from the root FSDP module (``trainer.strategy.model``), which also
    holds the root's own parameters when ``use_orig_params=False`` (then each is a flat parameter
    of one FSDP unit, and a "layer" is that unit).

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> resolve_parameters(pl.Trainer(logger=False), BoringModel()).layers
        ['layer']
    """
    module: Any = pl_module
    if _is_fsdp1(trainer):
        module = trainer.strategy.model
    return group_parameters(_CleanNames(module), include, exclude, depth)  # type: ignore[arg-type]


# -- local shards -----------------------------------------------------------------------------


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t``: ``t.to_local()`` for a ``DTensor`` (its storage, not a copy), else ``t``.

    Example:
        >>> local_tensor(torch.ones(2)).shape
        torch.Size([2])
    """
    return t.to_local() if isinstance(t, DTensor) else t


def whole_tensor(t: Tensor) -> Tensor:
    """The whole of ``t`` on every rank: ``t.full_tensor()`` for a ``DTensor``, else ``t`` itself.

    An all-gather, so a collective (every rank must call it at the same point) that moves the
    whole tensor: only for small tensors read rarely, such as a ``(K, d)`` classifier head at
    evaluation time (NCTracker reads ``head.weight`` outside the forward pass, where under FSDP2
    it is a sharded ``DTensor``). Norms and power iterations never need it.

    Example:
        >>> whole_tensor(torch.ones(2)).shape
        torch.Size([2])
    """
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local_tensor` of each tensor."""
    return [local_tensor(t) for t in tensors]


def local_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """This rank's part of each gradient; an empty tensor where ``p.grad`` is ``None``.

    Under sharding a ``None`` gradient can mean "no part of this parameter on this rank" (FSDP1),
    and every rank must hand the all-reduce a vector of the same layout: so the layout is the
    list of watched parameters, never the list of those with a gradient here. An empty tensor
    contributes 0 to a squared norm.

    Example:
        >>> p = nn.Parameter(torch.ones(3))
        >>> [g.shape for g in local_grads([p])]
        [torch.Size([0])]
    """
    return [local_tensor(p.grad) if p.grad is not None else _empty_like(p) for p in params]


def _empty_like(p: Tensor) -> Tensor:
    return torch.zeros(0, dtype=p.dtype, device=local_tensor(p).device)


# -- which ranks count, and the one all-reduce -----------------------------------------------


@dataclass
class Sharding:
    """How the local squares of a fixed list of parameters add up to global figures.

    Built once, after ``configure_model``, by :func:`sharding_of`. A monitor keeps it with its
    parameter list and, every step, does ``squares -> keep_owned -> grouped -> all_reduce_sum``
    (:meth:`global_squares`): one SUM all-reduce of a per-layer vector, whatever the depth.

    Attributes:
        kind: ``"none"`` (one process, or DDP: every rank holds the whole, already averaged
            gradient; no collective), ``"dtensor"`` (FSDP2/HSDP/tensor parallel: all-reduce over
            the world, replicas masked), ``"fsdp"`` (FSDP1: all-reduce over the FSDP shard
            group) or ``"deepspeed"`` (see :func:`deepspeed_limitation`).
        owned: per parameter, whether this rank's local part counts: False on all but one
            replica of a replicated piece (HSDP's replicate dimension, plain parameters under
            FSDP2), so nothing is counted twice. ``None``: every part counts.
        group: the process group of the all-reduce (``None``: the default, world group).
        unsupported: names of parameters whose local parts do not add up (a ``Partial``
            placement); they are not counted (``owned`` False everywhere).
    """

    kind: Kind
    owned: tuple[bool, ...] | None = None
    group: Any = None
    unsupported: tuple[str, ...] = ()
    _masks: dict[torch.device, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def owns(self, index: int) -> bool:
        """Whether this rank's part of parameter ``index`` counts (see :func:`weight_rows`)."""
        return True if self.owned is None else self.owned[index]

    def _mask(self, device: torch.device) -> Tensor:
        if device not in self._masks:  # built once per device: no host-to-device copy per step
            self._masks[device] = torch.tensor(self.owned, dtype=torch.bool, device=device)
        return self._masks[device]

    @property
    def reduces(self) -> bool:
        """Whether figures need the all-reduce (False for one process and for DDP)."""
        return self.kind != "none"

    def keep_owned(self, values: Tensor) -> Tensor:
        """``values`` (one per parameter) with the entries of parts counted elsewhere set to 0.

        ``torch.where``, not a product: a NaN on a replica must not leak into the sum (the
        owner's NaN still does, on every rank).
        """
        if self.owned is None:
            return values
        return torch.where(self._mask(values.device), values, 0.0)

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        """Sum of ``values`` over the ranks of :attr:`group`, in place; a no-op when not sharded.

        A collective: every rank must call it at the same point with the same shape and dtype.
        On CUDA it is queued on the stream (no host sync).
        """
        if self.reduces and _world_size() > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def global_squares(self, squares: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
        """Global per-group sums of squares from this rank's per-parameter local squares.

        ``sqrt`` of the result is the per-layer norm of the unsharded tensors on every rank.
        Non-finite local parts make their group non-finite on every rank.

        Example:
            >>> s = Sharding("none")
            >>> s.global_squares(torch.tensor([9.0, 16.0, 4.0]), torch.tensor([0, 0, 1]), 2).sqrt()
            tensor([5., 2.])
        """
        return self.all_reduce_sum(grouped_squares(self.keep_owned(squares), group_index, num_groups))

    def count_nonfinite(self, squares: Tensor) -> Tensor:
        """Number of parameters whose counted local part on *this* rank is non-finite (no collective).

        Not a global count once summed over ranks: a parameter sharded over ``w`` ranks with a
        non-finite piece on each would count ``w`` times. For the global count pack
        :meth:`nonfinite_flags` into the all-reduce and read it with :func:`count_flagged`.
        """
        return self.nonfinite_flags(squares).sum()

    def nonfinite_flags(self, squares: Tensor) -> Tensor:
        """Per parameter, 1 where this rank's counted part is non-finite, else 0 (local, no collective).

        A parameter is non-finite when *any* of its parts is: the maximum of the flags over the
        ranks. Summed in the one SUM all-reduce with the other figures, a flag is > 0 exactly where
        that maximum is 1, so :func:`count_flagged` of the sum counts each parameter once, however
        many ranks hold a bad piece of it.

        Example:
            >>> s = Sharding("dtensor", owned=(True, True))
            >>> rank0, rank1 = torch.tensor([float("nan"), 1.0]), torch.tensor([float("inf"), 4.0])
            >>> count_flagged(s.nonfinite_flags(rank0) + s.nonfinite_flags(rank1))  # the all-reduce's sum
            tensor(1.)
        """
        bad = ~torch.isfinite(squares)
        if self.owned is not None:  # a replica's piece is the owner's: counted there
            bad = bad & self._mask(bad.device)
        return bad.to(squares.dtype if squares.is_floating_point() else torch.float64)


def count_flagged(flags: Tensor) -> Tensor:
    """Number of parameters flagged on any rank, from the sum over ranks of :meth:`Sharding.nonfinite_flags`
    (or of any 0/1 flags): a maximum over ranks, read from a sum."""
    return (flags > 0).sum().to(flags.dtype)


def sharding_of(trainer: pl.Trainer, params: Sequence[Tensor], names: Sequence[str] | None = None) -> Sharding:
    """How ``params`` (as resolved by :func:`resolve_parameters`) are split across ranks.

    Reads placements and meshes once (a few host reads, at set-up only). The rule for
    ``DTensor`` parameters: a rank's local part counts when its coordinate is 0 on every
    ``Replicate`` mesh dimension and the mesh holds global rank 0 (a parameter that lives on a
    sub-mesh, e.g. the ``data_parallel`` one of a 2-D mesh, is replicated over the other copies of
    that sub-mesh); a plain parameter among ``DTensor`` ones counts on global rank 0 only. This
    assumes every rank holds every watched parameter (data, tensor and hybrid sharding; not
    pipeline parallelism).
    """
    names = list(names) if names is not None else [str(i) for i in range(len(params))]
    if deepspeed_zero_stage(trainer) is not None:
        return Sharding("deepspeed")
    if _world_size() <= 1:
        return Sharding("none")
    if _is_fsdp1(trainer):
        root = trainer.strategy.model
        strategy = str(getattr(root, "sharding_strategy", ""))
        if strategy.endswith("NO_SHARD"):
            return Sharding("none")  # whole, all-reduced gradients on every rank, as under DDP
        return Sharding("fsdp", group=getattr(root, "process_group", None))
    if not any(isinstance(p, DTensor) for p in params):
        return Sharding("none")
    rank = dist.get_rank()
    owned, unsupported = [], []
    for name, p in zip(names, params):
        state = _owns(p, rank)
        if state is None:
            unsupported.append(name)
        owned.append(bool(state))
    sharding = Sharding("dtensor", owned=tuple(owned), unsupported=tuple(unsupported))
    sharding._mask(local_tensor(params[0]).device)  # the host-to-device copy now, not in a training step
    return sharding


def _owns(p: Tensor, rank: int) -> bool | None:
    """Whether this rank's local part of ``p`` is the one to count (``None``: parts do not add up)."""
    if not isinstance(p, DTensor):
        return rank == 0
    mesh = p.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return False
    for dim, placement in enumerate(p.placements):
        if placement.is_partial():
            return None
        if placement.is_replicate() and coordinate[dim] != 0:
            return False
    return bool((mesh.mesh == 0).any())


# -- weights for the spectral monitor ---------------------------------------------------------


def is_row_sharded(weight: Tensor) -> bool:
    """Whether this rank's local part of a 2-D weight is a set of whole rows (plain or ``Shard(0)``).

    True for plain tensors and for FSDP2 (``Shard(0)``, also combined with ``Replicate``), so
    :func:`~lightning_diag.metrics.spectral.row_sharded_power_iteration` applies; False for
    column sharding (``Shard(1)``, row-wise tensor parallelism), ``Partial`` and FSDP1's 1-D
    flat fragments, whose figures need another route (FSDP1: a forward pre-hook, where the
    weight is whole).
    """
    if not isinstance(weight, DTensor):
        return weight.ndim == 2
    return weight.ndim == 2 and all(
        not placement.is_partial() and (not placement.is_shard() or placement.dim == 0)  # type: ignore[attr-defined]
        for placement in weight.placements
    )


def weight_rows(weight: Tensor, owned: bool) -> Tensor:
    """The rows this rank passes to the row-sharded power iteration: its local rows, or none.

    ``owned`` is :meth:`Sharding.owns` of this parameter: a replica passes ``(0, d_in)`` so
    that its rows are not counted twice.

    Example:
        >>> weight_rows(torch.ones(3, 2), owned=False).shape
        torch.Size([0, 2])
    """
    rows = local_tensor(weight)
    return rows if owned else rows[:0]


# -- data figures: rank-local samples -----------------------------------------------------------


def sum_over_ranks(values: Tensor) -> Tensor:
    """Sum of ``values`` over all ranks, in place (no-op for one process).

    For figures of rank-local *data* (sampled inputs, losses): every data-parallel strategy,
    DDP included, gives each rank different samples. Ratios of such sums (sign fractions, means)
    are also right under tensor parallelism, where ranks of one group see the same samples.
    """
    if _world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def max_over_ranks(values: Tensor) -> Tensor:
    """Element-wise maximum of ``values`` over all ranks, in place (no-op for one process); a
    minimum is ``-max_over_ranks(-x)``."""
    if _world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def mean_over_ranks(values: Tensor) -> Tensor:
    """Mean of ``values`` over all ranks (the global-batch loss from per-rank mean losses of
    equal-size batches, as ``DistributedSampler`` makes them)."""
    world = _world_size()
    return sum_over_ranks(values) / world if world > 1 else values


# -- strategy detection -------------------------------------------------------------------------


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_fsdp1(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def deepspeed_zero_stage(trainer: pl.Trainer) -> int | None:
    """The ZeRO stage (0-3) when the trainer runs Lightning's ``DeepSpeedStrategy``, else ``None``."""
    from lightning.pytorch.strategies import DeepSpeedStrategy  # importable without deepspeed installed

    if not isinstance(trainer.strategy, DeepSpeedStrategy):
        return None
    config = getattr(trainer.strategy, "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_limitation(stage: int, what: str = "gradient figures") -> str:
    """The one message a monitor gives under DeepSpeed ZeRO ``stage`` for what it cannot measure.

    DeepSpeed keeps gradients (stage >= 1, ``p.grad`` is None) and, at stage 3, the weights
    themselves in its own partitions; lightning_diag reads neither (no GPU here to test the
    accessors), so it says so once rather than logging nothing silently.

    Example:
        >>> deepspeed_limitation(2)[:46]
        'DeepSpeed ZeRO stage 2 keeps its own partition'
    """
    return (f"DeepSpeed ZeRO stage {stage} keeps its own partitions (p.grad is None"
            f"{', and the weights are partitioned' if stage == 3 else ''}): {what} are not measured under "
            "DeepSpeed; its own total gradient norm is engine.get_global_grad_norm()")


def deepspeed_local_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """ZeRO-3: each parameter's local gradient partition (flat, fp32), empty where there is none.

    ``deepspeed.utils.safe_get_local_grad`` (public since DeepSpeed 0.10) reads the partition
    this rank owns; the local squares add up over the data-parallel group, as under FSDP1.
    Call between backward and the optimizer step (``on_before_optimizer_step``).
    """
    from deepspeed.utils import safe_get_local_grad  # type: ignore[import-not-found]

    out = []
    for p in params:
        g = safe_get_local_grad(p) if hasattr(p, "ds_id") else None
        out.append(g if g is not None else _empty_like(p))
    return out


def deepspeed_global_grad_norm(trainer: pl.Trainer) -> Tensor | None:
    """The engine's global gradient norm of the last optimizer step, or ``None``.

    ``engine.get_global_grad_norm()`` is set inside ``engine.step()``: read it in
    ``on_train_batch_end`` for the step just taken (in ``on_before_optimizer_step`` it is the
    previous step's). DeepSpeed returns a float or a tensor (inf after an fp16 overflow).
    """
    get = getattr(trainer.model, "get_global_grad_norm", None)  # trainer.model is the DeepSpeedEngine
    value = get() if callable(get) else None
    return None if value is None else torch.as_tensor(value, dtype=torch.float32)
