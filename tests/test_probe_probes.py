"""Linear probes: they find a planted direction, fail on the control task, and transfer as they should."""

import numpy as np
import pytest
from scipy.linalg import orth
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_info, threadpool_limits

import probe.probes as probes
from probe.probes import (
    LayerwiseProbe,
    control_labels,
    evaluate_probe,
    selectivity,
    wilson_interval,
)


def planted(n_entities=60, repeats=3, d=32, layers=3, seed=0):
    """Activations (n, layers, d) where only layer 1 holds the class of each entity, along one direction per class."""
    rng = np.random.default_rng(seed)
    entities = np.repeat(np.arange(n_entities), repeats)
    classes = rng.integers(0, 3, n_entities)[entities]
    X = rng.standard_normal((len(entities), layers, d))
    directions = rng.standard_normal((3, d))
    X[:, 1] += 3 * directions[classes]
    return X, classes, entities


def accuracy(results, layer, target="task", scored_on="self"):
    row = results[(results.layer == layer) & (results.target == target) & (results.scored_on == scored_on)]
    return float(row.accuracy.iloc[0])


def test_probe_recovers_a_planted_direction_and_fails_on_the_control_task():
    X, y, entities = planted()
    results = evaluate_probe(X, y, entities, folds=5)
    chance = float(results.chance.iloc[0])
    assert accuracy(results, 1) > 0.95
    assert accuracy(results, 0) < chance + 0.15 and accuracy(results, 2) < chance + 0.15
    assert accuracy(results, 1, "control") < chance + 0.15
    selective = selectivity(results).set_index("layer").selectivity
    # On noise, folds grouped by entity leave each test fold's class balance off the training folds': a probe
    # that learns the training majority falls a little below chance there, the control task too.
    assert selective[1] > 0.5 and abs(selective[0]) < 0.25


def test_intervals_contain_the_accuracy():
    X, y, entities = planted()
    results = evaluate_probe(X, y, entities, folds=3)
    assert ((results.ci_low <= results.accuracy) & (results.accuracy <= results.ci_high)).all()
    assert wilson_interval(50, 100)[0] < 0.5 < wilson_interval(50, 100)[1]


def test_transfer_holds_on_the_same_activations_and_falls_where_the_direction_is_gone():
    X, y, entities = planted()
    scrambled = X.copy()
    scrambled[:, 1] = np.random.default_rng(1).standard_normal(X[:, 1].shape)
    results = evaluate_probe(X, y, entities, transfer={"same": X, "scrambled": scrambled}, folds=5)
    assert accuracy(results, 1, scored_on="same") == accuracy(results, 1)
    assert accuracy(results, 1, scored_on="scrambled") < float(results.chance.iloc[0]) + 0.15
    assert set(results[results.target == "control"].scored_on) == {"self"}


def test_control_labels_give_each_entity_one_label_from_the_same_set():
    rng = np.random.default_rng(0)
    entities = np.repeat(np.arange(40), 3)
    labels = rng.choice(["a", "b", "c"], 40)[entities]
    control = control_labels(labels, entities, seed=1)
    for entity in range(40):
        assert len(set(control[entities == entity])) == 1
    assert set(control) <= set(labels)
    assert not np.array_equal(control, labels)


def test_layerwise_probe_is_a_scikit_learn_estimator():
    X, y, _ = planted()
    probe = clone(LayerwiseProbe(C=0.5)).fit(X, y)
    assert probe.get_params()["C"] == 0.5
    assert probe.predict(X).shape == (len(y), 3)
    assert probe.score(X, y).shape == (3,)
    assert [w.shape for w in probe.directions()] == [(3, 32)] * 3


def test_multiclass_directions_span_the_differences_of_the_classes():
    # Three classes are read through two differences. Fitted on float32 activations, as probe.collect keeps them,
    # the three weight vectors also span the rounding of a shift common to all three: a third, spurious direction.
    X, y, _ = planted()
    X = X.astype(np.float32)
    multiclass = LayerwiseProbe().fit(X, y).directions()[1]
    assert np.allclose(multiclass.sum(axis=0), 0, atol=1e-6 * np.abs(multiclass).max())
    assert orth(multiclass.T).shape[1] == 2
    binary = LayerwiseProbe().fit(X, y == 0).directions()[1]
    assert binary.shape == (1, 32) and np.linalg.norm(binary) > 0.1


def blas_threads() -> set[int]:
    return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


def test_probes_fit_on_one_blas_thread_and_leave_the_setting_as_it_was(monkeypatch):
    # Several BLAS threads on a probe's small products are many times slower than one (benchmarks/probe_fit.py).
    seen = []
    fit = LogisticRegression.fit

    def watched(self, *args, **kwargs):
        seen.append(blas_threads())
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", watched)
    X, y, _ = planted()
    with threadpool_limits(limits=2, user_api="blas"):
        LayerwiseProbe().fit(X, y)
        assert blas_threads() == {2}
    assert seen == [{1}] * X.shape[1]


def test_rows_of_one_prompt_share_a_fold_so_identical_copies_read_as_chance():
    # Two conditions whose activations are the same prompt's, identical at layer 0 (before an aligner's first
    # layer) and apart at layer 1: the form probe's situation.
    rng = np.random.default_rng(0)
    n, d = 60, 16
    same = rng.standard_normal((n, 1, d))
    conditions = [np.concatenate([same, same + offset], axis=1) for offset in (0.0, 3.0)]
    X = np.concatenate(conditions)
    labels, prompts = np.repeat(["base", "aligned"], n), np.tile(np.arange(n), 2)
    grouped = evaluate_probe(X, labels, prompts, folds=5, groups=prompts)
    assert accuracy(grouped, 0) == 0.5  # each prompt's two identical rows get one prediction: one right, one wrong
    assert accuracy(grouped, 1) > 0.95
    # Split by rows, a test row's identical copy is in training with the other label: below chance.
    assert accuracy(evaluate_probe(X, labels, prompts, folds=5, groups=np.arange(len(labels))), 0) < 0.3


def test_an_entitys_rows_never_fall_on_both_sides_and_the_control_task_stays_at_chance(monkeypatch):
    """A country asked in two wordings: its two rows are near twins. Grouped by entity, the control task (one
    random label per entity) cannot be read off the twin, and sits at chance on every layer."""
    X, y, entities = planted(n_entities=80, repeats=2, layers=2)
    X[1::2] = X[::2] + 0.01 * np.random.default_rng(1).standard_normal(X[::2].shape)  # twins
    seen = []
    real_split = probes.StratifiedGroupKFold.split

    def recording(self, X_, y_, groups):
        for train, test in real_split(self, X_, y_, groups):
            seen.append((set(groups[train]), set(groups[test])))
            yield train, test

    monkeypatch.setattr(probes.StratifiedGroupKFold, "split", recording)
    results = evaluate_probe(X, y, entities, folds=5)
    assert seen and all(not (train & test) for train, test in seen)
    control = results[(results.target == "control") & (results.scored_on == "self")]
    assert (control.accuracy < control.chance + 0.15).all() and not control.above_chance.any()
    assert results[(results.target == "task") & (results.layer == 1)].above_chance.all()


def test_a_class_too_rare_for_the_folds_is_left_out_with_its_entities():
    X, y, entities = planted()
    y = y.copy()
    y[:2] = 7  # one entity's rows in a class of its own: fewer rows than folds
    results = evaluate_probe(X, y, entities, folds=5)
    assert (results.n == len(y) - 2).all() and accuracy(results, 1) > 0.95


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert probes.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
