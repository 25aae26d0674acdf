"""LossSpikeDetector with action="rollback" on a digits MLP whose learning rate is too high: the
detector restores the last good snapshot instead of letting the run diverge.

    python examples/loss_spike.py                  # ~10 s on a laptop CPU
    python examples/loss_spike.py --action skip    # or stop, reduce_lr, warn
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import LossSpikeDetector
from lightning_diag.testbeds import DigitsClassifier


def main(argv: Sequence[str] | None = None) -> LossSpikeDetector:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.6)
    parser.add_argument("--action", default="rollback",
                        choices=["log", "warn", "stop", "skip", "rollback", "reduce_lr"])
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    detector = LossSpikeDetector(
        warmup=10, alpha=0.9,      # short run: a short, fast-moving baseline
        z_threshold=6.0, factor=2.0, trend_window=None,
        action=args.action, snapshot_every_n_steps=5, max_rollbacks=3, lr_factor=0.5,
        every_n_steps=1,
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[detector], log_every_n_steps=1,
        logger=TensorBoardLogger(args.logdir, name="loss_spike"), enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(DigitsClassifier(lr=args.lr))
    print(f"\n{len(detector.alerts)} alert(s), {len(detector.bad_batches)} bad batch(es) recorded")
    for alert in detector.alerts[:5]:
        print("  ", alert.message)
    return detector


if __name__ == "__main__":
    main()
