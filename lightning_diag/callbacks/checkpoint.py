"""HealthyCheckpoint: Lightning's ModelCheckpoint that writes only healthy states, so rotation can never
replace the last healthy checkpoint by broken ones and ``last.ckpt`` is always one to resume from."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_diag._checks import check_int
from lightning_diag.callbacks._base import diagnostic_callbacks
from lightning_diag.callbacks._interventions import nonfinite_weights, serious_alert

__all__ = ["HealthyCheckpoint"]


class HealthyCheckpoint(ModelCheckpoint):
    """A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (same arguments) that writes no checkpoint
    of an unhealthy state.

    A NaN run otherwise "trains garbage, checkpoints garbage", and with ``save_top_k=3`` rotation
    deletes the last healthy checkpoints, so auto-resume reloads the NaN weights (pocket-tts #262).
    Here a save (top-k, ``last.ckpt``, on exception) is refused while the state is unhealthy:

    - a lightning_diag monitor on the trainer (:func:`~lightning_diag.callbacks._base.diagnostic_callbacks`)
      raised a ``warning`` or ``critical`` alert in the last ``quiet_steps`` optimizer steps, or has
      a rule of that severity in firing state (``info`` alerts do not count); the monitors' figures
      still in flight are read first;
    - or a weight is NaN or inf: one fused max-abs norm over the parameters (this rank's shards
      under FSDP2, one all-reduce over ranks), one host read per save.

    Since nothing unhealthy is ever written, rotation only ever replaces a healthy file by a newer
    healthy one: the last healthy checkpoint is never deleted, and ``last.ckpt`` is the last healthy
    state. A refused save is made at the first healthy step after it (``deferred``), once. Alerts and
    figures are global, so every rank decides alike. Pair it with
    ``LossSpikeDetector(action="recover")``, whose state in the checkpoint carries the batches still
    to skip, so a run resumed from it skips them too.

    Args:
        quiet_steps: optimizer steps without a serious alert before a state counts as healthy.
        *args, **kwargs: those of ``ModelCheckpoint``.

    Example:
        >>> from lightning_diag import LossSpikeDetector
        >>> callbacks = [LossSpikeDetector(action="recover"),
        ...              HealthyCheckpoint(every_n_train_steps=500, save_top_k=3, monitor="step", mode="max",
        ...                                save_last=True)]  # the 3 latest healthy states, and last.ckpt
    """

    def __init__(self, *args: Any, quiet_steps: int = 20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_int("quiet_steps", quiet_steps, 1)
        self.quiet_steps = quiet_steps
        self.refused: list[dict[str, Any]] = []  # {"step", "reason"} of each refused save
        self._verdict: tuple[int, str | None] | None = None  # (global_step, reason) of the last check
        self._deferred = False

    def unhealthy(self, trainer: pl.Trainer) -> str | None:
        """Why the current state must not be written, or None (computed once per optimizer step)."""
        if self._verdict is not None and self._verdict[0] == trainer.global_step:
            return self._verdict[1]
        for monitor in diagnostic_callbacks(trainer):  # the latest figures may still be on their way
            monitor.drain(trainer, trainer.global_step - 1, wait=True)
        alert = serious_alert(trainer, self.quiet_steps)
        reason = None if alert is None else str(alert)
        if reason is None and nonfinite_weights(trainer):
            reason = "a weight is NaN or inf"
        self._verdict = (trainer.global_step, reason)
        return reason

    def _allowed(self, trainer: pl.Trainer) -> bool:
        reason = self.unhealthy(trainer)
        if reason is None:
            self._deferred = False
            return True
        if not self.refused or self.refused[-1]["step"] != trainer.global_step:
            self.refused.append({"step": trainer.global_step, "reason": reason})
            rank_zero_info(f"lightning_diag: HealthyCheckpoint wrote no checkpoint at step {trainer.global_step}: "
                           f"{reason}")  # fmt: skip
        self._deferred = True
        return False

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if self.save_top_k != 0 and self._allowed(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if self.save_last and self._allowed(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _should_save_on_exception(self, trainer: pl.Trainer) -> bool:
        return super()._should_save_on_exception(trainer) and self.unhealthy(trainer) is None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._deferred or self._should_skip_saving_checkpoint(trainer):
            return
        if self.quiet(trainer) and self.unhealthy(trainer) is None:  # the save refused earlier, now
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def quiet(self, trainer: pl.Trainer) -> bool:
        """No serious alert in the window (host only: the cheap half of :meth:`unhealthy`, asked every step
        while a save is deferred, before the weights are read)."""
        return serious_alert(trainer, self.quiet_steps) is None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "refused": list(self.refused)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.refused = list(state_dict.get("refused", []))
