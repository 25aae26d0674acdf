"""NCTracker's helpers: checking ``data``, finding the head, capturing features and labels,
running a probe pass without touching training, splitting it over the ranks that see different
data, and the class-mean cosine image."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_diag._checks import check_int
from lightning_diag.layers import find_module, last_linear

__all__ = ["DATA_SOURCES", "NC4_MODES", "FeatureTap", "batch_labels", "check_data", "class_mean_cosines",
           "cosine_image", "data_parallel", "feature_matrix", "find_head", "normal_tensors", "probe_batches",
           "probe_mode"]  # fmt: skip

DATA_SOURCES = ("val", "train")
NC4_MODES = ("lagged", "exact")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
_IMAGE_SIZE = 256  # the cosine image is upscaled to about this many pixels a side


def check_data(data: Any, nc4: str, every_n_epochs: Any, probe_every_n_steps: Any, feature_layer: Any) -> None:
    """NCTracker's ``data`` and what depends on it: "val", "train", a DataLoader, or a re-iterable
    of ``(input, label)``-like batches; ``ValueError`` naming the bad value otherwise."""
    probe = not isinstance(data, str)
    if not probe and data not in DATA_SOURCES:
        raise ValueError(f"`data` must be one of {DATA_SOURCES} or a DataLoader, got {data!r}")
    if probe and not isinstance(data, DataLoader):
        if not isinstance(data, Iterable) or isinstance(data, Iterator):  # iter() of an iterator would consume it
            raise ValueError(f"`data` must be one of {DATA_SOURCES} or a re-iterable DataLoader, got {data!r}")
        if isinstance(data, Sequence) and not data:
            raise ValueError(f"`data` is an empty {type(data).__name__}: a probe needs at least one (input, label) "
                             "batch")
        first = next(iter(data), None) if isinstance(data, Sequence) else None
        if isinstance(data, Sequence) and not (isinstance(first, (Mapping, Tensor)) or (
                isinstance(first, (tuple, list)) and len(first) >= 2)):  # fmt: skip
            raise ValueError(f"`data` must be one of {DATA_SOURCES} or a DataLoader of (input, label) batches, got "
                             f"a {type(data).__name__} whose first batch is {first!r}")  # fmt: skip
    if nc4 not in NC4_MODES:
        raise ValueError(f"`nc4` must be one of {NC4_MODES}, got {nc4!r}")
    if nc4 == "exact" and not probe:
        raise ValueError(f"`nc4='exact'` needs a second pass, so a probe DataLoader as `data`, got data={data!r}")
    check_int("every_n_epochs", every_n_epochs, 1, optional=True)
    check_int("probe_every_n_steps", probe_every_n_steps, 1, optional=True)
    if probe_every_n_steps is not None and not probe:
        raise ValueError(f"`probe_every_n_steps` needs a probe DataLoader as `data`, got data={data!r}")
    if every_n_epochs is None and probe_every_n_steps is None:
        raise ValueError("`every_n_epochs` and `probe_every_n_steps` are both None: the tracker would never run")
    if feature_layer is not None and not (isinstance(feature_layer, str) or callable(feature_layer)):
        raise ValueError(f"`feature_layer` must be None, a module name or a callable, got {feature_layer!r}")
    if callable(feature_layer) and data == "train":
        raise ValueError("a callable `feature_layer` needs a forward pass of its own: use data='val' or a probe")


def find_head(pl_module: nn.Module, classifier: str | None, num_classes: int | None) -> nn.Module | None:
    """The module named ``classifier``, or the last ``nn.Linear`` (None if the model has none),
    checked to have a 2-D ``(K, d)`` weight with ``K == num_classes`` when given."""
    if classifier is not None:
        head = find_module(pl_module, classifier, "classifier", matrix=True)
    else:
        head = (last_linear(pl_module) or (None, None))[1]
    if head is None:
        return None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(f"`classifier={classifier!r}` must have a 2-D (K, d) `weight`, got "
                         f"{type(head).__name__} with weight {getattr(weight, 'shape', weight)!r}")  # fmt: skip
    if num_classes is not None and num_classes != weight.shape[0]:
        raise ValueError(f"`num_classes={num_classes}` but the classifier has {weight.shape[0]} outputs")
    return head


class FeatureTap:
    """Captures the features of the forwards it is switched on for, with forward hooks.

    ``source`` is the head itself (its input is captured), another module (its output is
    captured) or ``None`` (no features: a ``feature_layer`` callable computes them). With
    ``weights`` switched on, the head's pre-hook also keeps a copy of its ``(W, b)`` in ``dtype``:
    the decision of *that* forward, before an optimizer step moves ``W``. Under FSDP2 the hooks
    are registered after ``fully_shard``, so FSDP's own pre-hook has made ``W`` whole by then.
    """

    def __init__(self, head: nn.Module, source: nn.Module | None, dtype: torch.dtype) -> None:
        self.head, self.source, self.dtype = head, source, dtype
        self.on = self.keep_weights = False
        self.captured: list[Tensor] = []
        self.weights: tuple[Tensor, Tensor | None] | None = None
        self.handles = [head.register_forward_pre_hook(self._head_hook)]
        if source is not None and source is not head:
            self.handles.append(source.register_forward_hook(self._output_hook))

    def start(self, on: bool, keep_weights: bool = False) -> None:
        """Capture the next forwards (or not), forgetting what an earlier batch left."""
        self.captured.clear()
        self.on, self.keep_weights, self.weights = on, on and keep_weights, None

    def take(self) -> Tensor | None:
        """The features captured since :meth:`start`, as one ``(N, d)`` matrix (None if none); stops capturing."""
        dim = self.head.weight.shape[1]
        features = torch.cat([feature_matrix(f, dim) for f in self.captured]) if self.captured else None
        self.captured.clear()
        self.on = False
        return features

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.captured.clear()
        self.on, self.weights = False, None

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.on:
            return
        if self.source is module and args:
            self.captured.append(args[0].detach())
        if self.keep_weights:
            bias = getattr(module, "bias", None)
            weight = module.weight.detach().to(dtype=self.dtype, copy=True)
            self.weights = weight, None if bias is None else bias.detach().to(weight.device, self.dtype, copy=True)

    def _output_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.on:
            self.captured.append((output[0] if isinstance(output, (tuple, list)) else output).detach())


def feature_matrix(features: Tensor, dim: int) -> Tensor:
    """``features`` as an ``(N, dim)`` matrix, or a ValueError saying what was wrong.

    ``(B, T, ..., dim)`` are token features, one row per token (as ``nn.Linear`` reads them);
    other ``(N, ...)`` are flattened to one row per sample (a pooled ``(N, C, 1, 1)`` output).

    Example:
        >>> feature_matrix(torch.zeros(2, 5, 3), 3).shape, feature_matrix(torch.zeros(2, 3, 1, 1), 3).shape
        (torch.Size([10, 3]), torch.Size([2, 3]))
    """
    if features.ndim > 2 and features.shape[-1] == dim:
        matrix = features.reshape(-1, dim)
    else:
        matrix = features.flatten(1) if features.ndim > 2 else features
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"features of shape {tuple(features.shape)} do not match the classifier's input dimension "
                         f"{dim}; `feature_layer` must give (N, {dim}) features (or (N, ...) that flatten to it)")
    return matrix


def batch_labels(batch: Any, label_fn: Any = None) -> Tensor:
    """The labels of a batch: ``label_fn(batch)``, a mapping's label key, or ``batch[1]``.

    Example:
        >>> batch_labels({"x": 0, "target": torch.tensor([1, 0])})
        tensor([1, 0])
    """
    if label_fn is not None:
        return label_fn(batch)
    if isinstance(batch, Mapping):
        for key in _LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(f"no labels in the batch (keys {list(batch)}; looked for {_LABEL_KEYS}): pass `label_fn`")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ValueError(f"cannot find labels in a batch of type {type(batch).__name__}: pass `label_fn`")


def data_parallel(trainer: pl.Trainer) -> tuple[Any, int, int]:
    """``(process group, rank, size)`` of the ranks that see different data, split as Lightning splits them.

    The group ``None`` is the world (DDP, FSDP1, DeepSpeed). Under ``ModelParallelStrategy`` the
    ranks of one tensor-parallel group see the same batches (Lightning's sampler splits over the
    ``data_parallel`` mesh only), so data statistics are summed over that mesh's group.

    Example:
        >>> data_parallel(pl.Trainer(logger=False))
        (None, 0, 1)
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(trainer.strategy, ModelParallelStrategy):
        mesh = trainer.strategy.device_mesh["data_parallel"]
        return mesh.get_group(), mesh.get_local_rank(), mesh.size()
    return None, trainer.global_rank, trainer.world_size


def probe_batches(loader: Iterable[Any], rank: int, size: int, device: torch.device) -> Iterator[Any]:
    """This rank's batches of a probe loader, on ``device``: batches ``rank, rank + size, ...``,
    or every batch when the loader already has a ``DistributedSampler``."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", getattr(loader, "sampler", None))
    if isinstance(sampler, DistributedSampler):
        rank, size = 0, 1
    for i, batch in enumerate(loader):
        if i % size == rank % size:
            yield move_data_to_device(batch, device)


@contextlib.contextmanager
def normal_tensors() -> Iterator[None]:
    """Metric work outside inference mode, so its state never becomes inference tensors
    (Lightning validates under ``torch.inference_mode``; the state outlives that context)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextlib.contextmanager
def probe_mode(pl_module: pl.LightningModule) -> Iterator[None]:
    """``eval()``, ``no_grad``, no autocast and a forked RNG; every module's mode is restored after."""
    modes = [(m, m.training) for m in pl_module.modules()]
    device = pl_module.device
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        autocast: Any = torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        autocast = contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast:
            pl_module.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


def class_mean_cosines(means: Tensor, counts: Tensor, global_mean: str = "class") -> Tensor:
    """``K' x K'`` cosines of the centred means of the ``K'`` classes present (one host sync).

    Example:
        >>> class_mean_cosines(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([3.0, 2.0]))
        tensor([[ 1., -1.],
                [-1.,  1.]])
    """
    present = (counts > 0).nonzero().squeeze(1)
    mu, n = means[present], counts[present]
    if mu.shape[0] == 0:
        return mu.new_zeros(0, 0)
    centre = mu.mean(0) if global_mean == "class" else (n[:, None] * mu).sum(0) / n.sum()
    unit = torch.nn.functional.normalize(mu - centre, dim=1)
    return unit @ unit.T


def cosine_image(cosines: Tensor) -> Tensor:
    """A ``(3, H, W)`` RGB image of a matrix of values in ``[-1, 1]``: blue -1, white 0, red +1, grey NaN.

    Each entry is a square of ``max(1, 256 // K)`` pixels (no matplotlib needed).

    Example:
        >>> cosine_image(torch.eye(2)).shape
        torch.Size([3, 256, 256])
    """
    v = cosines.detach().float().clamp(-1, 1)
    rgb = torch.stack([1 + v.clamp(max=0), 1 - v.abs(), 1 - v.clamp(min=0)])
    rgb = torch.where(torch.isnan(v), torch.full_like(rgb, 0.5), rgb)
    scale = max(1, _IMAGE_SIZE // max(v.shape[0], 1))
    return rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).cpu()
