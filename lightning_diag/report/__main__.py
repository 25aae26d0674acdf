"""``python -m lightning_diag.report LOGDIR``: the same as ``lightning-diag report LOGDIR``."""

from lightning_diag.report import main

raise SystemExit(main())
