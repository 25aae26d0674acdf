"""Everything that touches the Trainer's loggers or private internals lives here, so a Lightning
change is a one-file fix."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightning_diag.alerts import Alert, DiagnosticWarning

__all__ = [
    "ALERTS_FILE", "HostCopy", "alert_line", "grad_scale", "has_tensorboard", "log_histogram", "log_image", "log_metrics",
    "log_text", "loss_scale", "show_alert_count", "warn", "write_alert_lines", "write_dashboard_once",
]

ALERTS_FILE = "lightning_diag_alerts.jsonl"  # one JSON alert per line, in each logger's log_dir
_OWN_PACKAGES = ("lightning_diag", "lightning", "pytorch_lightning", "lightning_fabric", "torch")


class HostCopy:
    """A small device vector on its way to the host, without a sync.

    On a CUDA device the vector is copied with ``non_blocking=True`` into pinned host memory and a
    CUDA event marks the copy; :meth:`ready` asks the event (never blocks) and :meth:`values`
    waits for it only if it has not completed (by the next step it has, unless the host runs
    ahead of the device by a whole step). On the CPU the vector is already on the host: ready at
    once, and read with ``tolist()``, which dispatches no ATen op.
    """

    def __init__(self, step: int, keys: tuple[str, ...], values: Tensor) -> None:
        self.step, self.keys = step, keys
        self._event: Any = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            values = host
        self._host = values

    def ready(self) -> bool:
        return self._event is None or bool(self._event.query())

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        values = self._host.tolist()
        return values if isinstance(values, list) else [values]


def _user_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first frame outside lightning_diag, Lightning and torch."""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in _OWN_PACKAGES:
            return level
        frame, level = frame.f_back, level + 1
    return 2


def warn(message: str) -> None:
    """A :class:`~lightning_diag.alerts.DiagnosticWarning` from global rank zero, pointing at the user's code.

    The warning is attributed to the first frame outside lightning_diag, Lightning and torch (the
    user's ``trainer.fit(...)`` line, or their own hook), not to this package's internals.
    """
    if rank_zero_only.rank == 0:
        warnings.warn(message, DiagnosticWarning, stacklevel=_user_stacklevel())


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float written as a string, ``"nan"``, ``"inf"`` or ``"-inf"``
    (what ``float()`` reads back), since ``NaN`` and ``Infinity`` are not JSON (``jq``, ``JSON.parse``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    return value


def alert_line(alert: Alert) -> str:
    """One alert as a line of strict JSON: non-finite numbers as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    return json.dumps(_strict(alert.as_dict()), allow_nan=False) + "\n"


def write_alert_lines(trainer: pl.Trainer, alerts: Iterable[Alert]) -> None:
    """Append each alert as one line of strict JSON (:func:`alert_line`) to
    ``<log_dir>/lightning_diag_alerts.jsonl`` of every logger."""
    lines = "".join(map(alert_line, alerts))
    if not lines or not trainer.is_global_zero:
        return
    for log_dir in {lg.log_dir for lg in trainer.loggers if isinstance(getattr(lg, "log_dir", None), (str, Path))}:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, ALERTS_FILE), "a", encoding="utf-8") as f:
            f.write(lines)


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send a dict of floats to every logger of the trainer, from global rank zero only."""
    if metrics and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
    """Write text to each TensorBoard logger; other loggers have no text channel and skip it."""
    for writer in _tensorboard_writers(trainer):
        writer.add_text(tag, text, global_step=step)


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int, bins: int = 64) -> None:
    """Write a histogram of the finite ``values`` to each TensorBoard logger (others skip it).

    The values reach the host only when a TensorBoard logger exists; non-finite ones are dropped
    there (TensorBoard rejects them), and an empty histogram is skipped.
    """
    for writer in _tensorboard_writers(trainer):
        values = values.detach().float().cpu().flatten()
        values = values[torch.isfinite(values)]
        if values.numel():
            writer.add_histogram(tag, values, global_step=step, bins=bins)


def has_tensorboard(trainer: pl.Trainer) -> bool:
    """True on global rank zero when the trainer has a TensorBoard logger (build images only then)."""
    return bool(_tensorboard_writers(trainer))


def log_image(trainer: pl.Trainer, tag: str, image: Tensor, step: int) -> None:
    """Write a ``(3, H, W)`` RGB image with values in ``[0, 1]`` to each TensorBoard logger (others skip it)."""
    for writer in _tensorboard_writers(trainer):
        writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), global_step=step, dataformats="CHW")


_DASHBOARD_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()  # SummaryWriters that hold our layout
_BARS_WRAPPED: weakref.WeakSet[Any] = weakref.WeakSet()  # progress bars that show the alert count
PROGRESS_BAR_KEY = "alerts"


def write_dashboard_once(trainer: pl.Trainer, layout: Callable[[], Mapping[str, Any]]) -> None:
    """Write a custom-scalars layout (``layout()``) to each TensorBoard logger that has none yet.

    TensorBoard reads the first layout of a run, so one per ``SummaryWriter`` (one per run) is
    enough; ``layout`` is called only when some writer still needs it.
    """
    writers = [w for w in _tensorboard_writers(trainer) if w not in _DASHBOARD_WRITTEN]
    if not writers:
        return
    built = dict(layout())
    for writer in writers:
        if built:
            writer.add_custom_scalars(built)
        _DASHBOARD_WRITTEN.add(writer)


def show_alert_count(trainer: pl.Trainer, count: Callable[[pl.Trainer], int]) -> None:
    """Show ``count(trainer)`` as ``alerts`` in the progress bar, from now on.

    Lightning's sanctioned place for extra progress-bar items is ``ProgressBar.get_metrics``
    (TQDM and Rich bars and custom ones all call it at every refresh); the trainer's bar gets a
    wrapper of it once. ``self.log(..., prog_bar=True)`` is not an option: it is refused in some
    of the hooks where monitors publish, and it would also send the count to every logger.
    """
    bar = trainer.progress_bar_callback
    if bar is None or bar in _BARS_WRAPPED:
        return
    inner = bar.get_metrics

    def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = inner(trainer, pl_module)
        items.setdefault(PROGRESS_BAR_KEY, count(trainer))  # a user's own "alerts" item wins
        return items

    bar.get_metrics = get_metrics  # type: ignore[method-assign]
    _BARS_WRAPPED.add(bar)


def grad_scale(trainer: pl.Trainer, optimizer: Any) -> Tensor | None:
    """The fp16 loss scale still applied to gradients at ``on_before_optimizer_step``, or None.

    Lightning unscales gradients before that hook, except for optimizers that unscale inside
    their own ``step`` (fused ones): for those the gradients are still multiplied by the scale.
    The scale is returned as the scaler's device tensor, so dividing by it costs no sync.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else torch.tensor(float(scaler.get_scale()))


def has_grad_scaler(trainer: pl.Trainer) -> bool:
    """True under fp16 mixed precision, where overflow steps (inf gradients) are routine."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def loss_scale(trainer: pl.Trainer) -> Tensor | None:
    """The fp16 loss scale that ``on_before_backward`` sees multiplied into the loss, or None.

    Lightning's fp16 precision plugins (``MixedPrecision``, ``FSDPPrecision``) scale the loss
    *before* calling ``on_before_backward``; bf16, fp32 and plugins that scale inside their own
    backward (DeepSpeed) hand the hook the plain loss. Returned as the scaler's device tensor (a
    power of two), so dividing by it is exact and costs no sync.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else None
