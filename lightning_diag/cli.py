"""The ``lightning-diag`` console script.

Commands:
    report LOGDIR   health summary of a run (TensorBoard event files or CSVLogger's metrics.csv),
                    plus an HTML, PDF or PNG report (see :mod:`lightning_diag.report`).

Only argparse and the report's argument definitions are imported before the arguments are parsed:
``--help`` and an argument error answer at once; torch (the explosion definition), TensorBoard's
reader and matplotlib are imported when a report is read or drawn (``benchmarks/cli_startup.py``).

Example:
    >>> from lightning_diag.cli import main
    >>> main(["report", "lightning_logs/version_0", "--no-output"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit status."""
    from lightning_diag import report  # light: its heavy imports wait until a run is read

    parser = argparse.ArgumentParser(prog="lightning-diag", description="lightning_diag command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report_parser = commands.add_parser(
        "report", help="health summary and HTML/PDF/PNG report of a run's TensorBoard or CSV logs",
        description=report.__doc__.split("\n\n")[0] if report.__doc__ else None,
    )
    report.add_arguments(report_parser)
    args = parser.parse_args(argv)
    return report.run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
