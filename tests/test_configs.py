"""The LightningCLI presets in configs/: each one parses, validates and trains a few steps."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (the dev extra)")
pytest.importorskip("sklearn", reason="DigitsClassifier needs scikit-learn (the dev extra)")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_diag.testbeds import DigitsClassifier  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPECTRAL = "lightning_diag.callbacks.spectral_alignment.SpectralAlignmentMonitor"
SHORT_RUN = [
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=3", "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
]


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _callback_specs(config: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(config.read_text())["trainer"]["callbacks"]


def _skip_unless_importable(config: Path) -> None:
    for spec in _callback_specs(config):
        try:
            _class(spec["class_path"])
        except (ImportError, AttributeError) as err:
            pytest.skip(f"{spec['class_path']} is not importable yet ({err}); {config.name} cannot run")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI(args=...) warns when sys.argv holds pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["train.py"])


def _run(config: Path, tmp_path: Path, *extra: str) -> LightningCLI:
    args = ["fit", "--config", str(config), *SHORT_RUN, f"--trainer.default_root_dir={tmp_path}", *extra]
    if "logger" in (yaml.safe_load(config.read_text())["trainer"]):
        args.append(f"--trainer.logger.init_args.save_dir={tmp_path}")
    return LightningCLI(DigitsClassifier, args=args, save_config_kwargs={"overwrite": True})


def _matches(value: Any, expected: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(expected, list):
        return list(value) == expected
    if isinstance(value, torch.dtype):
        return str(value) == expected
    return value == expected


@pytest.mark.parametrize(
    "name", ["grad_norm.yaml", "loss_spike.yaml", "neural_collapse.yaml", "spectral_alignment.yaml", "recommended.yaml"]
)
def test_config_builds_its_callbacks_and_trains(name: str, tmp_path: Path) -> None:
    config = CONFIGS / name
    _skip_unless_importable(config)
    cli = _run(config, tmp_path)
    assert cli.trainer.global_step == 3
    for spec in _callback_specs(config):
        cls = _class(spec["class_path"])
        built = [cb for cb in cli.trainer.callbacks if type(cb) is cls]
        assert len(built) == 1, f"{spec['class_path']} missing from {cli.trainer.callbacks}"
        for key, expected in (spec.get("init_args") or {}).items():
            if key != "rules" and hasattr(built[0], key) and not isinstance(expected, dict):
                assert _matches(getattr(built[0], key), expected), (key, getattr(built[0], key), expected)
        if "rules" in (spec.get("init_args") or {}):
            assert [type(r).__name__ for r in built[0].rules] == [
                r["class_path"].rpartition(".")[2] for r in spec["init_args"]["rules"]]


def test_recommended_config_holds_all_four_monitors() -> None:
    paths = [spec["class_path"] for spec in _callback_specs(CONFIGS / "recommended.yaml")]
    assert [p.rpartition(".")[2] for p in paths] == [
        "GradNormWatcher", "LossSpikeDetector", "NCTracker", "SpectralAlignmentMonitor"]


def test_cli_rejects_a_mistyped_callback_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    spec = _callback_specs(CONFIGS / "grad_norm.yaml")
    spec[0]["init_args"]["z_threshold"] = "high"
    bad.write_text(yaml.safe_dump({"trainer": {"callbacks": spec}}))
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(DigitsClassifier, args=["fit", "--config", str(bad), *SHORT_RUN], run=False)
    assert exit_info.value.code != 0
    assert "z_threshold" in capsys.readouterr().err
