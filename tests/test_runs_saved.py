"""The runs-saved benchmark's scoring on hand-built loss curves, and one tiny real run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.runs_saved import (
    Arm,
    Outcome,
    Result,
    final_loss,
    judge,
    leave_one_family_out,
    main,
    objective,
    parse_grid,
    progress_share,
)
from lightning_diag.testbeds.labels import explosion_step


def _result(loss, role="exploding", arm="zclip", budget=None, acted=0, sha="a", family="mlp-nowarmup"):
    loss = np.asarray(loss, dtype=np.float64)
    return Result(f"{family}-{role}-s0", family, 0, role, arm, loss, len(loss) if budget is None else budget, acted,
                  sha, 1.0)  # fmt: skip


def _descent(start, end, steps=100):
    return np.linspace(start, end, steps)


def test_final_loss_is_the_mean_of_the_last_window_and_inf_if_any_is_not_finite():
    curve = np.r_[np.full(80, 5.0), np.arange(20, dtype=float)]
    assert final_loss(curve) == pytest.approx(9.5)  # mean of 0..19
    assert final_loss(np.r_[curve, np.nan], window=20) == math.inf
    assert final_loss([], window=20) == math.inf


def test_progress_share_is_the_share_of_the_twins_loss_reduction():
    assert progress_share(4.0, 2.2, 2.0) == pytest.approx(0.9)
    assert progress_share(4.0, 1.5, 2.0) == pytest.approx(1.25)  # better than the twin
    assert math.isnan(progress_share(2.0, 1.0, 2.5))  # the twin made no progress: nothing to compare
    assert progress_share(4.0, math.inf, 2.0) == -math.inf


def test_a_governed_run_that_finishes_below_its_twin_is_saved_and_the_silent_twin_costs_nothing():
    plain_twin = _result(_descent(4.0, 2.0), "twin", "none", sha="w")
    plain_boom = _result(np.r_[_descent(4.0, 2.5, 60), np.full(20, 4.5)], "exploding", "none", budget=100)
    governed = _result(_descent(4.0, 2.1), "exploding")  # (4 - 2.1 - avg tail offset) / 2 of the twin's progress
    twin = _result(_descent(4.0, 2.0), "twin", sha="w", acted=0)
    o = judge(governed, twin, plain_boom, plain_twin)
    tail = _descent(4.0, 2.1)[-20:].mean()
    reference = _descent(4.0, 2.0)[-20:].mean()
    assert o.exploded_plain and o.survived and o.saved
    assert o.progress == pytest.approx((4.0 - tail) / (4.0 - reference))
    assert o.twin_cost == pytest.approx(0.0, abs=1e-12) and o.twin_identical


def test_a_run_that_explodes_or_stops_early_is_not_saved_and_a_slow_one_is_survived_not_saved():
    plain_twin = _result(_descent(4.0, 2.0), "twin", "none")
    plain_boom = _result(np.r_[_descent(4.0, 2.5, 60), np.full(20, 4.5)], "exploding", "none", budget=100)
    twin = _result(_descent(4.0, 2.0), "twin")
    exploded = _result(np.r_[_descent(4.0, 2.2, 60), np.full(40, 4.0)], "exploding")
    assert explosion_step(exploded.loss) == 60
    stopped = _result(_descent(4.0, 2.0, 70), "exploding", budget=100)  # e.g. stopped by the skip budget
    slow = _result(_descent(4.0, 3.0), "exploding")  # stable, about half the twin's progress
    for run, survived in ((exploded, False), (stopped, False), (slow, True)):
        o = judge(run, twin, plain_boom, plain_twin)
        assert (o.survived, o.saved) == (survived, False)
    assert judge(slow, twin, plain_boom, plain_twin).progress == pytest.approx(0.5, abs=0.03)


def test_twin_cost_is_the_share_of_the_twins_loss_reduction_lost():
    plain_twin = _result(np.r_[4.0, np.full(99, 2.0)], "twin", "none", sha="p")
    plain_boom = _result(np.r_[4.0, np.full(99, 2.0)], "exploding", "none")
    twin = _result(np.r_[4.0, np.full(99, 2.06)], "twin", sha="q", acted=3)  # 0.06 / 2.0 = 3% of the reduction lost
    o = judge(plain_boom, twin, plain_boom, plain_twin)
    assert o.twin_cost == pytest.approx(0.03) and o.twin_acted == 3 and not o.twin_identical
    exploded_twin = _result(np.r_[4.0, np.full(98, 2.0), np.nan], "twin")
    assert judge(plain_boom, exploded_twin, plain_boom, plain_twin).twin_cost == math.inf


def _o(family, key, saved, cost):
    return Outcome(family, 0, key, True, saved, 1.0 if saved else math.nan, cost, 1, False, True)


def test_a_setting_costing_any_twin_over_two_percent_ranks_below_every_cheap_setting():
    costly = [_o("a", "k", True, 0.03), _o("b", "k", True, 0.0)]
    cheap_saves_none = [_o("a", "k", False, 0.0), _o("b", "k", False, 0.0)]
    cheap_saves_one = [_o("a", "k", True, 0.01), _o("b", "k", False, 0.01)]
    cheaper_saves_one = [_o("a", "k", True, 0.0), _o("b", "k", False, 0.005)]
    ranked = sorted([costly, cheap_saves_none, cheap_saves_one, cheaper_saves_one], key=objective)
    assert ranked == [costly, cheap_saves_none, cheap_saves_one, cheaper_saves_one]


def test_leave_one_family_out_reports_each_family_at_the_setting_chosen_on_the_others():
    grid = {  # "gentle" saves x and y; "strong" saves all three but costs a twin of z 5%
        "gentle": [_o("x", "gentle", True, 0.0), _o("y", "gentle", True, 0.0), _o("z", "gentle", False, 0.0)],
        "strong": [_o("x", "strong", True, 0.0), _o("y", "strong", True, 0.0), _o("z", "strong", True, 0.05)],
    }
    in_sample, folds = leave_one_family_out(grid)
    assert in_sample == "gentle"  # strong costs a twin > 2% on z
    # holding z out, strong is cheap on x and y and ties gentle on saves; the tie goes to the first listed
    assert folds == {"x": "gentle", "y": "gentle", "z": "gentle"}
    grid["strong"][0] = _o("x", "strong", True, -0.01)  # strong now does better on x's twin
    assert leave_one_family_out(grid)[1]["z"] == "strong"


def test_an_explosion_found_in_a_prefix_is_the_explosion_of_the_whole_curve():
    """Why stopping 20 steps past a known explosion never changes a verdict."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        curve = np.exp(np.cumsum(rng.normal(-0.01, 0.15, 300))) + 0.1
        full = explosion_step(curve)
        for cut in (30, 100, 200):
            part = explosion_step(curve[:cut])
            if part is not None:
                assert part == full


def test_governor_settings_parse_into_a_product_grid():
    assert parse_grid(["target=0.5,target=0.8,check_every_n_steps=10"]) == [
        (("check_every_n_steps", 10), ("target", 0.5)), (("check_every_n_steps", 10), ("target", 0.8))]
    assert parse_grid(["target=0.5", "target=0.5,recovery=linear"]) == [
        (("target", 0.5),), (("recovery", "linear"), ("target", 0.5))]
    assert Arm("governor", (("target", 0.5),)).key == "governor_target=0.5"
    with pytest.raises(ValueError, match="name=value"):
        parse_grid(["target"])


def test_help_and_a_tiny_real_run_then_rescore(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = str(tmp_path)
    assert main(["--families", "poisoned-batch", "--seeds", "1", "--max-steps", "30", "--arms", "none,skip",
                 "--out", out]) == 0  # fmt: skip
    payload = json.loads((tmp_path / "runs_saved.json").read_text())
    skip = [o for o in payload["outcomes"] if o["arm_key"] == "skip"]
    assert len(skip) == 1 and skip[0]["twin_acted"] == 0 and skip[0]["twin_identical"]  # silent: bit-identical
    assert len(list((tmp_path / "records").glob("*.json.gz"))) == 4
    capsys.readouterr()
    assert main(["--rescore", "--families", "poisoned-batch", "--seeds", "1", "--max-steps", "30",
                 "--arms", "none,skip", "--out", out]) == 0  # fmt: skip
    assert "| skip | unpredictable |" in capsys.readouterr().out


def test_the_recorder_keeps_the_steps_own_loss_when_an_arm_reruns_training_step_inside_the_optimizer_step():
    """The governor's extra forward on the updated weights overwrites ``task_loss`` inside ``optimizer.step``."""
    import lightning.pytorch as pl
    import torch

    from benchmarks.runs_saved import _recorder
    from lightning_diag.testbeds import DigitsClassifier

    class Rerun(DigitsClassifier):
        seen: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.seen.append(float(loss))
            return loss

        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            self.task_loss = torch.tensor(99.0)  # what a re-run of training_step after the update leaves

    model = Rerun(seed=0, hidden=(16,))
    recorder = _recorder(None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, callbacks=[recorder], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model)
    assert recorder.losses == pytest.approx(model.seen)
