"""GradNormWatcher on a digits MLP whose learning rate is too high: per-layer gradient norms, the
ZClip z-score records and a user rule on the total norm. Here they describe the divergence; they
do not foretell it.

Measured on this script (one CPU thread, lr 0.8 with momentum 0.9): the loss explodes at step 11
(as ``lightning-diag report`` dates it). The ZClip z-score alerts are info records (kept and logged,
never acted on: healthy runs have them too); the first comes at step 11, the explosion step itself.
The critical rule ``Above("grad_norm/total", 50)`` fires at step 30, 19 steps after the explosion.
(The early-warning suite agrees: GradNormWatcher warned before no explosion, docs/early_warning.md.)

    python examples/grad_norm.py                   # ~10 s on a laptop CPU
    tensorboard --logdir runs/grad_norm            # then the "Custom Scalars" tab
    lightning-diag report runs/grad_norm           # health summary + HTML report
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import Above, GradNormWatcher
from lightning_diag.report import format_summary, read_summaries
from lightning_diag.testbeds import DigitsClassifier


def main(argv: Sequence[str] | None = None) -> GradNormWatcher:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.8, help="0.1 trains well; >= 0.5 diverges (momentum 0.9)")
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the measured steps above are those of one thread (sums differ with more)
    watcher = GradNormWatcher(
        every_n_steps=1,
        warmup=10,                # short run: a short baseline warm-up
        update_ratio=True,        # also ||w_t+1 - w_t|| / ||w_t|| per layer
        action="warn",            # "stop" would end the run at the first alert
        rules=[Above("grad_norm/total", 50.0, severity="critical")],
    )
    logger = TensorBoardLogger(args.logdir, name="grad_norm")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[watcher], log_every_n_steps=1, logger=logger,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0,
    )
    trainer.fit(DigitsClassifier(lr=args.lr))
    (summary,) = read_summaries(logger.log_dir)  # what `lightning-diag report` says of this run
    print("\n" + format_summary(summary, timeline=None, show_info=True))
    return watcher


if __name__ == "__main__":
    main()
