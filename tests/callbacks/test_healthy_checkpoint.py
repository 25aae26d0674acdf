"""HealthyCheckpoint: no checkpoint of a non-finite or alerting state is ever written, rotation never
deletes the last healthy file, and last.ckpt stays the last healthy state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyModule, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_diag import HealthyCheckpoint, LossSpikeDetector


class TurnsNan(TinyModule):
    """Trains normally, then an inf target at ``nan_from`` makes the weights NaN for good (no guard)."""

    def __init__(self, nan_from: int = 10**9, spike_at: int = 10**9) -> None:
        super().__init__()
        self.nan_from, self.spike_at = nan_from, spike_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.nan_from:
            y = y * float("inf")
        if self.global_step == self.spike_at:
            y = y * 1000.0
        return nn.functional.mse_loss(self.net(x), y)


def _files(path: Path) -> dict[str, dict[str, Any]]:
    return {f.name: torch.load(f, weights_only=False) for f in sorted(path.glob("*.ckpt"))}


def _finite(checkpoint: dict[str, Any]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in checkpoint["state_dict"].values())


@pytest.mark.parametrize("kind", ["plain", "healthy"])
def test_a_run_that_turns_nan_leaves_only_finite_checkpoints_and_a_healthy_last(kind, tmp_path):
    """The pocket-tts #262 run: a plain ModelCheckpoint (``save_top_k=2`` by step) rotates the healthy
    files out for NaN ones and ``last.ckpt`` holds NaN weights; HealthyCheckpoint keeps both healthy."""
    torch.manual_seed(0)
    cls = ModelCheckpoint if kind == "plain" else HealthyCheckpoint
    checkpoint = cls(dirpath=tmp_path, every_n_train_steps=5, save_top_k=2, monitor="step", mode="max",
                     save_last=True)
    detector = LossSpikeDetector(action="log", warmup=5, trend_window=None)
    trainer = make_trainer(max_steps=40, callbacks=[detector, checkpoint], enable_checkpointing=True)
    trainer.fit(TurnsNan(nan_from=22))
    assert not all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())  # the run is dead
    files = _files(tmp_path)
    if kind == "plain":
        assert not _finite(files["last.ckpt"]) and not any(_finite(c) for c in files.values())
        return
    assert files and all(_finite(c) for c in files.values())
    assert files["last.ckpt"]["global_step"] == 20  # the last healthy state, saved before step 22
    assert sorted(c["global_step"] for name, c in files.items() if name != "last.ckpt") == [15, 20]
    assert [r["step"] for r in checkpoint.refused][:1] == [25] and all(r["step"] >= 25 for r in checkpoint.refused)


def test_no_checkpoint_while_an_alert_is_recent_and_the_refused_save_is_made_once_quiet(tmp_path):
    torch.manual_seed(0)
    checkpoint = HealthyCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, quiet_steps=3,
                                   filename="{step}")
    detector = LossSpikeDetector(action="skip", warmup=5, trend_window=None)
    trainer = make_trainer(max_steps=26, callbacks=[detector, checkpoint], enable_checkpointing=True)
    with pytest.warns(UserWarning, match="zscore"):  # a z-score alert (warning) at step 14, its step skipped
        trainer.fit(TurnsNan(spike_at=14))
    assert [(a.metric, a.step) for a in detector.alerts] == [("loss_spike/zscore", 14)]
    steps = sorted(c["global_step"] for c in _files(tmp_path).values())
    # saves after 4, 8, 12 steps; after 16 the alert of step 14 is 2 steps old: refused, then made after
    # 18 steps, when the last step that ran (17) is 3 steps past the alert
    assert steps == [4, 8, 12, 18, 20, 24]
    assert [r["step"] for r in checkpoint.refused] == [16] and "zscore" in checkpoint.refused[0]["reason"]


def test_without_monitors_a_non_finite_weight_alone_blocks_the_save(tmp_path):
    torch.manual_seed(0)
    checkpoint = HealthyCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=1, save_last=True)
    trainer = make_trainer(max_steps=30, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(TurnsNan(nan_from=12))
    files = _files(tmp_path)
    assert len(files) == 2 and "last.ckpt" in files  # the top-1 file and last.ckpt...
    assert all(_finite(c) and c["global_step"] == 10 for c in files.values())  # ...both of the last healthy step
    assert [r["reason"] for r in checkpoint.refused][-1] == "a weight is NaN or inf"


def test_bad_quiet_steps_is_a_value_error():
    with pytest.raises(ValueError, match="`quiet_steps` must be an int >= 1, got 0"):
        HealthyCheckpoint(quiet_steps=0)
