import pytest
import torch

from lightning_diag.alerts import Above, Alert, Below, DivergenceError, NonFinite, ZScore, validate_action


def _run(rule, values, source="test"):
    for step, v in enumerate(values):
        rule.update(torch.as_tensor(v, dtype=torch.float32), step)
    return rule.take(rule.pending().tolist(), source)


@pytest.mark.parametrize(
    "rule, values, fired_steps",
    [
        (Above("m", 1.0), [0, 2, 0, 3], [1]),  # only the first firing is pending until taken
        (Above("m", 1.0, patience=3), [2, 2, 0, 2, 2, 2, 2], [5]),
        (Above("m", 1.0, patience=2), [0, float("nan"), float("nan")], [2]),  # NaN is never fine
        (Below("m", 0.5, patience=2), [1, 0.1, 0.2, 0.3], [2]),
        (NonFinite("m"), [1, 2, float("inf")], [2]),
        (NonFinite("m", patience=2), [float("nan"), 1, float("nan")], []),
    ],
)
def test_rules_fire_at_the_step_their_patience_is_reached(rule, values, fired_steps):
    assert [a.step for a in _run(rule, values)] == fired_steps


def test_a_rule_fires_once_per_streak_and_again_after_it_clears():
    rule, fired = Above("m", 1.0), []
    for step, v in enumerate([2, 2, 2, 0, 2, 2]):
        rule.update(torch.tensor(float(v)), step)
        fired += [a.step for a in rule.take(rule.pending().tolist(), "t")]
    assert fired == [0, 4]


def test_alert_record_carries_everything():
    (alert,) = _run(Above("grad_norm/total", 10.0, severity="critical"), [1.0, 12.5], source="GradNormWatcher")
    assert alert == Alert(
        "GradNormWatcher", "grad_norm/total", 1, 12.5, 10.0, "critical",
        "GradNormWatcher: grad_norm/total = 12.5 (above 10) at step 1",
    )


def test_vector_rules_track_each_key_independently():
    rule = Below("sa/*", 0.1, patience=2)
    assert rule.bind(["loss", "sa/a", "sa/b"]) == [1, 2]
    for step, v in enumerate([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]):
        rule.update(torch.tensor(v), step)
    alerts = rule.take(rule.pending().tolist(), "t")
    assert [(a.metric, a.step) for a in alerts] == [("sa/a", 1), ("sa/b", 2)]


def test_bind_lists_the_available_keys_when_nothing_matches():
    with pytest.raises(ValueError, match=r"matches none.*grad_norm/total"):
        Above("loss", 1.0).bind(["grad_norm/total"])


def test_zscore_rule_fires_on_a_spike_and_does_not_absorb_it():
    rule = ZScore("loss", 4.0, warmup=5)
    values = [1.0, 1.1, 0.9, 1.0, 1.05, 50.0, 50.0, 1.0]
    alerts = _run(rule, values)
    assert [a.step for a in alerts] == [5]
    assert rule.baselines[0].mean.item() < 1.2  # the spikes never entered the baseline


def test_rule_state_round_trip_keeps_streak_and_baseline():
    a, b = ZScore("m", 3.0, warmup=3, patience=2), ZScore("m", 3.0, warmup=3, patience=2)
    for step, v in enumerate([1.0, 2.0, 1.5, 30.0]):
        a.update(torch.tensor(v), step)
    b.load_state_dict(a.state_dict())
    for rule in (a, b):
        rule.update(torch.tensor(40.0), 4)
    assert [x.step for x in a.take(a.pending().tolist(), "t")] == [4]
    assert [x.step for x in b.take(b.pending().tolist(), "t")] == [4]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Above("", 1.0), "metric"),
        (lambda: Above("m", 1.0, patience=0), "patience"),
        (lambda: Below("m", 1.0, severity="fatal"), "severity"),
        (lambda: validate_action("explode"), r"'log', 'warn', 'stop', 'raise'"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_allowed_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_divergence_error_carries_its_alerts():
    alerts = _run(Above("m", 0.0), [1.0])
    err = DivergenceError(alerts)
    assert err.alerts == alerts and "m = 1" in str(err)
