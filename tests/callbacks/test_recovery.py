"""LossSpikeDetector's recovery: healthy snapshots, a rollback that restores model, optimizer and
scheduler bit for bit and removes the cause (lower LR, skipped data, statistics kept), the
``action="recover"`` ladder, and the skip record that survives a resume."""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyModule, ddp_on_cpu, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_diag import LossSpikeDetector
from lightning_diag.callbacks._interventions import Snapshots


class Scheduled(TinyModule):
    """TinyModule with AdamW under a linear warm-up (``LambdaLR``, stepped every step); targets x1000 at
    ``bad_steps`` (a spike), and every loss NaN from ``nan_from`` on."""

    def __init__(self, bad_steps: tuple[int, ...] = (), nan_from: int = 10**9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad_steps, self.nan_from = bad_steps, nan_from

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y * (1000.0 if self.global_step in self.bad_steps else 1.0))
        return loss * float("nan") if self.global_step >= self.nan_from else loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _state(trainer: pl.Trainer) -> dict[str, Any]:
    """Independent copies of the model, optimizer and scheduler states."""
    return {"model": {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())}


def _same(a: Any, b: Any) -> bool:
    """Nested equality, tensors bit for bit (``torch.equal``)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


class AtSnapshots(pl.Callback):
    """Copies of the state at every snapshot the detector takes, and right after each batch (put it after the detector)."""

    def __init__(self, detector: LossSpikeDetector) -> None:
        self.detector, self.seen = detector, 0
        self.at_snapshot: dict[int, dict[str, Any]] = {}
        self.after: dict[int, dict[str, Any]] = {}

    def _check(self, trainer: pl.Trainer) -> None:
        if self.detector.snapshots.taken > self.seen:
            self.seen = self.detector.snapshots.taken
            self.at_snapshot[trainer.global_step] = _state(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._check(trainer)
        self.after[trainer.global_step - 1] = _state(trainer)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_rollback_restores_bit_identical_weights_optimizer_and_scheduler_state(where, tmp_path):
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="rollback", warmup=5, trend_window=None, snapshot_every_n_steps=4,
                                 snapshot_dir=str(tmp_path / "snapshots") if where == "disk" else None)
    probe = AtSnapshots(detector)
    trainer = make_trainer(max_steps=24, callbacks=[detector, probe])
    with pytest.warns(UserWarning, match="rolled back"):
        trainer.fit(Scheduled(bad_steps=(17,)))
    newest = max(s for s in probe.at_snapshot if s <= 17)
    assert newest >= 12  # a recent healthy state, not the start
    restored, saved = probe.after[17], probe.at_snapshot[newest]
    assert _same(restored["model"], saved["model"])
    assert _same(restored["optimizer"], saved["optimizer"])  # moments, step counts, param_groups (lr)
    assert _same(restored["scheduler"], saved["scheduler"])  # the warm-up's position too
    assert restored["scheduler"]["last_epoch"] == newest < 17
    assert detector.rollbacks == 1 and detector.lr_scale == 0.5  # the cause removed: the rate in use halved
    if where == "disk":
        assert not os.listdir(tmp_path / "snapshots")  # scratch files, removed at the end


def test_rollback_keeps_the_statistics_and_halves_the_rate_the_optimizer_uses():
    """The baseline goes on (no second warm-up) and the learning rate in use is the schedule's times
    ``lr_scale`` from the rollback on (read from SGD's own update)."""

    class SgdSpike(Scheduled):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    rates: dict[int, float] = {}

    class Rate(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            p = pl_module.net[0].weight
            self.p, self.before, self.grad = p, p.detach().clone(), p.grad.detach().clone()

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            i = int(self.grad.abs().argmax())
            rates[trainer.global_step - 1] = float((self.before.flatten()[i] - self.p.detach().flatten()[i])
                                                   / self.grad.flatten()[i])

    torch.manual_seed(0)
    detector = LossSpikeDetector(action="rollback", warmup=5, trend_window=None, snapshot_every_n_steps=4)
    with pytest.warns(UserWarning, match="rolled back"):
        make_trainer(max_steps=24, callbacks=[detector, Rate()]).fit(SgdSpike(bad_steps=(15,)))
    assert rates[14] == pytest.approx(0.01, rel=1e-4)
    assert rates[16] == pytest.approx(0.005, rel=1e-4) and rates[23] == pytest.approx(0.005, rel=1e-4)
    assert int(detector.stats.baseline.count[0]) == 24 and detector.stats.baseline.ready[0]


class Jump(TinyModule):
    """A tiny MLP on SGD whose learning rate a ``LambdaLR`` multiplies by ``jump`` from step 60 on."""

    def __init__(self, jump: float) -> None:
        super().__init__(width=16)
        self.jump, self.losses = jump, {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses[self.global_step] = float(loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        jump = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.jump if s >= 60 else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": jump, "interval": "step"}}


def _run(jump: float, *callbacks: pl.Callback) -> tuple[pl.Trainer, Jump]:
    torch.manual_seed(0)
    module = Jump(jump)
    trainer = make_trainer(max_steps=200, callbacks=list(callbacks))
    trainer.fit(module)
    return trainer, module


def _finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_recover_ladder_saves_a_run_whose_learning_rate_jumps_tenfold_and_counts_each_rung():
    _, plain = _run(10.0)
    assert not _finite(plain)  # without help the run explodes
    detector = LossSpikeDetector(action="recover")
    trainer, module = _run(10.0, detector)
    assert trainer.global_step == 200 and _finite(module)
    late = [module.losses[s] for s in range(190, 200)]
    assert max(late) < 0.5  # trains on, at a reduced rate (the twin ends near 0.07)
    assert detector.skipped >= detector.rollback_after  # rung 1, until skipping did not help...
    assert detector.rollbacks == 1  # ...rung 3
    assert detector.lr_scale == pytest.approx(0.25)  # rung 2 (the sustained rise) and the rollback's own
    history = trainer.logger.history
    assert history["loss_spike/rollbacks"][-1] == (199, 1.0) and history["loss_spike/lr_scale"][-1] == (199, 0.25)
    assert history["loss_spike/skipped"][-1] == (199, float(detector.skipped))
    assert [a.severity for a in detector.alerts if a.metric == "loss_spike/rollbacks"] == ["warning"]


def test_recover_leaves_a_stable_twin_alone():
    detector = LossSpikeDetector(action="recover")
    _, untouched = _run(1.0)
    _, module = _run(1.0, detector)
    assert detector.skipped == detector.rollbacks == detector.events == 0 and detector.lr_scale == 1.0
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), untouched.parameters()))  # bit-identical


def test_recover_stops_with_a_critical_alert_when_the_budget_is_spent_and_ends_on_healthy_weights():
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="recover", warmup=5, trend_window=None, snapshot_every_n_steps=4,
                                 max_rollbacks=1, rollback_after=2)
    trainer = make_trainer(max_steps=60, callbacks=[detector])
    with pytest.warns(UserWarning, match="budget spent"):
        trainer.fit(Scheduled(nan_from=20))  # every loss NaN from step 20: nothing can save it
    # 2 skips -> rollback 1 at step 21; 2 more skips -> the budget is spent at step 23: restore and stop
    assert trainer.global_step == 24 and detector.rollbacks == 2 and detector.skipped == 4
    last = detector.alerts[-1]
    assert (last.metric, last.severity, last.step) == ("loss_spike/rollbacks", "critical", 23)
    assert _finite(trainer.lightning_module)


def test_snapshots_are_kept_at_growing_distances_and_their_memory_is_stated():
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="rollback", warmup=5, trend_window=None, snapshot_every_n_steps=2,
                                 keep_snapshots=3)
    held: dict[int, list[int]] = {}

    class Held(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            held[trainer.global_step] = detector.snapshots.steps
            self.bytes = detector.snapshot_bytes

    probe = Held()
    trainer = make_trainer(max_steps=40, callbacks=[detector, probe])
    trainer.fit(Scheduled())
    assert detector.snapshots.taken == 21  # train start, then every 2 steps (a quiet run, all healthy)
    assert held[40] == [36, 38, 40] and held[38] == [32, 36, 38]  # 0, 1 and 2-3 intervals old
    model = sum(t.numel() * t.element_size() for t in trainer.lightning_module.state_dict().values())
    adam = sum(t.numel() * t.element_size() for s in trainer.optimizers[0].state.values() for t in s.values())
    assert probe.bytes == 3 * (model + adam)  # three snapshots, each the model and AdamW's state


def test_the_hanoi_rotation_holds_snapshots_0_1_2to3_and_4to7_intervals_old():
    slots = Snapshots(keep=4)
    for newest in range(8, 40):  # which snapshot numbers are held after number `newest` was added
        held: dict[int, int] = {}
        for n in range(newest + 1):
            held[slots.slot(n)] = n
        ages = sorted(newest - n for n in held.values())
        assert ages[0] == 0 and ages[1] == 1 and 2 <= ages[2] <= 3 and 4 <= ages[3] <= 7, (newest, ages)


def test_a_resumed_run_skips_the_recorded_batches(tmp_path):
    """A checkpoint saved while batches remain to be skipped after a rollback, and with batches given
    to skip (a crashed run's ``bad_batches``), makes the resumed run skip them too."""

    def run(ckpt_path: str | None = None, **kwargs: Any) -> tuple[LossSpikeDetector, dict[int, bool]]:
        torch.manual_seed(0)
        detector = LossSpikeDetector(action="rollback", warmup=5, trend_window=None, snapshot_every_n_steps=4,
                                     **kwargs)
        moved: dict[int, bool] = {}

        class Moved(pl.Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
                self.before = pl_module.net[0].weight.detach().clone()

            def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
                moved[trainer.global_step - 1] = not torch.equal(self.before, pl_module.net[0].weight)

        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=16, save_top_k=-1)
        trainer = make_trainer(max_steps=32, callbacks=[detector, Moved(), checkpoint], enable_checkpointing=True)
        with pytest.warns(UserWarning):
            trainer.fit(Scheduled(bad_steps=(13,)), ckpt_path=ckpt_path)
        return detector, moved

    first, moved = run(rollback_skip_batches=6, skip_batches=[{"epoch": 3, "batch_idx": 4, "step": 28}])
    assert [s for s in range(14, 20) if not moved[s]] == [14, 15, 16, 17, 18, 19]  # skipped after the rollback
    assert not moved[28] and first.skipped == 7
    saved = torch.load(tmp_path / "epoch=1-step=16.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert saved["pending_skips"] == 4 and saved["skip_positions"] == [[3, 4]]
    resumed, moved = run(str(tmp_path / "epoch=1-step=16.ckpt"))  # a fresh detector, told nothing
    assert [s for s in range(16, 32) if not moved[s]] == [16, 17, 18, 19, 28]
    assert resumed.skipped == 7 and resumed.pending_skips == 0 and resumed.skip_positions == set()


def test_state_round_trip_keeps_the_recovery_record():
    detector = LossSpikeDetector(action="recover", skip_batches=[(2, 5), {"epoch": 4, "batch_idx": 1}])
    detector.rollbacks, detector.lr_scale, detector.pending_skips, detector.skipped = 2, 0.25, 7, 11
    other = LossSpikeDetector(action="recover")
    other.load_state_dict(detector.state_dict())
    assert (other.rollbacks, other.lr_scale, other.pending_skips, other.skipped) == (2, 0.25, 7, 11)
    assert other.skip_positions == {(2, 5), (4, 1)}
    assert other.state_dict() == detector.state_dict()


class RankSpike(Scheduled):
    """Each rank reads its own rows; the targets of rank 1 only are x1000 at ``bad_steps``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step in self.bad_steps and self.global_rank == 1:
            y = y * 1000.0
        return nn.functional.mse_loss(self.net(x), y)


class RankRecord(pl.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        [detector] = [c for c in trainer.callbacks if isinstance(c, LossSpikeDetector)]
        torch.save({"weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "alerts": [(a.metric, a.step) for a in detector.alerts], "rollbacks": detector.rollbacks,
                    "lr_scale": detector.lr_scale, "scheduler": trainer.lr_scheduler_configs[0].scheduler.last_epoch},
                   os.path.join(self.dirpath, f"rank{trainer.global_rank}.pt"))


@pytest.mark.distributed
def test_ddp_every_rank_rolls_back_to_the_same_snapshot_at_the_same_step(tmp_path):
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="rollback", warmup=5, trend_window=None, snapshot_every_n_steps=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ddp_on_cpu(timeout_s=30), max_steps=16,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[detector, RankRecord(str(tmp_path))])
    trainer.fit(RankSpike(bad_steps=(11,)))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["rollbacks"] == rank1["rollbacks"] == 1 and rank0["lr_scale"] == rank1["lr_scale"] == 0.5
    assert ("loss_spike/rollbacks", 11) in rank0["alerts"] and rank0["alerts"] == rank1["alerts"]
    assert rank0["scheduler"] == rank1["scheduler"] < 16  # both schedules went back to the snapshot
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])


def test_under_gradient_accumulation_a_batch_to_skip_skips_its_whole_optimizer_step():
    """``skip_batches=[(0, 0)]`` with ``accumulate_grad_batches=2``: micro-batches 0 and 1 make step 0.
    Before: the flag of micro-batch 0 was overwritten by micro-batch 1's, so the step ran on the bad
    batch with no word; now the step of the window holding it is skipped."""
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="log", skip_batches=[(0, 0)])
    weights: dict[int, torch.Tensor] = {}

    class Weights(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            weights[trainer.global_step] = pl_module.net[0].weight.detach().clone()

    module = TinyModule()
    start = module.net[0].weight.detach().clone()
    make_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[detector, Weights()]).fit(module)
    assert torch.equal(weights[1], start)  # after the window of step 0: its optimizer step was skipped
    assert not torch.equal(weights[2], start)  # the next step trains
    assert detector.skipped == 1
