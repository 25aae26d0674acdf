"""NCTracker inside real Lightning runs, against metrics recomputed from independently extracted features.

References are computed outside the tracker: a callback placed *after* it in ``callbacks=[...]``
(Lightning keeps that order) snapshots the weights at every evaluation, and the test recomputes
the features from the snapshot (``body(x)`` in eval mode, or the features the module's own
``training_step`` saw) and feeds them to :func:`neural_collapse_metrics` or to numpy.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import warnings
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import MemoryLogger, MixtureClassifier, ddp_on_cpu, make_trainer, reachable_tensors
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.alerts import Above, DiagnosticWarning, DivergenceError
from lightning_diag.callbacks.neural_collapse import NCTracker, class_mean_cosines, cosine_image
from lightning_diag.metrics.collapse import METRIC_KEYS, nearest_class_center, neural_collapse_metrics

# -- helpers ----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """These tensors are tiny: a second OpenMP thread only waits, 20x slower on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



class Snapshots(Callback):
    """Copies of the module's state at every measured evaluation; put it after the tracker."""

    def __init__(self, hook: str = "val") -> None:
        self.hook, self.states = hook, []

    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append((trainer.global_step, copy.deepcopy(pl_module.state_dict())))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook == "val" and not trainer.sanity_checking:
            self._take(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook == "train":
            self._take(trainer, pl_module)


def _fit(module: pl.LightningModule, *callbacks: Callback, **overrides: Any) -> pl.Trainer:
    trainer = make_trainer(callbacks=list(callbacks), **{"max_epochs": 3, "max_steps": -1, **overrides})
    trainer.fit(module)
    return trainer


def _series(logger: MemoryLogger, key: str) -> list[tuple[int, float]]:
    return list(logger.history[key])


@torch.no_grad()
def _eval_features(
    module: MixtureClassifier, state: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, W, b) of the snapshot ``state`` in eval mode, from a copy of the module."""
    clone = copy.deepcopy(module)
    clone.load_state_dict(state)
    clone.eval()
    return clone.body(x), clone.head.weight.detach().clone(), clone.head.bias.detach().clone()


def _lagged_nc4(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y_prev: torch.Tensor, h_prev: torch.Tensor,
                num_classes: int) -> float:
    """NC4 against the class means of the previous evaluation's features."""
    h, h_prev = h.double(), h_prev.double()
    means = torch.stack([h_prev[y_prev == c].mean(0) for c in range(num_classes)])
    decision = (h @ w.double().T + b.double()).argmax(1)
    return (nearest_class_center(h, means) != decision).double().mean().item()


def _float64(module: MixtureClassifier) -> MixtureClassifier:
    """The module and its data in float64: float32 features change with the rows batched together."""
    module.double()
    module.train_set, module.val_set = (TensorDataset(d.tensors[0].double(), d.tensors[1])
                                        for d in (module.train_set, module.val_set))
    return module


def _assert_close(logged: float, expected: float, key: str, rel: float = 1e-6) -> None:
    if math.isnan(expected):
        assert math.isnan(logged), key
    else:
        assert logged == pytest.approx(expected, rel=rel, abs=1e-12), key


def _numpy_nc1_and_cdnv(features: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """Papyan's NC1 with a float64 pseudo-inverse and Galanti's CDNV with explicit loops."""
    means = np.stack([features[labels == c].mean(0) for c in range(k)])
    centred = means - means.mean(0)
    within = sum(np.outer(f - means[c], f - means[c]) for f, c in zip(features, labels)) / len(labels)
    between = centred.T @ centred / k
    nc1 = float(np.trace(within @ np.linalg.pinv(between, rcond=1e-10, hermitian=True)) / k)
    variance = [np.mean(np.sum((features[labels == c] - means[c]) ** 2, 1)) for c in range(k)]
    pairs = [(variance[a] + variance[c]) / (2 * np.sum((means[a] - means[c]) ** 2))
             for a in range(k) for c in range(k) if a != c]
    return nc1, float(np.mean(pairs))


# -- correctness against independent references ---------------------------------------------------


def test_logged_metrics_equal_one_shot_metrics_of_the_validation_features() -> None:
    torch.manual_seed(0)
    module = MixtureClassifier(val_batch_size=7)  # batches of 7 rows: classes are missing from most
    tracker, snaps = NCTracker(action="log"), Snapshots("val")
    log = _fit(module, tracker, snaps).logger
    x, y = module.val_set.tensors
    assert [s for s, _ in _series(log, "nc/nc1")] == [s for s, _ in snaps.states] == [4, 8, 12]
    assert [s for s, _ in _series(log, "nc/nc4")] == [8, 12]  # lagged: no previous means at the first evaluation
    for key in log.history:  # every logged key is declared, once
        assert key == "nc/alerts" or len([k for k in tracker.declared_keys() if k.matches(key, "nc")]) == 1, key
    previous = None
    for i, (step, state) in enumerate(snaps.states):
        h, w, b = _eval_features(module, state, x)
        expected = neural_collapse_metrics(h, y, w, b)
        if previous is not None:
            expected["nc4"] = _lagged_nc4(h, w, b, y, previous, 4)
        for key in METRIC_KEYS:
            if key != "nc4" or previous is not None:
                _assert_close(dict(_series(log, f"nc/{key}"))[step], expected[key], key)
        assert dict(_series(log, "nc/num_samples"))[step] == pytest.approx(len(y), abs=1e-9)
        assert dict(_series(log, "nc/nonfinite_classes"))[step] == pytest.approx(0, abs=1e-12)
        previous = h
    nc1, cdnv = _numpy_nc1_and_cdnv(h.double().numpy(), y.numpy(), 4)
    assert _series(log, "nc/nc1")[-1][1] == pytest.approx(nc1, rel=1e-6)
    assert _series(log, "nc/cdnv")[-1][1] == pytest.approx(cdnv, rel=1e-6)
    assert tracker.alerts == []


def test_streaming_in_small_validation_batches_equals_one_batch() -> None:
    results = []
    for val_batch_size in (3, 64):
        torch.manual_seed(0)
        module = _float64(MixtureClassifier(val_batch_size=val_batch_size))  # same features in any batch
        trainer = make_trainer(callbacks=[NCTracker(action="log")])
        trainer.validate(module, verbose=False)
        assert "nc/nc4" not in trainer.logger.history  # lagged: no previous evaluation in a lone validate()
        results.append({key: trainer.logger.history[f"nc/{key}"][0][1] for key in METRIC_KEYS if key != "nc4"})
    small, whole = results
    assert small.keys() == whole.keys() and len(whole) == len(METRIC_KEYS) - 1
    for key in whole:
        _assert_close(small[key], whole[key], key, rel=1e-9)


def test_nc1_and_nc4_fall_while_training_and_match_the_saved_features() -> None:
    torch.manual_seed(0)
    module = MixtureClassifier()
    probe = DataLoader(module.train_set, batch_size=40)  # Papyan's protocol: the training set in eval mode
    tracker, snaps = NCTracker(data=probe, nc4="exact", action="log"), Snapshots("train")
    log = _fit(module, tracker, snaps, max_epochs=10, limit_val_batches=0).logger
    nc1, nc4 = [v for _, v in _series(log, "nc/nc1")], [v for _, v in _series(log, "nc/nc4")]
    assert len(nc1) == 10
    assert all(later < earlier for earlier, later in zip(nc1, nc1[1:])), nc1  # 1.42 -> 0.30 here
    assert nc1[-1] < nc1[0] / 3, nc1
    assert nc4[-1] < nc4[0], nc4
    assert _series(log, "nc/nc3")[-1][1] < _series(log, "nc/nc3")[0][1]
    x, y = module.train_set.tensors
    for i, (step, state) in enumerate(snaps.states):
        h, w, b = _eval_features(module, state, x)
        expected = neural_collapse_metrics(h, y, w, b)  # exact NC4 against the final means
        for key in METRIC_KEYS:
            _assert_close(_series(log, f"nc/{key}")[i][1], expected[key], key)


class RecordingMixture(MixtureClassifier):
    """Keeps the features and (W, b) that each training forward used."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.body(x)
        record = (h.detach().clone(), y, self.head.weight.detach().clone(), self.head.bias.detach().clone())
        self.seen[self.current_epoch].append(record)
        return nn.functional.cross_entropy(self.head(h), y)


def test_train_data_uses_the_features_of_the_training_forwards() -> None:
    torch.manual_seed(0)
    module = RecordingMixture()
    tracker, snaps = NCTracker(data="train", action="log"), Snapshots("train")
    log = _fit(module, tracker, snaps, limit_val_batches=0).logger
    for epoch, (step, state) in enumerate(snaps.states):
        h, y, w, b = (torch.cat(parts) for parts in zip(*module.seen[epoch]))
        expected = neural_collapse_metrics(h, y, state["head.weight"], state["head.bias"])
        if epoch > 0:  # lagged: each forward's own decision against the previous epoch's class means
            decisions = [(hb.double() @ wb.double().T + bb.double()).argmax(1) for hb, _, wb, bb in module.seen[epoch]]
            h_prev, y_prev = (torch.cat(parts) for parts in list(zip(*module.seen[epoch - 1]))[:2])
            means = torch.stack([h_prev.double()[y_prev == c].mean(0) for c in range(4)])
            expected["nc4"] = (nearest_class_center(h.double(), means) != torch.cat(decisions)).double().mean().item()
        for key in METRIC_KEYS:
            if key != "nc4" or epoch > 0:
                _assert_close(dict(_series(log, f"nc/{key}"))[step], expected[key], key)
    assert [s for s, _ in _series(log, "nc/nc4")] == [s for s, _ in snaps.states][1:]


def test_a_probe_run_by_another_tracker_is_not_captured_by_a_training_tracker() -> None:
    """Before: a data="train" tracker kept capturing until its own on_train_batch_end, so the probe
    forwards that a tracker placed before it ran in *its* on_train_batch_end were captured too
    (64 probe rows next to 32 labels: every batch was skipped and nothing was measured)."""
    figures = []
    for with_probe in (False, True):
        torch.manual_seed(0)
        module = MixtureClassifier()
        train = NCTracker(data="train", prefix="train", action="log")
        probe = NCTracker(data=DataLoader(module.train_set, batch_size=64), probe_every_n_steps=1, action="log")
        with warnings.catch_warnings():
            warnings.simplefilter("error", DiagnosticWarning)  # no "skipping batches" warning
            log = _fit(module, *([probe] if with_probe else []), train, max_epochs=2, limit_val_batches=0).logger
        figures.append({k: v for k, v in log.history.items() if k.startswith("train/")})
    alone, beside = figures
    assert alone.keys() == beside.keys() and [s for s, _ in alone["train/nc4"]] == [8]
    assert alone["train/num_samples"][0][1] == pytest.approx(128, abs=1e-9)
    for key, series in alone.items():
        for (step, a), (step_b, b) in zip(series, beside[key], strict=True):
            assert step == step_b
            _assert_close(b, a, key, rel=1e-9)


def test_named_feature_layer_and_feature_function_give_the_default_numbers() -> None:
    torch.manual_seed(0)
    module = MixtureClassifier()
    trackers = [
        NCTracker(action="log"),
        NCTracker(feature_layer="body.5", prefix="named", action="log"),  # the ReLU that feeds the head
        NCTracker(feature_layer=lambda m, batch: m.body(batch[0]), classifier="head", num_classes=4, prefix="fn",
                  action="log"),
    ]
    trainer = make_trainer(callbacks=trackers)
    trainer.validate(module, verbose=False)
    history = trainer.logger.history
    for key in METRIC_KEYS:
        for prefix in ("named", "fn"):
            if key == "nc4":  # lagged, and a lone validate(): nothing to compare with
                assert f"{prefix}/nc4" not in history and "nc/nc4" not in history
            else:
                _assert_close(history[f"{prefix}/{key}"][0][1], history[f"nc/{key}"][0][1], key, rel=1e-12)


@pytest.mark.parametrize(("num_classes", "width", "missing"), [(2, 16, None), (12, 4, None), (5, 16, 2)])
def test_two_classes_more_classes_than_dims_and_missing_classes_match_one_shot(
    num_classes: int, width: int, missing: int | None
) -> None:
    torch.manual_seed(0)
    module = MixtureClassifier(num_classes=num_classes, width=width, n_val_per_class=8)
    x, y = module.val_set.tensors
    if missing is not None:
        module.val_set = TensorDataset(x[y != missing], y[y != missing])
        x, y = module.val_set.tensors
    trainer = make_trainer(callbacks=[NCTracker(action="log")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module, verbose=False)
    missing_warnings = [w for w in caught if "classes occur" in str(w.message)]
    assert len(missing_warnings) == (missing is not None)
    h, w, b = _eval_features(module, module.state_dict(), x)
    expected = neural_collapse_metrics(h, y, w, b)
    for key in METRIC_KEYS:
        if key != "nc4":
            _assert_close(trainer.logger.history[f"nc/{key}"][0][1], expected[key], key)
    assert trainer.logger.history["nc/num_classes_present"][0][1] == num_classes - (missing is not None)


def test_probe_batches_as_dicts_with_input_and_label_functions() -> None:
    torch.manual_seed(0)
    module = MixtureClassifier()
    x, y = module.train_set.tensors
    tuples = DataLoader(module.train_set, batch_size=16)
    dicts = [{"inputs": x[i:i + 16], "label": y[i:i + 16]} for i in range(0, len(y), 16)]
    trackers = [NCTracker(data=tuples, action="log"), NCTracker(data=dicts, input_fn=lambda b: b["inputs"],
                                                                prefix="dict", action="log"),
                NCTracker(data=dicts, input_fn=lambda b: b["inputs"], label_fn=lambda b: b["label"], prefix="fn",
                          action="log")]
    log = _fit(module, *trackers, max_epochs=2, limit_val_batches=0).logger
    for key in METRIC_KEYS:
        for prefix in ("dict", "fn"):
            got, want = log.history[f"{prefix}/{key}"], log.history[f"nc/{key}"]
            assert [s for s, _ in got] == [s for s, _ in want] == ([8] if key == "nc4" else [4, 8]), key
            for (_, a), (_, b) in zip(got, want):
                _assert_close(a, b, key, rel=1e-12)


# -- token classifiers and label formats -------------------------------------------------------------


class TokenClassifier(pl.LightningModule):
    """A float64 token tagger: tokens ``(B, T)`` -> features ``(B, T, 16)`` -> logits ``(B, T, 3)``, labels
    ``(B, T)`` with ``pad`` on the last positions of every other sequence (padding, as tokenizers do)."""

    def __init__(self, labels: str = "long", pad: float = -100, non_integral: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(12, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.double()
        tokens = torch.randint(0, 12, (24, 5), generator=g)
        y = (tokens % 3).double()
        y[::2, 3:] = pad
        if non_integral:
            y[1, 0] = 0.5  # a soft label: not a class
        self.tokens, self.labels = tokens, (y if labels == "float" else y.long())

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(tokens))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        tokens, _ = batch
        self.head(self.features(tokens))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.tokens, self.labels), batch_size=8)


def _numpy_reference(features: np.ndarray, labels: np.ndarray, w: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """NC1, CDNV, NC3, trace ratio and bias collapse of ``(N, d)`` float64 features, from the definitions."""
    k = w.shape[0]
    nc1, cdnv = _numpy_nc1_and_cdnv(features, labels, k)
    means = np.stack([features[labels == c].mean(0) for c in range(k)])
    centred = means - means.mean(0)
    within = np.mean(np.sum((features - means[labels]) ** 2, 1))
    return {"nc1": nc1, "cdnv": cdnv, "trace_ratio": within / (np.sum(centred**2) / k),
            "nc3": float(np.sum((w / np.linalg.norm(w) - centred / np.linalg.norm(centred)) ** 2)),
            "bias_collapse": float(np.linalg.norm(w @ means.mean(0) + b)), "num_samples": float(len(labels))}


def _token_reference(module: TokenClassifier, keep: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        h = module.features(module.tokens).reshape(-1, 16)[keep.reshape(-1)].numpy()
    y = module.labels.reshape(-1)[keep.reshape(-1)].long().numpy()
    return _numpy_reference(h, y, module.head.weight.detach().numpy(), module.head.bias.detach().numpy())


@pytest.mark.parametrize(("labels", "pad", "kwargs"), [
    ("long", -100, {}),  # torch's ignore_index
    ("float", -100, {}),  # 0/1/2 stored as floats (integral values are classes)
    ("long", -1, {}),  # any negative label is ignored
    ("long", 3, {"ignore_index": 3}),  # a configured pad id, outside the classes
])
def test_token_classifier_features_are_flattened_and_ignored_labels_left_out(labels: str, pad: float,
                                                                             kwargs: dict[str, Any]) -> None:
    """Safety issue, fault 1. Before: ``(B, T, d)`` features crashed the run (flattened to ``(B, T * d)``),
    and -100 labels crashed ``index_add_`` (index out of range)."""
    module = TokenClassifier(labels, pad)
    trainer = make_trainer(callbacks=[NCTracker(action="log", **kwargs)])
    trainer.validate(module, verbose=False)
    logged = {k.partition("/")[2]: v[0][1] for k, v in trainer.logger.history.items() if k.startswith("nc/")}
    expected = _token_reference(module, module.labels != pad)
    assert expected["num_samples"] == 24 * 5 - 12 * 2
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key
    assert logged["num_classes_present"] == pytest.approx(3, abs=1e-12)


def test_non_integral_float_labels_warn_once_and_their_rows_are_left_out() -> None:
    module = TokenClassifier("float", -100, non_integral=True)
    tracker = NCTracker(action="log")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=[tracker], logger=(log := MemoryLogger())).validate(module, verbose=False)
        make_trainer(callbacks=[tracker], logger=MemoryLogger()).validate(module, verbose=False)  # once, not twice
    shown = [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert len(shown) == 1 and "1 label that is not an integer" in shown[0], shown
    keep = (module.labels != -100) & (module.labels == module.labels.round())
    expected = _token_reference(module, keep)
    assert expected["num_samples"] == 24 * 5 - 12 * 2 - 1
    for key, value in expected.items():
        assert log.history[f"nc/{key}"][0][1] == pytest.approx(value, rel=1e-6), key


# -- never changes training --------------------------------------------------------------------------


def _trained_state(callbacks: list[Callback]) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = MixtureClassifier(dropout=0.3, shuffle=True)
    _fit(module, *callbacks, max_epochs=2)
    return module.state_dict()


def test_training_is_bit_identical_with_and_without_trackers() -> None:
    torch.manual_seed(0)
    probe = DataLoader(MixtureClassifier().train_set, batch_size=20, shuffle=True)  # draws from the global RNG
    baseline = _trained_state([])
    tracked = _trained_state([
        NCTracker(action="log"),
        NCTracker(data="train", prefix="train", action="log"),
        NCTracker(data=probe, probe_every_n_steps=1, nc4="exact", prefix="probe", action="log"),
    ])
    assert baseline.keys() == tracked.keys()
    for name, value in baseline.items():  # parameters and BatchNorm running statistics
        assert torch.equal(value, tracked[name]), name


class ModeRecorder(MixtureClassifier):
    """``body.1`` (a BatchNorm) is kept frozen in eval mode; records every module's mode after each
    batch (module hooks run after callback hooks) and the context of every forward of the head."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.modes: list[list[bool]] = []
        self.contexts: list[tuple[bool, bool, bool]] = []
        self.head.register_forward_pre_hook(self._record_context)

    def _record_context(self, module: nn.Module, args: Any) -> None:
        self.contexts.append((module.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))

    def on_train_epoch_start(self) -> None:
        self.body[1].eval()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.modes.append([m.training for m in self.modules()])


def test_probe_runs_in_eval_without_grad_or_autocast_and_restores_every_mode() -> None:
    torch.manual_seed(0)
    module = ModeRecorder()
    probe = DataLoader(module.train_set, batch_size=64)
    tracker = NCTracker(data=probe, probe_every_n_steps=1, every_n_epochs=None, action="log")
    log = _fit(module, tracker, max_epochs=1, limit_val_batches=0, precision="bf16-mixed").logger
    expected = [name != "body.1" for name, _ in module.named_modules()]
    assert module.modes == [expected] * 4
    training = [c for c in module.contexts if c[0]]
    probing = [c for c in module.contexts if not c[0]]
    assert len(training) == 4 and all(grad and autocast for _, grad, autocast in training)
    assert len(probing) == 4 * 2 and all(not grad and not autocast for _, grad, autocast in probing)
    assert [s for s, _ in _series(log, "nc/nc1")] == [1, 2, 3, 4]


def test_probe_cadence_counts_optimizer_steps_and_runs_once_per_step() -> None:
    torch.manual_seed(0)
    module = MixtureClassifier(batch_size=8)  # 16 batches, 8 optimizer steps per epoch
    probe = DataLoader(module.train_set, batch_size=64)
    tracker = NCTracker(data=probe, probe_every_n_steps=3, every_n_epochs=1, action="log")
    log = _fit(module, tracker, max_epochs=2, limit_val_batches=0, accumulate_grad_batches=2).logger
    assert [s for s, _ in _series(log, "nc/nc1")] == [3, 6, 8, 9, 12, 15, 16]


def test_hooks_are_removed_after_fit() -> None:
    torch.manual_seed(0)
    module = MixtureClassifier()
    trackers = [NCTracker(action="log"), NCTracker(feature_layer="body.5", prefix="named", action="log")]
    _fit(module, *trackers, max_epochs=1)
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    for tracker in trackers:  # no captured features left: only the class means kept for lagged NC4
        held = reachable_tensors(tracker)
        assert sorted(tuple(t.shape) for t in held.values()) == [(4,), (4, 32)], tracker.family


class FailingValidation(MixtureClassifier):
    """Raises in ``validation_step`` (``fail="val"``) or ``training_step`` (``"train"``) at its second batch,
    after the tracker has captured the features of the first one."""

    def __init__(self, fail: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail = fail

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().validation_step(batch, batch_idx)
        if self.fail == "val" and batch_idx == 1:
            raise RuntimeError("validation failed")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.fail == "train" and batch_idx == 1:
            raise RuntimeError("training failed")
        return loss


@pytest.mark.parametrize("fail", ["val", "train"])
def test_an_exception_leaves_no_hook_and_later_forwards_hold_no_features(fail: str) -> None:
    """Issue 10, fault 1. Before: NCTracker had no ``on_exception``; after an exception during
    validation its forward hook stayed on the classifier with capturing on, and 100 later forwards
    of the model left 100 feature tensors in the tracker (memory grew without bound)."""
    torch.manual_seed(0)
    module = FailingValidation(fail)
    tracker = NCTracker(data=fail, action="log")
    with pytest.raises(RuntimeError, match=f"{'validation' if fail == 'val' else 'training'} failed"):
        _fit(module, tracker, num_sanity_val_steps=0)
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    before = reachable_tensors(tracker)
    x = module.val_set.tensors[0][:8]
    with torch.no_grad():
        for _ in range(100):
            module(x)
    after = reachable_tensors(tracker)
    assert after.keys() == before.keys()
    assert sum(t.numel() for t in after.values()) == sum(t.numel() for t in before.values())
    assert not [t for t in after.values() if t.shape[:1] == (8,)]  # no batch of features held


class HeadNotCalled(MixtureClassifier):
    """Uses the head's weights through ``F.linear`` (as ``nn.MultiheadAttention`` does with
    ``out_proj``): the classifier module itself is never called, so its input cannot be captured."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.body(x), self.head.weight, self.head.bias)


def test_a_classifier_never_called_warns_once_and_the_run_completes_with_tensorboard(tmp_path: Any) -> None:
    """Issue 10, fault 2. Before: with a TensorBoard logger the run crashed at the end of the first
    validation (``ValueError: cannot write empty image``) when the classifier Linear was never called."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    tracker = NCTracker(action="log")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(HeadNotCalled(), tracker, max_epochs=2, logger=tb)
    assert trainer.global_step == 8 and trainer.state.finished
    shown = [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert len(shown) == 1 and "no features were captured for data='val'" in shown[0], shown
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "nc/class_mean_cosine" not in events.Tags()["images"]
    assert [e.value for e in events.Scalars("nc/num_samples")] == pytest.approx([0, 0], abs=1e-12)
    assert tracker.alerts == []


# -- misuse, alerts, state ---------------------------------------------------------------------------


class NoLinear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (batch[0] @ self.weight).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(16, 4), torch.zeros(16, dtype=torch.long)), batch_size=4)


def test_model_without_linear_warns_once_and_does_nothing() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = _fit(NoLinear(), NCTracker(data="train"), max_epochs=2).logger
    messages = [str(w.message) for w in caught if "NCTracker" in str(w.message)]
    assert len(messages) == 1 and "no nn.Linear" in messages[0]
    assert not [k for k in log.history if k.startswith("nc/")]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"data": "test"}, r"`data` must be one of \('val', 'train'\)"),
    ({"data": iter([(torch.zeros(1), torch.zeros(1))])}, "re-iterable"),
    ({"nc4": "two_pass"}, r"`nc4` must be one of \('lagged', 'exact'\)"),
    ({"nc4": "exact"}, "probe DataLoader"),
    ({"global_mean": "mean"}, r"\('class', 'sample'\)"),
    ({"every_n_epochs": 0}, "`every_n_epochs` must be None or an int >= 1"),
    ({"probe_every_n_steps": 10}, "`probe_every_n_steps` needs a probe DataLoader"),
    ({"probe_every_n_steps": 0, "data": [(torch.zeros(2, 3), torch.zeros(2))]},
     "`probe_every_n_steps` must be None or"),
    ({"data": [(torch.zeros(2, 3), torch.zeros(2))], "every_n_epochs": None}, "would never run"),
    ({"data": [1, 2, 3]}, r"DataLoader of \(input, label\) batches, got a list whose first batch is 1"),  # fault 7
    ({"data": []}, r"`data` is an empty list"),
    ({"feature_layer": 3}, "`feature_layer` must be None, a module name or a callable"),
    ({"data": "train", "feature_layer": lambda m, b: b[0]}, "data='val' or a probe"),
    ({"num_classes": 1}, "`num_classes` must be None or an int >= 2"),
    ({"prefix": "a/b"}, "`prefix`"),
    ({"dtype": torch.int64}, "`dtype`"),
    ({"action": "explode"}, r"\('log', 'warn', 'stop', 'raise'\)"),
])
def test_bad_arguments_raise_value_errors_naming_the_allowed_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NCTracker(**kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), [  # safety issue, fault 4: each was accepted before
    ({"input_fn": 3}, TypeError, "`input_fn` must be None or a callable, got 3"),  # failed at the first probe
    ({"label_fn": "labels"}, TypeError, "`label_fn` must be None or a callable, got 'labels'"),
    ({"cosine_image": "no"}, ValueError, "`cosine_image` must be True or False, got 'no'"),  # 'no' is truthy
    ({"full_covariance": "false"}, ValueError, "`full_covariance` must be True or False, got 'false'"),
    ({"full_covariance": 1}, ValueError, "`full_covariance` must be True or False, got 1"),
    ({"ignore_index": "-100"}, ValueError, "`ignore_index` must be None or an int, got '-100'"),
    ({"ignore_index": 1.5}, ValueError, "`ignore_index` must be None or an int, got 1.5"),
    ({"dtype": torch.float16}, ValueError, "`dtype` must be torch.float64 or torch.float32"),  # crashed mid-run
    ({"dtype": torch.bfloat16}, ValueError, "`dtype` must be torch.float64 or torch.float32"),
])
def test_bad_callables_booleans_and_dtypes_are_refused_at_construction(kwargs: dict[str, Any], error: type,
                                                                        match: str) -> None:
    with pytest.raises(error) as raised:
        NCTracker(**kwargs)
    assert match in str(raised.value)


@pytest.mark.parametrize("kwargs", [{"full_covariance": None}, {"full_covariance": False}, {"cosine_image": False},
                                    {"ignore_index": None}, {"ignore_index": 0}, {"label_fn": lambda b: b[1]},
                                    {"dtype": torch.float32}])  # fmt: skip
def test_good_optional_arguments_are_accepted(kwargs: dict[str, Any]) -> None:
    NCTracker(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"classifier": "nope"}, r"`classifier='nope'` is not a module.*\['body.0', 'body.3', 'head'\]"),
    ({"classifier": "body.2"}, "2-D"),
    ({"feature_layer": "nope"}, r"`feature_layer='nope'` is not a module.*'body.1'.*'body.5'"),
    ({"num_classes": 7}, "`num_classes=7` but the classifier has 4 outputs"),
    ({"feature_layer": lambda m, batch: batch[0]}, r"shape \(16, 8\) do not .* input dimension 32"),
])
def test_names_that_do_not_fit_the_model_raise_listing_what_exists(kwargs: dict[str, Any], match: str) -> None:
    torch.manual_seed(0)
    trainer = make_trainer(callbacks=[NCTracker(**kwargs)])
    with pytest.raises(ValueError, match=match):
        trainer.validate(MixtureClassifier(), verbose=False)


class NaNFeatures(MixtureClassifier):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return super().validation_step((torch.where(y[:, None] == 1, float("nan"), x), y), batch_idx)


@pytest.mark.parametrize("action", ["log", "raise"])
def test_nonfinite_features_raise_a_critical_alert(action: str) -> None:
    torch.manual_seed(0)
    tracker = NCTracker(action=action)
    trainer = make_trainer(callbacks=[tracker])
    if action == "raise":
        with pytest.raises(DivergenceError, match="nc/nonfinite_classes"):
            trainer.validate(NaNFeatures(), verbose=False)
        return
    trainer.validate(NaNFeatures(), verbose=False)
    history = trainer.logger.history
    assert history["nc/nonfinite_classes"][0][1] == 1
    assert math.isnan(history["nc/nc1"][0][1])
    assert history["nc/nc2_equinorm_weights"][0][1] > 0  # weight-only metrics stay finite
    (alert,) = tracker.alerts
    assert (alert.metric, alert.severity) == ("nc/nonfinite_classes", "critical")
    assert history["nc/alerts"][-1][1] == pytest.approx(1, abs=1e-12)


class NaNFromSecondEpoch(MixtureClassifier):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return super().validation_step((x * float("nan") if self.current_epoch >= 1 else x, y), batch_idx)


def test_nan_features_log_nan_nc4_not_a_healthy_zero() -> None:
    """Safety issue, fault 2. Before: ``nc/nc4`` was logged as 0.0 at the evaluation whose features were all NaN."""
    torch.manual_seed(0)
    log = _fit(NaNFromSecondEpoch(), NCTracker(action="log"), max_epochs=2).logger
    (step, nc4), = _series(log, "nc/nc4")  # lagged: from the second evaluation
    assert step == 8 and math.isnan(nc4)
    last = {key: _series(log, f"nc/{key}")[-1][1] for key in METRIC_KEYS}
    weight_only = ("nc2_equinorm_weights", "nc2_equiangular_weights", "nc2_maxangle_weights", "num_classes_present")
    for key, value in last.items():
        assert math.isfinite(value) == (key in weight_only), key


def test_checkpoint_resume_keeps_the_reference_means_and_alerts(tmp_path: Any) -> None:
    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[NCTracker, MemoryLogger]:
        torch.manual_seed(0)
        tracker = NCTracker(rules=[Above("nc/nc1", 0.0)], action="log")
        checkpoint = ModelCheckpoint(dirpath=tmp_path / ("whole" if max_epochs == 3 and not ckpt_path else "parts"),
                                     save_last=True, save_top_k=0)
        trainer = make_trainer(callbacks=[tracker, checkpoint], max_epochs=max_epochs, max_steps=-1,
                               enable_checkpointing=True)
        trainer.fit(MixtureClassifier(), ckpt_path=ckpt_path)
        return tracker, trainer.logger

    whole, whole_log = run(3)
    run(2)
    resumed, resumed_log = run(3, ckpt_path=str(tmp_path / "parts" / "last.ckpt"))
    (step, nc4), = resumed_log.history["nc/nc4"]
    assert step == 12 and math.isfinite(nc4)  # lagged NC4 continues from the saved class means
    for key in ("nc/nc4", "nc/nc1", "nc/nc3"):
        assert resumed_log.history[key][0][1] == pytest.approx(whole_log.history[key][-1][1], rel=1e-9), key
    assert [a.as_dict() for a in resumed.alerts] == [a.as_dict() for a in whole.alerts]
    assert len(resumed.alerts) == 1 and resumed.alerts[0].step == 4  # fired once, restored, not repeated
    state, resumed_state = whole.state_dict(), resumed.state_dict()
    assert state.keys() == resumed_state.keys() and state["rules"] == resumed_state["rules"]
    for key in ("reference_means", "reference_present"):  # the class means of the last evaluation
        torch.testing.assert_close(resumed_state[key], state[key], rtol=1e-9, atol=1e-12)


def test_tensorboard_receives_the_scalars_and_the_cosine_image(tmp_path: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    tb, memory = TensorBoardLogger(tmp_path, name="tb", version=0), MemoryLogger()
    module = MixtureClassifier()
    _fit(module, NCTracker(action="log"), max_epochs=2, logger=[tb, memory])
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "nc/class_mean_cosine" in events.Tags()["images"]
    for key in ("nc/nc1", "nc/cdnv", "nc/nc2_maxangle"):
        scalars = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in scalars] == [s for s, _ in memory.history[key]]
        np.testing.assert_allclose([v for _, v in scalars], [v for _, v in memory.history[key]], rtol=1e-6)
    images = events.Images("nc/class_mean_cosine")
    assert [im.step for im in images] == [4, 8] and (images[0].width, images[0].height) == (256, 256)
    pil = pytest.importorskip("PIL.Image")
    pixels = np.asarray(pil.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    x, y = module.val_set.tensors
    h, _, _ = _eval_features(module, module.state_dict(), x)
    means = torch.stack([h[y == c].double().mean(0) for c in range(4)])
    expected = cosine_image(class_mean_cosines(means, torch.ones(4, dtype=torch.float64)))
    np.testing.assert_allclose(pixels, expected.permute(1, 2, 0).numpy() * 255, atol=1.5)
    assert tuple(pixels[0, 0]) == (255, 0, 0)  # the diagonal: cos = 1 is red


def test_cosine_image_colours() -> None:
    image = cosine_image(torch.tensor([[1.0, -1.0], [0.0, float("nan")]]))
    assert image.shape == (3, 256, 256)
    corners = [image[:, 0, 0], image[:, 0, 255], image[:, 255, 0], image[:, 255, 255]]
    expected = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]
    for got, want in zip(corners, expected):
        assert got.tolist() == want


# -- DDP -----------------------------------------------------------------------------------------------


def _ddp_trackers(module: MixtureClassifier) -> list[NCTracker]:
    probe = DataLoader(module.val_set, batch_size=10)  # 7 batches: rank 0 takes 4, rank 1 takes 3
    return [NCTracker(action="log"), NCTracker(data="train", prefix="train", action="log"),
            NCTracker(data=probe, nc4="exact", prefix="probe", action="log")]


@pytest.mark.distributed
def test_ddp_on_two_cpu_processes_logs_the_single_process_metrics(tmp_path: Any) -> None:
    # No BatchNorm and lr = 0: every feature is a function of its own input only, so two ranks
    # that split the data between them must reproduce the single-process statistics exactly.
    def module() -> MixtureClassifier:  # float64, so features do not depend on which rows share a batch
        torch.manual_seed(0)
        return _float64(MixtureClassifier(batchnorm=False, lr=0.0))

    single = module()
    log = _fit(single, *_ddp_trackers(single), max_epochs=2).logger
    strategy = ddp_on_cpu()
    ddp = module()
    _fit(ddp, *_ddp_trackers(ddp), max_epochs=2, devices=2, strategy=strategy,
         logger=CSVLogger(tmp_path, name="ddp", version=0))
    logged: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "":
                    logged[key].append((int(row["step"]), float(value)))
    for prefix in ("nc", "train", "probe"):
        # Each rank runs half the batches, so the epochs end at global steps 2 and 4 instead of 4 and 8.
        assert [s for s, _ in logged[f"{prefix}/nc1"]] == [2, 4]
        for key in (*METRIC_KEYS, "num_samples"):
            for (_, got), (_, want) in zip(logged[f"{prefix}/{key}"], log.history[f"{prefix}/{key}"], strict=True):
                _assert_close(got, want, f"{prefix}/{key}", rel=1e-9)
    assert logged["probe/num_samples"][0][1] == 64 and logged["train/num_samples"][0][1] == 128
