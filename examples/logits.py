"""LogitMonitor on a tiny character-level GPT under a learning-rate range test (an exponential ramp
that always ends in an explosion): the attention logits q.k / sqrt(d) grow many-fold before the
loss blows up (Wortsman et al. 2023); the output logits' log Z and softmax collapse come after.

Measured on this script: without qk-layernorm the largest attention logit is 10x its early
baseline by step ~85 and passes 100 at ~240, before the loss trend alert (~250); with
``--qk-layernorm`` (the cure) no attention alert comes before the loss's own.

    python examples/logits.py                      # ~30 s on a laptop CPU
    python examples/logits.py --qk-layernorm
    lightning-diag report runs/logits
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import LogitMonitor, LossSpikeDetector
from lightning_diag.testbeds import CharLM, flush_denormals


def main(argv: Sequence[str] | None = None) -> LogitMonitor:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--qk-layernorm", action="store_true", help="LayerNorm on queries and keys per head")
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args(argv)

    flush_denormals(True)  # high-LR CPU runs are ~10x faster without denormals
    monitor = LogitMonitor(
        check_every_n_steps=5,     # only check steps pay: nothing is hooked in between
        baseline_checks=5,         # the growth rule compares with the mean of the first 5 checks
        growth_factor=10.0,        # alert when the largest attention logit is 10x its baseline
        action="warn",
    )
    detector = LossSpikeDetector(warmup=20, action="log")  # for comparison: when does the loss notice?
    model = CharLM(n_layer=2, n_embd=32, block_size=32, batch_size=16, lr=1e-3, lr_end=10.0,
                   ramp_steps=args.max_steps, max_chars=100_000, qk_layernorm=args.qk_layernorm)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, callbacks=[monitor, detector], log_every_n_steps=5,
        logger=TensorBoardLogger(args.logdir, name="logits"), enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    first: dict[str, str] = {}
    for alert in monitor.alerts:
        first.setdefault(alert.metric, alert.message)
    print("\nfirst logit alert of each key:" if first else "\nno logit alert")
    for message in first.values():
        print("  ", message)
    print(f"first loss spike alert: {detector.alerts[0].message if detector.alerts else 'none'}")
    return monitor


if __name__ == "__main__":
    main()
