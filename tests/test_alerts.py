import pickle

import numpy as np
import pytest

from lightning_diag.alerts import Above, Alert, Below, DivergenceError, NonFinite, RuleBook, ZScore, as_rules


def _run(rule, values, source="test"):
    book, alerts = RuleBook(source, [rule]), []
    for step, v in enumerate(values):
        alerts += book.update(step, ["m"] if np.ndim(v) == 0 else ["m/a", "m/b"], np.atleast_1d(np.float64(v)))
    return alerts


@pytest.mark.parametrize(
    "rule, values, fired_steps",
    [
        (Above("m", 1.0), [0, 2, 0, 3], [1, 3]),
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
    assert [a.step for a in _run(Above("m", 1.0), [2, 2, 2, 0, 2, 2])] == [0, 4]


def test_patience_counts_steps_whatever_the_measurement_cadence():
    rule, book = Above("m", 1.0, patience=15), None
    book = RuleBook("t", [rule])
    fired = [a.step for step in (0, 10, 20, 30) for a in book.update(step, ["m"], np.array([2.0]))]
    assert fired == [20]  # held at steps 0..20: 21 >= 15 steps; at step 10 only 11 steps
    assert bool(rule.active[0])


def test_alert_record_carries_everything():
    (alert,) = RuleBook("GradNormWatcher", [Above("grad_norm/total", 10.0, severity="critical")]).update(
        1, ["grad_norm/total"], np.array([12.5]))
    assert alert == Alert("GradNormWatcher", "grad_norm/total", 1, 12.5, 10.0, "critical",
                          "GradNormWatcher: grad_norm/total = 12.5 (above 10) at step 1")
    assert str(alert).startswith("[critical] GradNormWatcher:") and alert.acted_step is None


def test_vector_rules_track_each_key_independently():
    book = RuleBook("t", [Below("sa/*", 0.1, patience=2)])
    alerts = []
    for step, v in enumerate([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]):
        alerts += book.update(step, ["loss", "sa/a", "sa/b"], np.array([9.0, *v]))
    assert [(a.metric, a.step) for a in alerts] == [("sa/a", 1), ("sa/b", 2)]


def test_a_key_not_measured_at_a_step_keeps_its_streak():
    book = RuleBook("t", [Above("m/*", 1.0, patience=3)])
    book.update(0, ["m/a", "m/b"], np.array([2.0, 2.0]))
    book.update(1, ["m/a"], np.array([2.0]))  # m/b not measured at step 1
    alerts = book.update(2, ["m/a", "m/b"], np.array([2.0, 2.0]))
    assert sorted(a.metric for a in alerts) == ["m/a", "m/b"]


def test_user_patterns_are_checked_against_the_keys_with_suggestions():
    book = RuleBook("t", user=[Above("grad_norm/totl", 1.0)])
    with pytest.raises(ValueError, match=r"matches none.*grad_norm/total.*did you mean"):
        book.check_patterns(["grad_norm/total", "grad_norm/zscore"])


def test_zscore_rule_fires_on_a_spike_and_does_not_absorb_it():
    rule = ZScore("m", 4.0, warmup=5)
    alerts = _run(rule, [1.0, 1.1, 0.9, 1.0, 1.05, 50.0, 50.0, 1.0])
    assert [a.step for a in alerts] == [5]
    assert rule.baseline.mean[0] < 1.2  # the spikes never entered the baseline


def test_rule_state_round_trip_keeps_streak_and_baseline():
    a, b = ZScore("m", 3.0, warmup=3, patience=2), ZScore("m", 3.0, warmup=3, patience=2)
    book_a, book_b = RuleBook("t", [a]), RuleBook("t", [b])
    for step, v in enumerate([1.0, 2.0, 1.5, 30.0]):
        book_a.update(step, ["m"], np.array([v]))
    book_b.load_state_dict(book_a.state_dict())
    assert [x.step for x in book_a.update(4, ["m"], np.array([40.0]))] == [4]
    assert [x.step for x in book_b.update(4, ["m"], np.array([40.0]))] == [4]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Above("", 1.0), "metric"),
        (lambda: Above("m", float("nan")), "threshold"),
        (lambda: Above("m", "1"), "threshold"),
        (lambda: Above("m", 1.0, patience=0), "patience"),
        (lambda: Below("m", 1.0, severity="fatal"), "severity"),
        (lambda: ZScore("m", -1.0), r"z-score must be > 0"),
        (lambda: ZScore("m", float("nan")), r"`threshold` of a z-score must be > 0.*got nan"),
        (lambda: Above("m", True), r"`threshold` must be a number.*got True"),
        (lambda: as_rules("Above"), "rules"),
        (lambda: as_rules([Above("m", 1.0), "x"]), "rules"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_allowed_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_single_rule_is_accepted_where_a_list_is_expected():
    rule = Above("m", 1.0)
    assert as_rules(rule) == [rule] and as_rules(None) == []


def test_divergence_error_carries_its_alerts():
    alerts = _run(Above("m", 0.0), [1.0])
    err = DivergenceError(alerts)
    assert err.alerts == alerts and "m = 1" in str(err)


def test_a_divergence_error_survives_pickling_with_its_message_and_alerts():
    alerts = _run(Above("m", 0.0), [1.0]) + _run(Above("m", 0.0, severity="critical"), [float("inf")], source="other")
    error = pickle.loads(pickle.dumps(DivergenceError(alerts)))  # what a multiprocessing launcher does
    assert type(error) is DivergenceError and error.alerts == alerts
    assert str(error) == str(DivergenceError(alerts)) and "m = 1" in str(error) and "m = inf" in str(error)


def test_a_rule_on_a_template_key_watches_every_layer_and_only_that_figure():
    book = RuleBook("t", user=[Above("grad_norm/layer/{layer}", 1.0)])
    book.check_patterns(["grad_norm/total", "grad_norm/layer/{layer}"])  # accepted before any layer is known
    keys = ["grad_norm/total", "grad_norm/layer/a", "grad_norm/layer/b%2Fc", "grad_norm/weight_norm/a"]
    alerts = book.update(0, keys, np.array([5.0, 2.0, 3.0, 4.0]))
    assert [(a.metric, a.layers) for a in alerts] == [("grad_norm/layer/{layer}", ("a", "b/c"))]


def test_one_rule_firing_on_several_layers_at_one_step_is_one_alert_naming_the_layers():
    layers = [f"blocks.{i}" for i in range(6)]
    keys = ["sa/total"] + [f"sa/sigma1/{layer}" for layer in layers] + [f"sa/rank/{layer}" for layer in layers]
    book = RuleBook("Mon", [NonFinite("sa/sigma1/*"), NonFinite("sa/rank/{layer}"), NonFinite("sa/total")])
    values = np.full(len(keys), np.nan)
    values[1 + 6 + 2] = 1.0  # sa/rank/blocks.2 is finite at step 4
    alerts = book.update(4, keys, values)
    assert [(a.metric, a.layers) for a in alerts] == [  # one per rule and figure, not one per layer
        ("sa/sigma1/{layer}", tuple(layers)), ("sa/rank/{layer}", tuple(layers[:2] + layers[3:])), ("sa/total", ())]
    sigma = alerts[0]
    assert sigma.message == ("Mon: sa/sigma1/{layer} = nan (non-finite) at step 4 in 6 layers: blocks.0 (nan), "
                             "blocks.1 (nan), blocks.2 (nan) and 3 more")
    assert sigma.severity == "critical" and sigma.step == 4 and np.isnan(sigma.value)
    values[1 + 6 + 2] = np.nan  # the one layer that turns NaN later: an alert of its own, on its key
    (late,) = book.update(5, keys, values)
    assert (late.metric, late.layers, late.step) == ("sa/rank/blocks.2", (), 5)
    assert late.message == "Mon: sa/rank/blocks.2 = nan (non-finite) at step 5"


def test_an_alert_naming_layers_survives_a_round_trip_and_an_old_record_loads():
    (alert,) = RuleBook("t", [Above("g/layer/*", 1.0)]).update(2, ["g/layer/a", "g/layer/b"], np.array([2.0, 3.0]))
    assert alert.value == 2.0 and alert.layers == ("a", "b")
    record = alert.as_dict()
    assert record["layers"] == ["a", "b"] and Alert(**record) == alert
    old = {k: v for k, v in record.items() if k != "layers"}  # a checkpoint written before `layers` existed
    assert Alert(**old).layers == ()


def test_a_typo_in_a_rule_lists_each_key_once_sorted_and_suggests_the_closest():
    book = RuleBook("t", user=[Above("grad_norm/totl", 1.0)])
    keys = ["grad_norm/zscore", "grad_norm/total", "grad_norm/layer/fc1", "grad_norm/layer/fc2"]
    with pytest.raises(ValueError) as error:  # the monitor passes its keys and their templates
        book.check_patterns(keys + ["grad_norm/zscore", "grad_norm/total", "grad_norm/layer/{layer}"])
    listed = str(error.value).split("keys: ")[1].split("; did you mean")[0]
    assert listed == "['grad_norm/layer/{layer}', 'grad_norm/total', 'grad_norm/zscore']"
    assert "did you mean 'grad_norm/total'" in str(error.value)  # the closest first


def _book(order):
    rules = [ZScore("m", 3.0, warmup=3), Above("m", 1.0, patience=3), Above("m", 1.0, patience=3, severity="info"),
             Above("m", 2.0), Below("m/*", 0.5, patience=2)]
    return RuleBook("t", user=[rules[i] for i in order])


def _feed(book, steps):
    return [(a.metric, a.step, a.severity, a.threshold) for s in steps
            for a in book.update(s, ["m", "m/a"], np.array([1.0 + 0.1 * s + 5.0 * (s == 6), 0.2]))]


def test_rule_state_is_filed_by_rule_not_by_position_in_the_list():
    whole, first, resumed = _book(range(5)), _book(range(5)), _book([4, 2, 0, 3, 1])
    fired_whole = _feed(whole, range(8))
    _feed(first, range(4))
    resumed.load_state_dict(first.state_dict())  # was: KeyError('baseline'), a ZScore given an Above's state
    assert sorted(_feed(resumed, range(4, 8))) == sorted(f for f in fired_whole if f[1] >= 4)
    assert resumed.state_dict() == whole.state_dict()


def test_a_builtin_rule_whose_patience_is_set_after_the_load_keeps_its_state():
    saved = RuleBook("t", [NonFinite("m", patience=3)])
    saved.update(0, ["m"], np.array([np.nan]))
    loaded = RuleBook("t", [NonFinite("m")])  # a monitor sets the patience at fit start, after the load
    loaded.load_state_dict(saved.state_dict())
    loaded.builtin[0].patience = 3
    assert [a.step for a in loaded.update(1, ["m"], np.array([np.nan])) + loaded.update(2, ["m"], np.array([np.nan]))
            ] == [2]
