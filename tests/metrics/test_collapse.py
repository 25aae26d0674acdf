"""Neural collapse metrics against a float64 numpy reference, closed forms, streaming and DDP merge."""

import io
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lightning_diag.metrics.collapse import (
    METRIC_KEYS,
    CollapseAccumulator,
    nearest_class_center,
    neural_collapse_metrics,
)

# ----------------------------------------------------------------------------- reference


def reference_metrics(h, y, weight, bias=None, global_mean="class"):
    """Every metric straight from its definition, in float64 numpy, two passes, loops over pairs."""
    h, y, weight = np.asarray(h, np.float64), np.asarray(y), np.asarray(weight, np.float64)
    num_classes = weight.shape[0]
    bias = np.zeros(num_classes) if bias is None else np.asarray(bias, np.float64)
    classes = [c for c in range(num_classes) if (y == c).any()]
    k, total = len(classes), len(y)
    mu = np.stack([h[y == c].mean(0) for c in classes])
    mu_g = mu.mean(0) if global_mean == "class" else h.mean(0)
    centred = mu - mu_g
    sigma_w = sum((h[y == c] - mu[j]).T @ (h[y == c] - mu[j]) for j, c in enumerate(classes)) / total
    sigma_b = centred.T @ centred / k
    if global_mean == "class":
        nc1 = np.trace(sigma_w @ np.linalg.pinv(sigma_b, rtol=1e-10, hermitian=True)) / k
    else:  # the documented choice: only the top K-1 directions of Sigma_B are inverted
        eigenvalues, vectors = np.linalg.eigh(sigma_b)
        top = np.argsort(eigenvalues)[::-1][: k - 1]
        top = top[eigenvalues[top] > 1e-10 * eigenvalues.max()]
        sigma_b_pinv = vectors[:, top] @ np.diag(1 / eigenvalues[top]) @ vectors[:, top].T
        nc1 = np.trace(sigma_w @ sigma_b_pinv) / k
    w, b = weight[classes], bias[classes]

    def cov(values):
        return np.std(values, ddof=1) / np.mean(values)

    def angles(rows):
        cosines = [
            rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]))
            for i in range(k) for j in range(k) if i != j
        ]
        return np.std(cosines, ddof=1), np.mean(np.abs(np.array(cosines) + 1 / (k - 1)))

    variance = [np.mean(np.sum((h[y == c] - mu[j]) ** 2, axis=1)) for j, c in enumerate(classes)]
    cdnv = np.mean([
        (variance[i] + variance[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2))
        for i in range(k) for j in range(k) if i != j
    ])
    logits = h @ weight.T + bias
    distances = np.linalg.norm(h[:, None, :] - mu[None, :, :], axis=2)
    ncc = np.array(classes)[distances.argmin(1)]
    equiangular, maxangle = angles(centred)
    equiangular_w, maxangle_w = angles(w)
    return {
        "nc1": nc1,
        "nc2_equinorm_means": cov(np.linalg.norm(centred, axis=1)),
        "nc2_equinorm_weights": cov(np.linalg.norm(w, axis=1)),
        "nc2_equiangular": equiangular,
        "nc2_maxangle": maxangle,
        "nc2_equiangular_weights": equiangular_w,
        "nc2_maxangle_weights": maxangle_w,
        "nc3": np.sum((w / np.linalg.norm(w) - centred / np.linalg.norm(centred)) ** 2),
        "nc4": np.mean(logits.argmax(1) != ncc),
        "cdnv": cdnv,
        "trace_ratio": np.trace(sigma_w) / np.trace(sigma_b),
        "bias_collapse": np.linalg.norm(w @ mu_g + b),
        "num_classes_present": k,
    }


def random_problem(seed, num_classes=5, dim=8, n=200, spread=2.0, noise=1.0, offset=0.0):
    """Gaussian classes with random means, imbalanced counts, a random classifier."""
    rng = np.random.default_rng(seed)
    means = spread * rng.standard_normal((num_classes, dim)) + offset
    labels = rng.choice(num_classes, size=n, p=rng.dirichlet(np.full(num_classes, 5.0)))
    labels[:num_classes] = np.arange(num_classes)  # every class at least once
    features = means[labels] + noise * rng.standard_normal((n, dim))
    weight = rng.standard_normal((num_classes, dim))
    bias = rng.standard_normal(num_classes)
    return features, labels, weight, bias


def as_torch(*arrays):
    return [torch.as_tensor(a) for a in arrays]


def assert_metrics_close(actual, expected, rtol=1e-6, atol=1e-12, keys=METRIC_KEYS):
    # atol: several figures are 0 in exact arithmetic (two classes are always equiangular); rounding
    # leaves ~1e-16 of either sign on another machine, where a pure relative test would fail.
    for key in keys:
        a, e = float(actual[key]), float(expected[key])
        assert math.isclose(a, e, rel_tol=rtol, abs_tol=atol), f"{key}: {a!r} != {e!r}"


def streamed(features, labels, weight, bias=None, batch_sizes=(7,), **kwargs):
    acc = CollapseAccumulator(weight.shape[0], features.shape[1], **kwargs)
    start, i = 0, 0
    while start < len(labels):
        stop = start + batch_sizes[i % len(batch_sizes)]
        acc.update(features[start:stop], labels[start:stop])
        start, i = stop, i + 1
    return acc


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("global_mean", ["class", "sample"])
def test_every_metric_matches_float64_numpy_reference(global_mean):
    h, y, w, b = random_problem(0)
    expected = reference_metrics(h, y, w, b, global_mean)
    actual = neural_collapse_metrics(*as_torch(h, y, w, b), global_mean=global_mean)
    assert set(actual) == set(METRIC_KEYS)
    assert 0 < expected["nc4"] < 1  # the random classifier disagrees with NCC on some samples
    assert_metrics_close(actual, expected)


def test_float32_features_are_accumulated_in_float64():
    h, y, w, b = random_problem(1)
    h32 = h.astype(np.float32)
    actual = neural_collapse_metrics(*as_torch(h32, y, w.astype(np.float32), b.astype(np.float32)))
    assert_metrics_close(actual, reference_metrics(h32, y, w.astype(np.float32), b.astype(np.float32)))


def test_nc1_survives_large_mean_offset_in_float32_input():
    # Offset 1e4, within-class std 1e-2: sum(h h^T) - n mu mu^T would lose ~1e-4 relative even
    # in float64 (eps * offset^2 / noise^2); batch-centred Chan updates keep ~1e-12.
    h, y, w, b = random_problem(2, num_classes=4, dim=16, n=2000, spread=1.0, noise=1e-2, offset=1e4)
    h32 = h.astype(np.float32)
    expected = reference_metrics(h32, y, w, b)
    acc = streamed(*as_torch(h32, y, w), batch_sizes=(64, 13))
    actual = acc.compute(torch.as_tensor(w), torch.as_tensor(b))
    assert expected["nc1"] < 1e-2
    assert_metrics_close(actual, expected, keys=("nc1", "trace_ratio", "cdnv", "nc2_equinorm_means"))


def test_two_classes():
    h, y, w, b = random_problem(3, num_classes=2)
    actual = neural_collapse_metrics(*as_torch(h, y, w, b))
    assert_metrics_close(actual, reference_metrics(h, y, w, b))
    # Papyan's centred means of two classes are opposite: perfectly equinorm and equiangular.
    assert actual["nc2_equinorm_means"] == pytest.approx(0, abs=1e-12)
    assert actual["nc2_maxangle"] == pytest.approx(0, abs=1e-12)


def test_more_classes_than_dimensions():
    h, y, w, b = random_problem(4, num_classes=10, dim=3, n=400)
    actual = neural_collapse_metrics(*as_torch(h, y, w, b))
    assert_metrics_close(actual, reference_metrics(h, y, w, b))


def test_missing_classes_are_excluded():
    h, y, w, b = random_problem(5, num_classes=6)
    keep = (y != 1) & (y != 4)
    h, y = h[keep], y[keep]
    actual = neural_collapse_metrics(*as_torch(h, y, w, b))
    assert actual["num_classes_present"] == 4
    assert_metrics_close(actual, reference_metrics(h, y, w, b))
    # Same as the problem with those classes never defined at all.
    remap = {c: i for i, c in enumerate([0, 2, 3, 5])}
    compact = neural_collapse_metrics(*as_torch(h, np.vectorize(remap.get)(y), w[[0, 2, 3, 5]], b[[0, 2, 3, 5]]))
    # NC4 differs on purpose: the network may still predict a class absent from the data.
    assert_metrics_close(actual, compact, rtol=1e-10, keys=[k for k in METRIC_KEYS if k != "nc4"])


def test_label_permutation_changes_nothing():
    h, y, w, b = random_problem(6)
    perm = np.random.default_rng(0).permutation(5)  # class c is renamed perm[c]
    inverse = np.argsort(perm)
    before = neural_collapse_metrics(*as_torch(h, y, w, b))
    after = neural_collapse_metrics(*as_torch(h, perm[y], w[inverse], b[inverse]))
    assert_metrics_close(after, before, rtol=1e-10)


def test_nearest_class_center_matches_brute_force_and_skips_absent_classes():
    rng = np.random.default_rng(7)
    means = rng.standard_normal((6, 5)) + 50.0
    points = means[rng.integers(0, 6, 300)] + 0.7 * rng.standard_normal((300, 5))
    present = np.array([True, True, False, True, True, True])
    distances = np.linalg.norm(points[:, None] - means[None], axis=2)
    distances[:, ~present] = np.inf
    means_nan = means.copy()
    means_nan[2] = np.nan  # an absent class may hold anything
    got = nearest_class_center(*as_torch(points, means_nan, present))
    np.testing.assert_array_equal(got.numpy(), distances.argmin(1))


# ----------------------------------------------------------------------------- closed forms


def simplex_etf(num_classes, dim, alpha, seed=0):
    """Rows alpha (e_c - 1/K) Q^T with Q orthonormal: a simplex ETF of radius alpha sqrt(1 - 1/K)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, num_classes)))
    return alpha * (np.eye(num_classes) - 1 / num_classes) @ q.T


def exact_isotropic_noise(n, dim, sigma, rng):
    """n x d noise with mean exactly 0 and scatter exactly n sigma^2 I (needs n > d)."""
    basis, _ = np.linalg.qr(np.column_stack([np.ones(n), rng.standard_normal((n, dim))]))
    return math.sqrt(n) * sigma * basis[:, 1:]


def etf_problem(num_classes=5, dim=12, per_class=20, alpha=3.0, sigma=0.05, seed=0):
    rng = np.random.default_rng(seed)
    means = simplex_etf(num_classes, dim, alpha, seed)
    offset = rng.standard_normal(dim)  # translation must not matter
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = np.concatenate([exact_isotropic_noise(per_class, dim, sigma, rng) for _ in range(num_classes)])
    features = means[labels] + offset + noise
    weight = 0.7 * means  # self-dual classifier
    bias = -weight @ offset  # then W h + b = 0.7 <mu_c - mu_G, h - mu_G>: the NCC decision
    return features, labels, weight, bias


def test_exact_simplex_etf_without_noise_is_fully_collapsed():
    h, y, w, b = etf_problem(sigma=0.0)
    m = neural_collapse_metrics(*as_torch(h, y, w, b))
    for key in METRIC_KEYS:
        if key != "num_classes_present":
            assert m[key] == pytest.approx(0.0, abs=1e-12), key


def test_simplex_etf_with_exact_isotropic_noise_matches_closed_forms():
    k, d, alpha, sigma = 5, 12, 3.0, 0.05
    h, y, w, b = etf_problem(k, d, alpha=alpha, sigma=sigma)
    m = neural_collapse_metrics(*as_torch(h, y, w, b))
    rho2 = alpha**2 * (1 - 1 / k)  # ||mu_c - mu_G||^2
    q = sigma**2 * d / rho2
    assert m["trace_ratio"] == pytest.approx(q, rel=1e-10)
    assert m["nc1"] == pytest.approx(sigma**2 * (k - 1) ** 2 / (k * rho2), rel=1e-10)
    assert m["cdnv"] == pytest.approx((k - 1) / (2 * k) * q, rel=1e-10)
    for key in ("nc2_equinorm_means", "nc2_equiangular", "nc2_maxangle", "nc3", "nc4", "bias_collapse"):
        assert m[key] == pytest.approx(0.0, abs=1e-12), key


def test_trace_approximation_bounds_nc1_for_etf_means_and_is_exact_in_their_span():
    k, d, per_class = 4, 10, 30
    rng = np.random.default_rng(1)
    means = simplex_etf(k, d, 2.0)
    labels = np.repeat(np.arange(k), per_class)
    w = rng.standard_normal((k, d))

    def with_noise(noise):
        noise = noise - np.stack([noise[labels == c].mean(0) for c in range(k)])[labels]  # means stay ETF
        return torch.as_tensor(means[labels] + noise)

    anisotropic = with_noise(rng.standard_normal((k * per_class, d)) * np.linspace(0.01, 0.3, d))
    in_span = with_noise(0.1 * rng.standard_normal((k * per_class, k)) @ means)
    for features, equal in ((anisotropic, False), (in_span, True)):
        exact = neural_collapse_metrics(features, torch.as_tensor(labels), torch.as_tensor(w))
        acc = CollapseAccumulator(k, d, full_covariance=False)
        acc.update(features, torch.as_tensor(labels))
        approx = acc.compute(torch.as_tensor(w))
        assert float(approx["nc1"]) == pytest.approx((k - 1) / k * exact["trace_ratio"], rel=1e-12)
        if equal:
            assert float(approx["nc1"]) == pytest.approx(exact["nc1"], rel=1e-9)
        else:
            assert float(approx["nc1"]) > 1.5 * exact["nc1"]


# ----------------------------------------------------------------------------- streaming / DDP


def test_streaming_in_small_batches_equals_one_batch_equals_one_shot():
    h, y, w, b = random_problem(8, num_classes=6, dim=10, n=300)
    keep = y != 5  # class 5 never occurs
    order = np.argsort(y[keep], kind="stable")  # sorted: most small batches miss most classes
    h, y = h[keep][order], y[keep][order]
    ht, yt, wt, bt = as_torch(h, y, w, b)
    many = streamed(ht, yt, wt, batch_sizes=(1, 5, 17, 3, 8)).compute(wt, bt)
    one = streamed(ht, yt, wt, batch_sizes=(len(y),)).compute(wt, bt)
    shot = neural_collapse_metrics(ht, yt, wt, bt)
    keys = [k for k in METRIC_KEYS if k != "nc4"]  # streaming NC4 is lagged: NaN without reference
    assert_metrics_close(many, one, rtol=1e-10, keys=keys)
    assert_metrics_close(one, shot, rtol=1e-10, keys=keys)
    assert_metrics_close(shot, reference_metrics(h, y, w, b))
    assert math.isnan(float(many["nc4"]))


def test_lagged_nc4_with_final_means_as_reference_equals_exact_nc4():
    h, y, w, b = random_problem(9)
    ht, yt, wt, bt = as_torch(h, y, w, b)
    first = streamed(ht, yt, wt)
    second = CollapseAccumulator(5, 8)
    second.set_reference_means(first.means, first.counts > 0)  # a second pass
    for start in range(0, len(y), 32):
        sl = slice(start, start + 32)
        second.update(ht[sl], yt[sl], logits=ht[sl] @ wt.T + bt)
    assert float(second.compute(wt, bt)["nc4"]) == pytest.approx(neural_collapse_metrics(ht, yt, wt, bt)["nc4"])


class FakeAllReduce:
    """In-process SUM all-reduce for ranks running in threads: deposit, wait, sum, wait."""

    def __init__(self, world_size):
        self.slots = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=30)

    def for_rank(self, rank):
        def all_reduce_sum(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            tensor.copy_(total)  # in place, like torch.distributed.all_reduce
            return tensor

        return all_reduce_sum


@pytest.mark.parametrize("full_covariance", [True, False])
def test_sync_of_simulated_ddp_shards_equals_the_whole(full_covariance):
    h, y, w, b = random_problem(10, num_classes=5, dim=6, n=240)
    order = np.argsort(y, kind="stable")
    ht, yt, wt, bt = as_torch(h[order], y[order], w, b)  # sorted: shards see different classes
    reference_means = torch.as_tensor(h[:5])  # any reference: NC4 counters must add up
    shards = [slice(0, 150), slice(150, 240), slice(0, 0)]  # the third rank saw no data at all

    def make():
        acc = CollapseAccumulator(5, 6, full_covariance=full_covariance)
        acc.set_reference_means(reference_means)
        return acc

    whole = make()
    for start in range(0, 240, 16):
        sl = slice(start, start + 16)
        whole.update(ht[sl], yt[sl], logits=ht[sl] @ wt.T)
    ranks = [make() for _ in shards]
    for acc, shard in zip(ranks, shards):
        for start in range(shard.start, shard.stop, 16):
            sl = slice(start, min(start + 16, shard.stop))
            acc.update(ht[sl], yt[sl], logits=ht[sl] @ wt.T)
    assert ranks[1].counts[0] == 0  # rank 1 never saw class 0
    reducer = FakeAllReduce(len(ranks))
    with ThreadPoolExecutor(len(ranks)) as pool:
        list(pool.map(lambda r: ranks[r].sync(reducer.for_rank(r)), range(len(ranks))))

    expected = whole.compute(wt, bt)
    for acc in ranks:
        torch.testing.assert_close(acc.counts, whole.counts, rtol=0, atol=0)
        torch.testing.assert_close(acc.means, whole.means, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.class_scatter, whole.class_scatter, rtol=1e-10, atol=0)
        if full_covariance:
            torch.testing.assert_close(acc.within_class_scatter, whole.within_class_scatter, rtol=1e-10, atol=1e-12)
        assert_metrics_close(acc.compute(wt, bt), expected, rtol=1e-9)
    assert 0 < float(expected["nc4"]) < 1


@pytest.mark.parametrize("full_covariance", [True, False])
def test_merge_of_two_accumulators_equals_one_over_all_batches(full_covariance):
    h, y, w, b = random_problem(15, num_classes=5, dim=6, n=240, offset=30.0)
    order = np.argsort(y, kind="stable")
    ht, yt, wt, bt = as_torch(h[order], y[order], w, b)  # sorted: the two parts see different classes
    reference = torch.as_tensor(h[:5])

    def run(sl):
        acc = CollapseAccumulator(5, 6, full_covariance=full_covariance)
        acc.set_reference_means(reference)
        for start in range(sl.start, sl.stop, 16):
            part = slice(start, min(start + 16, sl.stop))
            acc.update(ht[part], yt[part], logits=ht[part] @ wt.T)
        return acc

    whole, first, second, empty = run(slice(0, 240)), run(slice(0, 150)), run(slice(150, 240)), run(slice(0, 0))
    assert second.counts[0] == 0 and first.counts[4] == 0
    first.merge(second)
    first.merge(empty)  # nothing seen: changes nothing
    empty.merge(first)  # into an empty one: a copy
    for acc in (first, empty):
        torch.testing.assert_close(acc.counts, whole.counts, rtol=0, atol=0)
        torch.testing.assert_close(acc.means, whole.means, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.class_scatter, whole.class_scatter, rtol=1e-10, atol=0)
        if full_covariance:
            torch.testing.assert_close(acc.within_class_scatter, whole.within_class_scatter, rtol=1e-10, atol=1e-10)
        assert_metrics_close(acc.compute(wt, bt), whole.compute(wt, bt), rtol=1e-9)
    assert float(first.ncc_seen) == 240 and 0 < float(first.ncc_mismatches) < 240
    with pytest.raises(ValueError, match="full_covariance"):
        first.merge(CollapseAccumulator(5, 6, full_covariance=not full_covariance))


def test_sync_twice_or_update_after_sync_is_an_error():
    acc = CollapseAccumulator(3, 2)
    acc.update(torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    acc.sync(lambda t: t)
    with pytest.raises(RuntimeError, match="sync"):
        acc.sync(lambda t: t)
    with pytest.raises(RuntimeError, match="reset"):
        acc.update(torch.randn(2, 2), torch.tensor([0, 1]))
    acc.reset()
    acc.update(torch.randn(2, 2), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- state, edge cases


def test_state_dict_round_trip_resumes_exactly():
    h, y, w, b = random_problem(11)
    ht, yt, wt, bt = as_torch(h, y, w, b)
    acc = CollapseAccumulator(5, 8)
    acc.set_reference_means(torch.as_tensor(h[:5]))
    acc.update(ht[:100], yt[:100], logits=ht[:100] @ wt.T)
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    resumed = CollapseAccumulator(5, 8)
    resumed.load_state_dict(torch.load(buffer))
    for a in (acc, resumed):
        a.update(ht[100:], yt[100:], logits=ht[100:] @ wt.T)
    assert_metrics_close(resumed.compute(wt, bt), acc.compute(wt, bt), rtol=0)
    with pytest.raises(ValueError, match="dim"):
        CollapseAccumulator(5, 9).load_state_dict(acc.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_give_nan_metrics_without_raising(bad):
    h, y, w, b = random_problem(12)
    h[17, 3] = bad
    ht, yt, wt, bt = as_torch(h, y, w, b)
    one_shot = neural_collapse_metrics(ht, yt, wt, bt)
    streaming = {k: float(v) for k, v in streamed(ht, yt, wt).compute(wt).items()}
    for metrics in (one_shot, streaming):
        for key in METRIC_KEYS:
            if key in ("nc2_equinorm_weights", "nc2_equiangular_weights", "nc2_maxangle_weights"):
                assert math.isfinite(metrics[key]), key
            elif key == "num_classes_present":
                assert metrics[key] == 5
            else:
                assert math.isnan(metrics[key]), key


@pytest.mark.parametrize("where", ["features", "logits", "reference", "no_reference_class"])
def test_non_finite_input_makes_lagged_nc4_nan_not_a_healthy_zero(where):
    """Safety issue, fault 2. Before: argmin and argmax of a NaN row both gave class 0, so NaN
    features counted as agreement (``nc4`` 0.0 when every row was NaN)."""
    h, y, w, b = random_problem(15)
    ht, yt, wt, bt = as_torch(h, y, w, b)
    acc = streamed(ht, yt, wt)
    means = acc.means.clone()
    if where == "reference":
        means[2, 0] = float("nan")  # a class that occurred, without a usable mean
    acc.reset()
    acc.set_reference_means(means, torch.full((5,), where != "no_reference_class"))  # e.g. after an all-NaN eval
    logits = ht @ wt.T + bt
    if where == "features":
        ht = torch.full_like(ht, float("nan"))
    elif where == "logits":
        logits[3, 1] = float("nan")
    acc.update(ht, yt, logits)
    metrics = acc.compute(wt, bt)
    assert math.isnan(float(metrics["nc4"]))
    assert math.isfinite(float(metrics["nc2_equiangular_weights"]))  # weight-only figures are not touched
    assert math.isnan(float(metrics["nc1"])) == (where == "features")


def test_rows_with_negative_labels_are_left_out_whatever_their_features_hold():
    """Safety issue, fault 1: ``ignore_index=-100`` labels (padding tokens). Before: ``IndexError: index out of
    range in self`` from ``index_add_`` (on CUDA a device-side assert)."""
    h, y, w, b = random_problem(16)
    padded_h = np.concatenate([h, np.full((30, h.shape[1]), np.nan)])  # padding rows hold anything
    padded_y = np.concatenate([y, np.full(10, -100), np.full(20, -1)])
    order = np.random.default_rng(0).permutation(len(padded_y))
    padded_h, padded_y = padded_h[order], padded_y[order]
    ht, yt, wt, bt = as_torch(padded_h, padded_y, w, b)
    acc = streamed(ht, yt, wt, batch_sizes=(11,))
    expected = reference_metrics(h, y, w, b)  # nc4 against the final means: the reference below
    acc.reset()
    acc.set_reference_means(torch.as_tensor(np.stack([h[y == c].mean(0) for c in range(5)])))
    for start in range(0, len(padded_y), 11):
        rows = slice(start, start + 11)
        acc.update(ht[rows], yt[rows], ht[rows] @ wt.T + bt)
    assert float(acc.ncc_seen) == pytest.approx(len(y), abs=1e-9)
    assert_metrics_close(acc.compute(wt, bt), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_state_dtypes_other_than_float64_or_float32_are_refused_at_construction(dtype):
    """Safety issue. Before: float16 and bfloat16 were accepted and ``compute()`` failed in ``linalg_svd``."""
    with pytest.raises(ValueError, match=r"`dtype` must be torch.float64 or torch.float32.*got torch\."):
        CollapseAccumulator(3, 2, dtype=dtype)


def test_fewer_than_two_classes_give_nan_not_an_error():
    m = neural_collapse_metrics(torch.randn(10, 3), torch.zeros(10, dtype=torch.long), torch.randn(4, 3))
    assert m["num_classes_present"] == 1
    # NC4 needs no between-class geometry: with one class NCC always picks it.
    assert all(math.isnan(v) for k, v in m.items() if k not in ("num_classes_present", "nc4"))
    empty = neural_collapse_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.randn(4, 3))
    assert empty["num_classes_present"] == 0


def test_large_dimension_skips_the_covariance_and_one_shot_stays_exact():
    acc = CollapseAccumulator(3, 4097)  # auto: above FULL_COVARIANCE_MAX_DIM
    assert not acc.full_covariance and acc.within_class_scatter is None
    h, y, w, b = random_problem(13, dim=20)
    ht, yt, wt, bt = as_torch(h, y, w, b)
    projected = neural_collapse_metrics(ht, yt, wt, bt, full_covariance=False)
    assert_metrics_close(projected, reference_metrics(h, y, w, b))


def test_float32_state_is_close_on_well_conditioned_data():
    h, y, w, b = random_problem(14)
    acc = streamed(*as_torch(h, y, w), dtype=torch.float32)
    assert acc.means.dtype == torch.float32
    keys = [k for k in METRIC_KEYS if k != "nc4"]
    assert_metrics_close(acc.compute(*as_torch(w, b)), reference_metrics(h, y, w, b), rtol=1e-4, keys=keys)


def test_invalid_arguments_name_the_bad_value():
    with pytest.raises(ValueError, match="global_mean"):
        CollapseAccumulator(3, 2, global_mean="weighted")
    with pytest.raises(ValueError, match="num_classes"):
        CollapseAccumulator(0, 2)
    acc = CollapseAccumulator(3, 2)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        acc.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        acc.update(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="logits"):
        acc.set_reference_means(torch.zeros(3, 2))
        acc.update(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), logits=torch.randn(4, 2))
    assert acc.counts.sum() == 0  # rejected before touching the state
    with pytest.raises(ValueError, match="weight"):
        acc.compute(torch.randn(4, 2))
    with pytest.raises(ValueError, match="labels"):
        neural_collapse_metrics(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), torch.randn(3, 2))
    with pytest.raises(ValueError, match="num_classes"):
        neural_collapse_metrics(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), torch.randn(3, 2), num_classes=4)
