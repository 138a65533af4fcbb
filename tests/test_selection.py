"""The knob selection is blind to the dropped classes by construction (experiment/selection.py), with the correction
shift fitted, not fixed: the issue's counterexample (identical logits on the labelled set and the pool give an
identical criterion, where the old criterion rewarded recognising dropped-class images), the choice unchanged when
the pool's labels change, and the plan of a real split: disjoint sets, no dropped class in the labelled one."""

from __future__ import annotations

import numpy as np
import pytest

from extkd_jax.data import prepare_datasets
from extkd_jax.data.splits import selection_indices
from extkd_jax.experiment import bias_correction as bc
from extkd_jax.experiment.results import GridPoint, RunResult
from extkd_jax.experiment.selection import SelectionPlan, choose, criterion, criterion_of_plan, kd_temperature
from tests.tiny import tiny_config, write_tiny_npz

C, DROPPED, N = 4, 2, 600


def _old_criterion(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> float:
    """The criterion before this change: the shift fitted on every validation image, the accuracy read on the
    seen-class subset of the same images."""
    shifts = bc.shifts_to_match_teacher(student, teacher, [DROPPED])
    seen = labels != DROPPED
    return float((bc.shift_logits(student[seen], [DROPPED], shifts).argmax(-1) == labels[seen]).mean())


def _setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=N)
    teacher = np.eye(C)[labels] * 5.0 + rng.normal(size=(N, C)) * 0.5
    # a student that never saw the dropped class: seen images right with noise, the dropped class's logit low
    student = np.eye(C)[labels] * 3.0 + rng.normal(size=(N, C))
    student[:, DROPPED] = -1.0 + rng.normal(size=N)
    dropped = labels == DROPPED
    looks_seen = rng.choice([c for c in range(C) if c != DROPPED], size=int(dropped.sum()))
    student[dropped] = np.eye(C)[looks_seen] * 3.0 + rng.normal(size=(int(dropped.sum()), C))
    student[dropped, DROPPED] = -1.0 + rng.normal(size=int(dropped.sum()))  # dropped images look like seen ones
    return labels, teacher, student


def test_identical_logits_on_the_labelled_set_and_the_pool_give_an_identical_criterion():
    """Student A recognises the dropped-class images that are in neither set (the labelled candidates it loses);
    B does not. The old criterion rewards A: each image recognised frees one seen image from the shift. The new one
    cannot see them."""
    labels, teacher, b = _setup()
    plan = SelectionPlan.of(labels, C, [DROPPED], 0.5, seed=3)
    a = b.copy()
    outside = np.setdiff1d(np.arange(N), np.concatenate([plan.labelled, plan.pool]))
    assert len(outside) > 30 and (labels[outside] == DROPPED).all()  # the candidates' dropped-class images
    a[outside, DROPPED] = 6.0  # A recognises every one of them
    old_a, old_b = _old_criterion(a, teacher, labels), _old_criterion(b, teacher, labels)
    assert old_a > old_b + 0.02  # the exploit pays under the old protocol
    new_a, new_b = criterion_of_plan(plan, a, teacher), criterion_of_plan(plan, b, teacher)
    assert new_a == new_b
    # and the shift is fitted, not fixed: it moves the criterion
    unshifted = float((b[plan.labelled].argmax(-1) == labels[plan.labelled]).mean())
    assert new_b != unshifted and bc.shifts_to_match_teacher(b[plan.pool], teacher[plan.pool], [DROPPED])[0] > 1.0
    # whatever labels the pool's images carry: the criterion takes none of them
    relabelled = labels.copy()
    relabelled[plan.pool] = np.random.default_rng(1).permutation(labels[plan.pool])
    again = SelectionPlan.of(relabelled, C, [DROPPED], 0.5, seed=3)
    np.testing.assert_array_equal(again.labelled, plan.labelled)
    np.testing.assert_array_equal(again.pool, plan.pool)
    assert criterion_of_plan(again, a, teacher) == new_a
    assert _old_criterion(b, teacher, relabelled) != old_b  # the old one read them


def test_the_chosen_knob_does_not_move_when_the_pools_labels_change():
    """Three grid values' students: the choice on the new criterion is the same under any labelling of the pool
    (here: permuted, and every pool image called the dropped class)."""
    labels, teacher, base = _setup(seed=2)
    rng = np.random.default_rng(5)
    students = {v: base + rng.normal(size=base.shape) * s for v, s in ((0.5, 0.3), (1.0, 1.5), (2.0, 0.8))}

    def chosen(val_labels):
        plan = SelectionPlan.of(val_labels, C, [DROPPED], 0.5, seed=7)
        points = [
            GridPoint(
                v,
                RunResult(
                    "kd", 9, "w", v, 0, 0, 0, 0, 0, 0, 0, [], criterion_of_plan(plan, z, teacher), [], [], [], 0, 1
                ),
            )
            for v, z in students.items()
        ]
        return choose(points, default=1.0), [p.run.val_seen_acc_corrected for p in points]

    plan = SelectionPlan.of(labels, C, [DROPPED], 0.5, seed=7)
    reference = chosen(labels)
    for relabel in (lambda p: np.random.default_rng(9).permutation(labels[p]), lambda p: np.full(len(p), DROPPED)):
        changed = labels.copy()
        changed[plan.pool] = relabel(plan.pool)
        assert chosen(changed) == reference
    assert len(set(reference[1])) == 3  # the values are told apart: the choice is not a tie


def test_the_criterion_is_a_function_of_its_arguments_only():
    labels, teacher, student = _setup(seed=4)
    labelled, pool = np.arange(0, 200), np.arange(300, 600)
    seen = labelled[labels[labelled] != DROPPED]
    value = criterion(student[seen], labels[seen], student[pool], teacher[pool], [DROPPED])
    shifts = bc.shifts_to_match_teacher(student[pool], teacher[pool], [DROPPED])
    expected = (bc.shift_logits(student[seen], [DROPPED], shifts).argmax(-1) == labels[seen]).mean()
    assert value == pytest.approx(expected)
    assert np.isnan(criterion(student[:0], labels[:0], student[pool], teacher[pool], [DROPPED]))


def test_selection_indices_are_disjoint_seeded_and_refuse_bad_fractions():
    labels = np.random.default_rng(0).integers(0, 5, size=101)
    labelled, pool = selection_indices(labels, 5, (1, 3), 0.4, seed=2)
    assert len(pool) == 101 - 40 and not np.intersect1d(labelled, pool).size
    assert not np.isin(labels[labelled], [1, 3]).any() and np.isin(labels[pool], [1, 3]).any()
    again = selection_indices(labels, 5, (1, 3), 0.4, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip((labelled, pool), again, strict=True))
    assert not np.array_equal(selection_indices(labels, 5, (1, 3), 0.4, seed=3)[1], pool)
    for bad in (0.0, 1.0, "half"):
        with pytest.raises(ValueError, match="labelled_fraction"):
            selection_indices(labels, 5, (1,), bad, seed=0)


def test_the_experiments_plan_keeps_dropped_classes_out_of_the_labelled_set(tmp_path):
    """The selection plan of a real split (the reproduce code path): labelled and pool partition validation
    positions, disjoint; no dropped class labelled; no labelled image in the transfer set; recorded as computed."""
    from extkd_jax.experiment.reproduce import selection_plan

    write_tiny_npz(tmp_path)
    config = tiny_config(tmp_path, **{"data.drop_classes": (3,), "data.val_size": 80})
    datasets = prepare_datasets(config.data)
    plan = selection_plan(config, datasets)
    summary = plan.summary()
    assert summary["overlap"] == 0 and summary["dropped_in_labelled"] == 0
    assert summary["labelled_size"] + summary["pool_size"] < 80  # the candidates' dropped images are in neither
    assert summary["pool_size"] == 40
    assert not np.isin(datasets.val.labels[plan.labelled], [3]).any()
    assert np.isin(datasets.val.labels[plan.pool], [3]).any()  # dropped-class images enter, unlabelled, in the pool
    assert not np.intersect1d(datasets.plan.val[plan.labelled], datasets.plan.transfer).size
    # the summary is computed from the sets: a plan that leaks says so
    leaky = SelectionPlan(plan.labelled, plan.labelled[:3], np.full(len(plan.labelled), 3), (3,))
    assert leaky.summary()["overlap"] == 3 and leaky.summary()["dropped_in_labelled"] == len(plan.labelled)


def test_every_method_runs_at_kds_temperature_whatever_the_size_of_kds_grid(tmp_path):
    """Found in the `mnist_omit3:long` re-run: with KD's grid narrowed to one value (10), KD ran at 10 and Extended-KD
    at the preset's 20. One value is KD's temperature; a longer grid is decided by KD's selection runs."""
    config = tiny_config(tmp_path, **{"loss.temperature": 20.0})
    config.reproduce.methods = ("kd", "extended_kd")
    calls = []

    def select(method, temperature):
        calls.append((method, temperature))
        return [], {}  # every grid value diverged

    config.reproduce.grid.kd = (10.0,)
    one = kd_temperature(config, config.reproduce.methods, select)
    assert (one["value"], one["methods"], calls) == (10.0, ["extended_kd"], [])
    config.reproduce.grid.kd = ()  # no grid: the configured temperature, the one KD runs at
    assert kd_temperature(config, config.reproduce.methods, select)["value"] == 20.0
    config.reproduce.grid.kd = (2.0, 4.0)  # every grid value diverged: the configured one, said so
    longer = kd_temperature(config, config.reproduce.methods, select)
    assert (longer["value"], calls) == (20.0, [("kd", None)]) and "diverged" in longer["source"]
    config.reproduce.methods = ("kd",)
    assert kd_temperature(config, ("kd",), select) == {}
