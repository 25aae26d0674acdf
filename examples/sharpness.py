"""SharpnessMonitor on a digits MLP trained with SGD and heavy-ball momentum at a learning rate
that is too high: the top Hessian eigenvalue, times the learning rate, runs past the optimizer's
stability limit (2 + 2 * momentum; Gilmer et al. 2021) and the loss follows it up.

Measured on this script (one CPU thread, seed 0): at lr 0.5 the stability ratio is 1.04 at step 9
and 2.83 at step 14 (the alert), 4 steps before the loss explodes at step 18 (as ``lightning-diag
report`` dates it); the loss spike detector's first alert comes at step 21. At lr 0.1 the ratio
stays below 0.25 and nothing alerts.

    python examples/sharpness.py                   # ~10 s on a laptop CPU
    python examples/sharpness.py --lr 0.1          # a healthy run
    lightning-diag report runs/sharpness
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import LossSpikeDetector, SharpnessMonitor
from lightning_diag.report import format_summary, read_summaries
from lightning_diag.testbeds import DigitsClassifier


def main(argv: Sequence[str] | None = None) -> tuple[SharpnessMonitor, LossSpikeDetector]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.5, help="0.1 trains well; >= 0.5 diverges (momentum 0.9)")
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the measured steps above are those of one thread (sums differ with more)
    pl.seed_everything(0, verbose=False)  # Lanczos' random start vector
    monitor = SharpnessMonitor(
        check_every_n_steps=5,      # a check costs ~5 forward+backward passes: keep it sparse on big runs
        stability_threshold=2.0,    # a short full-batch-like run: twice the limit
                                    # (the default, 30, suits mini-batch runs)
        patience=1,
        action="warn",
    )
    # For comparison: when does the loss notice? It logs every step, so the report dates the explosion on every loss.
    detector = LossSpikeDetector(warmup=10, every_n_steps=1, action="log")
    logger = TensorBoardLogger(args.logdir, name="sharpness")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[monitor, detector], log_every_n_steps=5,
        logger=logger, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(DigitsClassifier(lr=args.lr))
    ratios = [(a.step, round(a.value, 2)) for a in monitor.alerts if a.metric == "sharpness/stability_ratio"]
    print(f"\nstability ratio alerts (step, lr * lambda_max / 3.8): {ratios or 'none'}")
    (summary,) = read_summaries(logger.log_dir)  # what `lightning-diag report` says of this run
    print("\n" + format_summary(summary, timeline=0))
    return monitor, detector


if __name__ == "__main__":
    main()
