"""LossSpikeDetector with action="rollback" on a digits MLP whose learning rate is too high: the
detector restores the last healthy snapshot and trains on at half the rate instead of leaving the
run diverged.

Measured on this script (one CPU thread, lr 0.6 with momentum 0.9): the first alert comes at step
15. With ``log``, ``skip`` and ``recover`` the loss explodes at step 13 (as ``lightning-diag
report`` dates it), 2 steps before that alert; with ``rollback`` and ``reduce_lr`` the report
finds no explosion. What is left after 80 steps (the validation loss of the final weights; a model
that knows nothing scores ln 10 = 2.30):

- ``log``: 2.33; ``skip``: 2.32 (only the alerted steps are skipped);
- ``recover``: 2.32: it skips two bad steps, but the loss stays high without three bad steps in a
  row, so the ladder never reaches its rollback rung here;
- ``rollback``: 1.41: one rollback at step 15 to the last healthy snapshot, then half the rate;
- ``reduce_lr``: 1.09, the rate halved at each alert.

    python examples/loss_spike.py                  # ~10 s on a laptop CPU
    python examples/loss_spike.py --action skip    # or stop, reduce_lr, warn, log
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import LossSpikeDetector
from lightning_diag.report import format_summary, read_summaries
from lightning_diag.testbeds import DigitsClassifier


@torch.no_grad()
def validation_loss(model: DigitsClassifier) -> float:
    """Cross-entropy of the model's final weights on the whole validation split."""
    x, y = model.val_data.tensors
    return float(torch.nn.functional.cross_entropy(model(x), y))


def main(argv: Sequence[str] | None = None) -> tuple[LossSpikeDetector, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.6)
    parser.add_argument("--action", default="rollback",
                        choices=["log", "warn", "stop", "skip", "rollback", "recover", "reduce_lr"])
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the measured steps above are those of one thread (sums differ with more)
    detector = LossSpikeDetector(
        warmup=10, alpha=0.9,      # short run: a short, fast-moving baseline
        z_threshold=6.0, factor=2.0, trend_window=None,
        action=args.action, snapshot_every_n_steps=5, max_rollbacks=3, lr_factor=0.5,
        every_n_steps=1,
    )
    logger = TensorBoardLogger(args.logdir, name="loss_spike")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[detector], log_every_n_steps=1, logger=logger,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0,
    )
    model = DigitsClassifier(lr=args.lr)
    trainer.fit(model)
    (summary,) = read_summaries(logger.log_dir)  # what `lightning-diag report` says of this run
    print("\n" + format_summary(summary, timeline=5))
    print(f"{len(detector.bad_batches)} bad batch(es) recorded; action {args.action!r}")
    final = validation_loss(model)
    print(f"trained {trainer.global_step} steps; validation loss of the final weights: {final:.3g}")
    return detector, final


if __name__ == "__main__":
    main()
