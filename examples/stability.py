"""StabilityGovernor on a digits MLP whose learning rate is too high: it measures how far each step
overshoots on its own batch and caps the learning rate on it, so the run trains instead of
exploding.

Measured on this script (one CPU thread, seed 0, SGD at lr 0.6 with momentum 0.9, 200 steps):

- ``--govern false`` (the governor measures only): the loss explodes at step 13, as ``lightning-diag
  report`` dates it; the validation loss of the final weights is 2.33 (a model that knows nothing
  scores ln 10 = 2.30). The scale it would have applied fell to 0.112.
- governed, at the defaults (target 0.65): no explosion; the scale falls to 0.025 by step 46
  (a warning: the run needs a much lower rate than its schedule) and ends at 0.269; the
  validation loss of the final weights is 0.344.

    python examples/stability.py                 # governed, at the governor's defaults
    python examples/stability.py --govern false  # the same run, measured only (it explodes)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import LossSpikeDetector, StabilityGovernor
from lightning_diag.report import format_summary, read_summaries
from lightning_diag.testbeds import DigitsClassifier


@torch.no_grad()
def validation_loss(model: DigitsClassifier) -> float:
    """Cross-entropy of the model's final weights on the whole validation split."""
    x, y = model.val_data.tensors
    return float(torch.nn.functional.cross_entropy(model(x), y))


def main(argv: Sequence[str] | None = None) -> tuple[tuple[StabilityGovernor, LossSpikeDetector], float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.6)
    parser.add_argument("--govern", choices=["true", "false"], default="true")
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the measured figures above are those of one thread
    pl.seed_everything(0, verbose=False)
    governor = StabilityGovernor(govern=args.govern == "true", action="log", every_n_steps=1)
    detector = LossSpikeDetector(action="log", every_n_steps=1)  # dates the explosion, changes nothing
    logger = TensorBoardLogger(args.logdir, name="stability")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[governor, detector], log_every_n_steps=1,
        logger=logger, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        limit_val_batches=0,
    )
    model = DigitsClassifier(lr=args.lr)
    trainer.fit(model)
    (summary,) = read_summaries(logger.log_dir)  # what `lightning-diag report` says of this run
    print("\n" + format_summary(summary, timeline=5))
    final = validation_loss(model)
    print(f"governor: lowest scale {min(v for _, v in summary.run.scalars['stability/scale']):.3g}, "
          f"scale at the end {governor.controller.scale:.3g}; validation loss of the final weights: {final:.3g}")
    return (governor, detector), final


if __name__ == "__main__":
    main()
