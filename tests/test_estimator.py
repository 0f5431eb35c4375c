"""The inline cost estimate alone: size classes, the fastest recent run, and never cheap unmeasured."""

from __future__ import annotations

import numpy as np

from daemon.estimator import RECENT_RUNS, CostEstimator, size_class


def cls(rows: int, *widths: int) -> tuple[object, ...]:
    inputs = {f"in{i}": np.zeros((rows, w), np.float32) for i, w in enumerate(widths or (4,))}
    return size_class(inputs, rows)


def test_size_classes_are_rows_in_powers_of_two_and_exact_per_row_shapes() -> None:
    assert cls(1) != cls(2) == cls(3) != cls(4) == cls(7) != cls(8)
    assert cls(1, 16) != cls(1, 4096)  # a long sequence is not a short one
    assert cls(2, 4, 8) != cls(2, 8, 4)
    assert size_class({"x": np.zeros((3, 2, 5), np.float32)}, 3) != size_class({"x": np.zeros((3, 10), np.float32)}, 3)


def test_a_class_is_cheap_only_once_measured_below_the_limit_by_its_fastest_recent_run() -> None:
    est = CostEstimator(0.001)
    assert est.enabled
    assert not est.cheap(cls(1)) and est.estimate(cls(1)) is None  # never measured: a worker measures it first
    est.note(cls(1), 0.004)
    assert not est.cheap(cls(1))
    est.note(cls(1), 0.0005)  # one uncontended run shows the real cost
    est.note(cls(1), 0.003)
    assert est.cheap(cls(1)) and est.estimate(cls(1)) == 0.0005
    assert not est.cheap(cls(2))  # other classes are judged on their own runs


def test_only_the_recent_runs_count_so_a_model_that_slowed_down_leaves_the_loop() -> None:
    est = CostEstimator(0.001)
    est.note(cls(1), 0.0001)
    for _ in range(RECENT_RUNS - 1):
        est.note(cls(1), 0.01)
    assert est.cheap(cls(1))
    est.note(cls(1), 0.01)  # the fast run is now older than the last RECENT_RUNS
    assert not est.cheap(cls(1)) and est.estimate(cls(1)) == 0.01


def test_a_zero_limit_is_off() -> None:
    est = CostEstimator(0.0)
    est.note(cls(1), 0.0)
    assert not est.enabled and not est.cheap(cls(1))
