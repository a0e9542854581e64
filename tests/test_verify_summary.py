import math

import pytest

from excise.verify.summary import recovery, residual, steps_to_fraction, summarise_attack, worst_case


def test_recovery_is_share_of_removed_accuracy():
    assert recovery(0.6, 0.2, 1.0) == pytest.approx(0.5)
    assert recovery(0.2, 0.2, 1.0) == 0.0
    assert recovery(1.3, 0.2, 1.0) == 1.0  # clipped above
    assert recovery(0.1, 0.2, 1.0) == 0.0  # an attack that hurts recovers nothing


def test_recovery_is_nan_when_nothing_was_removed():
    assert math.isnan(recovery(0.9, 0.98, 1.0))
    assert math.isnan(recovery(0.9, 1.0, 0.9))
    assert math.isnan(recovery(float("nan"), 0.2, 1.0))
    assert recovery(0.5, 0.9, 1.0, min_removed=0.05) == 0.0


def test_residual_is_relative_to_baseline_under_same_attack():
    # Attacked edited 0.55, attacked original 0.85, attacked twin 0.25: (0.55-0.25)/(0.85-0.25) = 0.5.
    assert residual(0.55, 0.85, 0.25) == pytest.approx(0.5)
    assert residual(0.2, 0.85, 0.25) == 0.0
    assert math.isnan(residual(0.5, 0.26, 0.25))


def test_summary_uses_twin_else_chance():
    with_twin = summarise_attack(
        "a",
        edited=0.3,
        original=0.9,
        edited_attacked=0.6,
        original_attacked=0.9,
        chance=0.25,
        twin=0.2,
        twin_attacked=0.3,
    )
    assert with_twin.recovery == pytest.approx(0.5)
    assert with_twin.residual == pytest.approx((0.6 - 0.3) / (0.9 - 0.3))
    without = summarise_attack("a", edited=0.3, original=0.9, edited_attacked=0.6, original_attacked=0.9, chance=0.25)
    assert without.residual == pytest.approx((0.6 - 0.25) / (0.9 - 0.25))
    assert math.isnan(without.twin)


def test_steps_to_fraction():
    steps, accuracy = [0, 2, 4, 6], [0.2, 0.4, 0.65, 0.9]
    assert steps_to_fraction(steps, accuracy, 1.0) == 4  # goal 0.6, first reached at 0.65
    assert steps_to_fraction(steps, accuracy, 1.0, fraction=0.25) == 2  # goal 0.4 exactly
    assert steps_to_fraction(steps, [0.2, 0.3, 0.3, 0.3], 1.0) is None
    assert steps_to_fraction(steps, accuracy, 0.1) is None  # nothing was removed
    with pytest.raises(ValueError, match="fraction"):
        steps_to_fraction(steps, accuracy, 1.0, fraction=0.0)
    with pytest.raises(ValueError, match="equally long"):
        steps_to_fraction([0, 1], [0.2], 1.0)


def test_worst_case_ignores_nan():
    assert worst_case([0.1, float("nan"), 0.4]) == 0.4
    assert math.isnan(worst_case([float("nan")]))
