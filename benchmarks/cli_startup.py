"""Wall time of a ``lightning-diag`` call that needs no training stack: ``--help`` and an argument error.

One command, one markdown table::

    python benchmarks/cli_startup.py              # median of 5 runs per row
    python benchmarks/cli_startup.py --repeat 9

Each row runs a fresh interpreter (``subprocess``) on this checkout's ``lightning_diag`` (its root
first on ``PYTHONPATH``), calling the console script's entry point exactly as the installed
``lightning-diag`` script does (``from lightning_diag.cli import main; sys.exit(main())``), so an
editable install elsewhere or a pyenv shim does not enter the figures. ``python -c pass`` is the
floor: the interpreter's own start-up. The last column lists the heavy modules the call imported
(torch, lightning, matplotlib, tensorboard): for these calls it should be none.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "import sys; from lightning_diag.cli import main; sys.exit(main())"
HEAVY = ("torch", "lightning", "matplotlib", "tensorboard", "numpy")
# After the call, print which heavy modules it imported (on stderr, so the call's output is untouched).
PROBE = ("import atexit, sys; atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {heavy!r} "
         "if m in sys.modules), file=sys.stderr)); ")
ROWS = {
    "python -c pass (interpreter floor)": ["-c", "pass"],
    "lightning-diag --help": ["-c", ENTRY, "--help"],
    "lightning-diag report --help": ["-c", ENTRY, "report", "--help"],
    "lightning-diag report (no LOGDIR: argument error)": ["-c", ENTRY, "report"],
    "lightning-diag report --top x (argument error)": ["-c", ENTRY, "report", "LOGDIR", "--top", "x"],
}


def _time(args: list[str], repeat: int) -> tuple[float, int, str]:
    """Median wall seconds of ``repeat`` runs, their exit status, and the heavy modules imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args[0] == "-c":
        args = ["-c", PROBE.format(heavy=HEAVY) + args[1], *args[2:]]
    times, status, heavy = [], 0, ""
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        status = done.returncode
        heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY=")), "")
    return statistics.median(times), status, heavy or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per row; the median is reported (default 5)")
    args = parser.parse_args()
    print(f"`{shlex.join(['python', *sys.argv])}` on {sys.platform}, Python {sys.version.split()[0]}, "
          f"median of {args.repeat} fresh processes\n")
    print("| call | median wall s | exit status | heavy modules imported |\n|---|---:|---:|---|")
    for name, call in ROWS.items():
        seconds, status, heavy = _time(call, args.repeat)
        print(f"| {name} | {seconds:.2f} | {status} | {heavy} |", flush=True)


if __name__ == "__main__":
    main()
