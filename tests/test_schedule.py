"""Warmup + decay as a pure function of the optimizer step, and the warmup-overflow policy."""

import pytest

from finllm_pl.schedule import Schedule, resolve_schedule


def test_warmup_starts_above_zero_reaches_peak_then_decays_to_min():
    s = Schedule(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert s.factor(0) == pytest.approx(0.1)  # the first update already moves the weights
    assert s.factor(9) == pytest.approx(1.0)  # warmup ends exactly at the peak
    assert s.factor(10) < 1.0
    assert s.factor(99) == pytest.approx(0.1)  # decay ends at min_lr_ratio on the last step
    factors = [s.factor(i) for i in range(100)]
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_cosine_and_constant():
    cos = Schedule(100, 0, decay="cosine")
    assert cos.factor(49) == pytest.approx(0.5, abs=0.02) and cos.factor(99) == pytest.approx(0.0)
    assert Schedule(100, 5, decay="constant").factor(80) == 1.0


def test_warmup_longer_than_run_is_clamped_loudly_with_the_peak_it_would_reach():
    with pytest.warns(UserWarning, match=r"only reach 6e-05 .*60.0%.*cut to 60 steps"):
        s = resolve_schedule(total_steps=600, warmup_steps=1000, lr=1e-4, policy="clamp")
    assert s.warmup_steps == 60 and s.factor(59) == pytest.approx(1.0)


def test_warmup_overflow_keep_and_error():
    with pytest.warns(UserWarning, match="following the config as written"):
        s = resolve_schedule(600, 10_000, 1e-4, policy="keep")
    assert s.factor(599) == pytest.approx(600 / 10_000)
    with pytest.raises(ValueError, match="warmup_steps=10000"):
        resolve_schedule(600, 10_000, 1e-4, policy="error")


def test_short_warmup_untouched():
    assert resolve_schedule(600, 50, 1e-4).warmup_steps == 50
