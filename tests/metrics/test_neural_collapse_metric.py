"""NeuralCollapse (torchmetrics Metric) against the float64 references of test_collapse.py, streaming,
NC4 reference handling, torchmetrics' machinery (collection, merge, forward, dtype, state_dict),
Lightning's validation loop and a 2-process gloo sync."""

import io
import math
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import MemoryLogger, MixtureClassifier, make_trainer
from test_collapse import as_torch, assert_metrics_close, random_problem, reference_metrics
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from lightning_diag import NeuralCollapse
from lightning_diag.metrics.collapse import METRIC_KEYS, nearest_class_center, neural_collapse_metrics
from lightning_diag.metrics.neural_collapse import CLASSIFIER_KEYS


def linear(weight, bias=None):
    """An nn.Linear holding the given (K, d) weight and (K,) bias, in float64."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        if bias is not None:
            layer.bias.copy_(torch.as_tensor(bias))
    return layer


def feed(metric, features, labels, batch_sizes=(16,)):
    start, i = 0, 0
    while start < len(labels):
        stop = start + batch_sizes[i % len(batch_sizes)]
        metric.update(features[start:stop], labels[start:stop])
        start, i = stop, i + 1
    return metric


def ncc_disagreement(h, y_logits, means):
    """numpy: fraction of rows whose logits' argmax differs from the nearest of ``means``."""
    distances = np.linalg.norm(h[:, None, :] - means[None], axis=2)
    return np.mean(y_logits.argmax(1) != distances.argmin(1))


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("global_mean", ["class", "sample"])
def test_compute_matches_float64_reference_and_a_second_pass_gives_exact_nc4(global_mean):
    h, y, w, b = random_problem(0)
    ht, yt = as_torch(h, y)
    expected = reference_metrics(h, y, w, b, global_mean)
    metric = NeuralCollapse(5, linear(w, b), global_mean=global_mean)
    first = feed(metric, ht, yt, batch_sizes=(7, 30)).compute()
    assert list(first) == [k for k in METRIC_KEYS if k != "nc4"]  # NC4 is lagged: none at first
    assert_metrics_close(first, expected, keys=list(first))
    metric.reset()  # the means of that pass become the reference
    second = feed(metric, ht, yt).compute()
    assert list(second) == list(METRIC_KEYS)
    assert 0 < expected["nc4"] < 1
    assert_metrics_close(second, expected)  # the same data twice: NC4 against its final means


def test_states_are_float64_and_float32_features_match_their_reference():
    h, y, w, b = random_problem(1, dim=6)
    h32 = h.astype(np.float32)
    metric = feed(NeuralCollapse(5, linear(w, b)), *as_torch(h32, y))
    assert metric.means.dtype == metric.within_class_scatter.dtype == torch.float64
    result = metric.compute()
    assert all(v.dtype == torch.float64 for v in result.values())
    assert_metrics_close(result, reference_metrics(h32, y, w, b), keys=list(result))


def test_chunked_updates_equal_one_update():
    h, y, w, b = random_problem(2, num_classes=6, dim=10, n=300, offset=50.0)
    ht, yt = as_torch(h, y)
    head = linear(w, b)
    whole = NeuralCollapse(6, head)
    whole.update(ht, yt)
    chunked = feed(NeuralCollapse(6, head), ht, yt, batch_sizes=(1, 13, 64, 5))
    for name in ("counts", "means", "class_scatter", "within_class_scatter"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-10, atol=1e-9)
    assert_metrics_close(chunked.compute(), whole.compute(), rtol=1e-10, keys=list(whole.compute()))


def test_reset_forgets_the_statistics():
    h, y, w, b = random_problem(3)
    ht, yt = as_torch(h, y)
    metric = feed(NeuralCollapse(5, linear(w, b)), ht[:100] * 10, yt[:100])
    metric.compute()
    metric.reset()
    assert float(metric.counts.sum()) == pytest.approx(0.0, abs=0.5)  # integer counts
    again = feed(metric, ht[100:], yt[100:]).compute()
    fresh = feed(NeuralCollapse(5, linear(w, b)), ht[100:], yt[100:]).compute()
    assert_metrics_close(again, fresh, rtol=1e-12, keys=[k for k in fresh if k != "nc4"])


def test_computed_statistics_are_the_class_counts_means_and_scatters_of_the_evaluation():
    h, y, w, b = random_problem(14, n=120)
    metric = feed(NeuralCollapse(5, linear(w, b)), *as_torch(h, y), batch_sizes=(7, 30))
    assert metric.computed_class_scatter is None  # nothing computed yet
    metric.compute()
    for c in range(5):
        rows = h[y == c]
        assert float(metric.computed_counts[c]) == pytest.approx(len(rows), abs=1e-9)
        np.testing.assert_allclose(metric.computed_means[c].numpy(), rows.mean(0), rtol=1e-12, atol=1e-12)
        scatter = np.square(rows - rows.mean(0)).sum()
        assert float(metric.computed_class_scatter[c]) == pytest.approx(scatter, rel=1e-10)
    # Squares that overflow the state dtype: a finite mean, an infinite scatter (what only the scatter shows).
    big = NeuralCollapse(2, dim=1, dtype=torch.float32)
    big.update(torch.tensor([[1e20], [-1e20], [1.0], [2.0]]), torch.tensor([0, 0, 1, 1]))
    big.compute()
    assert torch.isfinite(big.computed_means).all()
    assert math.isinf(float(big.computed_class_scatter[0]))
    assert float(big.computed_class_scatter[1]) == pytest.approx(0.5, abs=1e-6)


# ----------------------------------------------------------------------------- dict contents, NC4


def test_without_classifier_the_weight_metrics_are_absent_and_logits_still_give_nc4():
    h, y, w, b = random_problem(4)
    ht, yt = as_torch(h, y)
    expected = reference_metrics(h, y, w, b)
    metric = NeuralCollapse(5, dim=8)
    result = feed(metric, ht, yt).compute()
    assert set(result) == set(METRIC_KEYS) - set(CLASSIFIER_KEYS) - {"nc4"}
    assert_metrics_close(result, expected, keys=list(result))
    metric.reset()
    logits = ht @ torch.as_tensor(w).T + torch.as_tensor(b)
    metric.update(ht, yt, logits=logits)  # NC4 needs only the network's decisions
    result = metric.compute()
    assert set(result) == set(METRIC_KEYS) - set(CLASSIFIER_KEYS)
    assert float(result["nc4"]) == pytest.approx(expected["nc4"], abs=1e-12)


def test_nc4_is_lagged_against_the_previous_compute_from_the_next_reset():
    h, y, w, b = random_problem(5, n=300)
    ht, yt = as_torch(h, y)
    first, second = slice(0, 150), slice(150, 300)
    metric = feed(NeuralCollapse(5, linear(w, b)), ht[first], yt[first])
    assert "nc4" not in metric.compute()
    means_first = metric.computed_means.clone()
    metric.update(ht[second][:10], yt[second][:10])  # more updates before the reset: no reference yet
    assert "nc4" not in metric.compute()
    metric.reset()
    torch.testing.assert_close(metric.reference_means, metric.computed_means, rtol=0, atol=0)
    result = feed(metric, ht[second], yt[second]).compute()
    expected = ncc_disagreement(h[second], h[second] @ w.T + b, metric.reference_means.numpy())
    assert 0 < expected < 1
    assert float(result["nc4"]) == pytest.approx(expected, abs=1e-12)
    # The reference is the first pass plus those ten samples, not the first pass alone.
    assert not torch.allclose(metric.reference_means, means_first)


def test_manual_reference_is_kept_over_resets_and_absent_classes_are_never_chosen():
    h, y, w, b = random_problem(6)
    ht, yt = as_torch(h, y)
    metric = NeuralCollapse(5, linear(w, b), nc4_reference="manual")
    feed(metric, ht, yt).compute()
    metric.reset()
    assert metric.reference_means is None and "nc4" not in feed(metric, ht, yt).compute()
    reference = torch.as_tensor(h[:5]).clone()
    reference[2] = float("nan")  # class 2 absent from the reference: its row may hold anything
    metric.set_reference_means(reference)
    metric.reset()
    result = feed(metric, ht, yt).compute()
    present = torch.tensor([True, True, False, True, True])
    ncc = nearest_class_center(ht, reference, present)
    assert (ncc != 2).all()
    expected = (ncc != (ht @ torch.as_tensor(w).T + torch.as_tensor(b)).argmax(1)).double().mean()
    assert float(result["nc4"]) == pytest.approx(float(expected), abs=1e-12)


def test_non_finite_features_give_nan_not_absent_keys():
    h, y, w, b = random_problem(7)
    h[17, 3] = float("nan")
    result = feed(NeuralCollapse(5, linear(w, b)), *as_torch(h, y)).compute()
    for key, value in result.items():
        finite = key in ("nc2_equinorm_weights", "nc2_equiangular_weights", "nc2_maxangle_weights",
                         "num_classes_present")
        assert math.isfinite(float(value)) == finite, key


def test_nan_features_make_the_lagged_nc4_of_the_next_evaluation_nan_not_zero():
    """Safety issue, fault 2. Before: ``nc4`` was 0.0 on all-NaN features (argmin and argmax of NaN agree)."""
    h, y, w, b = random_problem(7)
    metric = NeuralCollapse(5, linear(w, b))
    feed(metric, *as_torch(h, y)).compute()
    metric.reset()  # the clean means become the reference
    result = feed(metric, torch.full((len(y), h.shape[1]), float("nan"), dtype=torch.float64), *as_torch(y)).compute()
    assert math.isnan(float(result["nc4"])) and math.isnan(float(result["nc1"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "torch.float16"])
def test_half_precision_states_are_refused_with_a_clear_error(dtype):
    """Safety issue. Before: ``dtype=torch.float16`` (or ``set_dtype(torch.half)``) was accepted and ``compute()``
    failed with ``"linalg_svd_cpu" not implemented for 'Half'``."""
    if isinstance(dtype, torch.dtype):
        with pytest.raises(ValueError, match="`dtype` must be torch.float64 or torch.float32"):
            NeuralCollapse(3, dim=2, dtype=dtype)
    metric = NeuralCollapse(3, nn.Linear(2, 3))
    with pytest.raises(ValueError, match="`dtype` must be torch.float64 or torch.float32"):
        metric.set_dtype(dtype)
    assert metric.means.dtype == torch.float64  # refused before touching the states
    metric.set_dtype("torch.float32")
    assert metric.means.dtype == torch.float32


# ----------------------------------------------------------------------------- torchmetrics machinery


def test_merge_state_equals_one_metric_over_both_parts():
    h, y, w, b = random_problem(8, n=240, offset=20.0)
    order = np.argsort(y, kind="stable")
    ht, yt = as_torch(h[order], y[order])  # sorted: the two parts see different classes
    head = linear(w, b)
    whole = feed(NeuralCollapse(5, head), ht, yt)
    part = feed(NeuralCollapse(5, head), ht[:150], yt[:150])
    part.merge_state(feed(NeuralCollapse(5, head), ht[150:], yt[150:]))
    torch.testing.assert_close(part.within_class_scatter, whole.within_class_scatter, rtol=1e-10, atol=1e-9)
    assert_metrics_close(part.compute(), whole.compute(), rtol=1e-10, keys=list(whole.compute()))
    with pytest.raises(ValueError, match="within_class_scatter"):
        part.merge_state({name: getattr(part, name) for name in ("counts", "means", "class_scatter")})


def test_forward_returns_the_batch_metrics_accumulates_and_leaves_the_reference_alone():
    h, y, w, b = random_problem(9, n=200)
    ht, yt = as_torch(h, y)
    head = linear(w, b)
    metric = NeuralCollapse(5, head)
    batch = metric(ht[:100], yt[:100])
    assert_metrics_close(batch, reference_metrics(h[:100], y[:100], w, b), keys=list(batch))
    metric(ht[100:], yt[100:])
    whole = feed(NeuralCollapse(5, head), ht, yt).compute()
    assert_metrics_close(metric.compute(), whole, rtol=1e-10, keys=list(whole))
    assert metric.reference_means is None  # forward's own compute/reset are not an evaluation
    metric.reset()
    torch.testing.assert_close(metric.reference_means, feed(NeuralCollapse(5, head), ht, yt).means)


def test_metric_collection_flattens_the_dict_and_routes_keyword_inputs():
    h, y, w, b = random_problem(10)
    ht, yt = as_torch(h, y)
    head = linear(w, b)
    collection = MetricCollection({"nc": NeuralCollapse(5, head), "acc": MulticlassAccuracy(5)}, prefix="val/")
    for start in range(0, 200, 50):
        sl = slice(start, start + 50)
        collection.update(features=ht[sl], labels=yt[sl], preds=head(ht[sl]), target=yt[sl])
    result = collection.compute()
    assert set(result) == {f"val/{k}" for k in METRIC_KEYS if k != "nc4"} | {"val/acc"}
    expected = reference_metrics(h, y, w, b)
    assert_metrics_close({k: result[f"val/{k}"] for k in METRIC_KEYS if k != "nc4"}, expected,
                         keys=[k for k in METRIC_KEYS if k != "nc4"])
    collection.reset()
    collection.update(features=ht, labels=yt, preds=head(ht), target=yt)
    assert float(collection.compute()["val/nc4"]) == pytest.approx(expected["nc4"], abs=1e-12)


def test_module_casts_keep_float64_and_set_dtype_changes_it():
    metric = NeuralCollapse(3, nn.Linear(4, 3))
    metric.update(torch.randn(9, 4), torch.arange(3).repeat(3))
    metric.half()
    holder = nn.Sequential(metric).to(torch.bfloat16)  # Lightning's "bf16-true" casts the module so
    assert holder[0].means.dtype == holder[0].within_class_scatter.dtype == torch.float64
    metric.set_dtype(torch.float32)
    assert metric.means.dtype == metric._defaults["means"].dtype == torch.float32
    metric.reset()
    assert metric.means.dtype == torch.float32  # and reset keeps it
    moved = NeuralCollapse(3, dim=4).to("meta")  # a device move (the only one a CPU machine has)
    assert moved.means.device.type == "meta" and moved.means.dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_states_and_reference_move_with_the_module_and_match_the_cpu():
    h, y, w, b = random_problem(13)
    ht, yt = as_torch(h, y)
    expected = reference_metrics(h, y, w, b)
    model = nn.Module()
    model.head = linear(w, b)
    model.nc = NeuralCollapse(5, model.head)
    feed(model.nc, ht, yt).compute()
    model.nc.reset()  # the reference is set on the CPU ...
    model.cuda()  # ... and moves with the module
    model.nc.to(torch.bfloat16)  # a cast leaves the states alone
    assert model.nc.means.is_cuda and model.nc.reference_means.is_cuda and model.nc.reference_present.is_cuda
    assert model.nc.means.dtype == torch.float64
    result = feed(model.nc, ht.cuda(), yt.cuda()).compute()
    assert all(v.is_cuda for v in result.values())
    assert_metrics_close({k: v.cpu() for k, v in result.items()}, expected, rtol=1e-9)


def test_state_dict_is_empty_by_default_and_persistent_states_resume_with_the_reference():
    h, y, w, b = random_problem(11)
    ht, yt = as_torch(h, y)
    head = linear(w, b)
    metric = NeuralCollapse(5, head)
    feed(metric, ht[:100], yt[:100]).compute()
    metric.reset()  # now there is a reference
    metric.update(ht[100:150], yt[100:150])
    assert metric.state_dict() == {}
    metric.persistent(True)
    buffer = io.BytesIO()
    torch.save(nn.ModuleDict({"nc": metric}).state_dict(), buffer)
    buffer.seek(0)
    resumed = nn.ModuleDict({"nc": NeuralCollapse(5, head)})
    resumed.load_state_dict(torch.load(buffer))
    for m in (metric, resumed["nc"]):
        m.update(ht[150:], yt[150:])
    assert_metrics_close(resumed["nc"].compute(), metric.compute(), rtol=1e-12)
    assert "nc4" in metric.compute()


def test_invalid_arguments_name_the_bad_value():
    with pytest.raises(ValueError, match="num_classes"):
        NeuralCollapse(0, dim=3)
    with pytest.raises(ValueError, match="`dim` is required"):
        NeuralCollapse(3)
    with pytest.raises(ValueError, match=r"weight of shape \(3, d\).*\(4, 2\)"):
        NeuralCollapse(3, nn.Linear(2, 4))
    with pytest.raises(ValueError, match="`dim`=5"):
        NeuralCollapse(3, nn.Linear(2, 3), dim=5)
    with pytest.raises(ValueError, match="nc4_reference.*'previous' or 'manual'.*'exact'"):
        NeuralCollapse(3, dim=2, nc4_reference="exact")
    with pytest.raises(ValueError, match="`dtype` must be torch.float64 or torch.float32"):
        NeuralCollapse(3, dim=2, dtype=torch.int64)
    with pytest.raises(ValueError, match="sync_on_compute"):
        NeuralCollapse(3, dim=2, sync_on_compute="yes")
    metric = NeuralCollapse(3, nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"weight of shape \(3, 2\)"):
        metric.classifier = nn.Linear(5, 3)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        metric.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    metric._is_synced = True  # what sync() leaves until unsync()
    with pytest.raises(TorchMetricsUserError, match="unsync"):
        metric.update(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- Lightning


class CollapseProbe(MixtureClassifier):
    """The README pattern: update in validation_step, log and reset at the end of the epoch."""

    def __init__(self) -> None:
        super().__init__(batchnorm=False)
        self.nc = NeuralCollapse(4, classifier=self.head)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        features = self.body(x)
        self.nc.update(features, y)
        return nn.functional.cross_entropy(self.head(features), y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"nc/{k}": v for k, v in self.nc.compute().items()})
        self.nc.reset()


def test_validation_step_with_log_dict_logs_the_metrics_of_the_whole_validation_set(tmp_path):
    torch.manual_seed(0)
    module = CollapseProbe()
    logger = MemoryLogger()
    trainer = make_trainer(logger=logger, default_root_dir=tmp_path)
    trainer.validate(module, verbose=False)
    trainer.validate(module, verbose=False)  # the same weights and data: NC4 against the final means
    x, y = module.val_set.tensors
    with torch.no_grad():
        expected = neural_collapse_metrics(module.body(x), y, module.head.weight, module.head.bias)
    assert len(logger.history["nc/nc1"]) == 2 and len(logger.history["nc/nc4"]) == 1
    for key in METRIC_KEYS:
        got = logger.history[f"nc/{key}"][-1][1]
        assert math.isclose(got, expected[key], rel_tol=1e-5, abs_tol=1e-6), (key, got, expected[key])


def test_logging_the_metric_object_is_refused_by_lightning_because_compute_is_a_dict(tmp_path):
    class LogsObject(CollapseProbe):
        def on_validation_epoch_end(self) -> None:
            self.log("nc", self.nc)

    with pytest.raises(ValueError, match="must be a tensor"):
        make_trainer(default_root_dir=tmp_path).validate(LogsObject(), verbose=False)


# ----------------------------------------------------------------------------- DDP


def _ddp_problem():
    h, y, w, b = random_problem(12, num_classes=5, dim=6, n=240, offset=30.0)
    order = np.argsort(y, kind="stable")  # sorted: the ranks see different classes
    return (*as_torch(h[order], y[order]), w, b)


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ht, yt, w, b = _ddp_problem()
        shard = slice(0, 150) if rank == 0 else slice(150, 240)
        report: dict[str, Any] = {}
        for name, kwargs in (("all_reduce", {}), ("gather_fn", {"dist_sync_fn": _gather})):
            metric = NeuralCollapse(5, linear(w, b), **kwargs)
            metric.set_reference_means(ht[:5])  # any reference: the NC4 counters must add up
            feed(metric, ht[shard], yt[shard])
            local = metric.counts.clone()
            report[name] = {k: v.item() for k, v in metric.compute().items()}
            report[name + "/computed_counts"] = metric.computed_counts
            report[name + "/computed_class_scatter"] = metric.computed_class_scatter
            report[name + "/local_after_compute"] = torch.equal(metric.counts, local)  # unsynced again
        metric.sync()  # torchmetrics' manual sync/unsync
        report["synced_counts"] = metric.counts.clone()
        metric.unsync()
        report["unsynced_counts"] = metric.counts.clone()
        torch.save(report, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor, group=group)
    return gathered


@pytest.mark.distributed
def test_two_gloo_processes_sync_to_the_single_process_result(tmp_path):
    # forkserver: the ranks fork from a server that imported torch once (spawn re-imports it in
    # both ranks at once), never from this process, whose threads make a plain fork unsafe.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchmetrics", "lightning_diag"])
    ranks = [context.Process(target=_ddp_worker, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=60)
    assert [p.exitcode for p in ranks] == [0, 0]
    ht, yt, w, b = _ddp_problem()
    metric = NeuralCollapse(5, linear(w, b))
    metric.set_reference_means(ht[:5])
    expected = feed(metric, ht, yt).compute()
    assert 0 < float(expected["nc4"]) < 1
    for rank in (0, 1):
        report = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ("all_reduce", "gather_fn"):
            assert list(report[name]) == list(expected)
            assert_metrics_close(report[name], expected, rtol=1e-10)
            torch.testing.assert_close(report[name + "/computed_counts"], metric.counts, rtol=0, atol=0)
            torch.testing.assert_close(report[name + "/computed_class_scatter"], metric.class_scatter, rtol=1e-10,
                                       atol=1e-9)  # the global scatters (Chan's merge), not a rank's own
            assert report[name + "/local_after_compute"]
        torch.testing.assert_close(report["synced_counts"], metric.counts, rtol=0, atol=0)
        assert float(report["unsynced_counts"].sum()) == pytest.approx(150 if rank == 0 else 90, abs=0.5)


def test_dtype_is_the_states_dtype_and_does_not_follow_a_module_cast():
    """torchmetrics' convention: ``metric.dtype`` is the states' dtype, changed by ``set_dtype`` only.
    Before: it said float32 while the states were float64, and followed ``.to(torch.half)``."""
    metric = NeuralCollapse(num_classes=3, dim=4)
    assert metric.dtype == metric.counts.dtype == torch.float64
    metric = metric.to(torch.half)
    assert metric.dtype == metric.means.dtype == torch.float64
    metric.set_dtype(torch.float32)
    assert metric.dtype == metric.means.dtype == torch.float32


def test_the_metric_can_be_scripted_like_every_torchmetrics_metric():
    """``torch.jit.script`` failed at the ``forward`` override (``*args``) before; torchmetrics marks
    its own ``forward`` unused for scripting, and so does this one."""
    scripted = torch.jit.script(NeuralCollapse(num_classes=3, dim=4))
    assert isinstance(scripted, torch.jit.ScriptModule)
