"""SpectralAlignmentMonitor on a tiny character-level GPT under a learning-rate range test (an
exponential ramp that always ends in an explosion): the sign diversity of the layers' inputs along
their top singular vectors collapses as the run diverges (arXiv 2510.04202).

Measured on this script (one CPU thread, seed 0): the loss explodes at step 285 (as ``lightning-diag
report`` dates it); the loss's own trend alert comes at step 285, and the spectral collapse alert
at step 319, 34 steps *after* the explosion: on this small, fast ramp the collapse does not warn
early. On the demo's slower ramp (``python -m lightning_diag.demo``) it came 78 steps before the
explosion; over the early-warning suite it warned early on few runs (docs/early_warning.md).

    python examples/spectral_alignment.py          # ~25 s on a laptop CPU
    lightning-diag report runs/spectral_alignment
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import LossSpikeDetector, SpectralAlignmentMonitor
from lightning_diag.report import format_summary, read_summaries
from lightning_diag.testbeds import CharLM, flush_denormals


def main(argv: Sequence[str] | None = None) -> tuple[SpectralAlignmentMonitor, LossSpikeDetector]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the measured steps above are those of one thread (sums differ with more)
    pl.seed_everything(0, verbose=False)  # the monitor's sampled rows
    flush_denormals(True)  # high-LR CPU runs are ~10x faster without denormals
    monitor = SpectralAlignmentMonitor(check_every_n_steps=5, warmup_steps=20, histogram_every_n_steps=100,
                                       action="warn")
    # For comparison: when does the loss notice? It logs every step, so the report dates the explosion on every loss.
    detector = LossSpikeDetector(warmup=20, every_n_steps=1, action="log")
    model = CharLM(n_layer=2, n_embd=32, block_size=32, batch_size=16, lr=1e-3, lr_end=10.0,
                   ramp_steps=args.max_steps, max_chars=100_000)
    logger = TensorBoardLogger(args.logdir, name="spectral_alignment")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[monitor, detector], log_every_n_steps=5,
        logger=logger, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    trainer.fit(model)
    (summary,) = read_summaries(logger.log_dir)  # what `lightning-diag report` says of this run
    print("\n" + format_summary(summary, timeline=0))
    return monitor, detector


if __name__ == "__main__":
    main()
