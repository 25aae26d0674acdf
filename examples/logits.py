"""LogitMonitor on a tiny character-level GPT under a learning-rate range test (an exponential ramp
that always ends in an explosion): the attention logits q.k / sqrt(d) grow many-fold before the
loss blows up (Wortsman et al. 2023); the output logits' log Z and softmax collapse come after.

Measured on this script (one CPU thread, seed 0): without qk-layernorm the loss explodes at step
285 (as ``lightning-diag report`` dates it); the largest attention logit is 10x its early baseline
at step 84 (the growth warning, 201 steps before the explosion) and passes 100 at step 234, while
the loss's own first alert (its trend) comes at step 285. With ``--qk-layernorm`` (the cure for
attention-logit growth, not for this ramp) the loss explodes at step 287, its trend alert comes at
step 282 and the first attention alert at step 294, after both.

    python examples/logits.py                      # ~30 s on a laptop CPU
    python examples/logits.py --qk-layernorm
    lightning-diag report runs/logits
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import LogitMonitor, LossSpikeDetector
from lightning_diag.report import format_summary, read_summaries
from lightning_diag.testbeds import CharLM, flush_denormals


def main(argv: Sequence[str] | None = None) -> tuple[LogitMonitor, LossSpikeDetector]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--qk-layernorm", action="store_true", help="LayerNorm on queries and keys per head")
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the measured steps above are those of one thread (sums differ with more)
    pl.seed_everything(0, verbose=False)  # the monitor's sampled queries
    flush_denormals(True)  # high-LR CPU runs are ~10x faster without denormals
    monitor = LogitMonitor(
        check_every_n_steps=5,     # only check steps pay: nothing is hooked in between
        baseline_checks=5,         # the growth rule compares with the mean of the first 5 checks
        growth_factor=10.0,        # alert when the largest attention logit is 10x its baseline
        action="warn",
    )
    # For comparison: when does the loss notice? It logs every step, so the report dates the explosion on every loss.
    detector = LossSpikeDetector(warmup=20, every_n_steps=1, action="log")
    model = CharLM(n_layer=2, n_embd=32, block_size=32, batch_size=16, lr=1e-3, lr_end=10.0,
                   ramp_steps=args.max_steps, max_chars=100_000, qk_layernorm=args.qk_layernorm)
    logger = TensorBoardLogger(args.logdir, name="logits")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[monitor, detector], log_every_n_steps=5,
        logger=logger, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    trainer.fit(model)
    first: dict[str, str] = {}
    for alert in monitor.alerts:
        first.setdefault(alert.metric, f"[{alert.severity}] {alert.message}")
    print("\nfirst logit alert of each key:" if first else "\nno logit alert")
    for message in first.values():
        print("  ", message)
    (summary,) = read_summaries(logger.log_dir)  # what `lightning-diag report` says of this run
    print("\n" + format_summary(summary, timeline=0))
    return monitor, detector


if __name__ == "__main__":
    main()
