"""GradNormWatcher on a digits MLP whose learning rate is too high: per-layer gradient norms and a
ZClip spike alert before the run diverges.

    python examples/grad_norm.py                   # ~10 s on a laptop CPU
    tensorboard --logdir runs/grad_norm            # then the "Custom Scalars" tab
    lightning-diag report runs/grad_norm           # health summary + HTML report
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import Above, GradNormWatcher
from lightning_diag.testbeds import DigitsClassifier


def main(argv: Sequence[str] | None = None) -> GradNormWatcher:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.8, help="0.1 trains well; >= 0.5 diverges (momentum 0.9)")
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    watcher = GradNormWatcher(
        every_n_steps=1,
        warmup=10,                # short run: a short baseline warm-up
        update_ratio=True,        # also ||w_t+1 - w_t|| / ||w_t|| per layer
        action="warn",            # "stop" would end the run at the first alert
        rules=[Above("grad_norm/total", 50.0, severity="critical")],
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[watcher], log_every_n_steps=1,
        logger=TensorBoardLogger(args.logdir, name="grad_norm"), enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(DigitsClassifier(lr=args.lr))
    print(f"\n{len(watcher.alerts)} alert(s); first ones:")
    for alert in watcher.alerts[:5]:
        print("  ", alert.message)
    return watcher


if __name__ == "__main__":
    main()
