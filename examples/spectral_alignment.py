"""SpectralAlignmentMonitor on a tiny character-level GPT under a learning-rate range test (an
exponential ramp that always ends in an explosion): the sign diversity of the layers' inputs
along their top singular vectors collapses before the loss blows up (arXiv 2510.04202).

    python examples/spectral_alignment.py          # ~25 s on a laptop CPU
    lightning-diag report runs/spectral_alignment
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import LossSpikeDetector
from lightning_diag.callbacks.spectral_alignment import SpectralAlignmentMonitor
from lightning_diag.testbeds import CharLM, flush_denormals


def main(argv: Sequence[str] | None = None) -> SpectralAlignmentMonitor:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    flush_denormals(True)  # high-LR CPU runs are ~10x faster without denormals
    monitor = SpectralAlignmentMonitor(check_every_n_steps=5, warmup_steps=20, histogram_every_n_steps=100,
                                       action="warn")
    detector = LossSpikeDetector(warmup=20, action="log")  # for comparison: when does the loss notice?
    model = CharLM(n_layer=2, n_embd=32, block_size=32, batch_size=16, lr=1e-3, lr_end=10.0,
                   ramp_steps=args.max_steps, max_chars=100_000)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[monitor, detector], log_every_n_steps=5,
        logger=TensorBoardLogger(args.logdir, name="spectral_alignment"), enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    for name, callback in (("spectral alignment", monitor), ("loss spike", detector)):
        first = callback.alerts[0].message if callback.alerts else "none"
        print(f"first {name} alert: {first}")
    return monitor


if __name__ == "__main__":
    main()
