"""The scripts in examples/ run as scripts (runpy, ``__name__ == "__main__"``) with short settings."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the digits examples need scikit-learn (the dev extra)")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHORT = {
    "grad_norm.py": ["--max-steps", "40"],
    "logits.py": ["--max-steps", "40"],
    "loss_spike.py": ["--max-steps", "40"],
    "neural_collapse.py": ["--max-epochs", "2", "--limit-train-batches", "5"],
    "sharpness.py": ["--max-steps", "40"],
    "spectral_alignment.py": ["--max-steps", "60"],
}


def test_every_example_is_exercised() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SHORT)


@pytest.mark.parametrize("name", sorted(SHORT))
def test_example_runs_as_a_script(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    if name == "spectral_alignment.py":
        pytest.importorskip("lightning_diag.callbacks.spectral_alignment", reason="SpectralAlignmentMonitor not landed")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *SHORT[name], "--logdir", str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    assert "alert" in out or "Neural collapse" in out
    assert list(tmp_path.rglob("events.out.tfevents.*")), "the example wrote no TensorBoard events"
