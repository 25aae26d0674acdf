"""The LightningCLI presets in configs/: each names its classes by their public path, and parses,
validates and trains a few steps.

A class that does not import is a failure, never a skip: the presets are what a user copies, and a
preset naming a class that moved or was renamed is exactly the breakage these tests exist to catch.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lightning_diag

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
SHORT_RUN = [
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=3", "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
]
# Building the configs through LightningCLI needs the dev extra; importing their classes does not.
needs_cli = pytest.mark.skipif(
    importlib.util.find_spec("jsonargparse") is None or importlib.util.find_spec("sklearn") is None,
    reason="LightningCLI needs jsonargparse[signatures], DigitsClassifier scikit-learn (the dev extra)",
)


def _class(path: str) -> type:
    """The class named by a ``class_path``; a path that does not import fails the test (no skip)."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"class_path {path!r} does not import: {type(err).__name__}: {err}")


def _callback_specs(config: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(config.read_text())["trainer"]["callbacks"]


def _class_paths(node: Any) -> list[str]:
    """Every ``class_path`` in a parsed YAML document (callbacks, their rules, the logger)."""
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for value in node.values() for p in _class_paths(value)]
    if isinstance(node, list):
        return [p for item in node for p in _class_paths(item)]
    return []


def test_the_configs_folder_holds_the_presets() -> None:
    assert NAMES == ["grad_norm.yaml", "logits.yaml", "loss_spike.yaml", "neural_collapse.yaml", "recommended.yaml",
                     "sharpness.yaml", "spectral_alignment.yaml", "stability.yaml"]


@pytest.mark.parametrize("name", NAMES)
def test_every_class_path_imports_and_ours_are_public(name: str) -> None:
    paths = _class_paths(yaml.safe_load((CONFIGS / name).read_text()))
    assert paths, f"{name} names no class"
    for path in paths:
        cls = _class(path)
        if path.startswith("lightning_diag."):  # lightning_diag.X, as a user imports it; not a module path
            assert path == f"lightning_diag.{cls.__name__}", path
            assert cls.__name__ in lightning_diag.__all__, path


def test_a_class_path_that_does_not_import_fails_rather_than_skips() -> None:
    for path in ("lightning_diag.NoSuchMonitor", "lightning_diag.no_such_module.Monitor"):
        with pytest.raises(pytest.fail.Exception, match="does not import"):
            _class(path)


def test_recommended_config_holds_its_four_monitors_in_order() -> None:
    paths = [spec["class_path"] for spec in _callback_specs(CONFIGS / "recommended.yaml")]
    assert paths == ["lightning_diag.GradNormWatcher", "lightning_diag.LossSpikeDetector", "lightning_diag.NCTracker",
                     "lightning_diag.SpectralAlignmentMonitor"]


@pytest.fixture
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI(args=...) warns when sys.argv holds pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["train.py"])


def _run(config: Path, tmp_path: Path, *extra: str) -> Any:
    from lightning.pytorch.cli import LightningCLI

    from lightning_diag.testbeds import DigitsClassifier

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


@needs_cli
@pytest.mark.usefixtures("_no_pytest_argv")
@pytest.mark.parametrize("name", NAMES)
def test_config_builds_its_callbacks_and_trains(name: str, tmp_path: Path) -> None:
    config = CONFIGS / name
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


@needs_cli
@pytest.mark.usefixtures("_no_pytest_argv")
def test_cli_rejects_a_mistyped_callback_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from lightning_diag.testbeds import DigitsClassifier

    bad = tmp_path / "bad.yaml"
    spec = _callback_specs(CONFIGS / "grad_norm.yaml")
    spec[0]["init_args"]["z_threshold"] = "high"
    bad.write_text(yaml.safe_dump({"trainer": {"callbacks": spec}}))
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(DigitsClassifier, args=["fit", "--config", str(bad), *SHORT_RUN], run=False)
    assert exit_info.value.code != 0
    assert "z_threshold" in capsys.readouterr().err
